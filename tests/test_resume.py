"""Resume: state_dict mid-epoch, reload into a fresh loader, and the rest equals an uninterrupted run.

``check_resume`` is the reusable save-at-midpoint helper (torchdata's pattern): run ``epochs`` epochs,
saving ``state_dict()`` after ``k`` batches (or right after an epoch's loop ends) on the way; build a
*new* loader, ``load_state_dict`` and finish the run there. Indices and coins must
match exactly, real images bit-exactly, synthetic images to float tolerance (they are recomputed from
the plan's seeds; nothing of the ring is saved).
"""

import json
import random
import time

import numpy as np
import pytest
import torch
from torch.utils.data import SubsetRandomSampler

from test_loader import TensorImages, engine_ready, fusion, real_fusion, real_synth  # noqa: F401  (fixture)


def _flatten(batches):
    out = []
    for (x, y), meta in batches:
        for j in range(len(y)):
            out.append((x[j], int(y[j]), int(meta["index"][j]), bool(meta["planned"][j]), bool(meta["synthetic"][j])))
    return out


def _run(loader, epochs):
    out = []
    for _ in range(epochs):
        out.extend(loader)
    return out


def check_resume(make_loader, epochs: int, save_after, atol: float = 0.0):
    """Run ``epochs`` epochs, saving ``state_dict()`` after batch ``save_after`` (a global batch count) or
    after epoch ``e``'s loop ends (``("epoch_end", e)``) without disturbing the run; load the state into a
    new loader, finish there, and compare with what the first run yielded after the save point."""
    loader, reference, state = make_loader(), [], None
    for epoch in range(epochs):
        for batch in loader:
            reference.append(batch)
            if len(reference) == save_after:
                state = loader.state_dict()
        if save_after == ("epoch_end", epoch):
            state, save_after = loader.state_dict(), len(reference)
    loader.close()
    assert state is not None
    resumed = make_loader()
    resumed.load_state_dict(state)
    rest = _run(resumed, epochs - state["next_epoch"])
    got, want = _flatten(rest), _flatten(reference[save_after:])
    assert len(got) == len(want) > 0
    for p, (a, b) in enumerate(zip(got, want)):
        assert a[1:] == b[1:], f"position {p}: (label, index, coin, synthetic) differ"
        if b[4] and atol:
            torch.testing.assert_close(a[0], b[0], atol=atol, rtol=0, msg=f"synthetic position {p}")
        else:
            assert torch.equal(a[0], b[0]), f"position {p}: image differs"
    assert resumed.stats()["cumulative"]["samples"] == len(_flatten(reference))  # counts carry over
    resumed.close()
    return _flatten(reference)


SAVE_POINTS = [2, 5, ("epoch_end", 0), 7]  # mid-epoch 0, last batch of epoch 0, between epochs, mid-epoch 1
IDS = ["mid-epoch-0", "last-batch-epoch-0", "epoch-boundary", "mid-epoch-1"]


@pytest.mark.parametrize("save_after", SAVE_POINTS, ids=IDS)
def test_resume_seeded_order(save_after):
    ds = TensorImages(n=20)
    make = lambda: fusion(ds, batch_size=4, shuffle=True, seed=3, return_meta=True, late_policy="wait",  # noqa: E731
                          strengths="randomized", transform=lambda x: x.flip(-1) if torch.rand(()) < 0.5 else x)
    got = check_resume(make, 2, save_after)
    assert any(s for *_, s in got) and not all(s for *_, s in got)


@pytest.mark.parametrize("persistent", [False, True], ids=["workers", "persistent-workers"])
@pytest.mark.parametrize("save_after", SAVE_POINTS, ids=IDS)
def test_resume_user_generator_and_workers(save_after, persistent):
    ds = TensorImages(n=20)

    def make():
        g = torch.Generator().manual_seed(9)
        return fusion(ds, batch_size=4, shuffle=True, generator=g, seed=1, num_workers=2, return_meta=True,
                      late_policy="wait", persistent_workers=persistent)

    check_resume(make, 2, save_after)


def test_resume_custom_sampler_recorded_order():
    ds = TensorImages(n=30)

    def make():
        g = torch.Generator().manual_seed(2)
        return fusion(ds, batch_size=3, sampler=SubsetRandomSampler(list(range(0, 30, 2)), generator=g),
                      return_meta=True, late_policy="wait")

    check_resume(make, 2, 3)


def test_resume_with_real_producers(real_synth):  # noqa: F811
    ds = TensorImages(n=8, size=32 if engine_ready() else 16)
    make = lambda: real_fusion(ds, real_synth, batch_size=4, shuffle=True, seed=5, alpha=0.5,  # noqa: E731
                               late_policy="wait", return_meta=True)
    check_resume(make, 2, 3, atol=1e-4)  # mid-epoch 1


# -- torchdata's state_dict behaviours (issue 10) ---------------------------------------------------


def test_state_dict_right_after_load_reports_the_restored_position():
    ds = TensorImages(n=20)
    make = lambda: fusion(ds, batch_size=4, shuffle=True, seed=3, return_meta=True)  # noqa: E731
    loader = make()
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    loader.close()
    resumed = make()
    resumed.load_state_dict(state)
    again = resumed.state_dict()  # a trainer checkpointing at once must not lose its place
    assert again["next_epoch"] == state["next_epoch"] and again["batch"] == state["batch"] == 2
    third = make()
    third.load_state_dict(again)
    assert [m["index"].tolist() for _, m in third] == [m["index"].tolist() for _, m in resumed]


@pytest.mark.parametrize("consumed", [1, 3])
def test_in_order_false_resume_loses_and_repeats_nothing(consumed):
    ds = _Slow(n=24)
    make = lambda: fusion(ds, batch_size=2, shuffle=True, seed=4, num_workers=2, in_order=False,  # noqa: E731
                          return_meta=True, alpha=0.5, late_policy="wait")
    loader = make()
    seen = []
    it = iter(loader)
    for _ in range(consumed):
        seen += next(it)[1]["index"].tolist()
    state = loader.state_dict()
    json.dumps(state)
    loader.close()
    resumed = make()
    resumed.load_state_dict(state)
    rest = [i for _, m in resumed for i in m["index"].tolist()]
    assert sorted(seen + rest) == list(range(24))  # every index once in the epoch: nothing lost or repeated


class _Slow(TensorImages):
    """Even indices take longer, so that with in_order=False batches overtake one another."""

    def __getitem__(self, i):
        if i % 2 == 0:
            time.sleep(0.01)
        return super().__getitem__(i)


class _RandomTransform(TensorImages):
    """A dataset whose own random transform draws from the worker's RNGs (torch, random, numpy). In the main
    process (the stand-in pool reading source images) it is deterministic, so only worker RNG is under test."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        if torch.utils.data.get_worker_info() is None:
            return x, y
        return x + torch.rand(()) + random.random() + float(np.random.rand()), y


@pytest.mark.parametrize("save_after", [1, 3, ("epoch_end", 0), 6])
def test_worker_rng_is_restored_on_resume(save_after):
    ds = _RandomTransform(n=16)

    def make():
        return fusion(ds, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(1), seed=1,
                      num_workers=2, return_meta=True, alpha=0.5, late_policy="wait")

    check_resume(make, 2, save_after)  # real samples bit-exact, random transform included


def test_shuffle_without_generator_or_seed_is_reproduced_in_the_next_epoch():
    ds = TensorImages(n=20)

    def orders(loader, epochs):
        return [[m["index"].tolist() for _, m in loader] for _ in range(epochs)]

    torch.manual_seed(11)
    loader = fusion(ds, batch_size=4, shuffle=True, alpha=0.0, return_meta=True, seed=None)
    it = iter(loader)
    first = [next(it)[1]["index"].tolist() for _ in range(2)]
    state = loader.state_dict()
    list(it)  # the rest of epoch 0
    reference = orders(loader, 1)  # epoch 1, from the global RNG
    loader.close()
    torch.manual_seed(12345)  # a new process: another global RNG
    resumed = fusion(ds, batch_size=4, shuffle=True, alpha=0.0, return_meta=True, seed=None)
    resumed.load_state_dict(state)
    json.dumps(state)
    rest = orders(resumed, 2)
    assert rest[1] == reference[0]  # the next epoch's global-RNG shuffle is the uninterrupted run's


class _BigSubset(SubsetRandomSampler):
    pass


def test_state_is_small_and_json_for_recomputable_samplers():
    ds = TensorImages(n=8)
    big = list(range(8)) * 20_000  # 160 k indices, as a large epoch would have
    g = torch.Generator().manual_seed(2)
    loader = fusion(ds, batch_size=4, sampler=SubsetRandomSampler(big, generator=g), alpha=0.5, late_policy="wait")
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert len(json.dumps(state)) < 64_000  # no recorded order: the generator's state re-derives it
    loader.close()


class _StatefulSampler:
    """A sampler with its own state_dict (torchdata's protocol): its order is restored through it."""

    def __init__(self, n):
        self.n, self.epoch_seed, self.loaded = n, 0, None

    def __iter__(self):
        order = np.random.default_rng(self.epoch_seed).permutation(self.n).tolist()
        self.epoch_seed += 1
        return iter(order)

    def __len__(self):
        return self.n

    def state_dict(self):
        return {"epoch_seed": self.epoch_seed}

    def load_state_dict(self, state):
        self.loaded = dict(state)
        self.epoch_seed = state["epoch_seed"]


@pytest.mark.parametrize("save_after", [2, ("epoch_end", 0), 6])
def test_a_sampler_with_its_own_state_dict_is_restored_through_it(save_after):
    ds = TensorImages(n=16)
    made = []

    def make():
        made.append(fusion(ds, batch_size=4, sampler=_StatefulSampler(16), return_meta=True, late_policy="wait"))
        return made[-1]

    check_resume(make, 2, save_after)
    assert made[-1].sampler.loaded is not None


class _PythonRandomSampler:
    """Draws from Python's ``random`` and has no state_dict: its order cannot be re-derived, so the loader
    stores what is left of it (the one case whose state holds indices)."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        order = list(range(self.n))
        random.shuffle(order)
        return iter(order)

    def __len__(self):
        return self.n


def test_a_sampler_that_cannot_re_derive_its_order_stores_the_rest():
    ds = TensorImages(n=16)
    random.seed(0)
    make = lambda: fusion(ds, batch_size=4, sampler=_PythonRandomSampler(16), return_meta=True,  # noqa: E731
                          late_policy="wait")
    loader, reference = make(), []
    it = iter(loader)
    reference += [next(it) for _ in range(2)]
    state = loader.state_dict()
    reference += list(it)
    loader.close()
    assert "stored_rest" in state and len(state["stored_rest"]["batches"]) == 2
    random.seed(99)  # another process
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = list(resumed)
    assert [m["index"].tolist() for _, m in rest] == [m["index"].tolist() for _, m in reference[2:]]
    assert [m["planned"].tolist() for _, m in rest] == [m["planned"].tolist() for _, m in reference[2:]]
