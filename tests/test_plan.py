"""The epoch plan: default-sampler orders reproduced exactly, coins/strengths/seeds pure and resumable."""

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler

from fusionloader.plan import (
    RANDOMIZED_INTENSITY,
    TEXT_ONLY,
    batch_order,
    distributed_order,
    mix_seed,
    normalize_strengths,
    plan_epoch,
    random_order,
    sequential_order,
)


def test_sequential_and_random_orders_match_torch_samplers():
    assert sequential_order(7) == list(SequentialSampler(range(7)))
    for epoch in range(3):
        g = torch.Generator()
        g.manual_seed(mix_seed(11, epoch))
        assert random_order(50, 11, epoch) == list(RandomSampler(range(50), generator=g))
    assert random_order(50, 11, 0) != random_order(50, 11, 1)


@pytest.mark.parametrize("n,world", [(10, 2), (11, 3), (5, 4), (2, 5)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_order_matches_distributed_sampler(n, world, shuffle, drop_last):
    data = list(range(n))
    for rank in range(world):
        for epoch in (0, 3):
            ref = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=7, drop_last=drop_last)
            ref.set_epoch(epoch)
            assert distributed_order(n, rank, world, shuffle, 7, epoch, drop_last) == list(ref)


@pytest.mark.parametrize("bs,drop", [(3, False), (3, True), (4, True), (1, False)])
def test_batch_order_matches_batch_sampler(bs, drop):
    order = list(range(10))
    assert batch_order(order, bs, drop) == list(BatchSampler(order, bs, drop))
    assert batch_order(order, None, drop) == [[i] for i in order]


def test_plan_is_a_pure_function_of_seed_epoch_rank_world():
    batches = batch_order(random_order(100, 3, 0), 8, False)
    a = plan_epoch(batches, seed=3, epoch=0, alpha=0.5, strengths="randomized")
    b = plan_epoch(batches, seed=3, epoch=0, alpha=0.5, strengths="randomized")
    for field in ("indices", "synthetic", "sample_seed", "prompt_draw"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(a.strength, b.strength)
    for other in (dict(seed=4, epoch=0), dict(seed=3, epoch=1), dict(seed=3, epoch=0, rank=1, world_size=2)):
        c = plan_epoch(batches, alpha=0.5, strengths="randomized", **other)
        assert not np.array_equal(a.synthetic, c.synthetic) or not np.array_equal(a.sample_seed, c.sample_seed)


def test_plan_contents():
    batches = batch_order(list(range(2000)), 32, False)
    p = plan_epoch(batches, seed=0, epoch=0, alpha=0.5, strengths="randomized")
    assert p.num_positions == 2000 and p.batch_starts[-1] == 2000
    frac = p.synthetic.mean()
    assert abs(frac - 0.5) < 4 * np.sqrt(0.25 / 2000)
    s = p.strength[p.synthetic]
    assert set(np.unique(s).tolist()) == set(RANDOMIZED_INTENSITY)
    assert np.isnan(p.strength[~p.synthetic]).all()
    assert len(np.unique(p.sample_seed)) == 2000 and (p.sample_seed >= 0).all()
    assert plan_epoch(batches, seed=0, epoch=0, alpha=0.0).synthetic.sum() == 0
    assert plan_epoch(batches, seed=0, epoch=0, alpha=1.0).synthetic.all()
    fixed = plan_epoch(batches, seed=0, epoch=0, alpha=1.0, strengths=0.75)
    assert (fixed.strength == 0.75).all() and fixed.job_strength(0) == 0.75
    text = plan_epoch(batches, seed=0, epoch=0, alpha=1.0, strengths=None)
    assert (text.strength == TEXT_ONLY).all() and text.job_strength(5) is None


def test_strength_and_alpha_validation():
    assert normalize_strengths(0.5) == (0.5,)
    assert normalize_strengths([0.25, 1.0]) == (0.25, 1.0)
    assert normalize_strengths("randomized") == RANDOMIZED_INTENSITY
    for bad in (0.0, 1.5, "bogus", []):
        with pytest.raises(ValueError):
            normalize_strengths(bad)
    with pytest.raises(ValueError):
        plan_epoch([[0]], seed=0, epoch=0, alpha=1.5)
