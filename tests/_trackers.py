"""What a run logged, from its own metrics and from a tracker's files, to compare them."""

from __future__ import annotations

import json
from pathlib import Path


def logged(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What the run's metrics.jsonl says was logged: per metric, (step, value) in order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(key, []).append((entry["step"], value))
    return out


def tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows of the event files in ``folder`` (its own reader, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), purge_orphaned_data=True, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def same_series(shown: dict[str, list[tuple[int, float]]], truth: dict[str, list[tuple[int, float]]]) -> list[str]:
    """The differences between a tracker's series and the run's own (float32 in TensorBoard)."""
    problems = []
    for key in sorted(set(shown) | set(truth)):
        a, b = shown.get(key, []), truth.get(key, [])
        if [s for s, _ in a] != [s for s, _ in b]:
            problems.append(f"{key}: steps {[s for s, _ in a]} != {[s for s, _ in b]}")
        elif any(abs(x - y) > 1e-6 * max(1.0, abs(y)) for (_, x), (_, y) in zip(a, b, strict=True)):
            problems.append(f"{key}: values differ")
    return problems
