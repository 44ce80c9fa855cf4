"""The sweep file: load, validate, expand the grid, build each run's command.

Everything here is checked before anything runs or is written: a typo found
after three hours of training is a typo found too late. Errors name the file,
the line and the key, and suggest the closest valid key. Every check is linear
in the size of the file (never in the number of runs), so a hostile or huge
file is refused in seconds.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import math
import os
import re
import shlex
import stat
import string
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError
from .identity import HASH_CHARS, LABEL_MAX_CHARS, RunSpec, canonical_value

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Placeholders the launcher fills in besides the parameters.
BUILTIN_PLACEHOLDERS = ("run_dir", "run_id", "attempt")

DEFAULTS: dict[str, Any] = {"max_attempts": 3, "max_lost": 5, "grace_s": 30.0, "lease_s": 60.0,
                            "max_runs": 1_000_000}
KEYS = ("name", "command", "store", "grid", "params", "flags", "max_attempts", "max_lost", "ledger",
        "grace_s", "lease_s", "max_runs")
REQUIRED = ("name", "command", "grid")

#: Limits that keep a hostile or mistaken file from costing more than seconds.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 64                  # nesting of lists and mappings; a sweep file needs 3
MAX_NODES = 1_000_000           # values in the file once aliases are expanded
MAX_INT_DIGITS = 4300           # Python refuses to print longer integers
MAX_NAME_CHARS = 128            # the name is a folder and part of the ledger's file name
MAX_FORMAT_NUMBER = 1000        # width or precision in a format spec such as {x:>8}
MAX_ARG_BYTES = 128 * 1024      # Linux's MAX_ARG_STRLEN, the longest single argument
MAX_COMMAND_BYTES = 1 << 20     # the whole command, well inside ARG_MAX with the environment
#: ``(minimum, maximum)`` of the numeric settings, from the file or the command line.
RANGES: dict[str, tuple[float, float]] = {
    "max_attempts": (1, 1_000_000), "max_lost": (1, 1_000_000), "grace_s": (0.0, 86_400.0), "lease_s": (1.0, 86_400.0),
    "max_runs": (1, 10**12), "workers": (1, 256),
}

_MAX_INT_BITS = (10**MAX_INT_DIGITS - 1).bit_length()


@dataclass(frozen=True)
class Field:
    """One ``{name}`` or ``{name:spec}`` placeholder in the command."""

    name: str
    spec: str = ""

    def __str__(self) -> str:
        return f"{{{self.name}:{self.spec}}}" if self.spec else f"{{{self.name}}}"


Word = tuple["str | Field", ...]


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

    def size(self) -> int:
        """The number of runs, counted without expanding the grid."""
        return math.prod(len(v) for v in self.grid.values())

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
        words: list[str] = []
        for word in split_command(self.command):
            flag = _flag_of(word, self.flags)
            if flag is not None:
                if values[flag] is True:
                    words.extend(shlex.split(self.flags[flag]))
                continue
            words.append("".join(p if isinstance(p, str) else render_value(values[p.name], p.spec)
                                 for p in word))
        if words and words[0] in ("python", "python3"):
            words[0] = sys.executable
        return words

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


def render_value(value: Any, spec: str = "") -> str:
    """A parameter as it appears on the command line.

    Without a format spec: booleans ``true``/``false``, null ``null``, lists
    comma-joined, numbers in their shortest form. With one, numbers go through
    Python's format mini-language (``{lr:.0e}`` gives ``1e-04``) and anything
    else is formatted as that text (``{name:>8}`` pads it).
    """
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    if isinstance(value, bool):
        text = str(value).lower()
    elif value is None:
        text = "null"
    elif isinstance(value, list):
        text = ",".join(render_value(v) for v in value)
    else:
        text = str(value)
    return format(text, spec) if spec else text


@functools.lru_cache(maxsize=64)
def split_command(command: str) -> tuple[Word, ...]:
    """The command as words of literal text and placeholders; raises ``ValueError`` on bad syntax."""
    words = []
    for word in shlex.split(command):
        parts: list[str | Field] = []
        for literal, name, spec, conversion in string.Formatter().parse(word):
            if literal:
                parts.append(literal)
            if name is None:
                continue
            if conversion is not None:
                raise ValueError(f"{{{name}!{conversion}}} has a conversion; placeholders take no '!'")
            parts.append(Field(name, spec or ""))
        words.append(tuple(parts))
    return tuple(words)


def _flag_of(word: Word, flags: Mapping[str, str]) -> str | None:
    """The flag parameter if ``word`` is exactly ``{name}`` for one of ``flags``."""
    if len(word) == 1 and isinstance(word[0], Field) and word[0].name in flags and not word[0].spec:
        return word[0].name
    return None


# --------------------------------------------------------------------------- YAML 1.2 reading


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema meanings and bounded cost.

    PyYAML reads YAML 1.1, where ``NO`` is false, ``010`` is eight and
    ``2024-01-01`` a date; users of every other modern tool mean a string, ten
    and a string. Composition also refuses deep nesting and alias expansion
    past fixed limits, so a "billion laughs" file costs milliseconds.
    """

    source = "<sweep>"

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        where = f"{self.source}:{event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._sizes:
                raise SpecError(f"{where}: alias *{event.anchor} refers to the value that contains it; "
                                "a value cannot include itself")
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if self._depth >= MAX_DEPTH:
                raise SpecError(f"{where}: values are nested more than {MAX_DEPTH} levels deep; "
                                "a sweep file needs lists of scalars")
            self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                self._depth -= 1
        if id(node) not in self._sizes:
            if isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._sizes[id(n)] for n in node.value)
            elif isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
            else:
                size = 1
            if size > MAX_NODES:
                raise SpecError(f"{where}: aliases expand the file to more than {MAX_NODES:,} values; "
                                "write the values out or use fewer aliases")
            self._sizes[id(node)] = size
        return node


def _no_merge(self: _Loader, node: yaml.MappingNode) -> None:
    """YAML 1.2 has no ``<<`` merge keys; an explicit ``!!merge`` is refused, never expanded."""
    for key, _ in node.value:
        if key.tag == "tag:yaml.org,2002:merge":
            raise _yaml_error(self, key, "merge keys (<<) are not supported in a sweep file")


_Loader.flatten_mapping = _no_merge  # type: ignore[assignment,method-assign]
_Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", list("-+0123456789.")),
):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), _first)


def _yaml_error(loader: _Loader, node: yaml.Node, problem: str) -> SpecError:
    return SpecError(f"{loader.source}:{node.start_mark.line + 1}: {problem}")


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    match = re.fullmatch(r"([-+]?)(?:0o([0-7]+)|0x([0-9a-fA-F]+)|([0-9]+))", text)
    if match is None:
        raise _yaml_error(loader, node, f"{_show(text)} is not an integer")
    sign, octal, hexa, decimal = match.groups()
    if decimal is not None and len(decimal.lstrip("0")) > MAX_INT_DIGITS:
        raise _yaml_error(loader, node, f"an integer of {len(decimal):,} digits is too long "
                                        f"(at most {MAX_INT_DIGITS}); quote it to make it a string")
    value = int(octal, 8) if octal else int(hexa, 16) if hexa else int(decimal)
    if value.bit_length() > _MAX_INT_BITS:
        raise _yaml_error(loader, node, f"an integer over {MAX_INT_DIGITS} digits is too long; "
                                        "quote it to make it a string")
    return -value if sign == "-" else value


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    text = str(loader.construct_scalar(node)).lower()
    special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
    if text in special:
        return special[text]
    try:
        return float(text)
    except ValueError:
        raise _yaml_error(loader, node, f"{_show(text)} is not a number") from None


def _construct_bool(loader: _Loader, node: yaml.ScalarNode) -> bool:
    text = str(loader.construct_scalar(node)).lower()
    if text not in ("true", "false"):
        raise _yaml_error(loader, node, f"{_show(text)} is not a boolean (true or false)")
    return text == "true"


def _construct_unsupported(loader: _Loader, node: yaml.Node) -> Any:
    raise _yaml_error(loader, node, f"tag {node.tag} is not supported in a sweep file; "
                                    "values are strings, numbers, booleans, null and lists")


_Loader.yaml_constructors = {
    tag: constructor for tag, constructor in yaml.SafeLoader.yaml_constructors.items()
    if tag in ("tag:yaml.org,2002:null", "tag:yaml.org,2002:str", "tag:yaml.org,2002:seq",
               "tag:yaml.org,2002:map")
}
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
_Loader.add_constructor(None, _construct_unsupported)


def _read_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader checks for unprintable characters here
        loader.source = source
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{source}{where}: invalid YAML: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return node, data


def _no_duplicate_keys(node: yaml.Node, source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                raise SpecError(f"{source}:{key.start_mark.line + 1}: key {_show(name)} appears twice")
            seen.add(name)
            _no_duplicate_keys(value, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _no_duplicate_keys(item, source)


def _lines(node: yaml.Node | None) -> dict[str, int]:
    """``key path -> line`` for top-level keys and one level below, for error messages."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            out[str(key.value)] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                for k2, _ in value.value:
                    out[f"{key.value}.{k2.value}"] = k2.start_mark.line + 1
    return out


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: Any, limit: int = 60) -> str:
    """A value as a user wrote it, cut short, on one line: messages must stay readable."""
    if isinstance(value, str):
        text = repr(value)
    else:
        text = render_value(value) if isinstance(value, (bool, type(None), list)) else repr(value)
        if isinstance(value, list):
            text = f"[{text}]"
    return text if len(text) <= limit else f"{text[:limit - 5]}...{text[-2:]} ({len(text):,} characters)"


# --------------------------------------------------------------------------- loading


def read_sweep_text(path: str | Path) -> str:
    """The sweep file's text: a regular file of at most ``MAX_FILE_BYTES``, never waiting on it.

    ``O_NONBLOCK`` lets a FIFO be opened and refused instead of waiting for a
    writer; the size bound keeps ``/dev/zero`` or a huge file from filling memory.
    """
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SpecError(f"sweep file {source} does not exist") from None
    except OSError as exc:
        raise SpecError(f"cannot read sweep file {source}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise SpecError(f"sweep file {source} is a folder; give the path of a .yaml file")
        if not stat.S_ISREG(info.st_mode):
            raise SpecError(f"sweep file {source} is not a regular file (a device, pipe or socket); "
                            "give the path of a .yaml file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, min(1 << 16, MAX_FILE_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise SpecError(f"cannot read sweep file {source}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:
        raise SpecError(f"sweep file {source} is over {MAX_FILE_BYTES // 1024} KiB; "
                        "a sweep file lists values, not data")
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"sweep file {source} is not UTF-8 text") from None


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
    node, data = _read_yaml(text, source)
    if data is None:
        raise SpecError(f"{source}: the sweep file is empty; it needs name, command and grid")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the sweep file must be a mapping of keys (name, command, grid, ...), "
                        f"not a {'list' if isinstance(data, list) else 'single value'}")
    assert node is not None
    _no_duplicate_keys(node, source)
    lines = _lines(node)

    def at(key: str) -> str:
        return f"{source}:{lines[key]}" if key in lines else source

    for key in data:
        if key not in KEYS:
            raise SpecError(f"{at(str(key))}: unknown key {_show(key)}{_suggest(str(key), KEYS)}")
    for key in REQUIRED:
        if key not in data or data[key] is None:
            raise SpecError(f"{source}: missing required key {key!r}")

    name = data["name"]
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise SpecError(f"{at('name')}: name {_show(name)} may only use letters, digits, '.', '_' and '-' "
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
            raise SpecError(f"{where}: grid.{key} must be a list of values; write [{_show(values)}] "
                            "for one value")
        if not values:
            raise SpecError(f"{where}: grid.{key} is an empty list, so the sweep has no runs; "
                            "give at least one value")
        canon = [_check_value(v, f"{where}: grid.{key}") for v in values]
        _no_duplicate_values(canon, lambda v: render_value(v), f"{where}: grid.{key}", "")
        clean_grid[str(key)] = canon
    clean_params: dict[str, Any] = {}
    for key, value in params.items():
        where = at(f"params.{key}")
        _check_param_name(key, where)
        if key in clean_grid:
            raise SpecError(f"{where}: {key!r} is both in grid and in params; keep one")
        clean_params[str(key)] = _check_value(value, f"{where}: params.{key}")

    max_runs = _check_int(data.get("max_runs", DEFAULTS["max_runs"]), f"{at('max_runs')}: max_runs",
                          *RANGES["max_runs"])
    size = math.prod(len(v) for v in clean_grid.values())
    if size > max_runs:
        raise SpecError(f"{at('grid')}: the grid has {size:,} runs, more than max_runs ({max_runs:,}); "
                        "shrink the grid or raise `max_runs:` in the file")

    flags = _check_flags(data.get("flags"), clean_grid, clean_params, at)
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
    )
    _check_command(spec, at("command"), at)
    return spec


def _check_flags(flags: Any, grid: dict[str, list[Any]], params: dict[str, Any],
                 at: Any) -> dict[str, str]:
    if flags is None:
        return {}
    if not isinstance(flags, dict):
        raise SpecError(f"{at('flags')}: flags must map boolean parameters to their flag, "
                        "e.g. `flags: {fp16: --fp16}`")
    out: dict[str, str] = {}
    for key, flag in flags.items():
        where = at(f"flags.{key}")
        if key not in grid and key not in params:
            known = sorted(set(grid) | set(params))
            raise SpecError(f"{where}: flags.{key}: {_show(key)} is not a parameter{_suggest(str(key), known)}; "
                            "add it to grid or params")
        if not isinstance(flag, str) or not flag.strip() or "\x00" in flag:
            raise SpecError(f"{where}: flags.{key} must be the flag to pass when {key} is true, e.g. --{key}")
        try:
            words = shlex.split(flag)
        except ValueError as exc:
            raise SpecError(f"{where}: flags.{key} cannot be split into words: {exc}") from None
        if any("{" in w or "}" in w for w in words) or not words:
            raise SpecError(f"{where}: flags.{key} is a fixed flag; it cannot hold placeholders")
        values = grid[key] if key in grid else [params[key]]
        for value in values:
            if not isinstance(value, bool):
                raise SpecError(f"{where}: flags.{key}: {key} must be true or false in every run, "
                                f"but it takes {_show(value)}")
        out[str(key)] = flag
    return out


def _check_command(spec: SweepSpec, where: str, at: Any) -> None:
    """Every run's command can be built and started: names known, specs valid, lengths within the OS's."""
    try:
        shlex.split(spec.command)
    except ValueError as exc:
        raise SpecError(f"{where}: command cannot be split into words: {exc}") from None
    try:
        words = split_command(spec.command)
    except ValueError as exc:
        raise SpecError(f"{where}: bad placeholder in command: {exc} "
                        "(write {{ and }} for literal braces)") from None
    known = sorted(set(spec.grid) | set(spec.params) | set(BUILTIN_PLACEHOLDERS))
    uses: dict[str, list[Field]] = {}
    for word in words:
        flag = _flag_of(word, spec.flags)
        for part in word:
            if not isinstance(part, Field):
                continue
            if not PARAM_RE.match(part.name):
                base = re.split(r"[.\[]", part.name, maxsplit=1)[0]
                raise SpecError(f"{where}: placeholder {_show(str(part))} is not a name: placeholders are "
                                f"parameter names like {{{base or 'lr'}}}, without attributes, indexes or "
                                "positions")
            if part.name not in known:
                raise SpecError(f"{where}: unknown placeholder {{{part.name}}}{_suggest(part.name, known)}; "
                                f"known: {', '.join(known)}")
            if part.name in spec.flags and flag is None:
                raise SpecError(f"{where}: {{{part.name}}} is a flag (flags.{part.name}); write it as a word "
                                f"of its own, `{{{part.name}}}`, with no format spec")
            if part.spec:
                _check_format_spec(part, where)
            uses.setdefault(part.name, []).append(part)

    for name in spec.flags:
        if name not in uses:
            raise SpecError(f"{at(f'flags.{name}')}: flags.{name} is never used: put {{{name}}} in the command "
                            "as a word of its own where the flag belongs")
    samples: dict[str, list[Any]] = {**{k: v for k, v in spec.grid.items()},
                                     **{k: [v] for k, v in spec.params.items()},
                                     "run_dir": ["x"], "run_id": ["x"], "attempt": [1]}
    for name, fields in uses.items():
        if name in spec.flags:
            continue
        place = at(f"grid.{name}") if name in spec.grid else at(f"params.{name}") if name in spec.params else where
        for value in samples[name]:
            for f in fields:
                if not f.spec:
                    continue
                try:
                    render_value(value, f.spec)
                except (ValueError, TypeError, OverflowError) as exc:
                    raise SpecError(f"{where}: {f} cannot format {name} = {_show(value)}: {exc}") from None
        if name in spec.grid and any(f.spec for f in fields):
            _no_duplicate_values(spec.grid[name], lambda v, fs=fields: tuple(render_value(v, f.spec) for f in fs),
                                 f"{place}: grid.{name}", f" in {' '.join(str(f) for f in fields)}")
    _check_lengths(spec, words, where)


def _check_format_spec(part: Field, where: str) -> None:
    if "{" in part.spec or "}" in part.spec:
        raise SpecError(f"{where}: placeholder {_show(str(part))} has a placeholder inside its format spec; "
                        "format specs are fixed text such as {lr:.0e}")
    for number in re.findall(r"[0-9]+", part.spec):
        if len(number) > 4 or int(number) > MAX_FORMAT_NUMBER:
            raise SpecError(f"{where}: placeholder {_show(str(part))} asks for a width or precision over "
                            f"{MAX_FORMAT_NUMBER}")


def _check_lengths(spec: SweepSpec, words: tuple[Word, ...], where: str) -> None:
    """No run's command may exceed the OS's limits; checked per value, so linear in the file.

    Each parameter's longest rendering is found on its own: the worst run takes
    the longest value of every axis, whose run is then named in the message.
    """
    run_id_bytes = LABEL_MAX_CHARS + 1 + HASH_CHARS
    builtin_bytes = {"run_id": run_id_bytes, "attempt": 20,
                     "run_dir": len(spec.store.encode()) + len(spec.name) + len("/runs/") + run_id_bytes + 1}
    values: dict[str, list[Any]] = {**spec.grid, **{k: [v] for k, v in spec.params.items()}}

    def longest(name: str, fields: list[Field]) -> tuple[int, Any]:
        """``(bytes, value)`` of the value of ``name`` that renders longest in ``fields``."""
        if name in builtin_bytes:
            return builtin_bytes[name] * len(fields), None
        if name in spec.flags:
            flag_bytes = sum(len(w.encode()) + 1 for w in shlex.split(spec.flags[name]))
            return (flag_bytes, True) if True in values[name] else (0, False)
        best = (-1, None)
        for value in values[name]:
            n = sum(len(render_value(value, f.spec).encode("utf-8", "surrogatepass")) for f in fields)
            if n > best[0]:
                best = (n, value)
        return best

    def worst_run(chosen: dict[str, Any]) -> str:
        params = {**spec.params, **{k: v[0] for k, v in spec.grid.items()},
                  **{k: v for k, v in chosen.items() if k in spec.grid}}
        return RunSpec.from_params(params, label_keys=list(spec.grid)).run_id

    total_fixed = 0
    per_name: dict[str, list[Field]] = {}
    for i, word in enumerate(words):
        flag = _flag_of(word, spec.flags)
        if flag is not None:
            per_name.setdefault(flag, []).append(word[0])  # type: ignore[arg-type]
            continue
        literal = sum(len(p.encode("utf-8", "surrogatepass")) for p in word if isinstance(p, str))
        in_word: dict[str, list[Field]] = {}
        for p in word:
            if isinstance(p, Field):
                in_word.setdefault(p.name, []).append(p)
                per_name.setdefault(p.name, []).append(p)
        worst = {name: longest(name, fields) for name, fields in in_word.items()}
        size = literal + sum(n for n, _ in worst.values()) + 1
        if size > MAX_ARG_BYTES:
            culprit = max(worst, key=lambda k: worst[k][0])
            value = worst[culprit][1]
            raise SpecError(f"{where}: run {worst_run({k: v for k, (_, v) in worst.items()})}: argument "
                            f"{i + 1} of the command would be {size:,} bytes with {culprit} = {_show(value)}; "
                            f"the OS allows {MAX_ARG_BYTES // 1024} KiB per argument")
        total_fixed += literal + 1
    worst_all = {name: longest(name, fields) for name, fields in per_name.items()}
    total = total_fixed + sum(n for n, _ in worst_all.values())
    if total > MAX_COMMAND_BYTES:
        culprit = max(worst_all, key=lambda k: worst_all[k][0])
        raise SpecError(f"{where}: run {worst_run({k: v for k, (_, v) in worst_all.items()})}: the command "
                        f"would be {total:,} bytes, {worst_all[culprit][0]:,} of them from {culprit} = "
                        f"{_show(worst_all[culprit][1])}; the limit is {MAX_COMMAND_BYTES // 1024} KiB")


def _no_duplicate_values(values: list[Any], key: Any, where: str, how: str) -> None:
    """Refuse two values that give runs the same command (``1`` and ``'1'``), in one pass."""
    seen: dict[Any, Any] = {}
    for value in values:
        k = key(value)
        if k in seen:
            first = seen[k]
            if type(first) is type(value) and first == value:
                raise SpecError(f"{where} lists {_show(value)} more than once")
            shown = k if isinstance(k, str) else " ".join(k)
            raise SpecError(f"{where} lists {_show(first)} and {_show(value)}, which both give "
                            f"{_show(shown)}{how} on the command line; keep one")
        seen[k] = value


def _check_param_name(key: Any, where: str) -> None:
    if not isinstance(key, str) or not PARAM_RE.match(key):
        raise SpecError(f"{where}: parameter name {_show(key)} must be a Python identifier "
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
        raise SpecError(f"{where}: value {_show(value)} contains a NUL character, which no program can receive")
    return canonical_value(value)


def _check_nonempty_str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{what} must be a non-empty string")
    if "\x00" in value:
        raise SpecError(f"{what} contains a NUL character")
    return value


def _check_int(value: Any, what: str, minimum: float, maximum: float) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise SpecError(f"{what} must be an integer from {minimum:,} to {maximum:,}, got {_show(value)}")
    return value


def _check_number(value: Any, what: str, minimum: float, maximum: float) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not minimum <= value <= maximum):
        raise SpecError(f"{what} must be a finite number from {minimum:g} to {maximum:g}, got {_show(value)}")
    return float(value)
