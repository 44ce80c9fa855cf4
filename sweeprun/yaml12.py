"""The sweep file's YAML: YAML 1.2 meanings, read with a bound on every cost.

A sweep file may come from anywhere (a colleague, a pasted snippet, a hostile
upload), and it is read before anything else is checked, so this is where a
file must fail fast: nesting, alias expansion, integer length and file size all
have fixed limits, and a path that is a FIFO or a device is refused rather than
waited on. Kept apart from the sweep's keys and values so the parser can be
reasoned about (and attacked in tests) on its own.
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from .command import show
from .errors import SpecError

#: Limits that keep a hostile or mistaken file from costing more than seconds.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 64                  # nesting of lists and mappings; a sweep file needs 3
MAX_NODES = 1_000_000           # values in the file once aliases are expanded
MAX_INT_DIGITS = 4300           # Python refuses to print longer integers

_MAX_INT_BITS = (10**MAX_INT_DIGITS - 1).bit_length()


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
        raise _yaml_error(loader, node, f"{show(text)} is not an integer")
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
        raise _yaml_error(loader, node, f"{show(text)} is not a number") from None


def _construct_bool(loader: _Loader, node: yaml.ScalarNode) -> bool:
    text = str(loader.construct_scalar(node)).lower()
    if text not in ("true", "false"):
        raise _yaml_error(loader, node, f"{show(text)} is not a boolean (true or false)")
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


def read_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """The document's nodes (they know their lines) and its values; a YAML error is one line."""
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


def no_duplicate_keys(node: yaml.Node, source: str) -> None:
    """Refuse a key written twice: PyYAML would silently keep the last, and the user meant one."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                raise SpecError(f"{source}:{key.start_mark.line + 1}: key {show(name)} appears twice")
            seen.add(name)
            no_duplicate_keys(value, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            no_duplicate_keys(item, source)


def key_lines(node: yaml.Node | None) -> dict[str, int]:
    """``key path -> line`` for error messages: top-level keys and one level below
    (``grid.lr``), and the items of a top-level list with their keys (``exclude[0].lr``)."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            out[str(key.value)] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                for k2, _ in value.value:
                    out[f"{key.value}.{k2.value}"] = k2.start_mark.line + 1
            elif isinstance(value, yaml.SequenceNode):
                for i, item in enumerate(value.value):
                    out[f"{key.value}[{i}]"] = item.start_mark.line + 1
                    if isinstance(item, yaml.MappingNode):
                        for k2, _ in item.value:
                            out[f"{key.value}[{i}].{k2.value}"] = k2.start_mark.line + 1
    return out


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
