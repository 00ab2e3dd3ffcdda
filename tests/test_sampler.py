"""The continuous-batching sampler: joins/leaves every step, CFG rows only where needed, batch invariance,
no host syncs inside the denoising loop, per-sample non-finite flags."""

import pytest
import torch

from fusionloader.engine import Request, Synthesizer

STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny UNet is far faster single-threaded on a loaded box
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth(tiny_sd1_path):
    return Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim")


def _posterior(synth, n, seed=0):
    images = torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed))
    return synth.latent_cache().encode(images)


def _requests(synth, n=5):
    mean, std = _posterior(synth, n)
    strengths = [0.5, 1.0, None, 0.75, 0.5][:n]
    guidance = [7.5, 1.0, 7.5, 3.0, 1.0][:n]
    return [
        Request(key=i, prompt=["a cat", "a dog", "a bird", "a frog", "a horse"][i], strength=strengths[i],
                guidance_scale=guidance[i], num_inference_steps=STEPS, seed=100 + i, eta=0.5,
                latent_mean=mean[i], latent_std=std[i])  # fmt: skip
        for i in range(n)
    ]


def test_continuous_batching_equals_each_sample_alone(synth):
    sampler = synth.sampler(capacity=2, return_latents=True)
    for r in _requests(synth):
        sampler.submit(r)
    assert sampler.pending == 5 and sampler.active == 0
    sampler.step()
    assert sampler.active == 2 and sampler.pending == 5
    batched = {}
    while not sampler.idle:
        assert sampler.active <= 2
        for f in sampler.step():
            batched[f.key] = f
    assert sorted(batched) == [0, 1, 2, 3, 4]
    for r in _requests(synth):
        alone = synth.sampler(capacity=1, return_latents=True)
        alone.submit(r)
        (f,) = list(alone.drain())
        assert (f.latents - batched[r.key].latents).abs().max().item() <= 1e-4 * max(1.0, f.latents.abs().max().item())
        assert f.finite and f.image.shape == (3, 32, 32) and 0 <= f.image.min() and f.image.max() <= 1


def test_cfg_rows_only_for_guided_slots(synth):
    sampler = synth.sampler(capacity=4)
    reqs = _requests(synth, 2)  # guidance 7.5 and 1.0
    for r in reqs:
        sampler.submit(r)
    sampler.step()
    assert sampler.steps_run == 1 and sampler.unet_rows == 3  # 2 conditional rows + 1 unconditional


def test_finished_leave_and_queued_join_each_step(synth):
    mean, std = _posterior(synth, 3)
    sampler = synth.sampler(capacity=2)
    # strength 0.5 of 6 steps = 3 denoising steps; 1.0 = 6 steps.
    for i, s in enumerate([0.5, 1.0, 0.5]):
        sampler.submit(Request(i, "a cat", s, 7.5, STEPS, seed=i, latent_mean=mean[i], latent_std=std[i]))
    finished_at = {}
    step = 0
    while not sampler.idle:
        step += 1
        for f in sampler.step():
            finished_at[f.key] = step
    # 0 leaves after step 3, 2 joins at step 4 and leaves after step 6, alongside 1.
    assert finished_at == {0: 3, 1: 6, 2: 6}
    assert sampler.steps_run == 6


def test_no_host_sync_inside_the_loop(synth, monkeypatch):
    sampler = synth.sampler(capacity=4)
    for r in _requests(synth, 4):
        r.num_inference_steps = 20
        sampler.submit(r)
    # The first step admits: it builds schedule tables from the diffusers scheduler on the host (CPU math,
    # once per setting). The loop after it must not read anything back.
    sampler.step()

    def sync(*args, **kwargs):
        raise AssertionError("host sync inside the denoising loop")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for _ in range(4):  # no sample finishes in these steps (the shortest has 10)
        assert sampler.step() == []
    monkeypatch.undo()
    assert len(list(sampler.drain())) == 4


def test_text_only_and_img2img_share_a_batch(synth):
    reqs = _requests(synth, 3)
    assert reqs[2].strength is None
    sampler = synth.sampler(capacity=3)
    for r in reqs:
        sampler.submit(r)
    done = {f.key: f for f in sampler.drain()}
    alone = synth.sampler(capacity=1)
    alone.submit(_requests(synth, 3)[2])
    (f,) = list(alone.drain())
    assert (f.image - done[2].image).abs().max().item() <= 1e-4


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN through the interpreter
def test_nonfinite_flagged_per_sample(synth):
    mean, std = _posterior(synth, 2)
    mean[1, 0, 0, 0] = float("inf")
    sampler = synth.sampler(capacity=2)
    for i in range(2):
        sampler.submit(Request(i, "a cat", 0.5, 7.5, STEPS, seed=i, latent_mean=mean[i], latent_std=std[i]))
    flags = {f.key: f.finite for f in sampler.drain()}
    assert flags == {0: True, 1: False}


def test_out_buffer_rows(synth):
    out = torch.zeros((4, 3, 32, 32), dtype=torch.uint8)
    sampler = synth.sampler(capacity=2, out=out)
    reqs = _requests(synth, 2)
    for r, row in zip(reqs, [3, 1]):
        r.out_row = row
        sampler.submit(r)
    done = {f.key: f for f in sampler.drain()}
    assert done[0].image.data_ptr() == out[3].data_ptr()
    assert out[[0, 2]].sum() == 0 and out[3].float().sum() > 0


def test_request_validation(synth):
    sampler = synth.sampler(capacity=2)
    mean, std = _posterior(synth, 1)
    with pytest.raises(ValueError, match="needs latent_mean"):
        sampler.submit(Request(0, "a cat", 0.5))
    with pytest.raises(ValueError, match="strength must be in"):
        sampler.submit(Request(0, "a cat", 1.5, latent_mean=mean[0]))
    with pytest.raises(ValueError, match="latents of shape"):
        sampler.submit(Request(0, "a cat", 0.5, latent_mean=torch.zeros(4, 8, 8)))
    with pytest.raises(ValueError, match="no denoising step"):
        sampler.submit(Request(0, "a cat", 0.1, num_inference_steps=5, latent_mean=mean[0]))
    with pytest.raises(TypeError, match="prompt must be a string"):
        sampler.submit(Request(0, 3, None))


def test_unfused_path_is_batch_invariant_with_seeds(tiny_sd1_path):
    from diffusers import EulerAncestralDiscreteScheduler  # stochastic, no fused kernel

    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler=EulerAncestralDiscreteScheduler)
    reqs = _requests(synth, 3)
    sampler = synth.sampler(capacity=3, return_latents=True)
    assert sampler.kind is None
    for r in reqs:
        sampler.submit(r)
    batched = {f.key: f.latents for f in sampler.drain()}
    for r in _requests(synth, 3):
        alone = synth.sampler(capacity=1, return_latents=True)
        alone.submit(r)
        (f,) = list(alone.drain())
        assert (f.latents - batched[r.key]).abs().max().item() <= 1e-4 * max(1.0, f.latents.abs().max().item())


def test_fused_step_compiles_as_one_graph(synth):
    """The loop body has no host syncs: dynamo traces it whole (fullgraph=True raises on any graph break)."""
    from fusionloader.engine.sampler import fused_step
    from fusionloader.kernels import backend

    sampler = synth.sampler(capacity=3)
    for r in _requests(synth, 3):
        sampler.submit(r)
    sampler.step()  # admit, fill the schedule tables
    B = sampler.active
    x = sampler._x[sampler._cur][:B].clone()
    rows = torch.tensor([s.base + s.i for s in sampler._slots])
    cfg = torch.tensor([b for b, s in enumerate(sampler._slots) if s.req.guidance_scale > 1])
    uncond_index = torch.full((B,), -1, dtype=torch.int64)
    uncond_index[cfg] = B + torch.arange(len(cfg))
    guidance = torch.tensor([s.req.guidance_scale for s in sampler._slots])
    seeds = torch.tensor([s.seed for s in sampler._slots])
    streams = torch.tensor([2 + s.i for s in sampler._slots])
    args = (synth.components.unet, x, sampler._cond[:B], sampler._uncond, rows, cfg, uncond_index, guidance,
            sampler._t, sampler._c_in, sampler._coefs)  # fmt: skip
    torch._dynamo.reset()
    with backend("torch"):
        eager = fused_step(*args, seeds=seeds, streams=streams)
        compiled = torch.compile(fused_step, fullgraph=True, backend="eager")(*args, seeds=seeds, streams=streams)
    for a, b in zip(eager, compiled):
        assert (a - b).abs().max().item() <= 1e-5


def test_chunked_decode_equals_one_shot(synth):
    # Three samples finish together; decoding them one at a time or all at once gives the same images.
    results = {}
    for chunk in (1, 3):
        sampler = synth.sampler(capacity=3, decode_chunk=chunk)
        sampler.trace = []
        for r in _requests(synth, 3):
            r.strength, r.num_inference_steps = 1.0, 2
            sampler.submit(r)
        results[chunk] = {f.key: f.image for f in sampler.drain()}
        assert [n for kind, n in sampler.trace if kind == "decode"] == ([1, 1, 1] if chunk == 1 else [3])
    for key in results[1]:
        # Per-sample math; only the convolution backends' batch-size-dependent blocking can move the last bits.
        torch.testing.assert_close(results[1][key], results[3][key], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="decode_chunk"):
        synth.sampler(decode_chunk=0)


def test_memory_estimate(synth):
    est = synth.memory_estimate(capacity=2, decode_chunk=1)
    c = synth.components
    unet_bytes = sum(p.numel() * p.element_size() for p in c.unet.parameters())
    assert est["weights"]["unet"] >= unet_bytes and set(est["weights"]) == {"unet", "text_encoder", "vae"}
    assert sum(est["weights_by_dtype"].values()) == sum(est["weights"].values())
    assert est["prompt_cache"] == synth.prompt_cache.max_size * synth.prompt_cache.entry_bytes()
    # Activations: at least the UNet's output for every row, and growing with the batch / the decode chunk.
    rows = 2 * 2
    assert est["unet_activations"] >= rows * synth.latent_shape[0] * 16 * 16 * 4
    bigger = synth.memory_estimate(capacity=8, decode_chunk=4)
    assert bigger["unet_activations"] > 3 * est["unet_activations"]
    assert bigger["decode_activations"] > 3 * est["decode_activations"]
    assert est["total"] == (sum(est["weights"].values()) + max(est["unet_activations"], est["decode_activations"])
                            + est["sampler_buffers"] + est["prompt_cache"])  # fmt: skip


# ------------------------------------------------------------------------------------ speed options


def test_speed_options_off_are_the_plain_engine(synth, monkeypatch):
    # Explicitly off (the defaults) is bit-identical, and the UNet sees exactly the plain call: no timestep_cond,
    # no extra keyword, one call per step over all rows.
    calls = []
    unet = synth.components.unet
    real = unet.forward

    def spy(*args, **kwargs):
        calls.append((args[0].shape[0], sorted(kwargs)))
        return real(*args, **kwargs)

    default = synth.sampler(capacity=3, return_latents=True)
    got_default = {f.key: f.latents for f in _drain_all(default, _requests(synth, 5))}
    monkeypatch.setattr(unet, "forward", spy)
    off = synth.sampler(capacity=3, return_latents=True, decode_chunk=DEFAULT_CHUNK)
    reqs = _requests(synth, 5)
    for r in reqs:
        r.deepcache_interval, r.decoder = None, "vae"
    got_off = {f.key: f.latents for f in _drain_all(off, reqs)}
    assert not off.compile and off._graphs is None and off.shallow_rows == 0
    for k in got_default:
        assert torch.equal(got_default[k], got_off[k])
    assert len(calls) == off.steps_run and all(kw == ["encoder_hidden_states", "return_dict"] for _, kw in calls)


DEFAULT_CHUNK = 4


def _drain_all(sampler, reqs):
    for r in reqs:
        sampler.submit(r)
    return list(sampler.drain())


@pytest.fixture(scope="module")
def lcm_path(tmp_path_factory):
    """A tiny SD-1-shaped checkpoint whose UNet takes LCM's guidance embedding (time_cond_proj_dim)."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    from fusionloader.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline("epsilon")
    torch.manual_seed(1)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}  # (_use_default_values would win)
    pipe.unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 8})
    assert pipe.unet.config.time_cond_proj_dim == 8
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    path = str(tmp_path_factory.mktemp("tiny-lcm"))
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _pipeline_latents(path, scheduler, images, strength, guidance, steps, seed):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler
    with torch.no_grad():
        return pipe(["a cat", "a dog"], image=images, strength=strength, guidance_scale=guidance,
                    num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type="latent").images  # fmt: skip


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_lcm_with_guidance_embedding_equals_the_pipeline(lcm_path, strength):
    # diffusers' convention: a UNet with time_cond_proj_dim gets w = guidance - 1 embedded, and no CFG rows.
    synth = Synthesizer.from_pretrained(lcm_path, scheduler="lcm")
    images = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(2))
    ref = _pipeline_latents(lcm_path, synth.scheduler, images, strength, 3.0, 4, 11)
    sampler = synth.sampler(capacity=2)
    assert sampler.kind == "lcm" and sampler._w_dim == 8
    got = synth.augment(images, ["a cat", "a dog"], strengths=strength, guidance_scale=3.0, num_inference_steps=4,
                        generator=torch.Generator().manual_seed(11), output_type="latent")  # fmt: skip
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # The embedding is per sample: another guidance changes the result.
    other = synth.augment(images, ["a cat", "a dog"], strengths=strength, guidance_scale=[3.0, 8.0],
                          num_inference_steps=4, generator=torch.Generator().manual_seed(11), output_type="latent")
    torch.testing.assert_close(other[0], got[0], rtol=1e-4, atol=1e-4)
    assert (other[1] - got[1]).abs().max() > 1e-3


@pytest.mark.parametrize("steps, strengths", [(1, [0.3, 0.8]), (2, [0.25, 1.0])])
def test_lcm_span_equals_the_lcm_img2img_pipeline_at_per_sample_strengths(lcm_path, steps, strengths):
    # "lcm_span": LatentConsistencyModelImg2ImgPipeline's strength rule (all k steps inside the strength's span),
    # so 1-2 steps run at strengths where "lcm" (the SD img2img rule, int(k * strength) steps) has none.
    from diffusers import LatentConsistencyModelImg2ImgPipeline

    synth = Synthesizer.from_pretrained(lcm_path, scheduler="lcm_span")
    images = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(2))
    pipe = LatentConsistencyModelImg2ImgPipeline.from_pretrained(lcm_path, safety_checker=None,
                                                                 requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = synth.scheduler
    refs = []
    for i, (prompt, s) in enumerate(zip(["a cat", "a dog"], strengths)):  # the pipeline: one strength per call
        with torch.no_grad():
            refs.append(pipe([prompt], image=images[i : i + 1], strength=s, guidance_scale=3.0, num_inference_steps=steps,
                             generator=torch.Generator().manual_seed(20 + i), output_type="latent").images[0])  # fmt: skip
    got = synth.augment(images, ["a cat", "a dog"], strengths=strengths, guidance_scale=3.0, num_inference_steps=steps,
                        generator=[torch.Generator().manual_seed(20 + i) for i in range(2)], output_type="latent")  # fmt: skip
    ref = torch.stack(refs)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="strength 0.01 with 2 LCM steps"):
        synth.augment(images[:1], ["a cat"], strengths=0.01, num_inference_steps=2, seeds=[0])
    plain = Synthesizer.from_pretrained(lcm_path, scheduler="lcm")
    with pytest.raises(ValueError, match="leaves no denoising step"):  # the SD img2img rule: int(1 * 0.3) == 0
        plain.augment(images[:1], ["a cat"], strengths=0.3, num_inference_steps=1, seeds=[0])


def test_turbo_runs_without_cfg_and_equals_the_pipeline(tiny_sd1_path):
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler="turbo")
    images = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(2))
    ref = _pipeline_latents(tiny_sd1_path, synth.scheduler, images, 0.5, 0.0, 4, 5)  # SD-Turbo: guidance 0
    got = synth.augment(images, ["a cat", "a dog"], strengths=0.5, guidance_scale=7.5, num_inference_steps=4,
                        generator=torch.Generator().manual_seed(5), output_type="latent")  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    sampler = synth.sampler(capacity=2)
    assert sampler.kind == "euler_a" and sampler.guidance_free
    for r in _requests(synth, 2):
        sampler.submit(r)
    sampler.step()
    assert sampler.unet_rows == 2  # guidance 7.5 asked, no unconditional row run


@pytest.mark.parametrize("scheduler", ["lcm", "lcm_span", "turbo"])
def test_few_step_schedulers_batch_invariant_per_sample_strengths(scheduler, tiny_sd1_path, lcm_path):
    synth = Synthesizer.from_pretrained(tiny_sd1_path if scheduler == "turbo" else lcm_path, scheduler=scheduler)
    reqs = lambda: [r for r in _requests(synth, 5)]  # noqa: E731 - strengths 0.5, 1.0, None, 0.75, 0.5
    for r in (rs := reqs()):
        r.num_inference_steps = 4
    sampler = synth.sampler(capacity=2, return_latents=True)
    batched = {f.key: f.latents for f in _drain_all(sampler, rs)}
    for r in reqs():
        r.num_inference_steps = 4
        (f,) = _drain_all(synth.sampler(capacity=1, return_latents=True), [r])
        assert (f.latents - batched[r.key]).abs().max().item() <= 1e-4 * max(1.0, f.latents.abs().max().item())
    # (Each sample equals its own run alone at its own strength: per-sample strengths are kept in the batch.)


@pytest.mark.parametrize("scheduler", ["lcm", "turbo"])
def test_few_step_steady_state_has_no_sync(scheduler, tiny_sd1_path, lcm_path):
    from fusionloader.engine.syncs import SyncDetector

    synth = Synthesizer.from_pretrained(lcm_path if scheduler == "lcm" else tiny_sd1_path, scheduler=scheduler)
    sampler = synth.sampler(capacity=3)
    for r in _requests(synth, 3):
        r.num_inference_steps = 8
        sampler.submit(r)
    sampler.step()
    with torch.inference_mode(), SyncDetector() as det:
        for _ in range(2):  # the shortest has 4 steps
            assert sampler.step() == []
    assert det.count == 0, det.report()


def test_loader_config_accepts_few_steps_at_low_strength_only_under_lcm_span(lcm_path):
    # "lcm" (the SD img2img rule) has int(1 * 0.25) = 0 steps at strength 0.25: refused at construction; under
    # "lcm_span" every strength runs all k steps, so the same settings are valid (the engine checks each job).
    from fusionloader import FusionConfig

    with pytest.raises(ValueError, match="0 denoising steps"):
        FusionConfig(synthesizer={"path_or_id": lcm_path, "scheduler": "lcm"}, strengths="randomized",
                     num_inference_steps=1)  # fmt: skip
    cfg = FusionConfig(synthesizer={"path_or_id": lcm_path, "scheduler": "lcm_span"}, strengths="randomized",
                       num_inference_steps=1)  # fmt: skip
    assert cfg.num_inference_steps == 1
    synth = Synthesizer.from_pretrained(lcm_path, scheduler="lcm_span")
    assert synth.spans_strength and not Synthesizer.from_pretrained(lcm_path, scheduler="lcm").spans_strength
    FusionConfig(synthesizer=synth, strengths="randomized", num_inference_steps=1)
