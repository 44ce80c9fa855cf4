"""Run identity: canonical parameters and the run id derived from them.

The id must be the same on every machine for the same parameters, whatever the
order of keys or the spelling of numbers in the sweep file, because it names the
run's directory in durable storage: two spellings of one run would otherwise
train it twice.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import operator
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Scalar = str | int | float | bool | None

#: Longest readable label kept in a run id; the hash keeps ids unique beyond it.
LABEL_MAX_CHARS = 96
HASH_CHARS = 8
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")


def canonical_value(value: Any) -> Any:
    """Normalise one parameter value so equal values have one representation.

    Integral floats become ints (``1.0`` is ``1``), ``-0.0`` is ``0``, strings
    are NFC-normalised, lists are canonicalised element-wise. Booleans stay
    booleans: ``True`` and ``1`` are different parameters to a user.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value.is_integer():
            return int(value)
        return float(value)
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, (list, tuple)):
        return [canonical_value(v) for v in value]
    raise TypeError(f"unsupported parameter value {value!r} of type {type(value).__name__}")


def canonical_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters with canonical values, keys sorted."""
    return {str(k): canonical_value(params[k]) for k in sorted(params)}


def canonical_json(params: Mapping[str, Any]) -> str:
    """The exact text that is hashed: sorted keys, no spaces, shortest float repr."""
    return json.dumps(canonical_params(params), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)


def _label_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def run_id(params: Mapping[str, Any], label_keys: Iterable[str] | None = None) -> str:
    """A readable, path-safe id: ``lr=0.01,seed=0-3fa2c1b9``.

    The hash covers every parameter; the label shows ``label_keys`` (the grid
    axes, by default all keys) with unsafe characters replaced and is cut to
    ``LABEL_MAX_CHARS``, so no value can produce ``/``, ``..``, a control
    character or an over-long path segment.
    """
    canon = canonical_params(params)
    digest = hashlib.sha256(canonical_json(canon).encode()).hexdigest()[:HASH_CHARS]
    keys = sorted(canon) if label_keys is None else sorted(k for k in label_keys if k in canon)
    label = ",".join(f"{k}={_label_text(canon[k])}" for k in keys)
    label = _UNSAFE.sub("_", label)[:LABEL_MAX_CHARS].strip(".")
    return f"{label}-{digest}" if label else digest


@dataclass(frozen=True)
class RunSpec:
    """One point of the sweep: its canonical parameters and the id naming its directory."""

    run_id: str
    params: dict[str, Any] = field(hash=False, compare=False)
    index: int = 0  # position in the grid; runs are claimed in this order

    @classmethod
    def from_params(cls, params: Mapping[str, Any], label_keys: Iterable[str] | None = None,
                    index: int = 0) -> RunSpec:
        return cls(run_id=run_id(params, label_keys), params=canonical_params(params), index=index)


def product_runs(fixed: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]) -> Iterator[RunSpec]:
    """The cartesian product of ``grid`` (first axis slowest) with ``fixed`` added: :func:`sweep_runs`
    with one axis per grid key."""
    return sweep_runs(fixed, [{key: values} for key, values in grid.items()])


def sweep_runs(fixed: Mapping[str, Any], axes: Sequence[Mapping[str, Sequence[Any]]],
               exclude: Sequence[Mapping[str, Any]] = ()) -> Iterator[RunSpec]:
    """Every point of the product of ``axes`` (first axis slowest) with ``fixed`` added, less the
    points that match an ``exclude`` entry, as :meth:`RunSpec.from_params` would make each (the
    axes' keys label the ids; ``index`` counts the runs kept).

    An axis maps keys to equally long lists whose i-th values vary together (a grid key is an
    axis of one key; a ``zip`` group is one axis of several). An ``exclude`` entry is a partial
    point: a run matching every one of its keys is skipped. The point's identity is only its
    parameters, so how they were spelled in the file (grid, zip, order) never changes an id.

    Nothing is redone per run that is the same for every run: each value is canonicalised
    and encoded once, and a run's hashed text is the join of those pieces. A 10,000-run
    sweep costs milliseconds, where canonicalising and encoding every run cost a third
    of a second on every launch and ``status``. An entry that names keys of one axis only
    removes that axis's rows before the product is taken; only entries across axes are
    looked up per run, once per distinct set of keys.
    """
    varying = [str(k) for axis in axes for k in axis]
    canon_fixed = {str(k): canonical_value(v) for k, v in fixed.items() if k not in varying}
    keys = sorted([*canon_fixed, *varying])
    fixed_pieces = {k: _piece(k, v) for k, v in canon_fixed.items()}
    place: dict[str, tuple[int, int]] = {}  # key -> (its axis, its column in that axis's rows)
    options: list[list[tuple[tuple[Any, str, str], ...]]] = []  # per axis, per row, per column
    for a, axis in enumerate(axes):
        columns = [str(k) for k in axis]
        for c, key in enumerate(columns):
            place[key] = (a, c)
        encoded = [[(value, _piece(key, value), _UNSAFE.sub("_", f"{key}={_label_text(value)}"))
                    for value in map(canonical_value, axis[key])] for key in columns]
        options.append(list(zip(*encoded, strict=True)))

    across: dict[tuple[str, ...], set[tuple[str, ...]]] = {}  # entries naming keys of several axes
    within: dict[int, dict[tuple[str, ...], set[tuple[str, ...]]]] = {}  # entries naming one axis
    for entry in exclude:
        shape = tuple(sorted(str(k) for k in entry))
        point = tuple(_piece(k, canonical_value(entry[k])) for k in shape)
        touched = {place[k][0] for k in shape}
        if len(touched) == 1:
            within.setdefault(touched.pop(), {}).setdefault(shape, set()).add(point)
        else:
            across.setdefault(shape, set()).add(point)
    for a, shapes in within.items():
        looks = [([place[k][1] for k in shape], points) for shape, points in shapes.items()]
        options[a] = [row for row in options[a]
                      if not any(tuple(row[c][1] for c in cols) in points for cols, points in looks)]
    # Each run's cells, flattened in axis order and followed by the fixed ones; a plain grid's
    # rows are single cells already. Reordering them by key is one C-level itemgetter call.
    single = all(len(axis) == 1 for axis in axes)
    starts = list(itertools.accumulate((len(axis) for axis in axes), initial=0))
    flat = {k: starts[a] + c for k, (a, c) in place.items()}
    fixed_cells = tuple((v, fixed_pieces[k], "") for k, v in canon_fixed.items())
    flat.update({k: starts[-1] + i for i, k in enumerate(canon_fixed)})
    by_key = _picker([flat[k] for k in keys])
    label_order = [flat[k] for k in sorted(varying)]
    checks = [([flat[k] for k in shape], points) for shape, points in across.items()]
    if single:
        options = [[row[0] for row in rows] for rows in options]
    chain = itertools.chain.from_iterable
    index = 0
    for combo in itertools.product(*options):
        cells = (combo if single else tuple(chain(combo))) + fixed_cells
        if checks and any(tuple(cells[i][1] for i in looks) in points for looks, points in checks):
            continue
        ordered = by_key(cells)
        digest = hashlib.sha256(("{" + ",".join([c[1] for c in ordered]) + "}").encode()).hexdigest()[:HASH_CHARS]
        label = ",".join([cells[i][2] for i in label_order])[:LABEL_MAX_CHARS].strip(".")
        params = dict(zip(keys, [c[0] for c in ordered], strict=True))
        yield RunSpec(run_id=f"{label}-{digest}" if label else digest, params=params, index=index)
        index += 1


def _picker(indices: list[int]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """``itemgetter`` that always returns a tuple, even of one item or none."""
    if len(indices) == 1:
        only = indices[0]
        return lambda cells: (cells[only],)
    return operator.itemgetter(*indices) if indices else (lambda cells: ())


def value_text(value: Any) -> str:
    """A canonical value as the hashed text writes it: two values are one parameter value
    exactly when their texts are equal (``1`` and ``1.0`` are, ``1`` and ``true`` are not)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _piece(key: str, value: Any) -> str:
    """``"key":value`` as ``json.dumps`` writes a member of the canonical text."""
    return json.dumps(key, ensure_ascii=False) + ":" + value_text(value)
