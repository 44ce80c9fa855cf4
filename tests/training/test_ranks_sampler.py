"""ResumableSampler across ranks: DistributedSampler's sharding, each rank's position, and what
a resume at another world size does with it (in process: no ranks need to run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DistributedSampler

import sweeprun
from sweeprun import ResumableSampler


@pytest.mark.parametrize("size", [10, 11, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_take_what_distributed_sampler_gives_them(size: int, drop_last: bool) -> None:
    """Unshuffled, the order is the same as DistributedSampler's, so the shards must be too:
    padded with the first indices by default, cut with drop_last."""
    for rank in range(4):
        ours = ResumableSampler(size, shuffle=False, num_replicas=4, rank=rank, drop_last=drop_last)
        theirs = DistributedSampler(range(size), num_replicas=4, rank=rank, shuffle=False, drop_last=drop_last)
        assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_each_rank_keeps_its_own_position() -> None:
    samplers = [ResumableSampler(20, seed=3, num_replicas=2, rank=r) for r in range(2)]
    taken = [[next(it) for _ in range(4)] for it in map(iter, samplers)]
    assert set(taken[0]).isdisjoint(taken[1])
    resumed = [ResumableSampler(20, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for sampler, new in zip(samplers, resumed, strict=True):
        new.load_state_dict(sampler.state_dict())
        assert list(new) == sampler.order(0)[4:]


def test_at_another_world_size_the_position_maps_onto_the_new_shards() -> None:
    """Two ranks had taken 4 indices each (8 of the epoch): one rank goes on from index 8 of the
    epoch's order. Approximate in general (pads and boundaries move), exact here."""
    two = ResumableSampler(20, seed=3, num_replicas=2, rank=0)
    it = iter(two)
    for _ in range(4):
        next(it)
    one = ResumableSampler(20, seed=3, num_replicas=1, rank=0)
    one.load_state_dict(two.state_dict())
    assert one.offset == 8 and list(one) == one.order(0)[8:]


def test_a_reduce_one_process_cannot_do_is_refused_there_too(tmp_path: Path) -> None:
    run = sweeprun.init(local_dir=tmp_path, every_steps=100)
    with pytest.raises(ValueError, match="reduce='median' for 'loss' is not one of mean, sum, min, max"):
        run.end_step(loss=1.0, reduce="median")
    with pytest.raises(ValueError, match="reduce= names acc, which this call does not log"):
        run.log(loss=1.0, reduce={"acc": "mean"})
    run.close()
