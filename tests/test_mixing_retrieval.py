"""Retrieved images through the loader (``retrieval=``): where synthetic ones enter, counted apart; and the
producer-side settings (``adapters``, ``clip_filter``) handed to the pool unchanged."""

import numpy as np
import pytest
import torch

from fusionloader.loader import FusionLoader
from fusionloader.methods.retrieval import Retrieved, RetrievedVariants
from test_loader import InlinePool, R, TensorImages, expected_variant, fusion, inline, run_epoch

POOL = torch.rand(12, 3, R, R, generator=torch.Generator().manual_seed(99))


class _Images:
    """Picklable ``pool_id -> image`` (what ``RetrievalPool.image_loader`` returns)."""

    def __call__(self, pid):
        return POOL[int(pid)].clone()


def variants(per_class=((0, 1, 2), (3, 4), (5, 6, 7, 8)), num_classes=3):
    ids = np.array([i for c in per_class for i in c], np.int64)
    labels = np.array([k for k, c in enumerate(per_class) for _ in c], np.int64)
    got = Retrieved(ids=ids, labels=labels, scores=np.ones(len(ids), np.float32), queries=labels.copy(),
                    num_classes=num_classes)  # fmt: skip
    return RetrievedVariants(got, _Images())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_retrieved_images_replace_at_alpha_keep_the_label_and_are_counted_apart(num_workers):
    ds = TensorImages(n=30)
    rv = variants()
    InlinePool.instances.clear()
    loader = FusionLoader(ds, batch_size=4, shuffle=True, seed=0, alpha=0.5, retrieval=rv, return_meta=True,
                          num_workers=num_workers)  # no synthesizer: no producers  # fmt: skip
    xs, ys, metas = [], [], []
    for (x, y), meta in loader:
        xs.append(x), ys.append(y), metas.append(meta)
    x, y = torch.cat(xs), torch.cat(ys)
    meta = {k: torch.cat([m[k] for m in metas]) for k in metas[0]}
    assert loader._pool is None and InlinePool.instances == []
    assert torch.equal(meta["retrieved"], meta["planned"]) and not meta["synthetic"].any()
    k = int(meta["retrieved"].sum())
    assert 0 < k < 30
    from fusionloader.order import random_order
    from fusionloader.plan import plan_epoch

    plan = plan_epoch([random_order(30, 0, 0).tolist()], seed=0, epoch=0, alpha=0.5)
    for p in range(30):
        i = int(meta["index"][p])
        assert int(y[p]) == ds.targets[i]  # labelled with its class = the class that retrieved the image
        if meta["retrieved"][p]:
            pid = rv.pick(i, ds.targets[i], int(plan.sample_seed[p]))
            assert int(meta["pool_id"][p]) == pid and pid in rv.pool_ids(ds.targets[i])
            assert torch.equal(x[p], POOL[pid]) and torch.isnan(meta["strength"][p])
        else:
            assert torch.equal(x[p], ds.images[i]) and int(meta["pool_id"][p]) == -1
    s = loader.stats()
    assert s["current"]["retrieved"] == k and s["retrieved"] == k and s["current"]["fresh"] == 0
    assert s["current"]["achieved_alpha"] == pytest.approx(k / 30)
    loader.close()


def test_a_class_with_nothing_retrieved_falls_back_to_real():
    ds = TensorImages(n=12)
    loader = FusionLoader(ds, batch_size=4, alpha=1.0, retrieval=variants(((0, 1), (), (2,))), return_meta=True)
    x, meta = run_epoch(loader)
    dog = torch.tensor([t == 1 for t in ds.targets])
    assert not meta["retrieved"][dog].any() and meta["retrieved"][~dog].all()
    assert torch.equal(x[dog], ds.images[dog])
    st = loader.stats()["current"]
    assert st["fallback"] == int(dog.sum()) and st["retrieved"] == 12 - int(dog.sum())


def test_retrieval_beside_a_synthesizer_splits_the_synthetic_positions():
    ds = TensorImages(n=40)
    loader = fusion(ds, batch_size=5, shuffle=True, alpha=1.0, retrieval=variants(), late_policy="wait",
                    return_meta=True)  # fmt: skip
    x, meta = run_epoch(loader)
    fresh, retrieved = meta["fresh"], meta["retrieved"]
    assert not (fresh & retrieved).any() and (fresh | retrieved).all()
    assert 8 <= int(retrieved.sum()) <= 32  # half each (Binomial(40, 1/2), > 3.7 sd)
    pool = InlinePool.instances[-1]
    assert pool.taken == int(fresh.sum())  # no producer job for a retrieved position
    from fusionloader.order import random_order
    from fusionloader.plan import plan_epoch

    plan = plan_epoch([random_order(40, 0, 0).tolist()], seed=0, epoch=0, alpha=1.0)
    assert torch.equal(retrieved, torch.from_numpy((plan.sample_seed >> 62).astype(bool)))
    for p in np.flatnonzero(fresh.numpy()):
        i = int(meta["index"][p])
        torch.testing.assert_close(x[p], expected_variant(ds.images[i], plan.sample_seed[p], float(plan.strength[p])))
    assert loader.stats()["current"]["retrieved"] == int(retrieved.sum())


def test_retrieval_with_concat_serves_the_generated_half():
    ds = TensorImages(n=9)
    loader = FusionLoader(ds, batch_size=4, seed=1, mixing="concat", retrieval=variants(), return_meta=True)
    assert len(loader) == 5
    _, meta = run_epoch(loader)
    assert int(meta["retrieved"].sum()) == 9 and torch.equal(meta["retrieved"], meta["planned"])


def test_retrieval_resume_serves_the_same_images():
    from test_resume import check_resume

    ds = TensorImages(n=16)
    make = lambda: FusionLoader(ds, batch_size=4, shuffle=True, seed=3, retrieval=variants(), return_meta=True)  # noqa: E731
    check_resume(make, 2, 3)


def test_bad_retrieval_settings_are_refused_naming_the_argument(tmp_path):
    ds = TensorImages(n=6)
    with pytest.raises(TypeError, match="retrieval"):
        FusionLoader(ds, alpha=0.5, retrieval=object())
    with pytest.raises(ValueError, match="retrieval.*label 2"):
        FusionLoader(ds, alpha=0.5, retrieval=variants(((0,), (1,)), num_classes=2))
    with pytest.raises(ValueError, match="synthesizer.*retrieval"):
        FusionLoader(ds, alpha=0.5)
    with pytest.raises(FileNotFoundError, match="adapters"):
        fusion(ds, adapters=str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="clip_filter"):
        fusion(ds, clip_filter=0.3)


def test_adapters_and_clip_filter_reach_the_pool_unchanged_and_only_when_given(tmp_path):
    ds = TensorImages(n=8)
    adapters, clip = object(), object()
    loader = FusionLoader(ds, batch_size=4, alpha=0.5, synthesizer="stand-in", pool_factory=inline(),
                          adapters=adapters, clip_filter=clip)  # fmt: skip
    next(iter(loader))
    kw = InlinePool.instances[-1].kwargs
    assert kw["adapters"] is adapters and kw["clip_filter"] is clip
    loader.close()
    loader = FusionLoader(ds, batch_size=4, alpha=0.5, synthesizer="stand-in", pool_factory=inline(),
                          adapters=str(tmp_path))  # a folder of per-class deltas: passed as given  # fmt: skip
    next(iter(loader))
    kw = InlinePool.instances[-1].kwargs
    assert kw["adapters"] == str(tmp_path) and "clip_filter" not in kw
    loader.close()
    loader = fusion(ds, batch_size=4)
    next(iter(loader))
    assert "adapters" not in InlinePool.instances[-1].kwargs  # today's ProducerPool keeps working
    loader.close()


def test_speed_options_and_labels_travel_with_every_job():
    ds = TensorImages(n=8)
    loader = FusionLoader(ds, batch_size=4, alpha=1.0, synthesizer="stand-in", pool_factory=inline(),
                          deepcache_interval=3, decoder="tiny", adapters=object())  # fmt: skip
    next(iter(loader))
    pool = InlinePool.instances[-1]
    jobs = list(pool.jobs.values())
    assert jobs  # requested ahead of the first batch
    for job in jobs:
        assert (job.deepcache_interval, job.decoder) == (3, "tiny")
        assert job.label == ds.targets[job.index]  # the class selects the producer's delta
    loader.close()
    loader = fusion(ds, batch_size=4)
    next(iter(loader))
    assert all(j.label is None and j.deepcache_interval is None and j.decoder == "vae"
               for j in InlinePool.instances[-1].jobs.values())  # plain engine, no label read  # fmt: skip
    loader.close()
    with pytest.raises(ValueError, match="decoder"):
        fusion(ds, decoder="taesd")
    with pytest.raises(ValueError, match="deepcache_interval"):
        fusion(ds, deepcache_interval=0)
