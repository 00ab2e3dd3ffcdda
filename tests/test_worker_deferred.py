"""Deferred synthetic positions (issue 10): a job unfinished when DataLoader hands its batch to a worker is
still served fresh if it is made before the trainer needs the batch (NOTE [Mixing] "When", NOTE [Worker side]).

The pool here is an in-process stand-in around a real shared-memory ``SlotRing``: the test decides when each
job's image is published, so "finished after dispatch, before consumption" is exact, not a race.
"""

import time

import pytest
import torch
from torch.utils.data import Dataset

from fusionloader.loader import FusionLoader
from fusionloader.ring import READY, SlotRing
from fusionloader.worker import DispatchGate

R = 16
KEY_STRIDE = 1 << 32


class Images(Dataset):
    def __init__(self, n=8):
        self.images = torch.rand(n, 3, R, R, generator=torch.Generator().manual_seed(7))
        self.targets = [i % 2 for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def variant(job) -> torch.Tensor:
    return torch.rand(3, R, R, generator=torch.Generator().manual_seed(int(job.seed) % (2**63)))


class RingPool:
    """ProducerPool's consumer-side protocol over a real host ring; jobs are published when the test says
    (``finish``), or at submission with ``eager=True``."""

    instances = []

    def __init__(self, synthesizer, source, devices=("cpu",), eager=False, **kwargs):
        self.eager = eager
        self.jobs, self.slot_of, self.cancelled, self.passed_keys, self.taken = {}, {}, [], [], []
        self.ring = None
        RingPool.instances.append(self)

    def start(self):
        self.ring = SlotRing(32, (3, R, R))
        self.free = list(range(32))

    def submit(self, jobs):
        for j in jobs:
            self.jobs[j.key] = j
            if self.eager:
                self.finish([j.key])

    def finish(self, keys):
        for key in keys:
            slot = self.free.pop(0)
            self.ring.assign(slot, 0)
            self.ring.write(slot, key, variant(self.jobs[key]), 0)
            self.slot_of[key] = slot

    def keys_at(self, positions):
        return at(self.jobs, positions)

    def take(self, key, timeout=0.0):
        slot = self.slot_of.pop(key, None)
        if slot is None:
            return None
        self.jobs.pop(key)
        self.taken.append(key)
        image = self.ring.read(slot, key)
        self.free.append(slot)
        return image

    def cancel(self, keys):
        for key in keys:
            self.cancelled.append(key)
            self.jobs.pop(key, None)
            slot = self.slot_of.pop(key, None)
            if slot is not None:
                self.ring.release(slot)
                self.free.append(slot)

    def passed(self, keys):
        self.passed_keys.extend(keys)

    def ready_keys(self):
        return set(self.slot_of)

    def state(self, key):
        return "ready" if key in self.slot_of else ("pending" if key in self.jobs else "unknown")

    def reader(self):
        return self.ring.handle

    def check(self):
        pass

    def stats(self):
        return {}

    def close(self):
        if self.ring is not None:
            self.ring.unlink()


def at(keys, positions):
    """The first epoch's job keys at ``positions`` (later epochs are requested ahead under other bases)."""
    base = min(k // KEY_STRIDE for k in keys)
    return sorted(k for k in keys if k // KEY_STRIDE == base and k % KEY_STRIDE in positions)


def make(late_policy, eager=False, num_workers=2, **kw):
    RingPool.instances.clear()
    loader = FusionLoader(Images(), batch_size=4, alpha=1.0, seed=0, lookahead=8, num_workers=num_workers,
                          late_policy=late_policy, return_meta=True, synthesizer="stand-in",
                          pool_factory=lambda s, src, devices, **k: RingPool(s, src, devices, eager=eager), **kw)
    return loader


@pytest.mark.parametrize("late_policy", ["reuse", "real"])
def test_a_job_finished_after_dispatch_before_consumption_is_served_fresh(late_policy):
    ds = Images()
    loader = make(late_policy)
    it = iter(loader)  # DataLoader hands both batches to the workers now: nothing is made yet
    pool = RingPool.instances[0]
    first = pool.keys_at(range(0, 4))
    assert len(first) == 4 and not pool.taken
    time.sleep(0.2)  # the workers hold the batches (nothing to serve yet)
    pool.finish(first)  # made after dispatch, before the trainer asks for batch 0
    (x, y), meta = next(it)
    assert meta["fresh"].all() and meta["synthetic"].all()
    for j, key in enumerate(first):
        assert torch.equal(x[j], variant(_SEEDS[key]))  # the job's own image, bit for bit
    assert sorted(pool.taken) == first  # taken at consumption: slots freed, images in the variant store
    assert pool.ring.counts()["ready"] == 0 and loader.stats()["store"]["variants"] == 4
    # batch 1: never made -> the late policy applies when the trainer goes past it, not at dispatch
    second = at(_SEEDS, range(4, 8))
    assert len(second) == 4 and not pool.cancelled and not pool.passed_keys
    (x1, _), meta1 = next(it)
    assert not meta1["fresh"].any()
    if late_policy == "real":
        assert not meta1["synthetic"].any() and sorted(pool.cancelled) == second
        assert torch.equal(x1, ds.images[meta1["index"]])  # the real samples
    else:
        assert sorted(pool.passed_keys) == second and not pool.cancelled  # kept running for the store
    with pytest.raises(StopIteration):
        next(it)
    loader.close()


_SEEDS = {}


@pytest.fixture(autouse=True)
def _remember_jobs(monkeypatch):
    """Keep every submitted job (the pool forgets taken ones) so a test can recompute its image."""
    orig = RingPool.submit

    def submit(self, jobs):
        for j in jobs:
            _SEEDS[j.key] = j
        return orig(self, jobs)

    monkeypatch.setattr(RingPool, "submit", submit)
    yield
    _SEEDS.clear()


def test_the_stream_is_the_same_whether_made_before_or_after_dispatch():
    """Made before dispatch (taken by the trainer then) or after (found by the worker): the same batches."""
    runs = []
    for eager in (True, False):
        loader = make("reuse", eager=eager)
        it = iter(loader)
        pool = RingPool.instances[0]
        if not eager:
            pool.finish(pool.keys_at(range(0, 8)))
        runs.append([next(it) for _ in range(2)])
        loader.close()
    for (xa, ma), (xb, mb) in zip(*runs):
        assert torch.equal(xa[0], xb[0]) and torch.equal(xa[1], xb[1])
        assert ma["fresh"].all() and mb["fresh"].all()


def test_no_deferral_without_workers_or_under_wait():
    for kw in ({"num_workers": 0, "late_policy": "reuse"}, {"num_workers": 2, "late_policy": "wait", "wait_timeout": 0.05}):
        policy = kw.pop("late_policy")
        loader = make(policy, **kw)
        it = iter(loader)
        pool = RingPool.instances[0]
        pool.finish(pool.keys_at(range(4, 8)))
        first = at(_SEEDS, range(0, 4))
        next(it)  # batch 0 (never made): gone past at dispatch, as before
        gone = pool.passed_keys if policy == "reuse" else pool.cancelled
        assert set(first) <= set(gone)
        loader.close()


def test_a_holding_worker_hands_the_batch_back_when_the_trainer_asks():
    """Nothing is ever made: each batch comes back as soon as it is asked for (the gate), not after a timeout."""
    loader = make("real")
    t0 = time.monotonic()
    batches = list(loader)
    assert len(batches) == 2 and time.monotonic() - t0 < 20
    assert not any(m["fresh"].any() for _, m in batches)
    loader.close()


def test_abandoning_an_epoch_releases_held_batches():
    loader = make("real", persistent_workers=True)
    it = iter(loader)
    next(it)
    t0 = time.monotonic()
    again = list(loader)  # the new iter() drains the old batches held by the persistent workers
    assert len(again) == 2 and time.monotonic() - t0 < 20
    loader.close()


def test_peek_copies_without_taking_and_never_returns_a_reused_slot():
    ring = SlotRing(2, (3, 2, 2))
    try:
        ring.assign(0, 0)
        ring.write(0, 11, torch.ones(3, 2, 2), 0)
        got = ring.peek([11, 12])
        assert set(got) == {11} and torch.equal(got[11], torch.ones(3, 2, 2))
        assert ring.state(0) == READY  # still the consumer's to read
        ring.release(0)
        ring.assign(0, 0)
        ring.write(0, 12, torch.zeros(3, 2, 2), 0)
        assert set(ring.peek([11])) == set()  # the slot now holds another job
    finally:
        ring.unlink()


def test_dispatch_gate_is_monotonic_and_releases_everything_dispatched():
    gate = DispatchGate()
    a, b = gate.next(), gate.next()
    gate.want(b)
    gate.want(a)  # never goes back
    assert DispatchGate.wanted(gate.tensor) == b
    c = gate.next()
    gate.release_all()
    assert DispatchGate.wanted(gate.tensor) == c


@pytest.mark.parametrize("num_workers, prefetch, slots", [(0, None, None), (2, 2, 2 * 2 * 4 + 4 + 2 * 8), (2, 4, None)])
def test_default_ring_holds_the_synthetic_positions_in_flight(num_workers, prefetch, slots):
    # A deferred position keeps its image's slot until its batch is consumed: the default ring must hold every
    # synthetic position DataLoader can have dispatched (prefetch_factor per worker, plus the batch being made)
    # and leave the producers room to work ahead, or they stall on a full ring and deliver just in time.
    from fusionloader.requests import ring_slots

    seen = {}

    def factory(s, src, devices, **k):
        seen.update(k)
        return RingPool(s, src, devices)

    kw = {} if prefetch is None else {"prefetch_factor": prefetch}
    loader = FusionLoader(Images(), batch_size=4, alpha=1.0, seed=0, num_workers=num_workers, producer_capacity=8,
                          synthesizer="stand-in", pool_factory=factory, **kw)  # fmt: skip
    try:
        next(iter(loader))
        in_flight = 4 * (1 + (prefetch or 0) * num_workers)
        assert seen["slots"] == ring_slots(loader.config, 1, in_flight)
        assert seen["slots"] == max(4 * 8, in_flight + 2 * 8)
        if slots is not None:
            assert seen["slots"] == slots
    finally:
        loader.close()
    pinned = FusionLoader(Images(), batch_size=4, alpha=1.0, seed=0, num_workers=num_workers, producer_slots=5,
                          synthesizer="stand-in", pool_factory=factory, **kw)  # fmt: skip
    try:
        next(iter(pinned))
        assert seen["slots"] == 5  # an explicit producer_slots is kept as given
    finally:
        pinned.close()
