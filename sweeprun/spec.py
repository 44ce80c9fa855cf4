"""The sweep file: load, validate, expand the grid, build each run's command.

Everything here is checked before anything runs or is written: a typo found
after three hours of training is a typo found too late. Errors name the file,
the line and the key, and suggest the closest valid key.
"""

from __future__ import annotations

import difflib
import itertools
import re
import shlex
import string
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError
from .identity import RunSpec, canonical_value

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Placeholders the launcher fills in besides the parameters.
BUILTIN_PLACEHOLDERS = ("run_dir", "run_id", "attempt")

DEFAULTS: dict[str, Any] = {"max_attempts": 3, "grace_s": 30.0, "lease_s": 60.0}
KEYS = ("name", "command", "store", "grid", "params", "max_attempts", "ledger", "grace_s", "lease_s")
REQUIRED = ("name", "command", "grid")


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file, with command-line overrides applied."""

    name: str
    command: str
    store: str
    grid: dict[str, list[Any]]
    params: dict[str, Any] = field(default_factory=dict)
    max_attempts: int = 3
    ledger: str | None = None
    grace_s: float = 30.0
    lease_s: float = 60.0
    source: str = "<sweep>"
    text: str = ""  # the file as written, kept in the store as sweep.yaml

    def runs(self) -> list[RunSpec]:
        """The cartesian product of the grid (first axis slowest), fixed params added."""
        axes = list(self.grid)
        out: list[RunSpec] = []
        seen: dict[str, dict[str, Any]] = {}
        for index, values in enumerate(itertools.product(*(self.grid[a] for a in axes))):
            params = {**self.params, **dict(zip(axes, values, strict=True))}
            run = RunSpec.from_params(params, label_keys=axes, index=index)
            if run.run_id in seen:
                raise SpecError(f"{self.source}: grid gives the same run twice ({run.run_id}); "
                                "remove the duplicate value")
            seen[run.run_id] = params
            out.append(run)
        return out

    def argv(self, run: RunSpec, run_dir: str = "", attempt: int = 1) -> list[str]:
        """The run's command as an argument list: each word formatted on its own, no shell.

        Formatting word by word means a value with spaces or quotes stays one
        argument and can never inject a second command. A leading ``python`` or
        ``python3`` is the interpreter running sweeprun, so the run sees the
        same environment (and torch) as the launcher.
        """
        values = {**run.params, "run_dir": run_dir, "run_id": run.run_id, "attempt": attempt}
        words = [w.format(**{k: _format_value(v) for k, v in values.items()})
                 for w in shlex.split(self.command)]
        if words and words[0] in ("python", "python3"):
            words[0] = sys.executable
        return words

    def with_overrides(self, **overrides: Any) -> SweepSpec:
        """Apply command-line flags (``None`` means not given), validated like the file."""
        given = {k: v for k, v in overrides.items() if v is not None}
        for key, value in given.items():
            if key == "store":
                _check_nonempty_str(value, "--store")
            elif key == "ledger":
                _check_nonempty_str(value, "--ledger")
            elif key == "max_attempts":
                _check_int(value, "--max-attempts", minimum=1)
            elif key in ("grace_s", "lease_s"):
                _check_number(value, f"--{key.replace('_', '-')}", minimum=0.0 if key == "grace_s" else 1.0)
        return replace(self, **given)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return ",".join(_format_value(v) for v in value)
    return str(value)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float, as a user means it (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _no_duplicate_keys(node: yaml.Node, source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                raise SpecError(f"{source}:{key.start_mark.line + 1}: key {name!r} appears twice")
            seen.add(name)
            _no_duplicate_keys(value, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _no_duplicate_keys(item, source)


def _lines(node: yaml.Node) -> dict[str, int]:
    """``key path -> line`` for top-level keys and one level below, for error messages."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            out[str(key.value)] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                for k2, _ in value.value:
                    out[f"{key.value}.{k2.value}"] = k2.start_mark.line + 1
    return out


def _suggest(word: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; raises :class:`SpecError` naming file, line and key."""
    p = Path(path)
    source = str(path)
    if not p.exists():
        raise SpecError(f"sweep file {source} does not exist")
    if p.is_dir():
        raise SpecError(f"sweep file {source} is a folder; give the path of a .yaml file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"sweep file {source} is not UTF-8 text") from None
    except OSError as exc:
        raise SpecError(f"cannot read sweep file {source}: {exc.strerror}") from None
    return parse_spec(text, source)


def parse_spec(text: str, source: str = "<sweep>") -> SweepSpec:
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{source}{where}: invalid YAML: {problem}") from None
    if data is None:
        raise SpecError(f"{source}: the sweep file is empty; it needs name, command and grid")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the sweep file must be a mapping of keys (name, command, grid, ...), "
                        f"not a {type(data).__name__}")
    _no_duplicate_keys(node, source)
    lines = _lines(node)

    def at(key: str) -> str:
        return f"{source}:{lines[key]}" if key in lines else source

    for key in data:
        if key not in KEYS:
            raise SpecError(f"{at(str(key))}: unknown key {key!r}{_suggest(str(key), KEYS)}")
    for key in REQUIRED:
        if key not in data or data[key] is None:
            raise SpecError(f"{source}: missing required key {key!r}")

    name = data["name"]
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise SpecError(f"{at('name')}: name {name!r} may only use letters, digits, '.', '_' and '-' "
                        "(it names the sweep's folder)")
    command = data["command"]
    if not isinstance(command, str) or not command.strip():
        raise SpecError(f"{at('command')}: command must be a non-empty string")
    store = data.get("store", None)
    if store is not None:
        _check_nonempty_str(store, f"{at('store')}: store")

    grid = data["grid"]
    if not isinstance(grid, dict) or not grid:
        raise SpecError(f"{at('grid')}: grid must map parameter names to lists of values, "
                        "e.g. `lr: [0.1, 0.01]`")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise SpecError(f"{at('params')}: params must map parameter names to values")

    clean_grid: dict[str, list[Any]] = {}
    for key, values in grid.items():
        where = at(f"grid.{key}")
        _check_param_name(key, where)
        if not isinstance(values, list):
            raise SpecError(f"{where}: grid.{key} must be a list of values; write [{values}] for one value")
        if not values:
            raise SpecError(f"{where}: grid.{key} is an empty list, so the sweep has no runs; "
                            "give at least one value")
        canon = [_check_value(v, f"{where}: grid.{key}") for v in values]
        dupes = {repr(v) for v in canon if canon.count(v) > 1 and not isinstance(v, bool)}
        if dupes:
            raise SpecError(f"{where}: grid.{key} lists {', '.join(sorted(dupes))} more than once")
        clean_grid[str(key)] = canon
    clean_params: dict[str, Any] = {}
    for key, value in params.items():
        where = at(f"params.{key}")
        _check_param_name(key, where)
        if key in clean_grid:
            raise SpecError(f"{where}: {key!r} is both in grid and in params; keep one")
        clean_params[str(key)] = _check_value(value, f"{where}: params.{key}")

    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise SpecError(f"{at('command')}: command cannot be split into words: {exc}") from None
    known = set(clean_grid) | set(clean_params) | set(BUILTIN_PLACEHOLDERS)
    for word in words:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(word) if f is not None]
        except ValueError as exc:
            raise SpecError(f"{at('command')}: bad placeholder in {word!r}: {exc} "
                            "(write {{ and }} for literal braces)") from None
        for field_name in fields:
            base = re.split(r"[.\[]", field_name, maxsplit=1)[0]
            if base not in known:
                raise SpecError(f"{at('command')}: unknown placeholder {{{field_name}}}"
                                f"{_suggest(base, sorted(known))}; known: {', '.join(sorted(known))}")

    spec = SweepSpec(
        name=name, command=command, store=store or "", grid=clean_grid, params=clean_params,
        max_attempts=_check_int(data.get("max_attempts", DEFAULTS["max_attempts"]),
                                f"{at('max_attempts')}: max_attempts", minimum=1),
        ledger=_check_nonempty_str(data["ledger"], f"{at('ledger')}: ledger") if data.get("ledger") is not None else None,
        grace_s=_check_number(data.get("grace_s", DEFAULTS["grace_s"]), f"{at('grace_s')}: grace_s", 0.0),
        lease_s=_check_number(data.get("lease_s", DEFAULTS["lease_s"]), f"{at('lease_s')}: lease_s", 1.0),
        source=source, text=text,
    )
    spec.runs()  # duplicate runs after canonicalisation are an error now, not at launch
    return spec


def _check_param_name(key: Any, where: str) -> None:
    if not isinstance(key, str) or not PARAM_RE.match(key):
        raise SpecError(f"{where}: parameter name {key!r} must be a Python identifier "
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
    if not isinstance(value, (str, int, float, bool, list)) and value is not None:
        raise SpecError(f"{where}: unsupported value {value!r} ({type(value).__name__}); "
                        "quote it to make it a string")
    return canonical_value(value)


def _check_nonempty_str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{what} must be a non-empty string")
    return value


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_number(value: Any, what: str, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise SpecError(f"{what} must be a number >= {minimum:g}, got {value!r}")
    return float(value)
