"""Comparing two endings: final checkpoints tensor by tensor, metrics line by line, and from
where they first differ, which piece of state was not restored."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Metrics that measure the clock, not the training: never equal between two runs.
TIMING = re.compile(r"time|elapsed|duration|runtime|throughput|per_s(ec(ond)?)?\b|_s$|_ms$|_sec$",
                    re.IGNORECASE)


@dataclass(frozen=True)
class Difference:
    path: tuple[Any, ...]
    detail: str
    max_abs: float | None = None


def diff_trees(a: Any, b: Any, atol: float = 0.0, path: tuple[Any, ...] = ()) -> Iterator[Difference]:
    """Where two saved states differ: tensors and arrays element by element (exactly, or within
    ``atol`` for floating point), numbers within ``atol``, everything else with ``==``."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            yield Difference(path, f"{type(a).__name__} vs {type(b).__name__}")
        elif a.dtype != b.dtype or a.shape != b.shape:
            yield Difference(path, f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        elif a.is_floating_point() or a.is_complex():
            if not torch.allclose(a, b, rtol=0.0, atol=atol, equal_nan=True):
                gap = (a.double() - b.double()).abs().nan_to_num(nan=math.inf).max().item() if a.numel() else 0.0
                yield Difference(path, f"differs by up to {gap:.3g}", gap)
        elif not torch.equal(a, b):
            yield Difference(path, "differs")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or not np.array_equal(a, b):
            yield Difference(path, "differs")
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in a.keys() - b.keys():
            yield Difference((*path, key), "only in the uninterrupted run")
        for key in b.keys() - a.keys():
            yield Difference((*path, key), "only in the resumed run")
        for key in a:
            if key in b:
                yield from diff_trees(a[key], b[key], atol, (*path, key))
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from diff_trees(x, y, atol, (*path, i))
    elif not _same_value(a, b, atol):
        gap = abs(a - b) if isinstance(a, float) and isinstance(b, float) else None
        yield Difference(path, f"{a!r} vs {b!r}", gap)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same_value(a: Any, b: Any, atol: float) -> bool:
    if _number(a) and _number(b):
        return a == b or abs(a - b) <= atol or (a != a and b != b)  # NaN logged by both
    return bool(a == b)


def count_tensors(tree: Any) -> int:
    import torch

    if isinstance(tree, torch.Tensor):
        return 1
    if isinstance(tree, Mapping):
        return sum(count_tensors(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(count_tensors(v) for v in tree)
    return 0


def kind_of(state: Any) -> str | None:
    """What a tracked object is, from the shape of its state: enough to say what is missing."""
    if isinstance(state, Mapping):
        keys = {k for k in state if isinstance(k, str)}
        if {"state", "param_groups"} <= keys:
            return "optimizer"
        if "last_epoch" in keys or "_last_lr" in keys:
            return "LR scheduler"
        if {"scale", "growth_factor"} <= keys:
            return "grad scaler"
        if {"epoch", "offset"} <= keys or any("yielded" in k or "sampler" in k for k in keys):
            return "data position"
        if "bit_generator" in keys:
            return "generator"
    if type(state).__name__ == "Tensor" and str(getattr(state, "dtype", "")) == "torch.uint8":
        return "generator"
    return None


@dataclass
class MetricsDiff:
    lines: tuple[int, int]                    # (uninterrupted, resumed)
    index: int | None = None                  # first differing line
    step: int | None = None                   # its step
    keys: list[str] = field(default_factory=list)
    detail: str = ""
    absent: list[str] = field(default_factory=list)   # of keys: logged on that line by one run only

    @property
    def same(self) -> bool:
        return self.index is None


def diff_metrics(a: list[dict[str, Any]], b: list[dict[str, Any]], atol: float = 0.0,
                 ignore: Collection[str] = ()) -> MetricsDiff:
    """The first line where the two runs' metrics differ, and in which keys; metrics in
    ``ignore`` and those named like a clock (:data:`TIMING`) are not compared."""
    result = MetricsDiff((len(a), len(b)))
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        keys = sorted(k for k in x.keys() | y.keys()
                      if k != "step" and k not in ignore and not TIMING.search(k)
                      and (k not in x or k not in y or not _same_value(x[k], y[k], atol)))
        if keys or x.get("step") != y.get("step"):
            keys = keys or ["step"]
            shown = [f"{k} {x.get(k, '-')!r} vs {y.get(k, '-')!r}" for k in keys[:3]]
            result.index, result.step, result.keys = i, x.get("step"), keys
            result.absent = [k for k in keys if (k in x) != (k in y)]
            result.detail = "; ".join(shown) + (f"; +{len(keys) - 3} more" if len(keys) > 3 else "")
            return result
    if len(a) != len(b):
        i = min(len(a), len(b))
        result.index, result.step = i, (a if len(a) > len(b) else b)[i].get("step")
        result.detail = f"{len(a)} lines vs {len(b)}"
    return result


def _leaf(path: tuple[Any, ...]) -> str:
    names = [str(p) for p in path if not isinstance(p, int)]
    if names[:1] == ["state"]:  # an optimizer's per-parameter state: exp_avg, momentum_buffer...
        names = names[1:]
    return ".".join(names) or "(value)"


def summarize(differences: list[Difference]) -> str:
    """``exp_avg, exp_avg_sq, step differ (largest difference 0.021)``."""
    leaves = list(dict.fromkeys(_leaf(d.path) for d in differences))
    gaps = [d.max_abs for d in differences if d.max_abs is not None]
    shown = ", ".join(leaves[:5]) + (f", +{len(leaves) - 5} more" if len(leaves) > 5 else "")
    text = f"{shown} differ{'s' if len(leaves) == 1 else ''}"
    if len(differences) == 1 and not gaps:
        text += f" ({differences[0].detail})"
    return text + (f" (largest difference {max(gaps):.3g})" if gaps else "")


def _group(path: tuple[Any, ...]) -> str:
    """The piece of state a difference belongs to, as the user named it in ``run.track``."""
    if path[:1] == ("objects",) and len(path) > 1:
        return str(path[1])
    return {"rng": "global RNGs", "extras": "run.extras"}.get(str(path[0]), str(path[0])) if path else "state"


def compare_states(a: Mapping[str, Any], b: Mapping[str, Any], atol: float = 0.0) -> dict[str, list[Difference]]:
    """The differences between two final checkpoints, by piece of state (``model``,
    ``optimizer``, ``global RNGs``...); bookkeeping (format, metrics file length) is left out."""
    keep = ("objects", "step", "epoch", "extras", "rng")
    found: dict[str, list[Difference]] = {}
    for d in diff_trees({k: a.get(k) for k in keep}, {k: b.get(k) for k in keep}, atol):
        inner = d.path[2:] if d.path[:1] == ("objects",) else d.path[1:]
        found.setdefault(_group(d.path), []).append(Difference(inner or d.path, d.detail, d.max_abs))
    return found


def compare_pieces(a: Mapping[str, Any], b: Mapping[str, Any], atol: float = 0.0) -> dict[str, list[Difference]]:
    """The differences between two endings' pieces (see :mod:`.endings`), by piece."""
    found: dict[str, list[Difference]] = {}
    for d in diff_trees(a, b, atol):
        found.setdefault(str(d.path[0]), []).append(Difference(d.path[1:] or d.path, d.detail, d.max_abs))
    return found
