"""Per-class UNet deltas on one resident UNet (engine/adapters.py) and the sampler's one-class-per-batch admission."""

import pickle

import pytest
import torch

pytest.importorskip("peft", reason="ESD deltas need peft (pip install fusionloader[erase])")

from fusionloader.engine.adapters import ClassAdapters, deltas_in  # noqa: E402
from fusionloader.engine.sampler import Request  # noqa: E402
from fusionloader.methods.erase import erase_concept  # noqa: E402
from fusionloader.pretrained import default_model_path  # noqa: E402
from fusionloader.engine.synthesizer import Synthesizer  # noqa: E402

PROMPT = "a photo of the digit {}"


@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    """Two short real ESD runs (LoRA, esd-x) on the embedded model, saved as files; and one full-weight delta."""
    folder = tmp_path_factory.mktemp("esd")
    synth = Synthesizer.from_pretrained(default_model_path())
    kw = dict(iterations=3, lr=3e-3, num_inference_steps=4)
    files = {
        7: erase_concept(synth, "seven", seed=1, out=folder, **kw),
        3: erase_concept(synth, "three", seed=2, out=folder, **kw),
    }
    full = erase_concept(synth, "five", rank=None, seed=3, **kw).save(folder / "five_full.safetensors")
    return {k: str(folder / f"{e.metadata['concept']}.safetensors") for k, e in files.items()} | {5: full}


def _sampler(adapters=None, capacity=2):
    synth = Synthesizer.from_pretrained(default_model_path())
    sampler = synth.sampler(capacity=capacity)
    if adapters is not None:
        sampler.adapters = ClassAdapters(adapters).attach(synth.components.unet)
    return sampler


def _requests(classes, names=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")):
    return [Request(key=i, prompt=PROMPT.format(names[4 if c is None else c]), strength=None, guidance_scale=3.0, num_inference_steps=4,
                    seed=100 + i, adapter=c) for i, c in enumerate(classes)]  # fmt: skip


def _run(sampler, requests):
    for r in requests:
        sampler.submit(r)
    return {f.key: f.image.clone() for f in sampler.drain()}


def test_swapping_two_deltas_equals_one_sampler_per_delta(deltas):
    classes = [7, 3, 7, 3]
    reqs = _requests(classes)
    both = _sampler({7: deltas[7], 3: deltas[3]})
    swapped = _run(both, reqs)
    assert both.adapters.swaps == 2  # one per class batch: 7 7, then 3 3 -- not one per request
    only7 = _run(_sampler({7: deltas[7]}), [r for r in _requests(classes) if r.adapter == 7])
    only3 = _run(_sampler({3: deltas[3]}), [r for r in _requests(classes) if r.adapter == 3])
    base = _run(_sampler(), _requests(classes))
    for key, c in enumerate(classes):
        alone = (only7 if c == 7 else only3)[key]
        assert torch.equal(swapped[key], alone), key
        assert not torch.equal(swapped[key], base[key]), f"class {c}'s delta changed nothing"


def test_classes_without_a_delta_are_unchanged(deltas):
    # Same UNet batches as the plain sampler ([0, 1, None, 2] then [7, 7]): bit-identical images.
    classes = [0, 1, None, 2, 7, 7]
    with_deltas = _run(_sampler({7: deltas[7], 3: deltas[3]}, capacity=4), _requests(classes))
    base = _run(_sampler(capacity=4), _requests(classes))
    for key, c in enumerate(classes):
        assert torch.equal(with_deltas[key], base[key]) == (c != 7), key
    # Interleaved, the grouping changes which rows share a UNet batch: equal up to the UNet's batch rounding.
    classes = [0, 7, 1, None, 7, 2]
    with_deltas = _run(_sampler({7: deltas[7], 3: deltas[3]}, capacity=3), _requests(classes))
    base = _run(_sampler(capacity=3), _requests(classes))
    for key, c in enumerate(classes):
        if c != 7:
            torch.testing.assert_close(with_deltas[key], base[key], rtol=0, atol=1e-5)


def test_full_weight_delta_swaps_in_and_out_exactly(deltas):
    classes = [5, 0, 5, 7]
    mixed = _sampler({5: deltas[5], 7: deltas[7]}, capacity=2)
    before = {n: p.clone() for n, p in mixed.c.unet.named_parameters() if "lora_" not in n}
    got = _run(mixed, _requests(classes))
    mixed.adapters.activate(None)
    after = {n: p for n, p in mixed.c.unet.named_parameters() if "lora_" not in n}
    assert all(torch.equal(before[n], after[n]) for n in before)  # base weights restored exactly
    only5 = _run(_sampler({5: deltas[5]}, capacity=2), [r for r in _requests(classes) if r.adapter == 5])
    base = _run(_sampler(capacity=2), _requests(classes))
    for key in (0, 2):
        assert torch.equal(got[key], only5[key])
        assert not torch.equal(got[key], base[key])
    torch.testing.assert_close(got[1], base[1], rtol=0, atol=1e-5)  # batched differently ([0] vs [5, 0])


def test_requests_grouped_by_class_so_swaps_are_rare(deltas):
    classes = [7, 3] * 8
    sampler = _sampler({7: deltas[7], 3: deltas[3]}, capacity=4)
    order = []
    for r in _requests(classes):
        sampler.submit(r)
    while not sampler.idle:
        sampler.step()
        order.append(sampler.adapters.active)
    # 16 alternating requests, 4 slots: 4 batches (7, 3, 7, 3 -- oldest-first), so 4 swaps instead of 16.
    assert sampler.adapters.swaps == 4
    assert [c for i, c in enumerate(order) if i == 0 or c != order[i - 1]] == [7, 3, 7, 3]


def test_fairness_bounds_the_wait_of_another_class(deltas):
    # A stream of class-7 requests that never ends would starve class 3 if freed slots always took class 7.
    sampler = _sampler({7: deltas[7], 3: deltas[3]}, capacity=2)
    sampler.adapters.patience = 3
    key = iter(range(10**6))
    mk = lambda c: Request(key=next(key), prompt=PROMPT.format("seven" if c == 7 else "three"), strength=None,  # noqa: E731
                           guidance_scale=1.0, num_inference_steps=2, seed=1, adapter=c)  # fmt: skip
    sampler.submit(mk(7))
    sampler.step()
    late = mk(3)
    sampler.submit(late)
    done_at = None
    for step in range(40):
        sampler.submit(mk(7))
        if any(f.key == late.key for f in sampler.step()):
            done_at = step
            break
    # waits patience (3) steps, then the running class-7 batch drains (<= 2 steps), then 2 denoising steps
    assert done_at is not None and done_at <= 3 + 2 + 2, done_at


def test_errors_name_the_class_and_file(tmp_path, deltas):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"class 4.*bad\.safetensors"):
        ClassAdapters({4: str(bad)})
    with pytest.raises(ValueError, match="class 4"):
        ClassAdapters({4: str(tmp_path / "missing.safetensors")})
    with pytest.raises(ValueError, match="patience"):
        ClassAdapters({7: deltas[7]}, patience=-1)
    with pytest.raises(ValueError, match="None"):
        ClassAdapters({None: deltas[7]})
    with pytest.raises(RuntimeError, match="attach"):
        ClassAdapters({7: deltas[7]}).activate(7)


def test_delta_for_another_unet_is_rejected(deltas, tiny_sd1_path):
    other = Synthesizer.from_pretrained(tiny_sd1_path)
    with pytest.raises(ValueError, match="class 7"):
        ClassAdapters({7: deltas[7]}).attach(other.components.unet)


def test_pickles_as_its_files_and_finds_a_folder(deltas):
    adapters = ClassAdapters({7: deltas[7], 3: deltas[3]}, patience=5)
    clone = pickle.loads(pickle.dumps(adapters))
    assert clone.classes == [7, 3] and clone.patience == 5 and clone.active is None
    folder = str(__import__("pathlib").Path(deltas[7]).parent)
    assert deltas_in(folder, {7: "seven", 3: "three", 1: "one"}) == {7: deltas[7], 3: deltas[3]}


# -- through the producer (producer_child.Producer driven in-process, as the pool drives it) ---------------------

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class Labels:
    """A source that knows labels only (text-only jobs read no image)."""

    def __init__(self, labels):
        self.labels = list(labels)

    def label(self, index):
        return self.labels[index]


def _jobs(classes, labelled=lambda key: True):
    from fusionloader.protocol import Job

    return [Job(key=i, index=i, prompt=PROMPT.format(NAMES[c]), strength=None, guidance_scale=3.0, num_inference_steps=4,
                seed=100 + i, label=c if labelled(i) else None) for i, c in enumerate(classes)]  # fmt: skip


def test_producer_swapping_two_deltas_equals_one_producer_per_delta(deltas):
    from producer_harness import counts, make_producer, run

    classes = [7, 3, 7, 3, 7, 3]
    # Odd keys carry no label: the producer reads it from its source.
    both = make_producer(default_model_path(), Labels(classes), capacity=2,
                         adapters=ClassAdapters({7: deltas[7], 3: deltas[3]}))  # fmt: skip
    got = run(both, _jobs(classes, labelled=lambda key: key % 2 == 0))
    # Admission grouped by class: batches [0, 2] (7), [1, 3] (3), [4] (7), [5] (3) -- 4 swaps for 6 alternating
    # jobs; FIFO admission would give one class per batch of 1, i.e. 6 swaps.
    assert counts(both)["adapter_swaps"] == 4
    alone = {}
    for c in (7, 3):
        mine = [job for job in _jobs(classes) if job.label == c]
        alone |= run(make_producer(default_model_path(), capacity=2, adapters=ClassAdapters({c: deltas[c]})), mine)
    base = run(make_producer(default_model_path(), capacity=2), _jobs(classes))
    assert sorted(got) == sorted(alone) == list(range(6))
    for key, c in enumerate(classes):
        assert torch.equal(got[key], alone[key]), key  # bit for bit
        assert not torch.equal(got[key], base[key]), f"class {c}'s delta changed nothing"


def test_producer_admission_fairness_is_bounded(deltas):
    from producer_harness import make_producer

    adapters = ClassAdapters({7: deltas[7], 3: deltas[3]}, patience=2)
    child = make_producer(default_model_path(), capacity=2, adapters=adapters)
    jobs = _jobs([7, 3, 7, 7, 7, 7])
    child.handle(("jobs", jobs))
    child.handle(("credit", list(range(8))))
    child.admit()
    assert [k for k in child.inflight] == [0, 2]  # class 7 first, job 1 (class 3) skipped
    child.step()
    child.step()  # job 1 has waited 2 steps (patience): it goes next, before the younger class-7 jobs
    child.handle(("credit", []))
    while child.inflight:
        child.step()
    child.admit()
    assert list(child.inflight)[0] == 1


def test_pool_takes_a_folder_of_deltas_by_class_name(deltas, tmp_path):
    from fusionloader.engine.clip_filter import ClipFilter
    from fusionloader.producer import ProducerPool

    folder = str(__import__("pathlib").Path(deltas[7]).parent)
    dataset = type("D", (), {"classes": list(NAMES)})()
    pool = ProducerPool("unused", dataset, image_size=8, slots=2, adapters=folder, clip_filter=ClipFilter())
    cfg = pool.config
    assert isinstance(cfg.adapters, ClassAdapters) and sorted(cfg.adapters.classes) == [3, 7]
    assert cfg.clip_filter.class_names == dict(enumerate(NAMES))  # filled from dataset.classes
    # What travels to a spawned producer: delta file paths and filter settings (no model).
    adapters, clip = pickle.loads(pickle.dumps((cfg.adapters, cfg.clip_filter)))
    assert sorted(adapters.classes) == [3, 7] and clip.threshold == 0.30 and clip.class_names[7] == "seven"
    assert adapters.__getstate__()["deltas"] == {7: deltas[7], 3: deltas[3]}
    pool.close()
    with pytest.raises(ValueError, match="adapters: .*no <class name>.safetensors"):
        ProducerPool("unused", type("D", (), {"classes": ["cat", "dog"]})(), image_size=8, slots=2, adapters=folder)
    with pytest.raises(ValueError, match="adapters: .*class names"):
        ProducerPool("unused", None, image_size=8, slots=2, adapters=folder)
    with pytest.raises(ValueError, match="adapters: .*not a folder"):
        ProducerPool("unused", None, image_size=8, slots=2, adapters=str(tmp_path / "nope"))
    with pytest.raises(TypeError, match="adapters"):
        ProducerPool("unused", None, image_size=8, slots=2, adapters={7: deltas[7]})


def test_spawned_pool_swaps_deltas_and_filters(deltas):
    """One real pool: the deltas and the filter travel to a spawned producer as files and settings."""
    from fusionloader.engine.clip_filter import ClipFilter
    from fusionloader.producer import ProducerPool
    from producer_harness import make_producer, run

    classes = [7, 3, 7, 3]
    jobs = _jobs(classes)
    adapters = ClassAdapters({7: deltas[7], 3: deltas[3]})
    clip = ClipFilter(-1.0, class_names=NAMES)  # passes everything: the images must be the unfiltered ones
    with ProducerPool(default_model_path(), Labels(classes), capacity=2, adapters=adapters, clip_filter=clip,
                      threads=1, timeout=60.0) as pool:  # fmt: skip
        pool.submit(jobs)
        got = {job.key: pool.take(job.key, timeout=60.0) for job in jobs}
        stats = pool.stats()
    assert adapters.active is None  # the caller's object was never attached: producers load their own copy
    assert stats["adapter_swaps"] == 2 and stats["clip_rejected"] == 0 and stats["taken"] == 4
    local = run(make_producer(default_model_path(), capacity=2, adapters=ClassAdapters({7: deltas[7], 3: deltas[3]})),
                jobs)  # fmt: skip
    for key in range(4):
        torch.testing.assert_close(got[key], local[key], rtol=0, atol=1e-5)


class PoolWithMethods:
    """A pool factory adding the method options, as the loader will once its config forwards them: the loader's
    jobs carry no label, so the producers read it from the source."""

    def __init__(self, **options):
        self.options = options

    def __call__(self, synthesizer, source, devices, **kwargs):
        from fusionloader.producer import ProducerPool

        return ProducerPool(synthesizer, source, devices, **kwargs, **self.options)


def test_loader_jobs_reach_deltas_and_filter_through_the_source(deltas):
    pytest.importorskip("sklearn", reason="the embedded digits need scikit-learn")
    from fusionloader.demo import TensorImages
    from fusionloader.engine.clip_filter import ClipFilter
    from fusionloader.loader import FusionLoader
    from fusionloader.pretrained import load_digits_splits

    folder = str(__import__("pathlib").Path(deltas[7]).parent)
    train = load_digits_splits().train
    keep = [i for i, y in enumerate(train.labels.tolist()) if y in (3, 7)][:8]
    data = TensorImages(train.images[keep], train.labels[keep], NAMES)
    factory = PoolWithMethods(adapters=folder, clip_filter=ClipFilter(0.30))
    loader = FusionLoader(data, batch_size=4, alpha=1.0, strengths=0.5, synthesizer=default_model_path(), seed=0,
                          prompts="a photo of the digit {}", num_inference_steps=4, guidance_scale=3.0,
                          late_policy="wait", pool_factory=factory, producer_capacity=4, return_meta=True)  # fmt: skip
    try:
        fresh = [bool(f) for _, meta in loader for f in meta["fresh"]]
        producer = loader.stats()["producer"]
    finally:
        loader.close()
    assert len(fresh) == 8 and sum(fresh) == producer["taken"] == 8 - producer["clip_dropped"]
    assert producer["adapter_swaps"] >= 2  # both classes' deltas ran: the labels came from the source
    assert producer["clip_rejected"] >= producer["clip_dropped"]
