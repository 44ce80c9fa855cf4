"""GPU packing (``--gpus``): a run of nproc N takes N indices together, no index is lent twice,
and a run that needs many is not starved by a stream of runs that need few.

The allocator's rules are tested on :class:`~sweeprun.gpus.GpuPool` alone (no processes);
one end-to-end sweep checks them from the runs' own environment.
"""

from __future__ import annotations

from itertools import combinations

import pytest
from test_ranks_launch import RANKS, events

from sweeprun.gpus import GpuPool

from conftest import Sandbox


def test_a_run_takes_all_its_gpus_or_none() -> None:
    pool = GpuPool(["0", "1", "2"])
    assert pool.take("a", 1) == ("0",)
    assert pool.take("b", 3) is None and pool.held() == {"a": ("0",)}  # nothing taken by halves
    pool.give_back("a")
    assert pool.take("b", 3) == ("0", "1", "2") and pool.free == ()


def test_indices_come_back_in_the_order_given() -> None:
    pool = GpuPool(["3", "5", "7"])
    assert pool.take("a", 2) == ("3", "5") and pool.take("b", 1) == ("7",)
    pool.give_back("a")
    assert pool.free == ("3", "5")
    assert pool.take("c", 1) == ("3",)


def test_a_waiting_big_run_is_not_starved_by_small_ones() -> None:
    """Three GPUs, a 1-GPU run on each, then a 2-GPU run asks: from then on a 1-GPU run is served
    only if it leaves two free for it, so the first two GPUs that free up are the big run's."""
    pool = GpuPool(["0", "1", "2"])
    for key in "abc":
        assert pool.take(key, 1)
    assert pool.take("big", 2) is None and pool.waiting() == ["big"]
    pool.give_back("a")
    assert not pool.admits(1) and pool.take("d", 1) is None  # would leave 0 free for big
    assert pool.take("big", 2) is None
    pool.give_back("b")
    assert pool.take("big", 2) == ("0", "1") and pool.waiting() == ["d"]
    assert pool.take("d", 1) is None  # all three are held


def test_small_runs_fill_what_the_waiting_run_cannot_use() -> None:
    pool = GpuPool(["0", "1", "2", "3"])
    assert pool.take("a", 3) == ("0", "1", "2")
    assert pool.take("big", 2) is None  # one free: not enough
    assert pool.admits(1) is False  # ... and a 1-GPU run there would keep big waiting longer
    pool.give_back("a")
    assert pool.take("small", 1) == ("0",)  # leaves 3 >= 2 for big
    assert pool.take("big", 2) == ("1", "2")


def test_a_stream_of_small_runs_never_starves_a_big_one() -> None:
    """Four GPUs busy with 1-GPU runs when a 4-GPU run asks; then each round the oldest run ends,
    the big run asks again and a new 1-GPU run arrives. The big run is served as soon as the
    four runs that held GPUs when it asked have ended; no newcomer gets ahead of it."""
    pool = GpuPool(["0", "1", "2", "3"])
    running = [key for key in ("s0", "s1", "s2", "s3") if pool.take(key, 1)]
    assert pool.take("big", 4) is None
    ended = 0
    for small in (f"s{i}" for i in range(4, 100)):
        pool.give_back(running.pop(0))
        ended += 1
        if pool.take("big", 4):
            break
        if pool.take(small, 1):  # a newcomer
            running.append(small)
    assert ended == 4 and pool.held() == {"big": ("0", "1", "2", "3")}


def test_a_waiting_run_that_withdraws_frees_the_line() -> None:
    pool = GpuPool(["0", "1"])
    assert pool.take("a", 1)
    assert pool.take("big", 2) is None and not pool.admits(1)
    pool.withdraw("big")
    assert pool.admits(1) and pool.take("b", 1) == ("1",)


@pytest.mark.parametrize("n", [0, 4])
def test_a_run_cannot_take_more_gpus_than_the_pool_has(n: int) -> None:
    with pytest.raises(ValueError, match="GPUs"):
        GpuPool(["0", "1", "2"]).take("a", n)


def test_nproc_above_the_gpus_given_is_refused_before_anything_starts(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"world": [1, 2]}, command=f"python {RANKS}", nproc="{world}")
    result = sandbox.run("launch", str(sweep), "--gpus", "0")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "a run takes nproc = 2 GPUs, but --gpus gives 1 (0)" in result.stderr
    assert not sandbox.store.exists()


@pytest.mark.slow  # five multi-rank starts; the allocator's own tests above are the fast ones
def test_gpus_are_packed_from_the_runs_own_environment(sandbox: Sandbox) -> None:
    """Issue 20's test 3: ``--gpus 0,1,2``, a grid of 1- and 2-process runs. Every rank writes
    the CUDA_VISIBLE_DEVICES it saw and when it started and ended: no index is in use by two
    runs at once, a 2-process run holds two distinct indices, every run is done."""
    sweep = sandbox.write_sweep({"world": [2, 1], "seed": [0, 1]}, {"steps": 3, "sleep": 0.05},
                                command=f"python {RANKS}", nproc="{world}")
    result = sandbox.run("launch", str(sweep), "--gpus", "0,1,2", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    spans: dict[str, list[float]] = {}
    gpus: dict[str, set[str]] = {}
    for e in events(sandbox, "start"):
        gpus.setdefault(e["run"], set()).add(e["env"]["CUDA_VISIBLE_DEVICES"])
        span = spans.setdefault(e["run"], [e["t"], e["t"]])
        span[0] = min(span[0], e["t"])
    for e in events(sandbox, "finish"):
        spans[e["run"]][1] = max(spans[e["run"]][1], e["t"])
    assert len(gpus) == 4 and all(len(seen) == 1 for seen in gpus.values())  # every rank of a run: one list
    held = {run: seen.pop().split(",") for run, seen in gpus.items()}
    for run, indices in held.items():
        assert len(set(indices)) == len(indices) == (2 if "world=2" in run else 1)
        assert set(indices) <= {"0", "1", "2"}
    for a, b in combinations(held, 2):
        overlap = spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
        assert not (overlap and set(held[a]) & set(held[b])), (a, b, held, spans)
    assert {r["state"] for r in sandbox.status(sweep).values()} == {"done"}
