"""The epoch order and plan: default-sampler orders reproduced exactly, lazily read; coins/strengths/seeds
drawn per position from a counter-based generator (pure, resumable, O(span))."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler

from fusionloader.order import (
    ArrayOrder,
    OrderSnapshot,
    StreamOrder,
    batch_order,
    distributed_order,
    from_json,
    mix_seed,
    random_order,
    sequential_order,
    to_json,
)
from fusionloader.plan import RANDOMIZED_INTENSITY, TEXT_ONLY, EpochPlan, normalize_strengths, plan_epoch


def test_sequential_and_random_orders_match_torch_samplers():
    assert sequential_order(7).tolist() == list(SequentialSampler(range(7)))
    for epoch in range(3):
        g = torch.Generator()
        g.manual_seed(mix_seed(11, epoch))
        assert random_order(50, 11, epoch).tolist() == list(RandomSampler(range(50), generator=g))
    assert random_order(50, 11, 0).tolist() != random_order(50, 11, 1).tolist()
    assert random_order(10, 0, 0).dtype == np.int64  # an array, not a Python list


@pytest.mark.parametrize("n,world", [(10, 2), (11, 3), (5, 4), (2, 5)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_order_matches_distributed_sampler(n, world, shuffle, drop_last):
    data = list(range(n))
    for rank in range(world):
        for epoch in (0, 3):
            ref = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=7, drop_last=drop_last)
            ref.set_epoch(epoch)
            assert distributed_order(n, rank, world, shuffle, 7, epoch, drop_last).tolist() == list(ref)


@pytest.mark.parametrize("bs,drop", [(3, False), (3, True), (4, True), (1, False), (None, False), (5, False)])
def test_array_order_batches_follow_batch_sampler(bs, drop):
    order = np.arange(10)[::-1].copy()
    ref = batch_order(order, bs, drop)
    if bs is not None:
        assert ref == list(BatchSampler(order.tolist(), bs, drop))
    a = ArrayOrder.batched(order, bs, drop)
    assert a.num_batches == len(ref) and [a.batch(b).tolist() for b in range(a.num_batches)] == ref
    assert a.span(a.num_batches) is None


def test_stream_order_reads_lazily_and_releases():
    pulled = []

    def sampler():
        for b in range(1000):
            pulled.append(b)
            yield [2 * b, 2 * b + 1]

    s = StreamOrder(sampler(), batched=True, num_batches=None)
    assert s.span(2) == (4, 6) and pulled == [0, 1, 2]  # nothing beyond what was asked for
    assert s.indices_between(3, 7).tolist() == [3, 4, 5, 6] and len(pulled) == 4
    s.release(3)
    with pytest.raises(IndexError):
        s.batch(1)
    assert s.batch(3).tolist() == [6, 7]
    short = StreamOrder(iter([5, 6]), batched=False, num_batches=2)
    assert short.extend_to(10) == 2 and short.exhausted and short.span(2) is None


def test_draws_are_counter_based_any_span_without_the_positions_before_it():
    order = ArrayOrder.batched(np.arange(5000), 32, False)
    plan = EpochPlan(order, seed=3, epoch=2, alpha=0.5, strengths="randomized")
    whole = plan.draws(0, 5000)
    for start, end in ((0, 1), (1, 2), (1234, 1300), (4999, 5000)):
        part = plan.draws(start, end)
        for a, b in zip(part, whole):
            np.testing.assert_array_equal(a, b[start:end])


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
    counts = np.unique(s, return_counts=True)[1]
    assert counts.min() > 0.8 * counts.mean()  # uniform over the four
    assert np.isnan(p.strength[~p.synthetic]).all()
    assert len(np.unique(p.sample_seed)) == 2000 and (p.sample_seed >= 0).all()
    assert ((p.prompt_draw >= 0) & (p.prompt_draw < 1)).all()
    assert plan_epoch(batches, seed=0, epoch=0, alpha=0.0).synthetic.sum() == 0
    assert plan_epoch(batches, seed=0, epoch=0, alpha=1.0).synthetic.all()
    fixed = plan_epoch(batches, seed=0, epoch=0, alpha=1.0, strengths=0.75)
    assert (fixed.strength == 0.75).all() and fixed.job_strength(fixed.strength[0]) == 0.75
    text = plan_epoch(batches, seed=0, epoch=0, alpha=1.0, strengths=None)
    assert (text.strength == TEXT_ONLY).all() and text.job_strength(text.strength[5]) is None


def test_synthetic_between_reads_only_the_span():
    pulled = []

    def sampler():
        for i in range(10_000):
            pulled.append(i)
            yield i

    plan = EpochPlan(StreamOrder(sampler(), batched=False, num_batches=10_000), seed=1, epoch=0, alpha=0.5)
    positions, indices, draws = plan.synthetic_between(100, 164)
    assert len(pulled) == 164 and (positions >= 100).all() and (positions < 164).all()
    assert indices.tolist() == positions.tolist() and draws.synthetic.all()
    np.testing.assert_array_equal(draws.sample_seed, plan.draws(100, 164).sample_seed[positions - 100])


def test_strength_and_alpha_validation():
    assert normalize_strengths(0.5) == (0.5,)
    assert normalize_strengths([0.25, 1.0]) == (0.25, 1.0)
    assert normalize_strengths("randomized") == RANDOMIZED_INTENSITY
    for bad in (0.0, 1.5, "bogus", [], float("nan")):
        with pytest.raises(ValueError):
            normalize_strengths(bad)
    for bad in (1.5, float("nan"), -0.1):
        with pytest.raises(ValueError, match="alpha"):
            plan_epoch([[0]], seed=0, epoch=0, alpha=bad)


def test_order_snapshot_round_trips_through_json():
    g = torch.Generator().manual_seed(4)
    sampler = RandomSampler(range(30), generator=torch.Generator().manual_seed(8))
    snap = OrderSnapshot.take(g, {"sampler": sampler})
    want = (torch.randperm(5, generator=g).tolist(), list(sampler))
    back = from_json(json.loads(json.dumps(to_json(snap))))
    OrderSnapshot.restore(back, g, {"sampler": sampler})
    assert (torch.randperm(5, generator=g).tolist(), list(sampler)) == want
    nested = {1: (b"x", np.arange(3), torch.arange(2)), "k": [1.5, None]}
    out = from_json(json.loads(json.dumps(to_json(nested))))
    assert out[1][0] == b"x" and out[1][1].tolist() == [0, 1, 2] and out[1][2].tolist() == [0, 1] and out["k"] == [1.5, None]


class _CountingSampler:
    """A long sampler that counts how far it has been read."""

    def __init__(self, n):
        self.n, self.read = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.read += 1
            yield i % 40

    def __len__(self):
        return self.n

    def state_dict(self):  # deterministic: nothing to save, but says so (torchdata's protocol)
        return {}

    def load_state_dict(self, state):
        pass


def test_the_loader_reads_a_user_sampler_only_a_window_ahead():
    from test_loader import TensorImages, fusion

    sampler = _CountingSampler(1_000_000)
    loader = fusion(TensorImages(n=40), batch_size=8, sampler=sampler, alpha=0.5, lookahead=64, late_policy="real")
    it = iter(loader)
    for _ in range(3):
        next(it)
    assert sampler.read <= 4 * 8 + 64 + 8  # consumed + next batch + look-ahead: not the epoch
    state = loader.state_dict()
    assert len(json.dumps(state)) < 20_000 and "stored_rest" not in state
    loader.close()
