"""The run's command: a template of words with ``{placeholder}`` fields, rendered without a shell.

The command is where a sweep meets the operating system, so everything that
decides what a run's argument list will be lives here, next to the checks that
prove every run of a sweep can start: placeholders are known names with sane
format specs, boolean flags are fixed words, two values never give the same
command line, and no run's arguments exceed the OS's limits. The checks work
per value, never per run, so they stay linear in the size of the sweep file.
"""

from __future__ import annotations

import difflib
import functools
import re
import shlex
import string
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SpecError
from .identity import HASH_CHARS, LABEL_MAX_CHARS, RunSpec

#: What a parameter name (and so a placeholder) may be: a Python identifier.
PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Placeholders the launcher fills in besides the parameters.
BUILTIN_PLACEHOLDERS = ("run_dir", "run_id", "attempt")

MAX_FORMAT_NUMBER = 1000        # width or precision in a format spec such as {x:>8}
MAX_ARG_BYTES = 128 * 1024      # Linux's MAX_ARG_STRLEN, the longest single argument
MAX_COMMAND_BYTES = 1 << 20     # the whole command, well inside ARG_MAX with the environment


@dataclass(frozen=True)
class Field:
    """One ``{name}`` or ``{name:spec}`` placeholder in the command."""

    name: str
    spec: str = ""

    def __str__(self) -> str:
        return f"{{{self.name}:{self.spec}}}" if self.spec else f"{{{self.name}}}"


Word = tuple["str | Field", ...]


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


def flag_of(word: Word, flags: Mapping[str, str]) -> str | None:
    """The flag parameter if ``word`` is exactly ``{name}`` for one of ``flags``."""
    if len(word) == 1 and isinstance(word[0], Field) and word[0].name in flags and not word[0].spec:
        return word[0].name
    return None


def build_argv(command: str, flags: Mapping[str, str], params: Mapping[str, Any], *,
               run_dir: str, run_id: str, attempt: int) -> list[str]:
    """One run's command as an argument list: each word formatted on its own, no shell.

    Formatting word by word means a value with spaces or quotes stays one
    argument and can never inject a second command. A leading ``python`` or
    ``python3`` is the interpreter running sweeprun, so the run sees the
    same environment (and torch) as the launcher.
    """
    values = {**params, "run_dir": run_dir, "run_id": run_id, "attempt": attempt}
    words: list[str] = []
    for word in split_command(command):
        flag = flag_of(word, flags)
        if flag is not None:
            if values[flag] is True:
                words.extend(shlex.split(flags[flag]))
            continue
        words.append("".join(p if isinstance(p, str) else render_value(values[p.name], p.spec)
                             for p in word))
    if words and words[0] in ("python", "python3"):
        words[0] = sys.executable
    return words


def suggest(word: str, options: Iterable[str]) -> str:
    """`` (did you mean ...?)`` for a near miss: most unknown names are typos of a known one."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def show(value: Any, limit: int = 60) -> str:
    """A value as a user wrote it, cut short, on one line: messages must stay readable."""
    if isinstance(value, str):
        text = repr(value)
    else:
        text = render_value(value) if isinstance(value, (bool, type(None), list)) else repr(value)
        if isinstance(value, list):
            text = f"[{text}]"
    return text if len(text) <= limit else f"{text[:limit - 5]}...{text[-2:]} ({len(text):,} characters)"


def check_flags(flags: Any, grid: dict[str, list[Any]], params: dict[str, Any],
                 at: Any) -> dict[str, str]:
    """The ``flags:`` key: a fixed flag word for each parameter that is true or false in every run."""
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
            raise SpecError(f"{where}: flags.{key}: {show(key)} is not a parameter{suggest(str(key), known)}; "
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
                                f"but it takes {show(value)}")
        out[str(key)] = flag
    return out


def check_command(command: str, *, sweep_name: str, store: str, grid: Mapping[str, list[Any]],
                  params: Mapping[str, Any], flags: Mapping[str, str], where: str,
                  at: Callable[[str], str]) -> None:
    """Every run's command can be built and started: names known, specs valid, lengths within the OS's."""
    try:
        shlex.split(command)
    except ValueError as exc:
        raise SpecError(f"{where}: command cannot be split into words: {exc}") from None
    try:
        words = split_command(command)
    except ValueError as exc:
        raise SpecError(f"{where}: bad placeholder in command: {exc} "
                        "(write {{ and }} for literal braces)") from None
    known = sorted(set(grid) | set(params) | set(BUILTIN_PLACEHOLDERS))
    uses: dict[str, list[Field]] = {}
    for word in words:
        flag = flag_of(word, flags)
        for part in word:
            if not isinstance(part, Field):
                continue
            if not PARAM_RE.match(part.name):
                base = re.split(r"[.\[]", part.name, maxsplit=1)[0]
                raise SpecError(f"{where}: placeholder {show(str(part))} is not a name: placeholders are "
                                f"parameter names like {{{base or 'lr'}}}, without attributes, indexes or "
                                "positions")
            if part.name not in known:
                raise SpecError(f"{where}: unknown placeholder {{{part.name}}}{suggest(part.name, known)}; "
                                f"known: {', '.join(known)}")
            if part.name in flags and flag is None:
                raise SpecError(f"{where}: {{{part.name}}} is a flag (flags.{part.name}); write it as a word "
                                f"of its own, `{{{part.name}}}`, with no format spec")
            if part.spec:
                _check_format_spec(part, where)
            uses.setdefault(part.name, []).append(part)

    for name in flags:
        if name not in uses:
            raise SpecError(f"{at(f'flags.{name}')}: flags.{name} is never used: put {{{name}}} in the command "
                            "as a word of its own where the flag belongs")
    samples: dict[str, list[Any]] = {**{k: v for k, v in grid.items()},
                                     **{k: [v] for k, v in params.items()},
                                     "run_dir": ["x"], "run_id": ["x"], "attempt": [1]}
    for name, fields in uses.items():
        if name in flags:
            continue
        place = at(f"grid.{name}") if name in grid else at(f"params.{name}") if name in params else where
        for value in samples[name]:
            for f in fields:
                if not f.spec:
                    continue
                try:
                    render_value(value, f.spec)
                except (ValueError, TypeError, OverflowError) as exc:
                    raise SpecError(f"{where}: {f} cannot format {name} = {show(value)}: {exc}") from None
        if name in grid and any(f.spec for f in fields):
            no_duplicate_values(grid[name], lambda v, fs=fields: tuple(render_value(v, f.spec) for f in fs),
                                 f"{place}: grid.{name}", f" in {' '.join(str(f) for f in fields)}")
    _check_lengths(words, sweep_name=sweep_name, store=store, grid=grid, params=params, flags=flags,
                   where=where)


def _check_format_spec(part: Field, where: str) -> None:
    if "{" in part.spec or "}" in part.spec:
        raise SpecError(f"{where}: placeholder {show(str(part))} has a placeholder inside its format spec; "
                        "format specs are fixed text such as {lr:.0e}")
    for number in re.findall(r"[0-9]+", part.spec):
        if len(number) > 4 or int(number) > MAX_FORMAT_NUMBER:
            raise SpecError(f"{where}: placeholder {show(str(part))} asks for a width or precision over "
                            f"{MAX_FORMAT_NUMBER}")


def _check_lengths(words: tuple[Word, ...], *, sweep_name: str, store: str, grid: Mapping[str, list[Any]],
                   params: Mapping[str, Any], flags: Mapping[str, str], where: str) -> None:
    """No run's command may exceed the OS's limits; checked per value, so linear in the file.

    Each parameter's longest rendering is found on its own: the worst run takes
    the longest value of every axis, whose run is then named in the message.
    """
    run_id_bytes = LABEL_MAX_CHARS + 1 + HASH_CHARS
    builtin_bytes = {"run_id": run_id_bytes, "attempt": 20,
                     "run_dir": len(store.encode()) + len(sweep_name) + len("/runs/") + run_id_bytes + 1}
    values: dict[str, list[Any]] = {**grid, **{k: [v] for k, v in params.items()}}

    def longest(name: str, fields: list[Field]) -> tuple[int, Any]:
        """``(bytes, value)`` of the value of ``name`` that renders longest in ``fields``."""
        if name in builtin_bytes:
            return builtin_bytes[name] * len(fields), None
        if name in flags:
            flag_bytes = sum(len(w.encode()) + 1 for w in shlex.split(flags[name]))
            return (flag_bytes, True) if True in values[name] else (0, False)
        best = (-1, None)
        for value in values[name]:
            n = sum(len(render_value(value, f.spec).encode("utf-8", "surrogatepass")) for f in fields)
            if n > best[0]:
                best = (n, value)
        return best

    def worst_run(chosen: dict[str, Any]) -> str:
        run_params = {**params, **{k: v[0] for k, v in grid.items()},
                      **{k: v for k, v in chosen.items() if k in grid}}
        return RunSpec.from_params(run_params, label_keys=list(grid)).run_id

    total_fixed = 0
    per_name: dict[str, list[Field]] = {}
    for i, word in enumerate(words):
        flag = flag_of(word, flags)
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
                            f"{i + 1} of the command would be {size:,} bytes with {culprit} = {show(value)}; "
                            f"the OS allows {MAX_ARG_BYTES // 1024} KiB per argument")
        total_fixed += literal + 1
    worst_all = {name: longest(name, fields) for name, fields in per_name.items()}
    total = total_fixed + sum(n for n, _ in worst_all.values())
    if total > MAX_COMMAND_BYTES:
        culprit = max(worst_all, key=lambda k: worst_all[k][0])
        raise SpecError(f"{where}: run {worst_run({k: v for k, (_, v) in worst_all.items()})}: the command "
                        f"would be {total:,} bytes, {worst_all[culprit][0]:,} of them from {culprit} = "
                        f"{show(worst_all[culprit][1])}; the limit is {MAX_COMMAND_BYTES // 1024} KiB")


def no_duplicate_values(values: list[Any], key: Any, where: str, how: str) -> None:
    """Refuse two values that give runs the same command (``1`` and ``'1'``), in one pass."""
    seen: dict[Any, Any] = {}
    for value in values:
        k = key(value)
        if k in seen:
            first = seen[k]
            if type(first) is type(value) and first == value:
                raise SpecError(f"{where} lists {show(value)} more than once")
            shown = k if isinstance(k, str) else " ".join(k)
            raise SpecError(f"{where} lists {show(first)} and {show(value)}, which both give "
                            f"{show(shown)}{how} on the command line; keep one")
        seen[k] = value
