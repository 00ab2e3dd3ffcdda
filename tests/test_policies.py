"""Mixing policies (NOTE [Mixing policies]): Replace is the old stream bit for bit; Concat doubles the epoch
(content, len(), 2-rank sharding, resume); HardWeighted requests hard samples first and gives them their share."""

import json
import math

import numpy as np
import pytest
import torch

from fusionloader.loader import FusionLoader
from fusionloader.order import ArrayOrder, distributed_order, mix_seed, random_order
from fusionloader.plan import EpochPlan, plan_epoch
from fusionloader.policies import (AlphaCoins, Concat, HardCoins, HardWeighted, Replace, mixing_policy,
                                   retrieval_positions)  # fmt: skip
from test_loader import InlinePool, TensorImages, expected_variant, fusion, run_epoch
from test_resume import check_resume


# -- Replace: the stream before policies, bit for bit --------------------------------------------------------


def test_replace_draws_the_same_coins_as_the_philox_formula():
    """The coin is ``(word0 >> 11) * 2**-53 < alpha`` at Philox counter p (NOTE [Plan draws]), recomputed here
    without the plan: what every run before mixing policies drew."""
    order = ArrayOrder.batched(random_order(500, 4, 2), 7, False)
    plan = EpochPlan(order, seed=4, epoch=2, alpha=0.3, strengths="randomized", rank=1, world_size=3)
    key = np.random.SeedSequence([mix_seed(4, 2, 1, 3)]).generate_state(2, np.uint64)
    raw = np.random.Philox(key=key).random_raw(4 * 500).reshape(500, 4)
    u = (raw[:, 0] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    want = u < 0.3
    assert np.array_equal(plan.draws(0, 500).synthetic, want)
    assert np.array_equal(plan.draws(123, 321).synthetic, want[123:321])
    explicit = EpochPlan(order, seed=4, epoch=2, alpha=0.3, strengths="randomized", rank=1, world_size=3,
                         mixing=Replace().bind(0.3))  # fmt: skip
    for a, b in zip(plan.draws(0, 500), explicit.draws(0, 500)):
        assert np.array_equal(a, b, equal_nan=True)


def test_replace_by_name_object_and_default_deliver_the_same_batches():
    ds = TensorImages(n=24)
    outs = []
    for mixing in (None, "replace", Replace()):
        kw = {} if mixing is None else {"mixing": mixing}
        loader = fusion(ds, batch_size=5, shuffle=True, return_meta=True, late_policy="wait", **kw)
        outs.append(run_epoch(loader))
        assert isinstance(loader.mixing, Replace)
        assert "epoch_mixing" not in loader.state_dict() and "feedback" not in loader.state_dict()
    for x, meta in outs[1:]:
        assert torch.equal(x, outs[0][0])
        for k in meta:  # strength is NaN at real positions
            torch.testing.assert_close(meta[k], outs[0][1][k], rtol=0, atol=0, equal_nan=True)


def test_mixing_names_and_invalid_settings_are_refused_naming_the_argument():
    assert isinstance(mixing_policy("concat"), Concat) and isinstance(mixing_policy("hard"), HardWeighted)
    ds = TensorImages(n=6)
    with pytest.raises(ValueError, match="mixing.*'mix'"):
        fusion(ds, mixing="mix")
    with pytest.raises(TypeError, match="mixing"):
        fusion(ds, mixing=3)
    for kw, word in ((dict(share=1.5), "share"), (dict(share=float("nan")), "share"), (dict(threshold=-0.1), "threshold"),
                     (dict(tail_class_size=-1), "tail_class_size")):  # fmt: skip
        with pytest.raises(ValueError, match=word):
            HardWeighted(**kw)
    with pytest.raises(TypeError, match="tail_class_size"):
        HardWeighted(tail_class_size=2.5)
    with pytest.raises(ValueError, match="alpha"):
        fusion(ds, mixing="concat", alpha=0.3)
    with pytest.raises(ValueError, match="sampler"):
        fusion(ds, mixing="concat", sampler=[0, 1, 2])
    with pytest.raises(ValueError, match="sampler"):
        fusion(ds, batch_sampler=[[0, 1]], mixing=Concat())
    with pytest.raises(ValueError, match="sampler"):
        fusion(ds, sampler=[0, 1, 2]).set_synthesis(mixing="concat")


# -- Concat ----------------------------------------------------------------------------------------------------


def _pairs(meta):
    return sorted(zip(meta["index"].tolist(), meta["planned"].tolist()))


@pytest.mark.parametrize("shuffle", [False, True])
def test_concat_epoch_holds_every_real_index_once_and_one_generated_variant_of_each(shuffle):
    ds = TensorImages(n=10)
    loader = fusion(ds, batch_size=4, shuffle=shuffle, mixing="concat", late_policy="wait", return_meta=True)
    assert len(loader) == math.ceil(20 / 4)
    seen = []
    for epoch in range(2):
        x, meta = run_epoch(loader)
        assert len(meta["index"]) == 20
        assert _pairs(meta) == sorted([(i, False) for i in range(10)] + [(i, True) for i in range(10)])
        assert torch.equal(meta["synthetic"], meta["planned"]) and torch.equal(meta["fresh"], meta["planned"])
        for p in range(20):
            i = int(meta["index"][p])
            if not meta["planned"][p]:
                assert torch.equal(x[p], ds.images[i])
        st = loader.stats()["per_epoch"][epoch]
        assert st["fresh"] == 10 and st["real"] == 10 and st["achieved_alpha"] == 0.5
        seen.append(meta["index"].tolist())
    if shuffle:
        assert seen[0] != seen[1]  # a new permutation of the doubled epoch each epoch
        order = random_order(20, 0, 0)  # RandomSampler over the 2N virtual indices, from the seed
        assert seen[0] == (order % 10).tolist()
    else:
        assert seen[0] == list(range(10)) * 2  # the real images, then the generated ones


def test_concat_generated_positions_are_variants_of_their_own_index():
    ds = TensorImages(n=8)
    loader = fusion(ds, batch_size=3, shuffle=True, mixing="concat", late_policy="wait", return_meta=True, seed=5)
    x, meta = run_epoch(loader)
    virtual = random_order(16, 5, 0)
    plan = EpochPlan(ArrayOrder.doubled(virtual, 8, 3, False), seed=5, epoch=0, alpha=0.5, mixing=Concat().bind(0.5))
    assert torch.equal(meta["planned"], torch.from_numpy(virtual >= 8))
    for p in np.flatnonzero(virtual >= 8):
        i = int(virtual[p]) - 8
        torch.testing.assert_close(x[p], expected_variant(ds.images[i], plan.sample_seed[p], 0.5))


@pytest.mark.parametrize("drop_last", [False, True])
def test_concat_len_and_two_rank_sharding_split_the_doubled_epoch(monkeypatch, drop_last):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    ds = TensorImages(n=11)  # 22 virtual indices: 11 per rank
    got = {}
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        loader = fusion(ds, batch_size=4, shuffle=True, drop_last=drop_last, mixing="concat", late_policy="wait",
                        return_meta=True, seed=7)  # fmt: skip
        batches = list(loader)
        assert len(loader) == len(batches) == (11 // 4 if drop_last else math.ceil(11 / 4))
        meta = {k: torch.cat([m[k] for _, m in batches]) for k in batches[0][1]}
        virtual = distributed_order(22, rank, 2, True, 7, 0, False)  # DistributedSampler's split of the doubled epoch
        kept = len(meta["index"])
        assert meta["index"].tolist() == (virtual % 11).tolist()[:kept]
        assert meta["planned"].tolist() == (virtual >= 11).tolist()[:kept]
        got[rank] = list(zip(meta["index"].tolist(), meta["planned"].tolist()))
        loader.close()
    if not drop_last:  # together the ranks hold every real index once and one generated variant of each
        assert sorted(got[0] + got[1]) == sorted([(i, g) for i in range(11) for g in (False, True)])
    assert not set(got[0]) & set(got[1])


@pytest.mark.parametrize("save_after", [2, ("epoch_end", 0), 8])
def test_concat_is_deterministic_and_resumable(save_after):
    ds = TensorImages(n=9)
    make = lambda: fusion(ds, batch_size=4, shuffle=True, seed=3, mixing="concat", return_meta=True,  # noqa: E731
                          late_policy="wait", strengths="randomized")
    got = check_resume(make, 2, save_after)
    assert sum(s for *_, s in got) == 18  # 9 generated per epoch


# -- HardWeighted -----------------------------------------------------------------------------------------------


class RecordingPool(InlinePool):
    """Records each submit call's (key, index) in submission order (producers make jobs in that order)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def submit(self, jobs):
        self.calls.append([(j.key, j.index) for j in jobs])
        super().submit(jobs)


def recording(synthesizer, source, devices=("cpu",), **kwargs):
    return RecordingPool(synthesizer, source, devices, **kwargs)


def test_hard_probabilities_keep_the_share_and_shrink_alpha_only_when_they_must():
    policy = HardWeighted(share=0.5)
    p_h, p_e = policy.probabilities(0.3, 0.2)
    assert 0.2 * p_h == pytest.approx(0.15) and 0.8 * p_e == pytest.approx(0.15)
    p_h, p_e = HardWeighted(share=0.75).probabilities(0.4, 0.2)  # hard too few for 0.3 of the positions
    assert p_h == 1.0 and 0.2 * p_h / (0.2 * p_h + 0.8 * p_e) == pytest.approx(0.75)
    assert HardWeighted(share=1.0).probabilities(0.5, 0.1) == (1.0, 0.0)
    assert policy.probabilities(0.3, 0.0) == (0.3, 0.3) and policy.probabilities(0.3, 1.0) == (0.3, 0.3)
    assert isinstance(policy.bind(0.3, np.zeros(10, bool)), AlphaCoins)
    bound = policy.bind(0.3, np.arange(10) < 2)
    assert isinstance(bound, HardCoins) and bound.key() == HardCoins.from_state(json.loads(json.dumps(
        {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in bound.state().items()}))).key()  # fmt: skip


def test_before_any_report_hard_weighted_is_replace():
    ds = TensorImages(n=30)
    a = run_epoch(fusion(ds, batch_size=4, shuffle=True, late_policy="wait", return_meta=True))
    b = run_epoch(fusion(ds, batch_size=4, shuffle=True, late_policy="wait", return_meta=True, mixing="hard"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["planned"], b[1]["planned"])


def test_reported_hard_samples_are_requested_first_and_get_their_share():
    n, n_hard, alpha, share = 300, 60, 0.3, 0.5
    ds = TensorImages(n=n)
    loader = FusionLoader(ds, batch_size=10, shuffle=True, seed=1, alpha=alpha, late_policy="wait", return_meta=True,
                          mixing=HardWeighted(share=share, threshold=0.5), synthesizer="stand-in",
                          pool_factory=recording, lookahead=64)  # fmt: skip
    hard = np.arange(n) < n_hard
    loader.report(np.arange(n), np.where(hard, 0.1, 0.9))  # true-class probabilities
    assert loader.hard_samples().tolist() == list(range(n_hard))
    _, meta = run_epoch(loader)
    idx, syn = meta["index"].numpy(), meta["planned"].numpy()
    H, E = int((syn & hard[idx]).sum()), int((syn & ~hard[idx]).sum())
    # expected counts: h * p_hard * n = share * alpha * n each side (c = 1 here), binomial spread
    p_h, p_e = share * alpha * n / n_hard, (1 - share) * alpha * n / (n - n_hard)
    mh, sh = n_hard * p_h, math.sqrt(n_hard * p_h * (1 - p_h))
    me, se = (n - n_hard) * p_e, math.sqrt((n - n_hard) * p_e * (1 - p_e))
    assert abs(H - mh) <= 4 * sh and abs(E - me) <= 4 * se, (H, E, mh, me)
    measured = H / (H + E)
    sd = math.sqrt(me**2 * sh**2 + mh**2 * se**2) / (mh + me) ** 2  # delta method on H / (H + E)
    assert abs(measured - share) <= 4 * sd, (measured, sd)
    # priority: within every window submitted, each hard job is requested before every easy one
    pool = InlinePool.instances[-1]
    base = pool.calls[0][0][0] >> 32  # epoch 0's key base (the window also requests epoch 1 ahead)
    assert sum(1 for c in pool.calls for k, _ in c if k >> 32 == base) == H + E
    for call in pool.calls:
        flags = [bool(hard[i]) for _, i in call]
        assert flags == sorted(flags, reverse=True)
    first = [bool(hard[i]) for _, i in pool.calls[0]]
    assert any(first) and not all(first)
    # the old stream (Replace) gives the hard samples only their natural share, h = 0.2
    ref = run_epoch(fusion(ds, batch_size=10, shuffle=True, seed=1, alpha=alpha, late_policy="wait", return_meta=True))
    r_idx, r_syn = ref[1]["index"].numpy(), ref[1]["planned"].numpy()
    assert (r_syn & hard[r_idx]).sum() / r_syn.sum() < share - 4 * sd


def test_tail_classes_are_hard_without_feedback():
    class LongTail(TensorImages):
        def __init__(self):
            super().__init__(n=60)
            self.targets = [0] * 45 + [1] * 10 + [2] * 5  # classes 1 and 2 are tail classes (< 20 images)

    ds = LongTail()
    loader = fusion(ds, batch_size=6, shuffle=True, mixing=HardWeighted(share=0.8), late_policy="wait", return_meta=True)
    assert loader.hard_samples().tolist() == list(range(45, 60))
    assert fusion(ds, mixing=HardWeighted(tail_class_size=6)).hard_samples().tolist() == list(range(55, 60))
    assert fusion(ds, mixing=HardWeighted(tail_class_size=0)).hard_samples().tolist() == []
    _, meta = run_epoch(loader)
    tail = meta["index"] >= 45
    assert meta["planned"][tail].float().mean() > meta["planned"][~tail].float().mean()


def test_hard_weighted_resume_replays_the_epoch_planned_before_later_reports():
    ds = TensorImages(n=40)

    def make():
        return fusion(ds, batch_size=4, shuffle=True, seed=2, mixing=HardWeighted(share=0.9), late_policy="wait",
                      return_meta=True)  # fmt: skip

    a = make()
    a.report(torch.arange(10), torch.full((10,), 3.0), kind="loss")  # exp(-3) < 0.5: hard
    it = iter(a)
    first = [next(it) for _ in range(3)]
    a.report(torch.arange(10, 40), torch.full((30,), 0.05))  # every sample now hard: shapes the *next* epoch
    state = json.loads(json.dumps(a.state_dict()))
    assert "epoch_mixing" in state and "feedback" in state
    rest_a = list(it) + list(a)  # the rest of epoch 0, then epoch 1
    b = make()
    b.load_state_dict(state)
    rest_b = list(b) + list(b)
    assert len(rest_a) == len(rest_b) == 7 + 10
    for (xa, ma), (xb, mb) in zip(rest_a, rest_b):
        assert torch.equal(ma["index"], mb["index"]) and torch.equal(ma["planned"], mb["planned"])
        torch.testing.assert_close(xa[0], xb[0])
    assert first and np.array_equal(a.hard_samples(), b.hard_samples()) and len(b.hard_samples()) == 40


def test_retrieval_positions_split_by_the_seeds_top_bit():
    seeds = np.array([0, 1 << 62, (1 << 62) + 5, 7, (1 << 63) - 1], dtype=np.int64)
    assert retrieval_positions(seeds, split=False).all()
    assert retrieval_positions(seeds, split=True).tolist() == [False, True, True, False, True]


def test_plan_epoch_accepts_a_bound_policy():
    hard = np.zeros(12, bool)
    hard[:3] = True
    bound = HardWeighted(share=1.0).bind(0.25, hard)
    plan = plan_epoch([list(range(12))], seed=0, epoch=0, alpha=0.25, mixing=bound)
    assert not plan.synthetic[3:].any()  # share 1.0: every synthetic position is a hard one
    assert plan.priority(np.array([5, 1, 7, 0])).tolist() == [1, 3, 0, 2]
