"""The sweep file's ``slurm:`` section and ``deadline:``, and the lane a run belongs to
(see :mod:`sweeprun.slurm`). Imported by the sweep-file parser: nothing here talks to SLURM."""

from __future__ import annotations

import datetime as _dt
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..command import suggest
from ..errors import SpecError

__all__ = ["Fallback", "LANES", "SlurmSpec", "lane_of", "parse_deadline", "parse_slurm", "switch_at"]

#: A task claims runs of one lane: ``main`` (the section's partition and QoS), ``fallback``.
LANES = ("main", "fallback")
#: SLURM's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"[0-9]+(:[0-9]{1,2}){0,2}|[0-9]+-[0-9]{1,2}(:[0-9]{1,2}){0,2}")


@dataclass(frozen=True)
class Fallback:
    """Where runs go that the main partition keeps losing, or that a deadline is near for."""

    partition: str | None = None
    qos: str | None = None
    after_interruptions: int = 3


@dataclass(frozen=True)
class SlurmSpec:
    """The sweep file's ``slurm:`` section."""

    partition: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    gpus_per_run: int | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    max_jobs: int = 4
    signal_s: int = 120
    sbatch: tuple[str, ...] = ()
    fallback: Fallback | None = None

    def options(self, lane: str) -> list[str]:
        """The resource options of a lane's jobs (partition, QoS, time, CPUs, GPUs, memory)."""
        partition, qos = self.partition, self.qos
        if lane == "fallback" and self.fallback is not None:
            partition = self.fallback.partition or partition
            qos = self.fallback.qos or qos
        out = [f"--partition={partition}"] if partition else []
        out += [f"--qos={qos}"] if qos else []
        out += [f"--account={self.account}"] if self.account else []
        out += [f"--time={self.time}"] if self.time else []
        out += [f"--cpus-per-task={self.cpus_per_task}"] if self.cpus_per_task else []
        out += [f"--gres=gpu:{self.gpus_per_run}"] if self.gpus_per_run else []
        out += [f"--mem={self.mem}"] if self.mem else []
        return [*out, *self.sbatch]


_KEYS = ("partition", "time", "cpus_per_task", "gpus_per_run", "mem", "account", "qos", "max_jobs",
         "signal_s", "sbatch", "fallback")
_FALLBACK_KEYS = ("partition", "qos", "after_interruptions")


def parse_slurm(value: Any, at: Callable[[str], str], max_nproc: int, grace_s: float) -> SlurmSpec:
    """The ``slurm:`` section, checked; ``at(key)`` places a key (``slurm.time``) in the file.
    ``grace_s``: the sweep's, which must fit between SLURM's warning and its time limit."""
    where = at("slurm")
    if value is None:
        return SlurmSpec()
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: slurm must map settings (partition, time, ...) to values")
    for key in value:
        if key not in _KEYS:
            raise SpecError(f"{at(f'slurm.{key}')}: unknown key slurm.{key}{suggest(str(key), _KEYS)}")

    def text(key: str) -> str | None:
        found = value.get(key)
        if found is None:
            return None
        if isinstance(found, bool) or not isinstance(found, (str, int)) or not str(found).strip() \
                or any(c.isspace() or c in "\x00'\"" for c in str(found)):
            raise SpecError(f"{at(f'slurm.{key}')}: slurm.{key} must be one word (no spaces or quotes), "
                            f"got {found!r}")
        return str(found)

    def number(key: str, default: int | None, lo: int, hi: int) -> int | None:
        found = value.get(key, default)
        if found is None:
            return None
        if isinstance(found, bool) or not isinstance(found, int) or not lo <= found <= hi:
            raise SpecError(f"{at(f'slurm.{key}')}: slurm.{key} must be an integer from {lo:,} to {hi:,}, "
                            f"got {found!r}")
        return found

    limit = text("time")
    if limit is not None and not _TIME.fullmatch(limit):
        raise SpecError(f"{at('slurm.time')}: slurm.time {limit!r} is not a SLURM time: give minutes, "
                        "HH:MM:SS or D-HH:MM:SS, e.g. 4:00:00")
    gpus = number("gpus_per_run", None, 1, 1024)
    if gpus is not None and gpus < max_nproc:
        raise SpecError(f"{at('slurm.gpus_per_run')}: slurm.gpus_per_run is {gpus}, but a run takes up to "
                        f"{max_nproc} processes (nproc), one GPU each; raise it to {max_nproc}")
    extra = value.get("sbatch") or []
    if isinstance(extra, str):
        extra = [extra]
    if not isinstance(extra, list) or not all(isinstance(o, str) and o.startswith("-") for o in extra):
        raise SpecError(f"{at('slurm.sbatch')}: slurm.sbatch must be a list of sbatch options, "
                        "e.g. [\"--constraint=a100\", \"--exclusive\"]")
    for option in extra:
        name = option.split("=", 1)[0]
        if name in _OWN_OPTIONS:
            raise SpecError(f"{at('slurm.sbatch')}: slurm.sbatch sets {name}, which sweeprun sets itself "
                            "(its jobs must be requeueable arrays that it signals and names)")
    warning = number("signal_s", 120, 0, 65_535) or 0
    if warning and grace_s + _REQUEUE_S > warning:
        raise SpecError(f"{at('slurm.signal_s' if 'signal_s' in value else 'slurm')}: slurm.signal_s is "
                        f"{warning} s, but the runs get grace_s ({grace_s:g} s) to save after SLURM's warning, "
                        f"and the task then requeues itself before the time limit: give signal_s at least "
                        f"{math.ceil(grace_s) + _REQUEUE_S}, or a smaller grace_s")
    if limit is not None and warning and time_s(limit) <= warning + _SIGNAL_EARLY_S:
        raise SpecError(f"{at('slurm.time')}: slurm.time {limit} is no longer than the warning before it "
                        f"(signal_s {warning} s, which SLURM may send up to {_SIGNAL_EARLY_S} s early): every "
                        "task would be told to stop as it starts; give a longer time or a smaller signal_s")
    return SlurmSpec(
        partition=text("partition"), time=limit, cpus_per_task=number("cpus_per_task", None, 1, 4096),
        gpus_per_run=gpus, mem=text("mem"), account=text("account"), qos=text("qos"),
        max_jobs=number("max_jobs", 4, 1, 100_000) or 4, signal_s=warning,
        sbatch=tuple(extra), fallback=_parse_fallback(value.get("fallback"), at, text))


#: SLURM sends ``--signal`` up to this many seconds before the time asked (sbatch(1): "may be
#: sent up to 60 seconds earlier than specified", the resolution of its timer).
_SIGNAL_EARLY_S = 60
#: What a task needs after its runs' grace to end and requeue itself, before the time limit.
_REQUEUE_S = 10


def time_s(limit: str) -> int:
    """A SLURM time (``90``, ``4:00:00``, ``1-12``, ...) in seconds."""
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts += [0] * (3 - len(parts))
        return int(days) * 86_400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:   # minutes
        return parts[0] * 60
    if len(parts) == 2:   # MM:SS
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


_OWN_OPTIONS = ("--array", "-a", "--job-name", "-J", "--requeue", "--no-requeue", "--signal",
                "--open-mode", "--parsable", "--output", "-o", "--error", "-e", "--wrap")


def _parse_fallback(value: Any, at: Callable[[str], str], text: Callable[[str], str | None]) -> Fallback | None:
    where = at("slurm.fallback")
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: slurm.fallback must be a mapping: {{partition or qos, after_interruptions}}")
    for key in value:
        if key not in _FALLBACK_KEYS:
            raise SpecError(f"{where}: unknown key slurm.fallback.{key}; it takes partition, qos and "
                            "after_interruptions")
    words = {}
    for key in ("partition", "qos"):
        found = value.get(key)
        if found is not None and (not isinstance(found, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", found)):
            raise SpecError(f"{where}: slurm.fallback.{key} must be a {key} name, got {found!r}")
        words[key] = found
    if not words["partition"] and not words["qos"]:
        raise SpecError(f"{where}: slurm.fallback needs a partition or a qos to fall back to")
    after = value.get("after_interruptions", 3)
    if isinstance(after, bool) or not isinstance(after, int) or not 1 <= after <= 1_000_000:
        raise SpecError(f"{where}: slurm.fallback.after_interruptions must be an integer from 1 to "
                        f"1,000,000, got {after!r}")
    return Fallback(partition=words["partition"], qos=words["qos"], after_interruptions=after)


def parse_deadline(value: Any, where: str) -> float:
    """``deadline:`` as seconds since the epoch: an ISO 8601 time with its zone
    (``2026-12-24T18:00+01:00``, ``...Z``). The zone is required: the nodes that read the file
    need not share the clock's zone of the machine that wrote it."""
    example = "2026-12-24T18:00+01:00 or 2026-12-24T17:00Z"
    if not isinstance(value, str):
        raise SpecError(f"{where}: deadline must be a time such as {example}, got {value!r}")
    text = value.strip()
    try:  # Python 3.10 reads no "Z"
        moment = _dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise SpecError(f"{where}: deadline {value!r} is not a time: give an ISO 8601 time such as "
                        f"{example}") from None
    if moment.tzinfo is None:
        raise SpecError(f"{where}: deadline {value!r} names no time zone: add it ({example}); the "
                        "nodes that read the file may not share this machine's")
    return moment.timestamp()


# -- lanes ----------------------------------------------------------------------------------


def lane_of(interruptions: int, fallback: Fallback | None, switch_at: float | None,
            now: float | None = None) -> str:
    """The lane a run not yet done belongs to, from how often it was interrupted and when the
    runs left move to the fallback (:func:`switch_at`)."""
    if fallback is None:
        return "main"
    if interruptions >= fallback.after_interruptions:
        return "fallback"
    if switch_at is not None and (time.time() if now is None else now) >= switch_at:
        return "fallback"
    return "main"


def switch_at(deadline: float | None, grace_s: float) -> float | None:
    """When the runs left move to the fallback lane: ``grace_s`` before the deadline, the moment
    the main lane's tasks ask their runs to save (their time limit is the deadline), so that
    the fallback's tasks find them theirs however soon they start."""
    return None if deadline is None else deadline - grace_s
