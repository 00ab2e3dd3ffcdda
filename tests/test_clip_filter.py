"""DisCL's CLIP-score filter (engine/clip_filter.py): scores, and the producer's regeneration of rejects."""

import pickle

import pytest
import torch

from fusionloader.engine.clip_filter import ClipFilter, class_names_of
from fusionloader.pretrained import class_names, default_model_path

PROMPT = "a photo of the digit {}"


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the embedded digits need scikit-learn (pip install fusionloader[demo])")
    from fusionloader.pretrained import load_digits_splits

    return load_digits_splits().test


def test_embedded_clip_passes_real_digits_of_their_class_and_rejects_other_classes(digits):
    f = ClipFilter(class_names=class_names)
    images, labels = digits.images[:60], digits.labels[:60].tolist()
    s = f.scores(images, labels)
    assert s.dtype == torch.float32 and s.shape == (60,)
    assert bool(f.accept(images, labels).all())  # every real digit passes at DisCL's 0.30
    wrong = [(y + 1) % 10 for y in labels]
    assert f.accept(images, wrong).float().mean() < 0.1  # labelled as another digit: rejected
    assert s.min() > f.scores(images, wrong).max() - 0.3  # the true class scores far above the others
    # uint8 images (a uint8 ring) score as their float values
    q = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(f.scores(q, labels), f.scores(q.float() / 255, labels))
    # string labels name themselves when no class names are given
    torch.testing.assert_close(ClipFilter().scores(images[:4], [class_names[y] for y in labels[:4]]), s[:4])


def test_settings_are_checked_and_travel_without_the_model(tmp_path):
    for kwargs, match in [({"threshold": 1.5}, "threshold"), ({"threshold": float("nan")}, "threshold"),
                          ({"max_tries": 0}, "max_tries"), ({"on_exhausted": "retry"}, "on_exhausted"),
                          ({"template": "a photo"}, "template"), ({"model": str(tmp_path / "none")}, "model"),
                          ({"class_names": ["one", ""]}, r"class_names\[1\]"), ({"class_names": "one"}, "class_names")]:
        with pytest.raises((ValueError, TypeError), match=match):
            ClipFilter(**kwargs)
    f = ClipFilter(0.5, class_names=["zero", "one"])
    f.scores(torch.zeros(1, 3, 32, 32), [1])  # loads the model
    state = pickle.dumps(f)
    assert len(state) < 2000  # settings only
    g = pickle.loads(state)
    assert g.threshold == 0.5 and g.class_names == {0: "zero", 1: "one"}
    with pytest.raises(ValueError, match="label 7 has no class name"):
        g.scores(torch.zeros(1, 3, 32, 32), [7])
    with pytest.raises(ValueError, match="label 3 is not a class name"):
        ClipFilter().scores(torch.zeros(1, 3, 32, 32), [3])
    assert class_names_of(type("D", (), {"classes": ["a", "b"]})()) == {0: "a", 1: "b"}
    assert class_names_of(None) is None


def _jobs(classes, seed0=500):
    from fusionloader.protocol import Job

    return [Job(key=i, index=i, prompt=PROMPT.format(class_names[c]), strength=None, guidance_scale=3.0,
                num_inference_steps=4, seed=seed0 + 10 * i, label=c) for i, c in enumerate(classes)]  # fmt: skip


def _threshold_between(values):
    """A threshold in the widest gap of the middle half of ``values`` (far from every score: batching noise cannot
    flip a verdict)."""
    v = sorted(values)
    lo, hi = len(v) // 4, 3 * len(v) // 4
    gaps = [(v[i + 1] - v[i], i) for i in range(lo, hi)]
    width, i = max(gaps)
    assert width > 1e-3
    return (v[i] + v[i + 1]) / 2


@pytest.mark.parametrize("on_exhausted", ["real", "keep"])
def test_producer_regenerates_rejects_with_the_next_seed_and_counts_them(on_exhausted):
    from dataclasses import replace

    from producer_harness import counts, make_producer, run

    classes = [1, 7, 3, 0, 4, 8]
    tries = 3
    jobs = _jobs(classes)
    # The oracle: every job's image at seed, seed + 1, seed + 2, made by a producer without a filter.
    plain = make_producer(default_model_path(), capacity=4)
    made = {n: run(plain, [replace(j, key=100 * n + j.key, seed=j.seed + n) for j in jobs]) for n in range(tries)}
    f = ClipFilter(class_names=class_names, max_tries=tries, on_exhausted=on_exhausted)
    score = {(j.key, n): float(f.scores(made[n][100 * n + j.key][None], [j.label])) for j in jobs for n in range(tries)}
    f = ClipFilter(_threshold_between(list(score.values())), class_names=class_names, max_tries=tries,
                   on_exhausted=on_exhausted)  # fmt: skip
    expect, rejected, dropped = {}, 0, 0
    for j in jobs:
        n = next((n for n in range(tries) if score[(j.key, n)] >= f.threshold), None)
        rejected += tries if n is None else n
        if n is not None:
            expect[j.key] = made[n][100 * n + j.key]
        elif on_exhausted == "keep":
            expect[j.key] = made[tries - 1][100 * (tries - 1) + j.key]
        else:
            dropped += 1
    assert 0 < rejected < tries * len(jobs), "the constructed threshold should reject some and pass some"

    child = make_producer(default_model_path(), capacity=4, clip_filter=f)
    got = run(child, jobs)
    assert sorted(got) == sorted(expect)
    for key in expect:  # same seed, other batch-mates: equal up to the UNet's batch rounding
        torch.testing.assert_close(got[key], expect[key], rtol=0, atol=1e-4)
    c = counts(child)
    assert c.get("clip_rejected", 0) == rejected
    assert c.get("clip_kept_below", 0) == (sum(1 for j in jobs if all(score[(j.key, n)] < f.threshold for n in
                                                                      range(tries))) if on_exhausted == "keep" else 0)  # fmt: skip
    assert sum(1 for m in child.results.msgs if m[0] == "dropped" and m[2] == "clip") == dropped
    assert not child.made and not child.tries  # nothing left behind


def test_pool_sums_counts_and_clip_drops_do_not_warn_as_nonfinite():
    from fusionloader.producer import ProducerPool

    pool = ProducerPool("unused", None, image_size=8, slots=2)  # not started: its core is driven by hand
    core, producer = pool._core, pool._core.supervisor.procs[0]
    core.on_message(producer, ("counts", {"clip_rejected": 3, "adapter_swaps": 1}))
    core.on_message(producer, ("counts", {"clip_rejected": 2}))  # increments (a restarted producer adds on)
    for key in range(40):
        core.on_message(producer, ("dropped", key, "clip"))
    assert not core.notices  # not NaN outputs: no vae_dtype warning
    core.started = True
    stats = pool.stats()
    assert stats["clip_rejected"] == 5 and stats["adapter_swaps"] == 1
    assert stats["clip_dropped"] == 40 and stats["nonfinite_dropped"] == 0
    pool.close()


def test_pool_checks_the_filter_argument():
    from fusionloader.producer import ProducerPool

    with pytest.raises(TypeError, match="clip_filter"):
        ProducerPool("unused", None, image_size=8, slots=2, clip_filter=0.3)
    pool = ProducerPool("unused", None, image_size=8, slots=2, clip_filter=ClipFilter(0.25))
    assert pool.config.clip_filter.class_names is None and pool.config.clip_filter.threshold == 0.25
    pool.close()


def test_calibrate_reports_quantiles_and_pass_rates(digits):
    from fusionloader.engine.clip_filter import calibrate

    out = calibrate(n=6, strengths=(None, 0.5), num_inference_steps=2)
    assert out["images"] == 6 and out["real_true_class"]["pass_rate"] == 1.0
    assert set(out["generated"]) == {"text-only", "strength 0.5"}
    q = out["real_true_class"]["quantiles"]
    assert q["0.05"] <= q["0.5"] <= q["0.95"]
