"""Every name a sweep writes, built and parsed in one place (SPEC's layout; pure, no I/O).

A sweep's folder in the store::

    <store>/<sweep>/sweep.yaml          ID  COORDINATION  STOP
                    runs/<run id>/      (below)
                    done/<run id>       done/.complete
                    resets/<run id>@<13-digit ms>-<8 hex>
                    trash/<run id>-<YYYYmmdd-HHMMSS>

and a run's folder::

    params.json  DONE  metrics.jsonl  metrics/attempt-<n>.jsonl  logs/attempt-<n>.log
    attempts/<n>.json|.started|.finished|.diverged|.oom
    rollbacks/<k>.json  rollbacks/<k>.rank-<rank>.pt
    checkpoints/ckpt-a<n>-<seq>-step<step>.pt|.json
    checkpoints/ckpt-a<n>-<seq>-step<step>.dcp/.metadata|__<rank>_<i>.distcp|rank-<rank>.pt
    lease/<generation>.json|.beat|.released   lease/<generation>.<nonce>.claim
    trainer/checkpoint-<step>/sweeprun-seal.json
    trainer/.sweeprun-rejected/checkpoint-<step>-a<n>[.<k>]

Every name here is read back from a store anyone may write to, and several readers
(the launcher's attempt scan, the training side's fence, ``status``, ``show``, ``gc``)
must agree on what a name says. So each is parsed by one pattern of one family: ASCII
digits only (``[0-9]``, never ``\\d``, which takes ``'²'`` and ``'١'``), at most 18 of
them (:data:`sweeprun.numbers.MAX_DIGITS`: always fits SQLite and C), matched whole
(``fullmatch``: ``$`` would take a trailing newline). A number sweeprun writes unpadded
(an attempt, a Trainer step) is parsed only in the form it is written (no leading zero),
so build and parse are inverses and ``attempt-07.log`` is nobody's attempt; a counter
written zero-padded (a checkpoint's seq and step, a lease generation) is parsed by its
width. Builders refuse a number its parser would refuse.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..numbers import MAX_DIGITS

# -- the grammar ---------------------------------------------------------------------------

#: The largest attempt (or step) a name can carry: 18 digits.
NUMBER_MAX = 10**MAX_DIGITS - 1
#: An attempt: 1 and up, written unpadded.
_POSITIVE = rf"[1-9][0-9]{{0,{MAX_DIGITS - 1}}}"
#: A step in a Trainer folder's name, as the Trainer writes it: 0 and up, unpadded.
_NATURAL = rf"(?:0|{_POSITIVE})"
#: A counter written zero-padded (a checkpoint's seq and step): any 1 to 18 digits.
_PADDED = rf"[0-9]{{1,{MAX_DIGITS}}}"
#: A lease generation: zero-padded to 8 digits, at most 12 (see :data:`GENERATION_MAX`).
_GENERATION = r"[0-9]{8,12}"
#: A lease claim's nonce: lowercase hex.
_NONCE = r"[0-9a-f]+"


def _match(pattern: re.Pattern[str], name: object) -> re.Match[str] | None:
    return pattern.fullmatch(name) if isinstance(name, str) else None


def _number(value: int, low: int = 1, high: int = NUMBER_MAX) -> int:
    """``value`` when a name may carry it; a ``ValueError`` otherwise (a bug, not input)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{value!r} is not a number a sweeprun name carries ({low} to {high})")
    return value


# -- the sweep's folder ----------------------------------------------------------------------

SPEC = "sweep.yaml"
RUNS = "runs"
#: The sweep's id, created once (:func:`sweep_id_text`).
SWEEP_ID = "ID"
#: How the sweep's workers are kept apart (:mod:`sweeprun.fleet`).
COORDINATION = "COORDINATION"
#: The latest stop request (:mod:`sweeprun.fleet`).
STOP = "STOP"
#: The done index: one entry per finished run, named by its run id.
DONE_INDEX = "done"
#: In ``done/``: every run done before it was written has an entry. No run id starts with a dot.
DONE_INDEX_COMPLETE = ".complete"
#: One marker per reset run (:func:`reset_marker`).
RESETS = "resets"
#: Where ``reset`` moves a run's folder (:func:`trash_name`).
TRASH = "trash"
#: The output of the sweep's SLURM tasks (:mod:`sweeprun.slurm`), when the store is a path.
SLURM_LOGS = "slurm"
#: The jobs submitted for the sweep with ``launch --on slurm`` (:mod:`sweeprun.slurm`).
SLURM_RECORD = "SLURM"
#: Held, create-only, by whoever is submitting the sweep's SLURM jobs right now.
SLURM_SUBMITTING = "SLURM.submitting"
#: ``sweeprun report``'s page: one self-contained HTML file, replaced by each report.
REPORT = "report.html"
#: The prefix of every temp file and folder sweeprun makes: never a run, an entry or a marker.
TEMP_PREFIX = ".tmp-"

_SWEEP_ID = re.compile(r"[0-9a-f]{32}")


def is_run_id(name: object) -> bool:
    """Is ``name`` one safe path segment for a run's folder (no ``/``, not ``.`` or ``..``)?"""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def is_done_index_entry(name: str) -> bool:
    """Is ``name`` (in ``done/``) a run's entry, not ``.complete`` or a temp file? Run ids
    never start with a dot (:func:`sweeprun.identity.run_id` strips them)."""
    return is_run_id(name) and not name.startswith(".")


def sweep_id_text(ident: str) -> bytes:
    """The content of ``ID``: 32 lowercase hex digits (a uuid4's) and a newline."""
    if not _match(_SWEEP_ID, ident):
        raise ValueError(f"{ident!r} is not a sweep id")
    return (ident + "\n").encode()


def parse_sweep_id(raw: bytes) -> str | None:
    """The id in an ``ID`` file's bytes, surrounding whitespace allowed; ``None`` for anything else."""
    ident = raw.decode(errors="replace").strip()
    return ident if _match(_SWEEP_ID, ident) else None


#: A reset marker's token: milliseconds since the epoch (13 digits), then 8 random hex digits.
_RESET_TOKEN = re.compile(r"(?P<ms>[0-9]{13})-[0-9a-f]{8}")


def reset_token(stamp_ms: int, random_hex: str) -> str:
    """``<13-digit ms>-<8 hex>``: tokens of one run sort as their stamps do."""
    token = f"{_number(stamp_ms, 0, 10**13 - 1):013d}-{random_hex}"
    if not _match(_RESET_TOKEN, token):
        raise ValueError(f"{random_hex!r} is not 8 lowercase hex digits")
    return token


def reset_token_ms(token: str) -> int | None:
    """The stamp of a reset token; ``None`` when ``token`` is not one."""
    m = _match(_RESET_TOKEN, token)
    return int(m["ms"]) if m else None


def reset_marker(run_id: str, token: str) -> str:
    """``<run id>@<token>``: the name of a reset marker in ``resets/``."""
    if not is_run_id(run_id) or reset_token_ms(token) is None:
        raise ValueError(f"no reset marker for run {run_id!r} with token {token!r}")
    return f"{run_id}@{token}"


def parse_reset_marker(name: str) -> tuple[str, str] | None:
    """``(run id, token)`` of a marker's name; ``None`` for a temp file or anything else."""
    run_id, sep, token = name.rpartition("@")
    if not sep or name.startswith(".") or not is_run_id(run_id) or reset_token_ms(token) is None:
        return None  # a dot: a temp file of the marker's atomic write
    return run_id, token


def trash_name(run_id: str, at_s: float) -> str:
    """``<run id>-<YYYYmmdd-HHMMSS>`` (UTC): where ``reset`` moves a run's folder in ``trash/``."""
    return f"{run_id}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(at_s))}"


def trash_deleting_name(run_id: str, pid: int) -> str:
    """A folder ``reset --delete`` renames into ``trash/`` before removing it (a temp name)."""
    return f"{TEMP_PREFIX}deleting-{run_id}-{pid}"


# -- a run's folder --------------------------------------------------------------------------

PARAMS = "params.json"
#: The run is finished: a regular file (never a link, a folder or a pipe), written last.
DONE = "DONE"
#: ``metrics.jsonl``, appended in place (local disk).
METRICS = "metrics.jsonl"
#: ``metrics/attempt-<n>.jsonl``: one object per attempt (object stores).
METRICS_PARTS = "metrics"
LOGS = "logs"
ATTEMPTS = "attempts"
CHECKPOINTS = "checkpoints"
LEASE = "lease"
#: A Hugging Face Trainer's ``output_dir`` inside a run folder (:mod:`sweeprun.training.sealed`).
TRAINER = "trainer"
#: Which tracker run the run logs to (:mod:`sweeprun.trackers`): ``{"kind", "run", ...}``.
TRACKER = "tracker.json"
#: TensorBoard's event files of the run (``tracker="tensorboard"``).
TENSORBOARD = "tensorboard"
#: The folder W&B makes for its files in the run's folder (``tracker="wandb"``, local disk).
WANDB = "wandb"

_METRICS_PART = re.compile(rf"attempt-(?P<n>{_POSITIVE})\.jsonl")
_LOG = re.compile(rf"attempt-(?P<n>{_POSITIVE})\.log")
_ATTEMPT_RECORD = re.compile(rf"(?P<n>{_POSITIVE})\.(?P<kind>json|started|finished|diverged|oom)")

#: ``diverged`` and ``oom``: how the training API ended an attempt that the launcher must
#: not count as an ordinary failure (:mod:`sweeprun.rollbacks`).
RecordKind = Literal["json", "started", "finished", "diverged", "oom"]
#: ``<n>.started`` holds ``{"attempt", "step"}``; a multi-rank run's adds ``"world_size"``, and a
#: resume at another world size ``"resumed": {"checkpoint", "step", "world_size" (the saving
#: run's), "approximate": ["rng", "data position"]}`` (:mod:`sweeprun.training.restore`).
STARTED_RESUMED = "resumed"


def metrics_part_name(attempt: int) -> str:
    return f"attempt-{_number(attempt)}.jsonl"


def parse_metrics_part(name: str) -> int | None:
    """The attempt of a name in ``metrics/``; ``None`` for any other name."""
    m = _match(_METRICS_PART, name)
    return int(m["n"]) if m else None


def log_name(attempt: int) -> str:
    return f"attempt-{_number(attempt)}.log"


def parse_log(name: str) -> int | None:
    """The attempt of a name in ``logs/``; ``None`` for any other name."""
    m = _match(_LOG, name)
    return int(m["n"]) if m else None


def attempt_record_name(attempt: int, kind: RecordKind = "json") -> str:
    """``<n>.json`` (the launcher's start), ``<n>.started`` and ``<n>.finished`` (the training API's)."""
    if kind not in ("json", "started", "finished", "diverged", "oom"):
        raise ValueError(f"{kind!r} is not an attempt record")
    return f"{_number(attempt)}.{kind}"


def parse_attempt_record(name: str) -> tuple[int, RecordKind] | None:
    """``(attempt, kind)`` of a name in ``attempts/``; ``None`` for any other name."""
    m = _match(_ATTEMPT_RECORD, name)
    return (int(m["n"]), m["kind"]) if m else None  # type: ignore[return-value]


# -- rollbacks (sweeprun.rollbacks) ---------------------------------------------------------

#: ``rollbacks/``: one record per loss-spike rollback of the run, numbered from 1.
ROLLBACKS = "rollbacks"
_ROLLBACK = re.compile(rf"(?P<k>{_POSITIVE})\.json")


def rollback_name(number: int) -> str:
    """``<k>.json``: rollback ``k``'s record, written create-only, last (its commit)."""
    return f"{_number(number)}.json"


def parse_rollback(name: str) -> int | None:
    """The number of a rollback record's name; ``None`` for any other name."""
    m = _match(_ROLLBACK, name)
    return int(m["k"]) if m else None


def rollback_data_name(number: int, rank: int) -> str:
    """``<k>.rank-<rank>.pt``: where one rank's data position was when rollback ``k`` began."""
    return f"{_number(number)}.rank-{_number(rank, 0)}.pt"


# -- checkpoints -----------------------------------------------------------------------------

_STEM = rf"ckpt-a(?P<attempt>{_POSITIVE})-(?P<seq>{_PADDED})-step(?P<step>{_PADDED})"
_CHECKPOINT = re.compile(rf"{_STEM}\.(?P<ext>pt|json|dcp)")
#: The stem inside a temp file's name (the writer's ``.tmp-<stem>-<random>.pt`` and
#: ``.tmp-<stem>-pruned.pt``; the store's ``.tmp-<random>-<stem>.json``): the stem ends there.
_STEM_IN_TEMP = re.compile(rf"{_STEM}(?=-|\.(?:pt|json)\Z)")


@dataclass(frozen=True, order=True)
class CheckpointName:
    """``ckpt-a<attempt>-<seq>-step<step>.<pt|json>``, parsed; ordering is newest-last by
    (attempt, seq), compared as integers: the zero padding is for people listing the folder."""

    attempt: int
    seq: int
    step: int

    def __post_init__(self) -> None:
        _number(self.attempt)
        _number(self.seq, 0)
        _number(self.step, 0)

    @property
    def stem(self) -> str:
        return f"ckpt-a{self.attempt}-{self.seq:08d}-step{self.step:010d}"

    @property
    def data(self) -> str:
        return self.stem + ".pt"

    @property
    def manifest(self) -> str:
        return self.stem + ".json"

    @property
    def shards(self) -> str:
        """The folder of a sharded checkpoint (a multi-rank run's): its manifest is :attr:`manifest`."""
        return self.stem + ".dcp"

    @property
    def temp_prefix(self) -> str:
        """What a streamed write of the data file names its temp file with."""
        return f"{TEMP_PREFIX}{self.stem}-"

    @property
    def pruned(self) -> str:
        """The temp name a data file is renamed to before it is unlinked in the background."""
        return f"{TEMP_PREFIX}{self.stem}-pruned.pt"

    @classmethod
    def parse(cls, name: str) -> CheckpointName | None:
        """A data file's, a manifest's or a shards folder's name; ``None`` for any other name."""
        m = _match(_CHECKPOINT, name)
        return cls(int(m["attempt"]), int(m["seq"]), int(m["step"])) if m else None

    @classmethod
    def in_temp(cls, name: str) -> CheckpointName | None:
        """The checkpoint a temp file (``.tmp-...``) was written for; ``None`` if it names none."""
        if not name.startswith(TEMP_PREFIX):
            return None
        m = _STEM_IN_TEMP.search(name)
        return cls(int(m["attempt"]), int(m["seq"]), int(m["step"])) if m else None


# -- inside a sharded checkpoint's folder (``<stem>.dcp/``) ------------------------------------
#
# A multi-rank run's checkpoint: torch.distributed.checkpoint (DCP) writes ``.metadata`` and
# each rank's tensor shards (``__<rank>_<i>.distcp``); sweeprun writes each rank's own state
# (RNG, sampler, extras: ``rank-<rank>.pt``). Its manifest (``<stem>.json`` beside the folder)
# lists every file with its size and hash and is written last, by rank 0, once all ranks
# reported: a folder without one is a save cut short and is never read.

#: DCP's metadata file, written by its coordinator (rank 0) once every rank's write returned.
DCP_METADATA = ".metadata"
_RANK = rf"(?:0|{_POSITIVE})"
_SHARD_FILE = re.compile(rf"__(?P<rank>{_RANK})_(?P<i>{_RANK})\.distcp")
_RANK_STATE = re.compile(rf"rank-(?P<rank>{_RANK})\.pt")


def rank_state_name(rank: int) -> str:
    """``rank-<rank>.pt``: one rank's own state in a sharded checkpoint's folder."""
    return f"rank-{_number(rank, 0)}.pt"


def parse_rank_state(name: str) -> int | None:
    """The rank of a ``rank-<rank>.pt`` name; ``None`` for any other name."""
    m = _match(_RANK_STATE, name)
    return int(m["rank"]) if m else None


def shard_file_rank(name: str) -> int | None:
    """The rank that wrote a DCP shard file (``__<rank>_<i>.distcp``); ``None`` for any other name."""
    m = _match(_SHARD_FILE, name)
    return int(m["rank"]) if m else None


# -- store leases ----------------------------------------------------------------------------

#: The highest generation a lease name can carry (12 digits). A longer number (a name made by
#: hand, near 2**63) is not one of ours: counting on from it would overflow the ledger.
GENERATION_MAX = 10**12 - 1
_LEASE = re.compile(
    rf"(?P<gen>{_GENERATION})\.(?:(?P<kind>json|beat|released)|(?P<nonce>{_NONCE})\.claim)")
_LEASE_TOO_LONG = re.compile(r"[0-9]{13,}\..*", re.DOTALL)

LeaseKind = Literal["json", "beat", "released", "claim"]


@dataclass(frozen=True)
class LeaseName:
    """A file of a run's ``lease/`` folder: ``<generation>.json`` (the holder's record),
    ``.beat``, ``.released``, or ``<generation>.<nonce>.claim``."""

    generation: int
    kind: LeaseKind
    nonce: str | None = None

    def __str__(self) -> str:
        gen = f"{_number(self.generation, 0, GENERATION_MAX):08d}"
        if self.kind == "claim":
            if not re.fullmatch(_NONCE, self.nonce or ""):
                raise ValueError(f"{self.nonce!r} is not a claim's nonce (lowercase hex)")
            return f"{gen}.{self.nonce}.claim"
        if self.kind not in ("json", "beat", "released"):
            raise ValueError(f"{self.kind!r} is not a lease file")
        return f"{gen}.{self.kind}"

    @classmethod
    def parse(cls, name: str) -> LeaseName | None:
        m = _match(_LEASE, name)
        if not m:
            return None
        if m["nonce"]:
            return cls(int(m["gen"]), "claim", m["nonce"])
        return cls(int(m["gen"]), m["kind"])  # type: ignore[arg-type]


def lease_name(generation: int, kind: LeaseKind = "json", nonce: str | None = None) -> str:
    return str(LeaseName(generation, kind, nonce))


def lease_generation_too_long(name: str) -> bool:
    """A name that would be a lease file but for a generation of more than 12 digits."""
    return _match(_LEASE_TOO_LONG, name) is not None


# -- Trainer folders ---------------------------------------------------------------------------

#: The seal of a Trainer checkpoint folder (:mod:`sweeprun.training.sealed`), written last.
SEAL = "sweeprun-seal.json"
#: In a Trainer checkpoint folder: sweeprun's own file (RNG replay, loss bookkeeping).
HF_RNG_FILE = "sweeprun-rng.pt"


def hf_rng_file(rank: int | None = None) -> str:
    """:data:`HF_RNG_FILE` of a single process, ``sweeprun-rng-<rank>.pt`` of one rank of
    several (each rank's RNGs and running loss are its own, as the Trainer's
    ``rng_state_<rank>.pth``)."""
    return HF_RNG_FILE if rank is None else f"sweeprun-rng-{_number(rank, 0)}.pt"


_HF_RNG_FILE = re.compile(rf"sweeprun-rng(?:-{_NATURAL})?\.pt")


def is_hf_rng_file(name: str) -> bool:
    """Whether ``name`` is :func:`hf_rng_file` of one process or of any rank."""
    return _match(_HF_RNG_FILE, name) is not None


#: In ``trainer/``: where cut-short or damaged folders are set aside (never deleted).
REJECTED = ".sweeprun-rejected"
#: A Trainer checkpoint folder's name is this and its step, as the Trainer writes it.
CHECKPOINT_FOLDER_PREFIX = "checkpoint-"
_CHECKPOINT_FOLDER = re.compile(rf"checkpoint-(?P<step>{_NATURAL})")
_SET_ASIDE = re.compile(rf"checkpoint-(?P<step>{_NATURAL})-a(?P<attempt>{_POSITIVE})(?:\.{_POSITIVE})?")


def checkpoint_folder(step: int) -> str:
    """``checkpoint-<step>``: the Trainer's name for its folder of that step."""
    return f"{CHECKPOINT_FOLDER_PREFIX}{_number(step, 0)}"


def parse_checkpoint_folder(name: str) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name; ``None`` for any other name."""
    m = _match(_CHECKPOINT_FOLDER, name)
    return int(m["step"]) if m else None


def set_aside_name(folder: str, attempt: int, repeat: int = 0) -> str:
    """``checkpoint-<step>-a<attempt>`` (``.<repeat>`` after the first): where attempt ``attempt``
    sets a folder that does not verify aside, in ``trainer/.sweeprun-rejected/``."""
    if parse_checkpoint_folder(folder) is None:
        raise ValueError(f"{folder!r} is not a Trainer checkpoint folder")
    return f"{folder}-a{_number(attempt)}" + (f".{_number(repeat)}" if repeat else "")


def parse_set_aside(name: str) -> tuple[int, int] | None:
    """``(step, attempt)`` of a set-aside folder's name; ``None`` for any other name."""
    m = _match(_SET_ASIDE, name)
    return (int(m["step"]), int(m["attempt"])) if m else None


def is_trainer_seal(rel: str) -> bool:
    """Is ``rel`` (a path in a run's folder) ``trainer/checkpoint-<step>/sweeprun-seal.json``?
    Sealed last, its time is when that folder became a checkpoint: ``status`` ages a Trainer
    run's checkpoints from its listing alone, hashing nothing."""
    parts = rel.split("/")
    return (len(parts) == 3 and parts[0] == TRAINER and parts[2] == SEAL
            and parse_checkpoint_folder(parts[1]) is not None)


# -- the attempt a file names ------------------------------------------------------------------

def attempt_of(rel: str) -> int | None:
    """The attempt that wrote a file of a run folder (``rel``: its path in the folder), as its
    name says: ``attempts/<n>.*``, ``logs/attempt-<n>.log``, ``metrics/attempt-<n>.jsonl``,
    ``checkpoints/ckpt-a<n>-...``; ``None`` for any other file."""
    folder, _, name = rel.partition("/")
    if folder == ATTEMPTS:
        record = parse_attempt_record(name)
        return record[0] if record else None
    if folder == LOGS:
        return parse_log(name)
    if folder == METRICS_PARTS:
        return parse_metrics_part(name)
    if folder == CHECKPOINTS:
        checkpoint = CheckpointName.parse(name)
        return checkpoint.attempt if checkpoint else None
    return None


def highest_attempt(rels: Iterable[str]) -> int:
    """The highest attempt any of a run's files names (:func:`attempt_of`); 0 when none does.

    The one rule for "which attempts have been here": a new attempt takes a number above
    it, and a process whose number is below it is a stale one.
    """
    return max((n for rel in rels if (n := attempt_of(rel)) is not None), default=0)
