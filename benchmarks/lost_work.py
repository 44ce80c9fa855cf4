"""Lost work + checkpoint time under random interruptions: ``every_s="auto"`` vs fixed intervals.

A simulation, not a measurement of this machine: jobs of ``--work-h`` hours of training
run on machines interrupted as a Poisson process (mean time between interruptions
``M``). Each save blocks training for its stall ``C`` (noisy: lognormal, 30 %) and is
durable ``L`` seconds later (the background write of an asynchronous save); an
interruption loses the work done since the last durable save, and each restart costs
``--restart-s`` of wall time. Every attempt starts a new process, so the automatic
interval starts over from ``min_every_s`` and re-measures the cost, as a real run does.

The automatic interval is sweeprun's own :class:`~sweeprun.training.cadence.AutoInterval`,
given ``M`` as the launcher would (SWEEPRUN_MTBI_S), or the 6 h prior when the sweep has
seen no interruption yet. Each policy meets the same interruptions (common random
numbers); "best fixed" is the best of a fine grid of fixed intervals chosen in hindsight.
Waste is what the interval decides: lost work plus time blocked saving, in % of the work.

    python benchmarks/lost_work.py [--jobs 300] [--work-h 8]
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from sweeprun.training.cadence import PRIOR_MTBI_S, AutoInterval  # noqa: E402

#: (what, stall C s, write latency L s, true MTBI s, MTBI given to auto or None for the prior)
SCENARIOS = [
    ("1 GB async, spot (M=1 h)", 0.12, 3.7, 3600.0, 3600.0),
    ("1 GB async, M=6 h", 0.12, 3.7, 6 * 3600.0, 6 * 3600.0),
    ("1 GB sync, spot (M=1 h)", 2.7, 0.0, 3600.0, 3600.0),
    ("1 GB sync, M=6 h", 2.7, 0.0, 6 * 3600.0, 6 * 3600.0),
    ("10 GB sync, M=2 h", 30.0, 0.0, 2 * 3600.0, 2 * 3600.0),
    ("1 GB sync, M=1 h, prior only", 2.7, 0.0, 3600.0, None),
]

Policy = Callable[[], Callable[[float | None], float]]
"""A new attempt's interval chooser: called with the last save's stall (None at start)."""


def fixed(interval_s: float) -> Policy:
    return lambda: (lambda _cost: interval_s)


def auto(mtbi_s: float | None) -> Policy:
    def attempt() -> Callable[[float | None], float]:
        chooser = AutoInterval(mtbi_s=PRIOR_MTBI_S if mtbi_s is None else mtbi_s,
                               mtbi_measured=mtbi_s is not None)

        def interval(cost: float | None) -> float:
            if cost is not None:
                chooser.observe(cost)
            return chooser.interval_s

        return interval
    return attempt


def simulate(policy: Policy, work_s: float, stall_s: float, latency_s: float, mtbi_s: float,
             restart_s: float, seed: int) -> float:
    """Seconds of lost work + save stalls for one job."""
    rng = random.Random(seed)        # the same interruptions and costs for every policy
    durable, waste = 0.0, 0.0        # work made durable so far; what the interval cost
    while durable < work_s:
        budget = rng.expovariate(1 / mtbi_s)             # wall time until this attempt dies
        interval = policy()
        t, done, cost = restart_s, durable, None
        pending: tuple[float, float] | None = None       # (work saved, wall time it is durable)
        while t < budget:
            if pending is not None and pending[1] <= t:
                durable, pending = pending[0], None
            step = min(interval(cost), work_s - done)
            if t + step >= budget:                       # interrupted while training
                done += budget - t
                t = budget
                break
            t, done = t + step, done + step
            cost = stall_s * rng.lognormvariate(0, 0.3)
            if pending is not None:                      # one save in flight: wait for it
                cost += max(0.0, pending[1] - t)
                durable, pending = pending[0], None
            final = done >= work_s
            blocked = cost + (latency_s if final else 0.0)   # the last save is waited for
            if t + blocked >= budget:                    # interrupted while saving
                waste += budget - t
                t = budget
                break
            t += blocked
            waste += blocked
            if final:
                durable = done
                break
            pending = (done, t + latency_s)
        if durable >= work_s:
            break
        if pending is not None and pending[1] <= budget:
            durable = pending[0]
        waste += max(0.0, done - durable)                # trained, never made durable: lost
    return waste


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--work-h", type=float, default=8.0)
    parser.add_argument("--restart-s", type=float, default=60.0)
    args = parser.parse_args()
    work_s = args.work_h * 3600
    grid = [10 * 1.15**k for k in range(60) if 10 * 1.15**k <= 4 * 3600]
    print(f"{args.jobs} jobs of {args.work_h:g} h of work each; waste = lost work + save stalls, "
          f"% of the work")
    print(f"{'scenario':<30} {'auto s':>7} {'auto %':>7} {'best fixed s':>12} {'best %':>7} "
          f"{'300 s %':>8} {'3600 s %':>8} {'auto/best':>9}")
    ratios = []
    for what, stall_s, latency_s, mtbi_s, given in SCENARIOS:
        def mean_waste(policy: Policy, stall_s: float = stall_s, latency_s: float = latency_s,
                       mtbi_s: float = mtbi_s) -> float:
            return sum(simulate(policy, work_s, stall_s, latency_s, mtbi_s, args.restart_s, seed)
                       for seed in range(args.jobs)) / args.jobs / work_s * 100

        fixed_waste = {tau: mean_waste(fixed(tau)) for tau in grid + [300.0, 3600.0]}
        best_tau = min(grid, key=lambda tau: fixed_waste[tau])
        auto_waste = mean_waste(auto(given))
        chooser = AutoInterval(mtbi_s=given or PRIOR_MTBI_S)
        chooser.observe(stall_s)
        ratio = auto_waste / fixed_waste[best_tau]
        ratios.append((what, ratio))
        print(f"{what:<30} {chooser.interval_s:>7.0f} {auto_waste:>7.2f} {best_tau:>12.0f} "
              f"{fixed_waste[best_tau]:>7.2f} {fixed_waste[300.0]:>8.2f} {fixed_waste[3600.0]:>8.2f} "
              f"{ratio:>9.2f}", flush=True)
    measured = [r for (w, r) in ratios if "prior" not in w]
    print("ratios auto/best-fixed-in-hindsight: " + ", ".join(f"{w}: {r:.2f}" for w, r in ratios)
          + f"; worst with a measured rate {max(measured):.2f} (target <= 1.10)")


if __name__ == "__main__":
    main()
