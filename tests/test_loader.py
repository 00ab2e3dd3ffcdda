"""FusionLoader: alpha=0 is DataLoader; mixing, late policies, meta, stats, epochs, lifetime.

Most tests use ``InlinePool``, an in-process stand-in for ``ProducerPool`` whose output is a known
function of (source image, seed, strength), so "a variant of its own index" can be checked exactly and
lateness can be forced. The acceptance tests at the bottom run the real ``ProducerPool`` (spawned
producers, shared-memory ring) with the tiny checkpoint when the engine is importable, else with the
stand-in engine ``VariantSynth`` below.
"""

import collections
import logging
import os
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SubsetRandomSampler, WeightedRandomSampler

from fusionloader.loader import FusionLoader
from fusionloader.testing import process_alive as alive

R = 16  # stand-in synthesis resolution (= the test images' size, so no resize muddles exact checks)


# -- datasets ------------------------------------------------------------------------------------


class TensorImages(Dataset):
    """(float image (3, R, R), label) with ``targets`` and ``classes``; optional loader-side transform."""

    classes = ["cat", "dog", "bird"]

    def __init__(self, n=40, size=R):
        g = torch.Generator().manual_seed(1234)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.targets = [i % 3 for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


class PILImages(Dataset):
    """VisionDataset-style: PIL images of varying size, ``transform`` attribute applied in __getitem__."""

    def __init__(self, n=12, transform=None):
        rng = np.random.default_rng(0)
        self.arrays = [rng.integers(0, 256, size=(R + i % 3, R + 2 * (i % 2), 3), dtype=np.uint8) for i in range(n)]
        self.targets = [i % 2 for i in range(n)]
        self.transform = transform

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(self.arrays[i])
        return (self.transform(img) if self.transform is not None else img), self.targets[i]


# -- stand-ins for producers -----------------------------------------------------------------------


def expected_variant(source_image, seed, strength):
    """What both stand-ins make: the source blended towards seeded noise by ``strength``."""
    noise = torch.rand(3, R, R, generator=torch.Generator().manual_seed(int(seed) % (2**63)))
    if strength is None:
        return noise
    src = torch.nn.functional.interpolate(source_image[None], size=(R, R), mode="bilinear", antialias=True)[0]
    return ((1 - strength) * src + strength * noise).clamp(0, 1)


class InlinePool:
    """In-process ProducerPool stand-in. ``behavior``: "ready" (every job done at once) or "never"."""

    instances = []

    def __init__(self, synthesizer, source, devices=("cpu",), behavior="ready", **kwargs):
        self.source, self.devices, self.behavior, self.kwargs = source, devices, behavior, kwargs
        self.jobs, self.started, self.closed, self.cancelled, self.taken = {}, False, False, [], 0
        self.asked = set()
        InlinePool.instances.append(self)

    def start(self):
        self.started = True

    def submit(self, jobs):
        assert self.started and not self.closed
        for j in jobs:
            assert j.key not in self.jobs, "duplicate key"
            self.jobs[j.key] = j

    def take(self, key, timeout=0.0):
        job = self.jobs.pop(key, None)
        if job is None:
            return None
        if self.behavior == "never" or (self.behavior == "late" and key not in self.asked):
            self.asked.add(key)  # "late": not ready when its position comes up, ready at the next take
            time.sleep(timeout)
            self.jobs[key] = job
            return None
        self.taken += 1
        return expected_variant(self.source.raw(job.index)[0], job.seed, job.strength)

    def cancel(self, keys):
        for k in keys:
            self.cancelled.append(k)
            self.jobs.pop(k, None)

    def check(self):
        pass

    def state(self, key):
        return "pending" if key in self.jobs else "unknown"

    def stats(self):
        return {"images_per_s": 0.0, "ring": {"occupancy": 0.0}}

    def close(self):
        self.closed = True


def inline(behavior="ready"):
    def factory(synthesizer, source, devices=("cpu",), **kwargs):
        return InlinePool(synthesizer, source, devices, behavior=behavior, **kwargs)

    return factory


def fusion(ds, behavior="ready", **kw):
    kw.setdefault("alpha", 0.5)
    kw.setdefault("seed", 0)
    return FusionLoader(ds, pool_factory=inline(behavior), synthesizer="stand-in", **kw)


def same(a, b):
    """Deep equality of batches (tensors bit-exact)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


# -- alpha = 0 is DataLoader -----------------------------------------------------------------------


def pair_collate(batch):
    return {"x": torch.stack([b[0] for b in batch]).mul(2), "y": [b[1] for b in batch]}


def _configs():
    yield "shuffle-generator", lambda g: dict(batch_size=6, shuffle=True, generator=g)
    yield "shuffle-global-rng", lambda g: dict(batch_size=6, shuffle=True)
    yield "sequential-drop-last", lambda g: dict(batch_size=7, drop_last=True)
    yield "subset-sampler", lambda g: dict(batch_size=4, sampler=SubsetRandomSampler(list(range(0, 40, 3)), generator=g))
    yield "weighted-sampler", lambda g: dict(batch_size=5, sampler=WeightedRandomSampler([1.0] * 40, 30, generator=g))
    yield "batch-sampler", lambda g: dict(batch_sampler=[[3, 1], [0, 2, 5], [39]])
    yield "collate-fn", lambda g: dict(batch_size=8, shuffle=True, generator=g, collate_fn=pair_collate)
    yield "no-auto-batching", lambda g: dict(batch_size=None, shuffle=True, generator=g)


CONFIGS = dict(_configs())


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_alpha0_is_exactly_dataloader(name, num_workers):
    ds = TensorImages()
    epochs = {}
    for cls in (DataLoader, FusionLoader):
        g = torch.Generator().manual_seed(5)
        torch.manual_seed(17)
        kw = CONFIGS[name](g)
        extra = {"alpha": 0.0} if cls is FusionLoader else {}
        loader = cls(ds, num_workers=num_workers, **kw, **extra)
        epochs[cls] = ([list(loader) for _ in range(2)], len(loader), g.get_state(), torch.get_rng_state())
    (ref, n_ref, g_ref, rng_ref), (out, n_out, g_out, rng_out) = epochs[DataLoader], epochs[FusionLoader]
    assert n_out == n_ref and [len(e) for e in out] == [len(e) for e in ref]
    assert same(out, ref)
    assert torch.equal(g_out, g_ref) and torch.equal(rng_out, rng_ref)  # the same RNG draws, in the same order


def test_alpha0_persistent_workers_and_worker_seeds():
    ds = _WorkerSeeds()
    res = {}
    for cls in (DataLoader, FusionLoader):
        g = torch.Generator().manual_seed(3)
        extra = {"alpha": 0.0} if cls is FusionLoader else {}
        loader = cls(ds, batch_size=2, num_workers=2, persistent_workers=True, generator=g, **extra)
        res[cls] = [list(loader) for _ in range(2)]
        if cls is FusionLoader:
            loader.close()
    assert same(res[FusionLoader], res[DataLoader])


class _WorkerSeeds(Dataset):
    """Returns the worker's torch seed: equal only if workers are seeded exactly like DataLoader's."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([i, torch.initial_seed() % 100003])


def test_len_and_end_of_epoch_like_dataloader():
    ds = TensorImages(n=23)
    for kw in (dict(batch_size=5), dict(batch_size=5, drop_last=True), dict(batch_size=None)):
        ref, loader = DataLoader(ds, **kw), fusion(ds, **kw)
        assert len(loader) == len(ref)
        it = iter(loader)
        assert sum(1 for _ in it) == len(ref)
        with pytest.raises(StopIteration):
            next(it)
        with pytest.raises(StopIteration):
            next(it)
        assert sum(1 for _ in loader) == len(ref)  # a new iter() is a new epoch


def test_front_is_not_a_dataloader_and_starts_nothing_before_iter():
    ds = TensorImages()
    InlinePool.instances.clear()
    sampler = SubsetRandomSampler(list(range(10)))
    loader = fusion(ds, batch_size=3, sampler=sampler, drop_last=True)
    assert not isinstance(loader, DataLoader)
    assert loader.dataset is ds and loader.sampler is sampler and loader.batch_size == 3 and loader.drop_last
    assert loader.batch_sampler.sampler is sampler
    assert InlinePool.instances == []  # nothing heavy before iter()
    next(iter(loader))
    assert len(InlinePool.instances) == 1 and InlinePool.instances[0].started
    with pytest.raises(ValueError):
        FusionLoader(ds, alpha=0.5)  # synthesis without a synthesizer
    with pytest.raises(ValueError):
        FusionLoader(ds, batch_size=2, shuffle=True, sampler=sampler, alpha=0)  # torch's own validation
    with pytest.raises(ValueError):
        fusion(ds, late_policy="sometimes")


# -- mixing ----------------------------------------------------------------------------------------


def run_epoch(loader):
    xs, metas = [], []
    for (x, y), meta in loader:
        xs.append(x)
        metas.append(meta)
    meta = {k: torch.cat([m[k] for m in metas]) for k in metas[0]}
    return torch.cat(xs), meta


def test_alpha_half_wait_synthesizes_exactly_the_planned_positions():
    ds = TensorImages(n=40)
    loader = fusion(ds, batch_size=6, shuffle=True, late_policy="wait", return_meta=True, strengths="randomized")
    x, meta = run_epoch(loader)
    assert x.shape[0] == 40
    assert torch.equal(meta["synthetic"], meta["planned"]) and torch.equal(meta["fresh"], meta["synthetic"])
    n, k = len(meta["index"]), int(meta["synthetic"].sum())
    assert abs(k - n / 2) <= 3 * (n / 4) ** 0.5  # binomial noise
    assert sorted(meta["index"].tolist()) == list(range(40))
    pool = InlinePool.instances[-1]
    assert pool.taken == k
    # every synthetic sample is a variant of its own index (made from its seed and strength)
    from fusionloader.order import batch_order, random_order
    from fusionloader.plan import plan_epoch

    plan = plan_epoch(batch_order(random_order(40, 0, 0), 6, False), seed=0, epoch=0, alpha=0.5, strengths="randomized")
    assert torch.equal(meta["index"], torch.from_numpy(plan.indices))
    for p in range(n):
        i = int(meta["index"][p])
        if meta["synthetic"][p]:
            assert float(meta["strength"][p]) in (0.25, 0.5, 0.75, 1.0)
            want = expected_variant(ds.images[i], plan.sample_seed[p], float(plan.strength[p]))
            torch.testing.assert_close(x[p], want)
        else:
            assert torch.equal(x[p], ds.images[i]) and torch.isnan(meta["strength"][p])
    s = loader.stats()
    assert s["current"]["fresh"] == k and s["current"]["real"] == n - k and s["current"]["fallback"] == 0
    assert s["current"]["achieved_alpha"] == pytest.approx(k / n)


def test_late_policies_reuse_real_wait():
    ds = TensorImages(n=12)
    # reuse: an epoch with ready producers fills the store, then late positions reuse own-index variants
    loader = fusion(ds, batch_size=4, shuffle=True, return_meta=True, alpha=1.0, variants_per_index=2)
    x0, m0 = run_epoch(loader)
    assert m0["fresh"].all()
    InlinePool.instances[-1].behavior = "never"
    x1, m1 = run_epoch(loader)
    assert m1["synthetic"].all() and not m1["fresh"].any()
    variants = collections.defaultdict(list)
    for p, i in enumerate(m0["index"].tolist()):
        variants[i].append(x0[p])
    for p, i in enumerate(m1["index"].tolist()):  # each reused image is a stored variant of its own index
        assert any((x1[p] - v).abs().max() <= 1 / 255 for v in variants[i])
    st = loader.stats()
    assert st["per_epoch"][1]["reused"] == 12 and st["cumulative"]["fresh"] == 12
    pool = InlinePool.instances[-1]
    late = {key for key, _, _ in loader._mixer.late}
    assert len(late) == 12 and not late & set(pool.cancelled)  # late jobs keep running, to be stored when done
    loader.close()
    assert late <= set(pool.cancelled) and pool.closed

    # real: late positions are delivered real and counted as fallback
    loader = fusion(ds, "never", batch_size=4, return_meta=True, alpha=1.0, late_policy="real")
    x, m = run_epoch(loader)
    assert not m["synthetic"].any() and m["planned"].all() and torch.equal(x, ds.images)
    assert loader.stats()["current"]["fallback"] == 12 and loader.stats()["current"]["achieved_alpha"] == 0.0

    # wait: blocks until the batch's one deadline (wait_timeout from its arrival, not per position), then real
    loader = fusion(ds, "never", batch_size=4, return_meta=True, alpha=1.0, late_policy="wait", wait_timeout=0.05)
    x, m = run_epoch(loader)
    assert not m["synthetic"].any() and torch.equal(x, ds.images)
    assert 3 * 0.05 <= loader.stats()["current"]["stall_s"] < 6 * 0.05  # 3 batches of 4 late positions


def test_synthetic_gets_the_dataset_transform_in_the_raw_form():
    seen = []

    def transform(img):
        seen.append((type(img).__name__, img.size))
        return torch.from_numpy(np.array(img.resize((8, 8)))).permute(2, 0, 1).float() / 255

    ds = PILImages(transform=transform)
    loader = fusion(ds, batch_size=4, alpha=1.0, return_meta=True, late_policy="wait")
    (x, y), meta = next(iter(loader))
    assert x.shape == (4, 3, 8, 8) and meta["synthetic"].all()
    sizes = {ds.arrays[i].shape[1::-1] for i in range(4)}
    assert {s for _, s in seen[-4:]} <= sizes and all(t == "Image" for t, _ in seen)  # PIL, original size
    assert y.tolist() == ds.targets[:4]


def test_loader_transform_applies_to_real_and_synthetic_and_is_seeded():
    ds = TensorImages(n=12)

    def transform(img):  # random, so reproducibility needs the per-position RNG
        return img * 0 + torch.rand(())

    a, ma = run_epoch(fusion(ds, batch_size=4, alpha=0.5, return_meta=True, transform=transform, late_policy="wait"))
    b, mb = run_epoch(fusion(ds, batch_size=4, alpha=0.5, return_meta=True, transform=transform, late_policy="wait"))
    syn = ma["synthetic"]
    assert syn.any() and (~syn).any()
    assert torch.equal(a[syn], b[syn])  # synthetic: transform RNG seeded per position
    assert (a.amax(dim=(1, 2, 3)) == a.amin(dim=(1, 2, 3))).all()  # both kinds went through the transform


def test_meta_stats_progress_and_logging(caplog):
    ds = TensorImages(n=16)

    class Bar:
        def __init__(self):
            self.calls = 0

        def set_postfix(self, d, refresh=True):
            self.calls += 1
            self.last = d

    bar = Bar()
    loader = fusion(ds, batch_size=4, return_meta=True, progress=bar, log_every=2)
    with caplog.at_level(logging.INFO, logger="fusionloader"):
        batches = list(loader)
    (x, y), meta = batches[0]
    assert set(meta) == {"index", "planned", "synthetic", "fresh", "strength"}
    assert meta["index"].dtype == torch.int64 and meta["synthetic"].dtype == torch.bool
    assert meta["strength"].dtype == torch.float32
    assert bar.calls == 4 and {"alpha", "fresh", "stall"} <= set(bar.last)
    assert any("epoch 0" in r.getMessage() for r in caplog.records)
    s = loader.stats()
    for key in ("real", "fresh", "reused", "fallback", "achieved_alpha", "stall_s", "fresh_fraction"):
        assert key in s["current"] and key in s["cumulative"]
    assert s["current"]["samples"] == 16 and "producer" in s and 0 in s["per_epoch"]


def test_text_only_and_prompts():
    ds = TensorImages(n=9)
    loader = fusion(ds, batch_size=3, alpha=1.0, strengths=None, prompts={0: "p0", 1: ["p1a", "p1b"], 2: "a {}"},
                    late_policy="wait")
    list(loader)
    pool = InlinePool.instances[-1]
    assert loader.prompt(0, 0.1) == "p0" and loader.prompt(1, 0.9) == "p1b" and loader.prompt(2, 0.0) == "a bird"
    loader2 = fusion(ds, alpha=1.0)
    assert loader2.prompt(4, 0.0) == "a photo of a dog"
    loader3 = fusion(ds, alpha=1.0, prompts=lambda index, label: f"{index}-{label}")
    assert loader3.prompt(4, 0.0) == "4-1"
    assert pool.taken == 9


def test_epochs_are_counted_and_set_epoch_is_forwarded():
    ds = TensorImages(n=20)
    loader = fusion(ds, batch_size=5, shuffle=True, return_meta=True)
    _, e0 = run_epoch(loader)
    _, e1 = run_epoch(loader)
    assert not torch.equal(e0["index"], e1["index"])  # epoch counted: new order, new coins
    loader.set_epoch(0)
    _, again = run_epoch(loader)
    assert torch.equal(again["index"], e0["index"]) and torch.equal(again["planned"], e0["planned"])
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)
    loader = fusion(ds, batch_size=5, sampler=sampler, alpha=0.0)
    loader.set_epoch(4)
    assert sampler.epoch == 4
    ref = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)
    ref.set_epoch(4)
    assert torch.cat([y for _, y in loader]).tolist() == [ds.targets[i] for i in ref]


def test_close_with_and_del():
    ds = TensorImages(n=12)
    with fusion(ds, batch_size=4) as loader:
        for _ in loader:
            break
    pool = InlinePool.instances[-1]
    assert pool.closed and pool.cancelled  # breaking out cancels what was requested ahead
    loader = fusion(ds, batch_size=4, num_workers=2, persistent_workers=True)
    next(iter(loader))
    pool = InlinePool.instances[-1]
    del loader
    assert pool.closed
    with pytest.raises(RuntimeError):
        iter(_closed(fusion(ds)))


def _closed(loader):
    loader.close()
    loader.close()  # idempotent
    return loader


# -- acceptance against the real ProducerPool --------------------------------------------------------

Finished = collections.namedtuple("Finished", "key image finite")


class _VariantCache:
    def get(self, indices, load):
        images = torch.stack([load(i) for i in indices])
        return images, torch.zeros_like(images)


class _VariantSampler:
    def __init__(self, capacity):
        self.capacity, self.queue = capacity, []

    def submit(self, req):
        self.queue.append(req)

    def step(self):
        done, self.queue = self.queue[: self.capacity], self.queue[self.capacity :]
        time.sleep(0.002)
        out = []
        for req in done:
            img = expected_variant(req.latent_mean, req.seed, req.strength)
            out.append(Finished(req.key, img, True))
        return out


class VariantSynth:
    """Stand-in engine for the real ProducerPool (DEV ONLY until fusionloader.engine has a sampler)."""

    device = "cpu"

    def sampler(self, capacity=8):
        return _VariantSampler(capacity)

    def latent_cache(self, path=None, resolution=None):
        return _VariantCache()


def engine_ready():
    try:
        from fusionloader.engine import Synthesizer  # noqa: F401

        return hasattr(Synthesizer, "sampler")
    except ImportError:
        return False


@pytest.fixture
def real_synth(request):
    """The tiny SD-1.x checkpoint (conftest's session fixture) when the engine is in, else the stand-in."""
    if engine_ready():
        return request.getfixturevalue("tiny_sd1_path")
    return VariantSynth()


def real_fusion(ds, synth, **kw):
    kw.setdefault("num_inference_steps", 4)
    kw.setdefault("guidance_scale", 2.0)
    kw.setdefault("seed", 0)
    kw.setdefault("producer_timeout", 120.0)
    return FusionLoader(ds, synthesizer=synth, **kw)


def test_real_pool_alpha_half_wait_and_shutdown(real_synth):
    ds = TensorImages(n=24, size=32 if engine_ready() else R)
    loader = real_fusion(ds, real_synth, batch_size=4, shuffle=True, alpha=0.5, late_policy="wait",
                         return_meta=True, strengths="randomized", num_workers=2)
    x, meta = run_epoch(loader)
    assert torch.equal(meta["synthetic"], meta["planned"]) and torch.equal(meta["fresh"], meta["planned"])
    n, k = len(meta["index"]), int(meta["synthetic"].sum())
    assert abs(k - n / 2) <= 3 * (n / 4) ** 0.5 and sorted(meta["index"].tolist()) == list(range(24))
    for p in range(n):
        i = int(meta["index"][p])
        if not meta["synthetic"][p]:
            assert torch.equal(x[p], ds.images[i])
        elif not engine_ready():  # the stand-in's output is known: a variant of the position's own index
            assert not torch.equal(x[p], ds.images[i])
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    stats = loader.stats()
    assert stats["current"]["fresh"] == k and stats["producer"]["images"] >= k
    pids, shm = loader._pool.pids, loader._pool.shm_names
    assert pids and all(alive(p) for p in pids)
    t0 = time.monotonic()
    del loader
    while any(alive(p) for p in pids) and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)
    assert not any(os.path.exists(f"/dev/shm/{name}") for name in shm)


def test_producer_failure_reraises_in_the_training_loop():
    class Failing(InlinePool):
        def check(self):
            if self.taken >= 2:
                raise RuntimeError("producer 0 on cpu failed on job 7 (dataset index 3)")

    loader = FusionLoader(TensorImages(n=12), batch_size=2, alpha=1.0, late_policy="wait", seed=0,
                          synthesizer="stand-in", pool_factory=lambda s, src, devices, **kw: Failing(s, src, devices))
    with pytest.raises(RuntimeError, match="producer 0 on cpu"):
        list(loader)
    loader.close()
    assert Failing.instances[-1].closed


def epoch_plan(n, batch_size, epoch):
    """The plan of a seed-0, shuffled, alpha=1 epoch, as the loader makes it."""
    from fusionloader.order import batch_order, random_order
    from fusionloader.plan import plan_epoch

    return plan_epoch(batch_order(random_order(n, 0, epoch), batch_size, False), seed=0, epoch=epoch, alpha=1.0)


def queued_after_first_epoch(loader):
    """Run epoch 0; return the pool and the jobs it still holds, in key order."""
    run_epoch(loader)
    pool = InlinePool.instances[-1]
    return pool, sorted(pool.jobs.values(), key=lambda j: j.key)


def test_requests_cross_the_epoch_boundary():
    ds = TensorImages(n=12)
    loader = fusion(ds, batch_size=4, shuffle=True, alpha=1.0, late_policy="wait", return_meta=True, lookahead=8)
    pool, ahead = queued_after_first_epoch(loader)
    plan1 = epoch_plan(12, 4, 1)
    assert [j.index for j in ahead] == plan1.indices[: len(ahead)].tolist() and len(ahead) >= 4  # epoch 1 queued
    x, meta = run_epoch(loader)  # adopted: epoch 1 consumes exactly those jobs, all fresh
    assert meta["fresh"].all() and torch.equal(meta["index"], torch.from_numpy(plan1.indices))
    for p in range(12):
        torch.testing.assert_close(x[p], expected_variant(ds.images[int(plan1.indices[p])], plan1.sample_seed[p], 0.5))
    cancelled = len(pool.cancelled)
    loader.set_epoch(5)  # epoch 2 was requested ahead; a different epoch drops those requests
    x, meta = run_epoch(loader)
    assert len(pool.cancelled) > cancelled and meta["fresh"].all()


def test_look_ahead_spans_several_short_epochs_in_consumption_order():
    # A few-shot epoch (4 samples) is shorter than the look-ahead (14): the requests run two epochs and more
    # ahead, keys growing in consumption order (the pool's deadline order relies on it), and each epoch
    # then consumes exactly the jobs requested for it.
    ds = TensorImages(n=4)
    loader = fusion(ds, batch_size=2, shuffle=True, alpha=1.0, late_policy="wait", return_meta=True, lookahead=14)
    pool, ahead = queued_after_first_epoch(loader)
    expected = [i for epoch in (1, 2, 3, 4) for i in epoch_plan(4, 2, epoch).indices.tolist()]
    assert len(ahead) >= 12 and [j.index for j in ahead] == expected[: len(ahead)]
    for epoch in (1, 2, 3):
        x, meta = run_epoch(loader)
        assert meta["fresh"].all() and meta["index"].tolist() == expected[4 * (epoch - 1) : 4 * epoch]
    assert not pool.cancelled  # every request made ahead was used


def test_late_jobs_are_harvested_into_the_store():
    ds = TensorImages(n=8)
    loader = fusion(ds, "late", batch_size=4, alpha=1.0, return_meta=True, seed=2)
    _, m0 = run_epoch(loader)  # every job late at its position: nothing stored yet, all real
    assert not m0["synthetic"].any() and loader.stats()["current"]["fallback"] == 8
    x1, m1 = run_epoch(loader)  # epoch 0's jobs finished meanwhile and were stored: reused now
    st = loader.stats()
    assert st["store"]["harvested"] >= 4 and m1["synthetic"].sum() >= 4 and not m1["fresh"].any()
    for p in range(8):
        if m1["synthetic"][p]:
            assert not torch.equal(x1[p], ds.images[int(m1["index"][p])])
    loader.close()


# -- DataLoader's contracts (issue 10) ----------------------------------------------------------------


class _Failing(Dataset):
    """Raises the dataset's own exception type at index 7 (a missing key, as a dict-backed dataset would)."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        if i == 7:
            raise KeyError(f"no record {i}")
        return torch.full((2,), float(i))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_dataset_exception_type_reaches_the_trainer(num_workers, alpha):
    import traceback

    loader = fusion(_Failing(), batch_size=4, num_workers=num_workers, alpha=alpha, late_policy="real")
    with pytest.raises(KeyError) as info:  # DataLoader re-raises the dataset's own type
        list(loader)
    text = "".join(traceback.format_exception(info.value))
    assert "no record 7" in text and "dataset index 7" in text  # and the loader says where it happened
    loader.close()


def test_assigning_dataloader_attributes_after_init_raises_value_error_like_dataloader():
    ds = TensorImages(n=8)
    ref, loader = DataLoader(ds, batch_size=2), fusion(ds, batch_size=2, alpha=0.0)
    for attr, value in (("batch_size", 3), ("sampler", None), ("batch_sampler", None), ("drop_last", True),
                        ("dataset", ds), ("persistent_workers", True)):
        with pytest.raises(ValueError) as want:
            setattr(ref, attr, value)
        with pytest.raises(ValueError) as got:
            setattr(loader, attr, value)
        assert str(got.value) == str(want.value).replace("DataLoader", "FusionLoader")
    loader.num_workers = 0  # DataLoader allows this one (and so do we)
    assert loader.batch_size == 2


class _ListIndexed(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, idx):  # a sampler hands whole lists of indices (batch_size=None)
        return torch.tensor(idx) * 10


def test_batch_size_none_with_a_sampler_yielding_lists_is_dataloader():
    sampler = [[0, 1, 2], [5, 6], [9]]
    ref = list(DataLoader(_ListIndexed(), batch_size=None, sampler=sampler))
    loader = fusion(_ListIndexed(), batch_size=None, sampler=sampler, alpha=0.0)
    assert same(list(loader), ref)
    with pytest.raises(ValueError, match="integer"):  # synthesis needs one dataset index per position
        next(iter(fusion(_ListIndexed(), batch_size=None, sampler=sampler, alpha=1.0)))


def test_subscriptable_for_typing():
    alias = FusionLoader[torch.Tensor]
    assert alias.__origin__ is FusionLoader


# -- every setting validated at construction (issue 10, item 5) --------------------------------------------


@pytest.mark.parametrize("kw,err,words", [
    (dict(guidance_scale=float("nan")), ValueError, ["guidance_scale", "nan"]),
    (dict(guidance_scale="high"), TypeError, ["guidance_scale", "high"]),
    (dict(num_inference_steps=0), ValueError, ["num_inference_steps", "0"]),
    (dict(num_inference_steps=2.5), TypeError, ["num_inference_steps", "2.5"]),
    (dict(strengths=0.1, num_inference_steps=5), ValueError, ["strength", "0.1", "num_inference_steps=5"]),
    (dict(strengths=(0.25, 0.5), num_inference_steps=3), ValueError, ["0.25", "0 denoising steps"]),
    (dict(wait_timeout=float("nan")), ValueError, ["wait_timeout", "nan"]),
    (dict(wait_timeout=0), ValueError, ["wait_timeout", "0"]),
    (dict(alpha=float("nan")), ValueError, ["alpha", "nan"]),
    (dict(late_policy="sometimes"), ValueError, ["late_policy", "sometimes"]),
    (dict(variants_per_index=-1), ValueError, ["variants_per_index", "-1"]),
    (dict(lookahead=0), ValueError, ["lookahead", "0"]),
    (dict(image_size=100), ValueError, ["image_size", "100"]),
    (dict(producer_capacity=0), ValueError, ["producer_capacity", "0"]),
    (dict(producer_timeout=-1.0), ValueError, ["producer_timeout", "-1.0"]),
    (dict(on_producer_error="ignore"), ValueError, ["on_producer_error", "ignore"]),
    (dict(max_restarts=-2), ValueError, ["max_restarts", "-2"]),
    (dict(distributed="yes"), ValueError, ["distributed", "yes"]),
    (dict(producer_devices=("tpu:0",)), ValueError, ["producer_devices", "tpu:0"]),
    (dict(producer_devices=()), ValueError, ["producer_devices"]),
    (dict(log_every=-1), ValueError, ["log_every", "-1"]),
    (dict(progress=object()), TypeError, ["progress"]),
    (dict(prompts=3), TypeError, ["prompts", "3"]),
    (dict(prompts={0: "a cat", 1: "a dog"}), ValueError, ["prompts", "label 2"]),  # TensorImages has 3 classes
    (dict(prompts=["a", "b"]), ValueError, ["prompts", "label 2"]),
    (dict(bogus_setting=1), TypeError, ["bogus_setting"]),
])  # fmt: skip
def test_every_setting_is_validated_at_construction(kw, err, words):
    InlinePool.instances.clear()
    with pytest.raises(err) as info:
        fusion(TensorImages(n=6), **kw)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert InlinePool.instances == []  # nothing started


def test_cuda_device_on_a_cpu_build_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"producer_devices: 'cuda:0' needs CUDA"):
        fusion(TensorImages(n=6), producer_devices=["cpu", "cuda:0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:3' does not exist; this machine has 1 CUDA"):
        fusion(TensorImages(n=6), producer_devices="cuda:3")
    assert fusion(TensorImages(n=6), producer_devices="cuda:0").config.producer_devices == ("cuda:0",)


def test_a_missing_synthesizer_path_is_file_not_found(tmp_path):
    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        FusionLoader(TensorImages(n=6), synthesizer=missing, alpha=0.5)
    with pytest.raises(FileNotFoundError, match="models/sd"):
        FusionLoader(TensorImages(n=6), synthesizer="./models/sd", alpha=0.5)
    FusionLoader(TensorImages(n=6), synthesizer=str(tmp_path), alpha=0.5).close()  # exists: accepted, nothing started


def test_config_object_and_keyword_arguments():
    from fusionloader import FusionConfig, LatePolicy

    cfg = FusionConfig(synthesizer="stand-in", alpha=0.25, late_policy="wait", pool_factory=inline())
    loader = FusionLoader(TensorImages(n=8), batch_size=2, config=cfg, seed=4)
    assert loader.config.alpha == 0.25 and loader.config.seed == 4 and loader.late_policy == "wait"
    assert loader.config.late_policy == LatePolicy("wait") and loader.config.late_policy.waits
    assert cfg.seed is None  # the caller's object is not changed
    loader.set_synthesis(alpha=0.75, strengths="randomized")
    assert loader.alpha == 0.75 and loader.strengths == "randomized"
    with pytest.raises(ValueError, match="alpha"):
        loader.set_synthesis(alpha=2.0)
    with pytest.raises(ValueError, match="denoising steps"):
        fusion(TensorImages(n=6), num_inference_steps=2).set_synthesis(strengths=0.25)
    with pytest.raises(AttributeError):
        loader.alpha = 0.5  # through set_synthesis only (validated once, in one place)


class _StalledPool(InlinePool):
    """Never delivers, and says its producer is stuck (the pool's public stalled() query)."""

    def stalled(self):
        return True


def test_a_stalled_producer_ends_the_wait_at_once():
    ds = TensorImages(n=8)
    loader = FusionLoader(ds, batch_size=4, alpha=1.0, late_policy="wait", wait_timeout=30.0, seed=0,
                          synthesizer="stand-in", return_meta=True,
                          pool_factory=lambda s, src, devices, **kw: _StalledPool(s, src, devices, behavior="never"))
    t0 = time.monotonic()
    x, meta = run_epoch(loader)
    assert time.monotonic() - t0 < 5 and not meta["synthetic"].any()  # not 30 s per batch
    assert loader.stats()["current"]["fallback"] == 8
    loader.close()


# -- synthetic post-processing off the trainer's thread (issue 10, item 3) ---------------------------------


class _PidTransform:
    """A random train transform that also says which process ran it (channel 0 of pixel 0)."""

    def __call__(self, img):
        out = img.clone() * torch.rand(())
        out[0, 0, 0] = float(os.getpid())
        return out


def test_synthetic_post_processing_runs_in_the_workers_with_the_same_results():
    ds = TensorImages(n=16)
    runs = {}
    for workers in (0, 2):
        loader = fusion(ds, batch_size=4, alpha=0.5, return_meta=True, transform=_PidTransform(), late_policy="wait",
                        num_workers=workers)  # fmt: skip
        runs[workers] = run_epoch(loader)
        loader.close()
    (x0, m0), (x2, m2) = runs[0], runs[2]
    syn = m2["synthetic"]
    assert syn.any() and torch.equal(syn, m0["synthetic"])
    assert (x0[syn][:, 0, 0, 0] == os.getpid()).all()  # num_workers=0: in the trainer's process, as DataLoader
    assert (x2[syn][:, 0, 0, 0] != os.getpid()).all()  # with workers: made there, not on the trainer's thread
    # bit-for-bit the same samples wherever they are made: the transform RNG is seeded per position
    torch.testing.assert_close(x2[syn][:, :, 1:], x0[syn][:, :, 1:], rtol=0, atol=0)


def test_signature_shows_every_setting():
    import inspect

    from fusionloader import FusionConfig

    params = inspect.signature(FusionLoader).parameters
    dl = [p for p in inspect.signature(DataLoader).parameters if p != "self"]
    assert [p for p in params if p in dl] == dl  # DataLoader's parameters, in DataLoader's order
    assert set(FusionConfig.field_names()) <= set(params) and params["alpha"].default == 0.5
