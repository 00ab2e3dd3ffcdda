"""DeepCache per slot (engine/deepcache.py): the shallow branch is the UNet with the deep part replaced by the
cached feature, every slot keeps its own phase under continuous batching, batch-invariant and sync-free."""

import pytest
import torch

from fusionloader.engine import Request, Synthesizer
from fusionloader.engine.deepcache import DeepCache
from fusionloader.engine.syncs import SyncDetector

STEPS = 8


@pytest.fixture(scope="module")
def synth(tiny_sd1_path):
    return Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim")


def _requests(synth, intervals, strengths=(1.0, 0.5, None, 0.75, 1.0),
              guidance=(7.5, 1.0, 3.0, 7.5, 1.0)):  # fmt: skip
    g = torch.Generator().manual_seed(3)
    reqs = []
    for k, every in enumerate(intervals):
        mean = torch.randn(synth.latent_shape, generator=g)
        reqs.append(Request(key=k, prompt=["a cat", "a dog", "a bird"][k % 3], strength=strengths[k % 5],
                            guidance_scale=guidance[k % 5], num_inference_steps=STEPS, seed=40 + k, eta=0.3,
                            latent_mean=mean, latent_std=torch.full_like(mean, 0.1), deepcache_interval=every))  # fmt: skip
    return reqs


def _run(synth, reqs, capacity):
    sampler = synth.sampler(capacity=capacity, return_latents=True)
    for r in reqs:
        sampler.submit(r)
    return {f.key: f.latents for f in sampler.drain()}, sampler


def test_shallow_branch_with_the_same_steps_feature_is_the_full_unet(synth):
    # With the feature recorded in the very same call, the shallow branch must reproduce the full output:
    # this pins the skips it recomputes, the time embedding and the output head to diffusers' forward.
    unet = synth.components.unet
    deep = DeepCache(unet, capacity=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *synth.latent_shape, generator=g)
    t = torch.tensor([999.0, 500.0, 21.0])
    emb = synth.prompt_cache.get(["a cat", "a dog", ""])
    plain = lambda xin, tt, e, tc: unet(xin, tt, encoder_hidden_states=e, return_dict=False)[0]  # noqa: E731
    with torch.no_grad():
        full, feature = deep.full(plain, x, t, emb, None)
        shallow = deep.shallow(x, t, emb, None, feature)
        assert torch.equal(full, plain(x, t, emb, None))  # the capture hook changes nothing
    torch.testing.assert_close(shallow, full, rtol=0, atol=1e-5)
    # ... and with a stale feature it differs (the deep part really is skipped).
    other = deep.shallow(x, t, emb, None, torch.zeros_like(feature))
    assert (other - full).abs().max() > 1e-3


def test_interval_one_and_none_are_the_plain_engine(synth):
    plain, _ = _run(synth, _requests(synth, [None] * 4), capacity=4)
    every, sampler = _run(synth, _requests(synth, [1] * 4), capacity=4)
    assert sampler.shallow_rows == 0
    for k in plain:
        assert torch.equal(plain[k], every[k])


def test_slots_at_different_phases_are_batch_invariant(synth):
    # Capacity 2 with 5 requests: slots join at different steps, so in one UNet batch one slot runs its full
    # call while another runs the shallow branch; intervals differ per request and one has none at all.
    reqs = lambda: _requests(synth, [2, 3, None, 2, 4])  # noqa: E731
    batched, sampler = _run(synth, reqs(), capacity=2)
    assert sampler.shallow_rows > 0
    for r in reqs():
        alone, _ = _run(synth, [r], capacity=1)
        err = (alone[r.key] - batched[r.key]).abs().max().item()
        assert err <= 1e-4 * max(1.0, alone[r.key].abs().max().item()), (r.key, err)
    # DeepCache is an approximation: the cached samples differ from the plain engine's, the uncached one not.
    plain, _ = _run(synth, _requests(synth, [None] * 5), capacity=2)
    assert (plain[0] - batched[0]).abs().max() > 1e-4
    torch.testing.assert_close(plain[2], batched[2], rtol=0, atol=1e-4)


def test_shallow_rows_follow_each_slots_phase(synth):
    sampler = synth.sampler(capacity=2)
    r0, r1 = _requests(synth, [2, 3], strengths=(1.0, 1.0), guidance=(1.0, 1.0))
    sampler.submit(r0)
    sampler.step()  # r0 step 0: full
    sampler.submit(r1)
    counts = []
    for _ in range(4):
        before = sampler.shallow_rows
        sampler.step()
        counts.append(sampler.shallow_rows - before)
    # r0 at steps 1..4 (shallow, full, shallow, full); r1 at 0..3 (full, shallow, shallow, full).
    assert counts == [1, 1, 2, 0]


def test_steady_steps_with_deepcache_add_no_sync(synth):
    sampler = synth.sampler(capacity=3)
    for r in _requests(synth, [2, 3, None]):
        sampler.submit(r)
    sampler.step()
    with torch.inference_mode(), SyncDetector() as det:
        for _ in range(2):  # the shortest has 4 steps (strength 0.5 of 8)
            assert sampler.step() == []
    assert det.count == 0, det.report()
    assert sampler.shallow_rows > 0


def test_bad_interval_rejected(synth):
    sampler = synth.sampler(capacity=1)
    for bad in (0, -2, 1.5, True):
        r = _requests(synth, [None])[0]
        r.deepcache_interval = bad
        with pytest.raises(ValueError, match="deepcache_interval"):
            sampler.submit(r)


def test_augment_takes_the_option(synth):
    images = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    kw = dict(strengths=[1.0, 0.75], num_inference_steps=STEPS, seeds=[1, 2])
    plain = synth.augment(images, ["a cat", "a dog"], **kw)
    cached = synth.augment(images, ["a cat", "a dog"], deepcache_interval=[3, None], **kw)
    assert (plain[0] - cached[0]).abs().max() > 0 and torch.allclose(plain[1], cached[1], atol=1e-5)
