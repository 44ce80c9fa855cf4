"""A loss-spike rollback, from the spike to the step after it (policy: :mod:`.spikes`,
records: :mod:`sweeprun.rollbacks`).

The rollback is a restart, not a rewind in place: the script's loop holds things no run can
reach (its epoch variable, its DataLoader iterator), so a run that met a spike records where
to go back to and exits 75, and the launcher starts it again at once; the new process's
``run.restore()`` then puts everything where the record says before the loop begins:

1. the spike is confirmed at step ``s`` (on any rank: every rank learns it at that step);
2. the save in flight is waited for; the target is the newest checkpoint at least
   ``margin`` steps older than the spike's start, every checkpoint newer than it is
   *abandoned*;
3. every rank writes where its data is (``rollbacks/<k>.rank-<r>.pt``: the epoch and the
   tracked samplers and loaders as of step ``s``, plus ``skip`` batches);
4. rank 0 writes ``rollbacks/<k>.json``, create-only, after the fence: the commit. Killed
   before it, the run resumes from its newest checkpoint and meets the same spike at the
   same step again (the detector's state is in every checkpoint); killed after, every
   restore follows the record;
5. the abandoned checkpoints are deleted (again at the next restore, if a kill came first);
   every rank exits 75.

A restore skips the abandoned checkpoints of every record, so one written after a spike
began is never restored. The record applies while no checkpoint newer than its target
exists: model, optimizer, scheduler, RNG and extras from the target, the data position and
epoch from the record, the step moved to ``s + skip``, metrics cut to their length at ``s``.
"""

from __future__ import annotations

import io
import pickle
import time
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from ..errors import CheckpointError, LeaseLost, SweeprunError
from ..faults import crash_point
from ..rollbacks import RollbackRecord, read_rollbacks, set_aside
from ..runenv import DIVERGED_EXIT, PREEMPTED_EXIT
from ..store import RunPaths, atomic_write, create_only, store_errors
from .checkpoints import CheckpointDir, Loaded, say
from .ranks import Ranks
from .spikes import Guard, Spike, target
from .state import Stateful, from_safe, to_safe
from .writer import CheckpointWriter


@dataclass(frozen=True)
class Candidate:
    """A checkpoint a rollback may go back to: what its record calls it, and its step."""

    name: str
    step: int


class Checkpoints(Protocol):
    """Where a run's checkpoints are, for a rollback: sweeprun's own (:class:`OwnCheckpoints`),
    or a framework's folders (the Hugging Face Trainer's)."""

    def candidates(self, set_aside: set[str]) -> list[Candidate]:
        """Every checkpoint that verifies, oldest first, less those ``set_aside`` (by name)."""

    def discard(self, names: set[str]) -> None:
        """Take the checkpoints named out of every later restore's sight (delete, or move)."""

    @property
    def data_offset(self) -> int:
        """Steps the data is ahead of the step count now (a framework that counts its own)."""


class OwnCheckpoints:
    """The run's ``checkpoints/`` folder (:mod:`.checkpoints`)."""

    def __init__(self, directory: CheckpointDir, writer: CheckpointWriter) -> None:
        self.dir, self.writer = directory, writer

    def candidates(self, set_aside: set[str]) -> list[Candidate]:
        return [Candidate(m.stem, m.step) for m in sorted(self.dir.manifests(), key=lambda m: m.name)
                if m.stem not in set_aside]

    def discard(self, names: set[str]) -> None:
        self.writer.discard(names)

    @property
    def data_offset(self) -> int:
        return 0                                  # the run's step moves with its data


class Run(Protocol):
    """What a rollback uses of the run (:class:`~.run.Run`, which imports this module)."""

    paths: RunPaths
    attempt: int
    step: int
    epoch: int
    every_steps: int | None
    steps_follow_data: bool
    _objects: dict[str, Stateful]
    _writer: CheckpointWriter
    _dir: CheckpointDir
    guard: Guard

    @property
    def ranks(self) -> Ranks | None: ...

    @property
    def under_launcher(self) -> bool: ...

    def wait(self) -> Any: ...

    def close(self) -> None: ...

    def flush_metrics(self) -> int: ...

    def _resume(self, step: int, metrics_bytes: Any, attempt: int | None) -> None: ...


def data_objects(objects: dict[str, Stateful]) -> dict[str, Stateful]:
    """The tracked objects that are a position in the data (samplers, stateful loaders), or
    that carry one (``data_position()``/``load_data_position(state)``: an integration's
    state, whose samplers live inside the framework): what a rollback does not take back
    to its checkpoint."""
    import torch

    return {n: o for n, o in objects.items() if _carrier(o)
            or (hasattr(o, "__iter__") and not isinstance(o, torch.nn.Module))}


def _carrier(obj: Any) -> bool:
    return callable(getattr(obj, "data_position", None)) and callable(getattr(obj, "load_data_position", None))

def roll_back(run: Run, spike: Spike, checkpoints: Checkpoints | None = None,
              every_steps: int | None = None) -> NoReturn:
    """Steps 2-5 of the module's docstring on every rank; never returns (exit 75, or
    :data:`~sweeprun.runenv.DIVERGED_EXIT` once the rollbacks are used up). ``checkpoints``:
    where the targets are (default: sweeprun's own), ``every_steps`` their step cadence
    (default: the run's)."""
    source = checkpoints or OwnCheckpoints(run._dir, run._writer)
    grid = every_steps if checkpoints is not None else run.every_steps
    policy, ranks, paths = run.guard.policy, run.ranks, run.paths
    assert policy is not None
    leader = ranks is None or ranks.leader
    run.wait()
    run._writer.settle()
    records = read_rollbacks(paths.fs, paths.rollbacks)
    number = 1 + max((r.number for r in records), default=0)
    used = sum(not r.diverged for r in records)
    diverged = used >= policy.max_rollbacks
    if ranks is not None:                     # rank 0's reading, on every rank
        number, used, diverged = ranks.gather((number, used, diverged))[0]
    record: RollbackRecord | str | None = None
    if not diverged:
        _write_positions(run, number, ranks.rank if ranks else 0)
    crash_point("rollback.before_record")
    if ranks is not None:
        ranks.barrier()                       # every rank's position is durable
    if leader:
        try:
            record = _commit(run, spike, number, records, diverged, source, grid)
        except Exception as exc:  # noqa: BLE001 - every rank raises it, none waits in a collective
            record = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if ranks is not None:
        record = ranks.gather(record)[0]
    if isinstance(record, str):
        run.close()
        raise (LeaseLost if record.startswith("LeaseLost") else CheckpointError)(
            record.split(": ", 1)[-1])
    assert record is not None
    crash_point("rollback.after_record")
    nowhere = record.diverged and not diverged    # nothing from before the spike to go back to
    diverged = record.diverged
    if leader and record.abandoned:
        try:
            source.discard(set(record.abandoned))
        except (SweeprunError, OSError) as exc:  # the next restore sets them aside again
            say(f"warning: the checkpoints set aside by the rollback were not all deleted: {exc}")
    run._stop_reason = run._stop_reason or "rolled back"   # its tracker run: stopped, not finished
    run.close()
    if diverged:
        why = ("no checkpoint from before it to go back to (its framework cannot pass over batches "
               "from the start)" if nowhere else f"after {used} rollback(s), max_rollbacks={policy.max_rollbacks}")
        say(f"{record.text()} ({why}); exiting with {DIVERGED_EXIT}: relaunching does not start it "
            "again until `sweeprun reset`")
        raise SystemExit(DIVERGED_EXIT)
    say(f"{record.text()}; rollback {record.number} of at most {policy.max_rollbacks}; exiting with "
        f"{PREEMPTED_EXIT}: the launcher starts it again from there at once (standalone: run it again)")
    raise SystemExit(PREEMPTED_EXIT)


def _write_positions(run: Run, number: int, rank: int) -> None:
    """This rank's data position as of now, plus ``skip`` batches: atomic, before the commit."""
    import torch

    policy = run.guard.policy
    assert policy is not None
    objects = {}
    for name, obj in data_objects(run._objects).items():
        position = (obj.data_position() if _carrier(obj)  # type: ignore[attr-defined]
                    else run.guard.positions.after(name, obj, policy.skip))
        objects[name] = to_safe(position, f"the data position of {name!r}")
    raw = io.BytesIO()
    torch.save({"epoch": run.epoch, "objects": objects}, raw)
    atomic_write(run.paths.fs, run.paths.rollback_data(number, rank), raw.getvalue())


def _commit(run: Run, spike: Spike, number: int, records: list[RollbackRecord], diverged: bool,
            source: Checkpoints, every_steps: int | None) -> RollbackRecord:
    """Rank 0: the fence, the target, the record (create-only); with ``diverged`` also the
    attempt's ``.diverged`` mark for the launcher."""
    policy = run.guard.policy
    assert policy is not None
    run._writer.fence()                       # a process whose run was taken over writes nothing
    metrics_bytes = run.flush_metrics()
    candidates = source.candidates(set_aside(records))
    chosen = None if diverged else target(candidates, spike.start - policy.margin, every_steps)
    # a framework that counts its own steps resumes from a checkpoint or not at all: from the
    # start it would train the bad batches again
    diverged = diverged or (chosen is None and not run.steps_follow_data)
    abandoned = () if diverged else tuple(c.name for c in candidates[candidates.index(chosen) + 1 if chosen else 0:])
    restored = chosen.step if chosen else 0
    passed = spike.step + policy.skip           # the data goes on after this step's batch
    record = RollbackRecord(
        number=number, attempt=run.attempt, metric=spike.metric, reason=spike.reason,
        value=spike.value if spike.reason == "spike" else None, start=spike.start, step=spike.step,
        checkpoint=chosen.name if chosen else None, restored_step=spike.step if diverged else restored,
        resume_step=spike.step if diverged else passed if run.steps_follow_data else restored,
        skipped=0 if diverged else passed - restored, data_offset=source.data_offset,
        abandoned=abandoned, diverged=diverged,
        metrics_bytes=metrics_bytes, world_size=run.ranks.world_size if run.ranks else 1, at=time.time())
    path = run.paths.rollback(number)
    with store_errors("write", path):
        if not create_only(run.paths.fs, path, record.to_bytes()):
            raise CheckpointError(f"{path} exists already: another process of this run wrote a rollback "
                                  "record (two processes run one attempt?); stopping without another")
    if diverged:
        mark_diverged(run)
    return record


def mark_diverged(run: Run) -> None:
    """``attempts/<n>.diverged`` under the launcher (rank 0): the attempt ends the run diverged."""
    if run.under_launcher and (run.ranks is None or run.ranks.leader):
        run.paths.write_marker(run.paths.api_diverged(run.attempt), run.attempt, run.step)


def restore_records(run: Run) -> tuple[list[RollbackRecord], set[str]]:
    """The run's rollback records and the checkpoints they set aside; a run whose last
    record is ``diverged`` stops here (the launcher records it, standalone it is said)."""
    records = read_rollbacks(run.paths.fs, run.paths.rollbacks)
    if records and records[-1].diverged:
        mark_diverged(run)
        run.close()
        say(f"this run diverged ({records[-1].text()}); it is not run again: `sweeprun reset` it "
            f"(or remove {run.paths.rollbacks}) to start over; exiting with {DIVERGED_EXIT}")
        raise SystemExit(DIVERGED_EXIT)
    return records, set_aside(records)


def applies(records: list[RollbackRecord], resumed_attempt: int | None) -> RollbackRecord | None:
    """The rollback a restore must apply: the last one, while no checkpoint written after it
    exists (``resumed_attempt``: the restored checkpoint's attempt, ``None`` for none)."""
    last = records[-1] if records else None
    if last is None or (resumed_attempt is not None and resumed_attempt > last.attempt):
        return None
    return last


def apply(run: Run, record: RollbackRecord, loaded: Loaded | None) -> None:
    """Put the data position, the epoch and the step where ``record`` says (the rest was
    restored from its checkpoint, ``loaded``), and delete what it set aside if a kill left
    any. Where the framework counts its own steps, they and the metrics stay the checkpoint's."""
    import torch

    rank = run.ranks.rank if run.ranks else 0
    fs = run.paths.fs
    path = run.paths.rollback_data(record.number, rank)
    with store_errors("read", path):
        if not fs.exists(path):
            path = run.paths.rollback_data(record.number, 0)
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: rollback {record.number}'s data position was "
                                  f"not written; remove {run.paths.rollback(record.number)} to resume "
                                  "from the newest checkpoint instead") from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path} does not load ({exc}); remove "
                              f"{run.paths.rollback(record.number)} to resume from the newest checkpoint "
                              "instead") from None
    for name, obj in data_objects(run._objects).items():
        if name in state["objects"]:
            position = from_safe(state["objects"][name])
            if _carrier(obj):
                obj.load_data_position(position)  # type: ignore[attr-defined]
            else:
                obj.load_state_dict(position)
    if run.steps_follow_data or loaded is None:
        run.epoch = int(state["epoch"])
        run._resume(record.resume_step, record.metrics_bytes, record.attempt)
    else:
        run._resume(int(loaded.state["step"]), loaded.state.get("metrics_bytes"), loaded.manifest.attempt)
    say(f"rolled back: {record.text()}; going on from step {run.step} (epoch {run.epoch})")
    if run.ranks is None or run.ranks.leader:
        try:
            run._writer.discard(set(record.abandoned))
        except SweeprunError as exc:
            say(f"warning: checkpoints set aside by rollback {record.number} were not all deleted: {exc}")
