"""The sweep file's ``zip:`` and ``exclude:``: points beyond a plain grid, checked before anything runs.

A grid is rarely the sweep people mean: a large model needs a smaller batch (values
that vary together), and some corners are known to diverge (points to skip). Both
are written as values, never as code, so the same checks as the grid's apply: each
key is a parameter, each value a scalar or list, every mistake one line naming the
line of the file. An exclusion that matches no run is refused, because it is almost
always a typo that would silently run what the user meant to skip.

Every check here is linear in the size of the file, never in the number of runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .command import Field, render_value, show, split_command, suggest
from .errors import SpecError
from .identity import value_text

#: Distinct sets of keys among ``exclude`` entries that span several axes: each is one
#: lookup per run, so a hostile file cannot multiply the cost of expanding the sweep.
MAX_EXCLUDE_SHAPES = 16

Check = Callable[[Any, str], Any]   # (raw value, where) -> canonical value, or SpecError
At = Callable[[str], str]           # key path -> "file:line"


def axis_values(values: Any, where: str, label: str, check_value: Check) -> list[Any]:
    """The checked values of one axis (``label``: ``grid.lr``, ``zip.batch``): a non-empty
    list, each value checked as any parameter value is."""
    if not isinstance(values, list):
        raise SpecError(f"{where}: {label} must be a list of values; write [{show(values)}] for one value")
    if not values:
        raise SpecError(f"{where}: {label} is an empty list, so the sweep has no runs; give at least one value")
    return [check_value(v, f"{where}: {label}") for v in values]


def parse_zip(value: Any, at: At, check_name: Callable[[Any, str], None], check_value: Check,
              grid: Mapping[str, list[Any]]) -> dict[str, dict[str, list[Any]]]:
    """``zip:``: one group (a mapping of equally long lists) or a list of groups, each
    returned under the name errors give it (``zip`` or ``zip[1]``, as the file spells it).

    The i-th values of a group's lists form one point: ``{model: [small, large],
    batch: [64, 16]}`` gives two points, not four. Each group is one axis of the
    sweep's product; grid keys and other groups multiply with it.
    """
    if value is None:
        return {}
    single = isinstance(value, dict)
    groups = [value] if single else value
    if not isinstance(groups, list) or not any(isinstance(g, dict) for g in groups):
        raise SpecError(f"{at('zip')}: zip must map parameter names to lists whose i-th values go "
                        "together, e.g. `zip: {model: [small, large], batch: [64, 16]}`")
    out: dict[str, dict[str, list[Any]]] = {}
    seen: dict[str, str] = {}  # key -> the group it is in
    for i, group in enumerate(groups):
        name = "zip" if single else f"zip[{i}]"
        if not isinstance(group, dict) or not group:
            raise SpecError(f"{at(name)}: {name} must map parameter names to lists whose i-th values go "
                            "together, e.g. `{model: [small, large], batch: [64, 16]}`")
        columns: dict[str, list[Any]] = {}
        for key, values in group.items():
            where = at(f"{name}.{key}")
            check_name(key, where)
            if key in grid:
                raise SpecError(f"{where}: {key!r} is both in grid and in {name}; keep one")
            if key in seen:
                raise SpecError(f"{where}: {key!r} is both in {seen[key]} and in {name}; keep one")
            seen[key] = name
            columns[str(key)] = axis_values(values, where, f"{name}.{key}", check_value)
        first, *others = columns
        for key in others:
            if len(columns[key]) != len(columns[first]):
                raise SpecError(f"{at(f'{name}.{key}')}: {name} lists go together value by value, so they "
                                f"must be equally long: {first} has {len(columns[first])} values, "
                                f"{key} has {len(columns[key])}")
        out[name] = columns
    return out


def distinct_values(values: list[Any], command: str, key: str) -> list[Any]:
    """A zip column's values once each, as the command shows them, for the checks that the
    command shares with the grid: a column may repeat a value (two models, one batch size),
    or two values may format alike (``{lr:.0e}``) where the rows differ in another key."""
    try:
        fields = [p for word in split_command(command) for p in word
                  if isinstance(p, Field) and p.name == key and p.spec]
    except ValueError:
        fields = []  # the command's own check says what is wrong with it
    seen: set[Any] = set()
    out = []
    for v in values:
        try:
            k = tuple(render_value(v, f.spec) for f in fields) if fields else value_text(v)
        except (ValueError, TypeError, OverflowError):
            k = ("unformattable", value_text(v))  # kept, so the command's check names it
        if k not in seen:
            seen.add(k)
            out.append(v)
    return out


def check_rows(groups: Mapping[str, dict[str, list[Any]]], command: str, at: At) -> None:
    """No two points of a group are one run, or one command line (``1`` and ``'1'``, or
    ``0.0001`` and ``0.00011`` under ``{lr:.0e}``): the grid refuses the same per value."""
    fields: dict[str, list[Field]] = {}
    for word in split_command(command):
        for part in word:
            if isinstance(part, Field) and part.spec:
                fields.setdefault(part.name, []).append(part)
    for name, group in groups.items():
        keys = list(group)
        rows = list(zip(*group.values(), strict=True))

        def described(row: tuple[Any, ...], keys: list[str] = keys) -> str:
            return "(" + ", ".join(f"{k}={show(v, 40)}" for k, v in zip(keys, row, strict=True)) + ")"

        for kind, key_of in (
            ("run", lambda row: tuple(value_text(v) for v in row)),
            ("plain", lambda row: tuple(render_value(v) for v in row)),
            ("spec", lambda row, keys=keys: tuple(
                tuple(render_value(v, f.spec) for f in fields[k]) if k in fields else render_value(v)
                for k, v in zip(keys, row, strict=True))),
        ):
            if kind == "spec" and not any(k in fields for k in keys):
                continue
            first_at: dict[Any, int] = {}
            for r, row in enumerate(rows):
                k = key_of(row)
                if k in first_at:
                    before = first_at[k]
                    if kind == "run":
                        raise SpecError(f"{at(name)}: {name} gives the point {described(row)} twice "
                                        f"(points {before + 1} and {r + 1}); keep one")
                    raise SpecError(f"{at(name)}: {name} points {before + 1} and {r + 1}, "
                                    f"{described(rows[before])} and {described(row)}, give the same "
                                    "command line; keep one")
                first_at[k] = r


def parse_exclude(value: Any, at: At, check_value: Check, grid: Mapping[str, list[Any]],
                  groups: Mapping[str, dict[str, list[Any]]], params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``exclude:``: partial points (one mapping or a list); a run matching every key of one is skipped.

    Each value must be one the key takes, and an entry naming several keys of one zip
    group must name a point of that group: otherwise the entry skips nothing, which is
    a mistake the user would only notice after the runs they meant to skip had run.
    """
    if value is None:
        return []
    single = isinstance(value, dict)
    entries = [value] if single else value
    if not isinstance(entries, list):
        raise SpecError(f"{at('exclude')}: exclude must be a list of partial points, "
                        "e.g. `exclude: [{model: large, lr: 0.1}]`")
    taken: dict[str, dict[str, Any]] = {}  # key -> its values' texts -> the value
    group_of: dict[str, str] = {}
    rows_with: dict[tuple[str, str], set[int]] = {}  # (key, value text) -> rows of its group holding it
    for key, values in grid.items():
        taken[key] = {value_text(v): v for v in values}
    for group_name, group in groups.items():
        for key, values in group.items():
            taken[key] = {}
            group_of[key] = group_name
            for r, v in enumerate(values):
                text = value_text(v)
                taken[key].setdefault(text, v)
                rows_with.setdefault((key, text), set()).add(r)
    found: dict[tuple[tuple[str, str], ...], bool] = {}  # a zip group's partial point -> has a row

    out: list[dict[str, Any]] = []
    shapes: set[tuple[str, ...]] = set()
    for i, entry in enumerate(entries):
        name = "exclude" if single else f"exclude[{i}]"
        if not isinstance(entry, dict):
            raise SpecError(f"{at(name)}: {name} must be a partial point, a mapping such as "
                            "`{model: large, lr: 0.1}`")
        if not entry:
            raise SpecError(f"{at(name)}: {name} is empty, so it would skip every run; name the keys "
                            "and values of the runs to skip")
        point: dict[str, Any] = {}
        texts: dict[str, str] = {}
        for key, raw in entry.items():
            where = at(f"{name}.{key}")
            if key in params:
                raise SpecError(f"{where}: {name}: {show(key)} is fixed in params, the same in every run; "
                                "exclude names keys of grid or zip")
            if key not in taken:
                raise SpecError(f"{where}: {name}: {show(key)} is not a key of grid or zip"
                                f"{suggest(str(key), taken)}")
            canon = check_value(raw, f"{where}: {name}.{key}")
            text = value_text(canon)
            if text not in taken[key]:
                hint = (" (an entry is one point: write one entry per value)"
                        if isinstance(canon, list) else "")
                options = list(taken[key].values())
                listed = ", ".join(show(v, 30) for v in options[:6]) + (", ..." if len(options) > 6 else "")
                raise SpecError(f"{where}: {name}: {key} = {show(canon)} matches no run; {key} takes "
                                f"{listed}{hint}")
            point[str(key)] = canon
            texts[str(key)] = text
        by_group: dict[str, list[str]] = {}
        for key in point:
            if key in group_of:
                by_group.setdefault(group_of[key], []).append(key)
        for group_name, keys in by_group.items():
            if len(keys) < 2:
                continue
            pairs = tuple(sorted((k, texts[k]) for k in keys))
            if pairs not in found:
                found[pairs] = bool(set.intersection(*sorted((rows_with[p] for p in pairs), key=len)))
            if not found[pairs]:
                both = " and ".join(f"{k} = {show(point[k])}" for k in keys)
                raise SpecError(f"{at(name)}: {name} matches no run: no point of {group_name} has {both}")
        axes = {group_of.get(k, k) for k in point}
        if len(axes) > 1:
            shapes.add(tuple(sorted(point)))
            if len(shapes) > MAX_EXCLUDE_SHAPES:
                raise SpecError(f"{at(name)}: exclude names more than {MAX_EXCLUDE_SHAPES} different sets "
                                "of keys across grid and zip; each set is checked against every run, "
                                "so write entries with fewer distinct sets of keys")
        out.append(point)
    return out
