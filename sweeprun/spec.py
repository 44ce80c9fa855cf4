"""The sweep file: its keys and values, validated into a :class:`SweepSpec`.

Everything here is checked before anything runs or is written: a typo found
after three hours of training is a typo found too late. Errors name the file,
the line and the key, and suggest the closest valid key. Every check is linear
in the size of the file (never in the number of runs), so a hostile or huge
file is refused in seconds.

Reading the YAML safely lives in :mod:`sweeprun.yaml12` and the command
template in :mod:`sweeprun.command`; this module decides what a sweep file
means. The names that lived here before that split are still importable from
here.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .axes import axis_values, check_rows, distinct_values, parse_exclude, parse_zip
from .command import (
    BUILTIN_PLACEHOLDERS,
    MAX_ARG_BYTES,
    MAX_COMMAND_BYTES,
    MAX_FORMAT_NUMBER,
    PARAM_RE,
    Field,
    Word,
    build_argv,
    check_command,
    check_flags,
    no_duplicate_values,
    render_value,
    show,
    split_command,
    suggest,
)
from .errors import SpecError
from .identity import RunSpec, canonical_value, sweep_runs
from .limits import RANGES
from .slurm import SlurmSpec, parse_deadline, parse_slurm
from .yaml12 import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_INT_DIGITS,
    MAX_NODES,
    key_lines,
    no_duplicate_keys,
    read_sweep_text,
    read_yaml,
)

__all__ = [
    "BUILTIN_PLACEHOLDERS", "DEFAULTS", "KEYS", "MAX_ARG_BYTES", "MAX_COMMAND_BYTES", "MAX_DEPTH",
    "MAX_FILE_BYTES", "MAX_FORMAT_NUMBER", "MAX_INT_DIGITS", "MAX_NAME_CHARS", "MAX_NODES", "NAME_RE",
    "PARAM_RE", "RANGES", "REQUIRED", "Field", "SweepSpec", "Word", "load_spec", "parse_spec",
    "read_sweep_text", "render_value", "resolve_location", "split_command",
]

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")

DEFAULTS: dict[str, Any] = {"max_attempts": 3, "max_lost": 5, "grace_s": 30.0, "lease_s": 60.0,
                            "max_runs": 1_000_000, "nproc": 1, "on_world_size_change": "reshard"}
KEYS = ("name", "command", "store", "grid", "zip", "exclude", "params", "flags", "max_attempts", "max_lost",
        "ledger", "grace_s", "lease_s", "max_runs", "lease_settle_s", "nproc", "on_world_size_change",
        "slurm", "deadline", "on_oom")
#: What a run does when it resumes at another world size than its checkpoint's: reshard the
#: model and optimizer (RNG and data position then cannot be exact), or refuse to resume.
WORLD_SIZE_POLICIES = ("reshard", "refuse")
REQUIRED = ("name", "command", "grid")  # `zip:` may stand in for `grid:`

MAX_NAME_CHARS = 128            # the name is a folder and part of the ledger's file name


@dataclass(frozen=True)
class OnOom:
    """``on_oom:``: what a run that ran out of accelerator memory does next. By default
    (``retries: 0``) it fails for good: the same attempt would run out again. With
    ``retries: N`` it is started again up to N times, with ``SWEEPRUN_OOM_RETRY`` set to the
    number of attempts that ran out so far and each ``halve:`` parameter halved that many
    times (an integer, never below 1), under the same run id and folder."""

    retries: int = 0
    halve: tuple[str, ...] = ()

    def hinted(self, params: dict[str, Any], retry: int) -> dict[str, Any]:
        """``params`` for the ``retry``-th start after an OOM (0: unchanged)."""
        return {k: max(1, v >> retry) if retry and k in self.halve else v for k, v in params.items()}


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file, with command-line overrides applied."""

    name: str
    command: str
    store: str          # resolved: a relative path in the file is relative to the file
    grid: dict[str, list[Any]]
    params: dict[str, Any] = field(default_factory=dict)
    max_attempts: int = 3
    ledger: str | None = None
    grace_s: float = 30.0
    lease_s: float = 60.0
    source: str = "<sweep>"
    text: str = ""  # the file as written, kept in the store as sweep.yaml
    flags: dict[str, str] = field(default_factory=dict)  # boolean parameter -> its flag word(s)
    max_runs: int = 1_000_000
    #: Attempts lost in a row with their machine, without a new checkpoint, before a run fails.
    max_lost: int = 5
    #: Claim-then-confirm delay for store leases on folders that show other machines'
    #: writes late; ``None``: chosen from the store (see :func:`sweeprun.leases.settle_default`).
    lease_settle_s: float | None = None
    #: ``zip:`` groups: each maps keys to equally long lists whose i-th values go together.
    paired: list[dict[str, list[Any]]] = field(default_factory=list)
    #: ``exclude:`` entries: partial points; a run matching every key of one is skipped.
    exclude: list[dict[str, Any]] = field(default_factory=list)
    #: ``zip:`` came before ``grid:`` in the file, so its groups vary slowest.
    paired_first: bool = False
    #: Processes per run: an int, or the name of the parameter that gives each run's (written
    #: ``"{world}"`` in the file). Not part of a run's identity: changing it renames nothing.
    nproc: int | str = 1
    #: ``nproc:`` is in the file: every run starts through torchrun, a run of one rank too (a
    #: script written for torchrun initialises its process group from the rank variables).
    ranked: bool = False
    on_world_size_change: str = "reshard"
    #: The ``slurm:`` section (``launch --on slurm``); ``None`` when the file has none.
    slurm: SlurmSpec | None = None
    #: ``deadline:`` (seconds since the epoch): runs left then go to ``slurm.fallback``.
    deadline: float | None = None
    on_oom: OnOom = field(default_factory=OnOom)

    def axes(self) -> list[dict[str, list[Any]]]:
        """The sweep's axes in the file's order (the first varies slowest): one per grid key,
        one per zip group."""
        grid = [{key: values} for key, values in self.grid.items()]
        return [*self.paired, *grid] if self.paired_first else [*grid, *self.paired]

    def varying(self) -> list[str]:
        """The keys that differ between runs (grid and zip keys): they label the run ids."""
        return [key for axis in self.axes() for key in axis]

    def size(self) -> int:
        """The number of points of the grid and zip groups before exclusions, counted without
        expanding them: what ``max_runs`` bounds, since expanding costs this many steps.
        Exclusions only remove runs; ``len(runs())`` is the exact count."""
        return math.prod(len(next(iter(axis.values()))) for axis in self.axes())

    def runs(self) -> list[RunSpec]:
        """Every point of the grid and zip groups (first axis slowest), less the excluded ones,
        fixed params added."""
        out: list[RunSpec] = []
        seen: set[str] = set()
        for run in sweep_runs(self.params, self.axes(), self.exclude):
            if run.run_id in seen:
                raise SpecError(f"{self.source}: grid gives the same run twice ({run.run_id}); "
                                "remove the duplicate value")
            seen.add(run.run_id)
            out.append(run)
        if not out:
            raise SpecError(f"{self.source}: exclude skips every one of the sweep's {self.size():,} runs; "
                            "remove an entry")
        return out

    def nproc_of(self, run: RunSpec) -> int:
        """How many processes (ranks) ``run`` is started as."""
        return self.nproc if isinstance(self.nproc, int) else int(run.params[self.nproc])

    def max_nproc(self) -> int:
        """The most processes any run of the sweep takes, without expanding the grid."""
        if isinstance(self.nproc, int):
            return self.nproc
        values = self.grid.get(self.nproc) or next(
            (group[self.nproc] for group in self.paired if self.nproc in group), [self.params.get(self.nproc, 1)])
        return max(values)

    def argv(self, run: RunSpec, run_dir: str = "", attempt: int = 1) -> list[str]:
        """The run's command as an argument list, started without a shell (see :func:`build_argv`)."""
        return build_argv(self.command, self.flags, run.params, run_dir=run_dir, run_id=run.run_id,
                          attempt=attempt)

    def with_overrides(self, **overrides: Any) -> SweepSpec:
        """Apply command-line flags (``None`` means not given), validated like the file.

        A relative ``--store`` or ``--ledger`` is relative to the current folder, as
        any path typed in a shell is.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        for key, value in given.items():
            flag = f"--{key.replace('_', '-')}"
            if key in ("store", "ledger"):
                given[key] = resolve_location(_check_nonempty_str(value, flag), Path.cwd())
            elif key in ("max_attempts", "max_lost"):
                _check_int(value, flag, *RANGES[key])
            elif key in ("grace_s", "lease_s"):
                given[key] = _check_number(value, flag, *RANGES[key])
        return replace(self, **given)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; raises :class:`SpecError` naming file, line and key."""
    text = read_sweep_text(path)
    return parse_spec(text, str(path), base=Path(os.path.abspath(path)).parent)


def resolve_location(value: str, base: Path | None) -> str:
    """A store or ledger location: URLs as given, ``~`` expanded, relative paths joined to ``base``."""
    if "://" in value or "::" in value:
        return value
    path = os.path.expanduser(value)
    if base is not None and not os.path.isabs(path):
        path = os.path.abspath(os.path.join(base, path))
    return path


def parse_spec(text: str, source: str = "<sweep>", base: Path | None = None) -> SweepSpec:
    """Validate a sweep file's text; relative store and ledger paths are relative to ``base``.

    Every run's command is checked here, per value rather than per run, so no
    run of a valid sweep can fail to start for a reason the file already shows.
    """
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise SpecError(f"{source}: the sweep file is over {MAX_FILE_BYTES // 1024} KiB; "
                        "a sweep file lists values, not data")
    node, data = read_yaml(text, source)
    if data is None:
        raise SpecError(f"{source}: the sweep file is empty; it needs name, command and grid")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the sweep file must be a mapping of keys (name, command, grid, ...), "
                        f"not a {'list' if isinstance(data, list) else 'single value'}")
    assert node is not None
    no_duplicate_keys(node, source)
    lines = key_lines(node)

    def at(key: str) -> str:
        return f"{source}:{lines[key]}" if key in lines else source

    for key in data:
        if key not in KEYS:
            raise SpecError(f"{at(str(key))}: unknown key {show(key)}{suggest(str(key), KEYS)}")
    for key in REQUIRED:
        if (key not in data or data[key] is None) and not (key == "grid" and data.get("zip") is not None):
            raise SpecError(f"{source}: missing required key {key!r}")

    name = data["name"]
    if not isinstance(name, str):  # `name: 123` is a number in YAML, `name: yes` a boolean
        raise SpecError(f"{at('name')}: name {show(name)} must be a string: quote it, "
                        f"e.g. name: \"{show(name).strip(chr(39))}\"")
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise SpecError(f"{at('name')}: name {show(name)} may only use letters, digits, '.', '_' and '-' "
                        "(it names the sweep's folder)")
    if len(name) > MAX_NAME_CHARS:
        raise SpecError(f"{at('name')}: name is {len(name)} characters; at most {MAX_NAME_CHARS}, "
                        "since it names the sweep's folder and its ledger file")
    command = data["command"]
    if not isinstance(command, str) or not command.strip():
        raise SpecError(f"{at('command')}: command must be a non-empty string")
    if "\x00" in command:
        raise SpecError(f"{at('command')}: command contains a NUL character, which no program can receive")
    store = data.get("store", None)
    if store is not None:
        store = resolve_location(_check_nonempty_str(store, f"{at('store')}: store"), base)
    ledger = data.get("ledger", None)
    if ledger is not None:
        ledger = resolve_location(_check_nonempty_str(ledger, f"{at('ledger')}: ledger"), base)

    grid = data.get("grid")
    if grid is None or (grid == {} and data.get("zip") is not None):
        grid = {}  # every varying key is in zip
    elif not isinstance(grid, dict) or not grid:
        raise SpecError(f"{at('grid')}: grid must map parameter names to lists of values, "
                        "e.g. `lr: [0.1, 0.01]`")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise SpecError(f"{at('params')}: params must map parameter names to values")

    clean_grid: dict[str, list[Any]] = {}
    for key, values in grid.items():
        where = at(f"grid.{key}")
        _check_param_name(key, where)
        canon = axis_values(values, where, f"grid.{key}", _check_value)
        no_duplicate_values(canon, lambda v: render_value(v), f"{where}: grid.{key}", "")
        clean_grid[str(key)] = canon
    paired = parse_zip(data.get("zip"), at, _check_param_name, _check_value, clean_grid)
    columns = {key: values for group in paired.values() for key, values in group.items()}
    clean_params: dict[str, Any] = {}
    for key, value in params.items():
        where = at(f"params.{key}")
        _check_param_name(key, where)
        if key in clean_grid or key in columns:
            raise SpecError(f"{where}: {key!r} is both in {'grid' if key in clean_grid else 'zip'} and in "
                            "params; keep one")
        clean_params[str(key)] = _check_value(value, f"{where}: params.{key}")

    max_runs = _check_int(data.get("max_runs", DEFAULTS["max_runs"]), f"{at('max_runs')}: max_runs",
                          *RANGES["max_runs"])
    size = math.prod(len(v) for v in clean_grid.values()) * math.prod(
        len(next(iter(group.values()))) for group in paired.values())
    if size > max_runs:
        what = "grid and zip give" if paired and clean_grid else "zip gives" if paired else "the grid has"
        raise SpecError(f"{at('zip' if paired else 'grid')}: {what} {size:,} runs, more than max_runs "
                        f"({max_runs:,}); shrink {'them' if paired else 'the grid'} or raise `max_runs:` "
                        "in the file")
    exclude = parse_exclude(data.get("exclude"), at, _check_value, clean_grid, paired, clean_params)

    flags = check_flags(data.get("flags"), {**clean_grid, **columns}, clean_params, at)
    spec = SweepSpec(
        name=name, command=command, store=store or "", grid=clean_grid, params=clean_params,
        max_attempts=_check_int(data.get("max_attempts", DEFAULTS["max_attempts"]),
                                f"{at('max_attempts')}: max_attempts", *RANGES["max_attempts"]),
        ledger=ledger,
        grace_s=_check_number(data.get("grace_s", DEFAULTS["grace_s"]), f"{at('grace_s')}: grace_s",
                              *RANGES["grace_s"]),
        lease_s=_check_number(data.get("lease_s", DEFAULTS["lease_s"]), f"{at('lease_s')}: lease_s",
                              *RANGES["lease_s"]),
        source=source, text=text, flags=flags, max_runs=max_runs,
        max_lost=_check_int(data.get("max_lost", DEFAULTS["max_lost"]), f"{at('max_lost')}: max_lost",
                            *RANGES["max_lost"]),
        lease_settle_s=None if data.get("lease_settle_s") is None else _check_number(
            data["lease_settle_s"], f"{at('lease_settle_s')}: lease_settle_s", *RANGES["lease_settle_s"]),
        paired=list(paired.values()), exclude=exclude,
        nproc=_check_nproc(data.get("nproc", DEFAULTS["nproc"]), at, clean_grid, columns, clean_params),
        ranked="nproc" in data,
        on_world_size_change=_check_choice(data.get("on_world_size_change", DEFAULTS["on_world_size_change"]),
                                           f"{at('on_world_size_change')}: on_world_size_change",
                                           WORLD_SIZE_POLICIES),
        paired_first="zip" in data and "grid" in data and list(data).index("zip") < list(data).index("grid"),
    )
    if data.get("on_oom") is not None:
        spec = replace(spec, on_oom=_parse_on_oom(data["on_oom"], at, {**clean_grid, **columns},
                                                  clean_params))
    if "slurm" in data:
        spec = replace(spec, slurm=parse_slurm(data["slurm"], at, spec.max_nproc(), spec.grace_s))
    if data.get("deadline") is not None:
        if spec.slurm is None or spec.slurm.fallback is None:
            raise SpecError(f"{at('deadline')}: deadline sends the runs left to slurm.fallback, and the "
                            "file has none: add `fallback: {partition: ..., after_interruptions: 3}` "
                            "under slurm:")
        spec = replace(spec, deadline=parse_deadline(data["deadline"], at("deadline")))
    # The command's checks see each value a key takes once: a zip column may repeat a
    # value (two models, one batch size), and its points are checked whole by check_rows.
    check_command(spec.command, sweep_name=spec.name, store=spec.store,
                  grid={**clean_grid, **{k: distinct_values(v, spec.command, k) for k, v in columns.items()}},
                  params=spec.params, flags=spec.flags, where=at("command"), at=at)
    check_rows(paired, spec.command, at)
    return spec


def _check_nproc(value: Any, at: Any, grid: dict[str, list[Any]], columns: dict[str, list[Any]],
                 params: dict[str, Any]) -> int | str:
    """``nproc:``: an int, or ``"{name}"`` naming a parameter whose every value is such an int
    (one grid then mixes 1- and N-process runs); the values are checked where they are written."""
    lo, hi = RANGES["nproc"]
    where = f"{at('nproc')}: nproc"
    if not isinstance(value, str):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise SpecError(f"{where} must be an integer from {lo:,} to {hi:,} (processes per run), or "
                            f"\"{{param}}\" naming a parameter that gives it, got {show(value)}")
        return value
    found = re.fullmatch(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", value.strip())
    name = found.group(1) if found else None
    known = [*grid, *columns, *params]
    if name is None or name not in known:
        hint = suggest(name, known) if name else ""
        raise SpecError(f"{where} {show(value)} must be an integer, or \"{{param}}\" naming one of the sweep's "
                        f"parameters{hint}{'' if known else ' (it has none)'}")
    values, place, line = ((grid[name], f"grid.{name}", at(f"grid.{name}")) if name in grid else
                           (columns[name], f"zip {name}", at("zip")) if name in columns else
                           ([params[name]], f"params.{name}", at(f"params.{name}")))
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise SpecError(f"{line}: {place}: nproc is {value!r}, so every value of {name} must be a number "
                            f"of processes, an integer from {lo:,} to {hi:,}; got {show(v)}")
    return name


def _parse_on_oom(value: Any, at: Callable[[str], str], varying: dict[str, list[Any]],
                  params: dict[str, Any]) -> OnOom:
    """``on_oom: {retries: N, halve: [name, ...]}``; each name a parameter whose every value
    is a positive integer (a batch size), so halving it means something."""
    if not isinstance(value, dict):
        raise SpecError(f"{at('on_oom')}: on_oom must be a mapping such as "
                        "`{retries: 2, halve: [batch_size]}`, got " + show(value))
    unknown = sorted(set(map(str, value)) - {"retries", "halve"})
    if unknown:
        raise SpecError(f"{at('on_oom')}: on_oom has no key {unknown[0]!r}; it takes retries and halve"
                        f"{suggest(unknown[0], ('retries', 'halve'))}")
    retries = _check_int(value.get("retries", 0), f"{at('on_oom.retries')}: on_oom.retries",
                         *RANGES["on_oom.retries"])
    halve = value.get("halve", [])
    halve = [halve] if isinstance(halve, str) else halve
    if not isinstance(halve, list):
        raise SpecError(f"{at('on_oom.halve')}: on_oom.halve must list parameter names, got {show(halve)}")
    for name in halve:
        values = varying.get(name) if isinstance(name, str) else None
        values = values if values is not None else [params[name]] if isinstance(name, str) and name in params else None
        if values is None:
            raise SpecError(f"{at('on_oom.halve')}: on_oom.halve names {show(name)}, which is not a "
                            "parameter of the sweep (grid, zip or params)")
        bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1), None)
        if bad is not None:
            raise SpecError(f"{at('on_oom.halve')}: on_oom.halve names {name!r}, which takes {show(bad)}; "
                            "only a parameter whose values are positive integers can be halved")
    if halve and not retries:
        raise SpecError(f"{at('on_oom.halve')}: on_oom.halve needs on_oom.retries of 1 or more: without "
                        "a retry nothing is halved")
    return OnOom(retries=retries, halve=tuple(halve))


def _check_choice(value: Any, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SpecError(f"{what} must be one of {', '.join(choices)}, got {show(value)}"
                        f"{suggest(value, choices) if isinstance(value, str) else ''}")
    return value


def _check_param_name(key: Any, where: str) -> None:
    if not isinstance(key, str) or not PARAM_RE.fullmatch(key):
        raise SpecError(f"{where}: parameter name {show(key)} must be a Python identifier "
                        "(letters, digits, '_'), so it can be a {placeholder}")
    if key in BUILTIN_PLACEHOLDERS:
        raise SpecError(f"{where}: parameter name {key!r} is reserved for the launcher's own placeholder")


def _check_value(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        raise SpecError(f"{where}: values must be scalars or lists, not a mapping")
    if isinstance(value, list):
        for v in value:
            if isinstance(v, (Mapping, list)):
                raise SpecError(f"{where}: list values may only hold scalars")
            _check_value(v, where)
    elif not isinstance(value, (str, int, float, bool)) and value is not None:
        raise SpecError(f"{where}: unsupported value of type {type(value).__name__}; "
                        "quote it to make it a string")
    if isinstance(value, str) and "\x00" in value:
        raise SpecError(f"{where}: value {show(value)} contains a NUL character, which no program can receive")
    return canonical_value(value)


def _check_nonempty_str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{what} must be a non-empty string")
    if "\x00" in value:
        raise SpecError(f"{what} contains a NUL character")
    return value


def _check_int(value: Any, what: str, minimum: float, maximum: float) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise SpecError(f"{what} must be an integer from {minimum:,} to {maximum:,}, got {show(value)}")
    return value


def _check_number(value: Any, what: str, minimum: float, maximum: float) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not minimum <= value <= maximum):
        raise SpecError(f"{what} must be a finite number from {minimum:g} to {maximum:g}, got {show(value)}")
    return float(value)
