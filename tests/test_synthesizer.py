"""The oracle: ``Synthesizer.augment`` computes ``StableDiffusionImg2ImgPipeline``'s function (fp32, CPU).

Axes (issue 2): scheduler {DDIM eta 0, DDIM eta 0.5, Euler, DPM-Solver++(2M)} x strength {0.25, 0.5, 0.75, 1.0}
x guidance {1.0, 7.5} x prediction {epsilon, v_prediction} x timestep_spacing {leading, trailing, linspace}.
The full product is 192 pipeline runs; ``_CASES`` is a 16-row pairwise covering (every pair of values of every
two axes appears; ``test_cases_cover_every_pair`` checks it). The tiny random model saturates at 0/1 after
clamping, so latents (``output_type="latent"``) are compared too.
"""

import itertools
import pickle

import pytest
import torch

from fusionloader.engine import MissingComponentError, NonFiniteOutputError, PromptPolicy, Synthesizer
from fusionloader.engine.schedules import get_scheduler

STEPS = 8
TOL = 1e-4  # images in [0, 1]: the acceptance bound


def _close(a, b):
    """Latents: 1e-4 absolute, relative to the latents' scale (Euler starts at sigma ~ 15: ulp ~ 2e-6 there)."""
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= TOL * scale, f"max abs diff {err:.3g} at scale {scale:.3g}"
SCHEDULERS = [("ddim", 0.0), ("ddim", 0.5), ("euler", 0.0), ("dpmpp_2m", 0.0)]
STRENGTHS = [0.25, 0.5, 0.75, 1.0]
GUIDANCE = [1.0, 7.5]
PREDICTIONS = ["epsilon", "v_prediction"]
SPACINGS = ["leading", "trailing", "linspace"]
PROMPTS = ["a photo of a cat", "a good photo of a dog"]

# Row (i, j): scheduler i, strength j; the other axes are functions of (i, j) chosen so that every pair of
# values of every two axes occurs (a covering array of strength 2, found by search and asserted below).
_CASES = [
    (SCHEDULERS[i], STRENGTHS[j], GUIDANCE[(i + j) % 2], PREDICTIONS[(j + i // 2) % 2], SPACINGS[(i + j) % 3])
    for i in range(4)
    for j in range(4)
]


def _case_id(case):
    (name, eta), s, g, pred, spacing = case
    return f"{name}-eta{eta}-s{s}-g{g}-{pred[:3]}-{spacing}"


def test_cases_cover_every_pair():
    axes = [SCHEDULERS, STRENGTHS, GUIDANCE, PREDICTIONS, SPACINGS]
    for a, b in itertools.combinations(range(len(axes)), 2):
        have = {(c[a], c[b]) for c in _CASES}
        assert have == set(itertools.product(axes[a], axes[b])), (a, b)



_PIPES = {}


def _pipe(path):
    from diffusers import StableDiffusionImg2ImgPipeline

    if path not in _PIPES:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[path] = pipe
    return _PIPES[path]


def _scheduler(pipe, name, spacing):
    config = dict(pipe.scheduler.config, timestep_spacing=spacing)
    return get_scheduler(name, config)


def _pipeline_call(pipe, images, prompts, strength, guidance, generator, eta=0.0):
    """The pipeline's latents and its "pt" output (decode + postprocess exactly as the pipeline does)."""
    with torch.no_grad():
        latents = pipe(
            prompts, image=images, strength=strength, guidance_scale=guidance, num_inference_steps=STEPS,
            generator=generator, eta=eta, output_type="latent",
        ).images  # fmt: skip
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return latents, pipe.image_processor.postprocess(decoded, output_type="pt")


def _images(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, 32, 32), generator=g)


@pytest.mark.parametrize("case", _CASES, ids=[_case_id(c) for c in _CASES])
def test_oracle_single_strength(case, tiny_sd1_path, tiny_sd2_path):
    (name, eta), strength, guidance, pred, spacing = case
    path = tiny_sd1_path if pred == "epsilon" else tiny_sd2_path
    pipe = _pipe(path)
    pipe.scheduler = _scheduler(pipe, name, spacing)
    synth = Synthesizer.from_pretrained(path, scheduler=_scheduler(pipe, name, spacing))
    images = _images()
    ref_lat, ref_img = _pipeline_call(pipe, images, PROMPTS, strength, guidance, torch.Generator().manual_seed(7), eta)
    kw = dict(strengths=strength, guidance_scale=guidance, num_inference_steps=STEPS, eta=eta)
    img, lat = synth.augment(images, PROMPTS, generator=torch.Generator().manual_seed(7), return_latents=True, **kw)
    assert ref_lat.abs().max() > 0.1  # not vacuous
    _close(lat, ref_lat)
    assert (img - ref_img).abs().max().item() <= TOL
    assert img.shape == (2, 3, 32, 32) and img.dtype == torch.float32


@pytest.mark.parametrize("name,eta", [("ddim", 0.5), ("dpmpp_2m", 0.0)])
def test_mixed_strengths_equal_separate_pipeline_calls(name, eta, tiny_sd1_path):
    pipe = _pipe(tiny_sd1_path)
    pipe.scheduler = _scheduler(pipe, name, "leading")
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler=name)
    images = _images(4, seed=2)
    prompts = ["a photo of a cat", "a dog", "a bird", "a photo of a horse"]
    strengths = [0.25, 1.0, 0.5, 0.75]
    guidance = [7.5, 1.0, 7.5, 7.5]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    # capacity 2 < 4 images of different lengths: samples join as others finish (continuous batching).
    lat = synth.augment(images, prompts, strengths=strengths, guidance_scale=guidance, num_inference_steps=STEPS,
                        generator=gens, eta=eta, capacity=2, output_type="latent")  # fmt: skip
    for i in range(4):
        ref, _ = _pipeline_call(pipe, images[i : i + 1], prompts[i : i + 1], strengths[i], guidance[i],
                                [torch.Generator().manual_seed(100 + i)], eta)  # fmt: skip
        _close(lat[i], ref[0])


def test_single_generator_mixed_strengths_equal_consecutive_group_calls(tiny_sd1_path):
    """One generator, mixed strengths: strength groups draw one after the other (module NOTE)."""
    pipe = _pipe(tiny_sd1_path)
    pipe.scheduler = _scheduler(pipe, "ddim", "leading")
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim")
    images = _images(3, seed=3)
    prompts = ["a cat", "a dog", "a bird"]
    lat = synth.augment(images, prompts, strengths=[0.5, 1.0, 0.5], guidance_scale=7.5, num_inference_steps=STEPS,
                        generator=torch.Generator().manual_seed(5), eta=0.5, output_type="latent")  # fmt: skip
    g = torch.Generator().manual_seed(5)
    ref_a, _ = _pipeline_call(pipe, images[[0, 2]], ["a cat", "a bird"], 0.5, 7.5, g, 0.5)
    ref_b, _ = _pipeline_call(pipe, images[[1]], ["a dog"], 1.0, 7.5, g, 0.5)
    _close(lat[[0, 2]], ref_a)
    _close(lat[[1]], ref_b)


@pytest.mark.parametrize("scheduler_cls", ["EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"])
def test_unfused_scheduler_equals_pipeline(scheduler_cls, tiny_sd1_path):
    """Schedulers without a fused kernel run through the grouped ``scheduler.step`` path, still exact."""
    import diffusers

    pipe = _pipe(tiny_sd1_path)
    pipe.scheduler = getattr(diffusers, scheduler_cls).from_config(pipe.scheduler.config)
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler=getattr(diffusers, scheduler_cls))
    assert synth.sampler().kind is None
    images = _images(3, seed=4)
    prompts = ["a cat", "a dog", "a bird"]
    strengths = [0.5, 1.0, 0.5]
    lat = synth.augment(images, prompts, strengths=strengths, guidance_scale=7.5, num_inference_steps=4,
                        generator=[torch.Generator().manual_seed(i) for i in range(3)], capacity=2,
                        output_type="latent")  # fmt: skip
    for i in range(3):
        with torch.no_grad():
            ref = pipe(prompts[i], image=images[i : i + 1], strength=strengths[i], guidance_scale=7.5,
                       num_inference_steps=4, generator=[torch.Generator().manual_seed(i)], output_type="latent").images  # fmt: skip
        _close(lat[i], ref[0])


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_text_only_equals_txt2img_pipeline(name, tiny_sd2_path):
    from diffusers import StableDiffusionPipeline

    img2img = _pipe(tiny_sd2_path)
    pipe = StableDiffusionPipeline(**img2img.components)
    pipe.scheduler = _scheduler(img2img, name, "trailing")
    pipe.set_progress_bar_config(disable=True)
    synth = Synthesizer.from_pretrained(tiny_sd2_path, scheduler=_scheduler(img2img, name, "trailing"))
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator().manual_seed(9),
                   output_type="latent", height=32, width=32).images  # fmt: skip
    lat = synth.generate(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5,
                         generator=torch.Generator().manual_seed(9), output_type="latent")  # fmt: skip
    _close(lat, ref)


def test_seeded_batch_invariance(tiny_sd1_path):
    """With seeds (Philox), a sample's output does not depend on its batch-mates or capacity."""
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim")
    images = _images(4, seed=6)
    prompts = ["a cat", "a dog", "a bird", "a frog"]
    kw = dict(guidance_scale=[7.5, 1.0, 7.5, 3.0], num_inference_steps=STEPS, eta=0.5, output_type="latent")
    strengths = [0.25, 0.5, 1.0, 0.75]
    batch = synth.augment(images, prompts, strengths=strengths, seeds=[11, 12, 13, 14], capacity=3, **kw)
    for i in range(4):
        one = {k: (v[i : i + 1] if isinstance(v, list) else v) for k, v in kw.items()}
        alone = synth.augment(images[i : i + 1], prompts[i : i + 1], strengths=strengths[i], seeds=[11 + i], **one)
        _close(batch[i], alone[0])
    other = synth.augment(images, prompts, strengths=strengths, seeds=[11, 99, 98, 97], **kw)
    _close(other[0], batch[0])
    assert (other[1] - batch[1]).abs().max().item() > 1e-2  # a different seed is a different sample


def test_class_ids_with_prompt_policy(tiny_sd1_path):
    synth = Synthesizer.from_pretrained(tiny_sd1_path)
    policy = PromptPolicy(["cat", "dog"])
    images = _images(2)
    a = synth.augment(images, [1, 0], prompt_policy=policy, num_inference_steps=4, seeds=[1, 2], output_type="latent")
    b = synth.augment(images, ["a photo of a dog", "a photo of a cat"], num_inference_steps=4, seeds=[1, 2],
                      output_type="latent")  # fmt: skip
    assert torch.equal(a, b)


def test_augment_into_uint8_and_cached_latents(tiny_sd1_path):
    synth = Synthesizer.from_pretrained(tiny_sd1_path)
    images = _images(3)
    ref = synth.augment(images, ["a cat"] * 3, num_inference_steps=4, seeds=[1, 2, 3])
    out = torch.zeros((5, 3, 32, 32), dtype=torch.uint8)
    synth.augment_into(out, images, ["a cat"] * 3, num_inference_steps=4, seeds=[1, 2, 3], rows=[4, 0, 2])
    assert torch.equal(out[[4, 0, 2]], (ref * 255).round().to(torch.uint8))
    assert out[[1, 3]].sum() == 0
    cache = synth.latent_cache()
    mean, std = cache.get([0, 1, 2], lambda i: images[i])
    from_cache = synth.augment((mean, std), ["a cat"] * 3, num_inference_steps=4, seeds=[1, 2, 3])
    assert (from_cache - ref).abs().max().item() <= TOL


def test_bad_inputs(tiny_sd1_path, tmp_path):
    import shutil

    synth = Synthesizer.from_pretrained(tiny_sd1_path)
    images = _images(2)
    with pytest.raises(ValueError, match="generation resolution"):
        synth.augment(torch.rand(2, 3, 24, 24), PROMPTS)
    with pytest.raises(ValueError, match="3 channels"):
        synth.augment(torch.rand(2, 1, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        synth.augment(images * 2 - 1, PROMPTS)
    for bad in (0.0, 1.5, -0.25):
        with pytest.raises(ValueError, match="strength"):
            synth.augment(images, PROMPTS, strengths=bad)
    with pytest.raises(ValueError, match="no denoising step"):
        synth.augment(images, PROMPTS, strengths=0.1, num_inference_steps=4)
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        synth.augment(images, PROMPTS + ["a frog"])
    with pytest.raises(ValueError, match="strengths: got 3 values for 2 images"):
        synth.augment(images, PROMPTS, strengths=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="unknown scheduler"):
        Synthesizer.from_pretrained(tiny_sd1_path, scheduler="not-a-scheduler")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd1_path, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(MissingComponentError, match="unet") as err:
        Synthesizer.from_pretrained(str(broken))
    assert str(broken) in str(err.value)
    with pytest.raises(MissingComponentError, match="model_index"):
        Synthesizer.from_pretrained(str(tmp_path / "nowhere"))


def test_nonfinite_output_is_reported(tiny_sd1_path):
    synth = Synthesizer.from_pretrained(tiny_sd1_path)
    latents = torch.randn(3, 4, 16, 16)
    latents[1, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteOutputError) as err:
        synth.augment(latents, ["a cat"] * 3, num_inference_steps=4, seeds=[1, 2, 3])
    assert err.value.indices == [1]


def test_pickle_roundtrip(tiny_sd1_path):
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler="euler")
    images = _images(1)
    ref = synth.augment(images, ["a cat"], num_inference_steps=4, seeds=[3], output_type="latent")
    clone = pickle.loads(pickle.dumps(synth))
    assert type(clone.scheduler).__name__ == "EulerDiscreteScheduler"
    assert torch.equal(clone.augment(images, ["a cat"], num_inference_steps=4, seeds=[3], output_type="latent"), ref)
    # Built from a pipeline object: pickles by saving the pipeline to a temporary folder.
    from_pipe = Synthesizer(_pipe(tiny_sd1_path), scheduler="euler")
    clone = pickle.loads(pickle.dumps(from_pipe))
    again = clone.augment(images, ["a cat"], num_inference_steps=4, seeds=[3], output_type="latent")
    assert (again - ref).abs().max() <= TOL


def test_outputs_are_plain_tensors_usable_in_training(tiny_sd1_path):
    # The engine samples in inference mode; what it hands out must work in autograd and in place.
    synth = Synthesizer.from_pretrained(tiny_sd1_path)
    images = torch.rand(2, 3, *synth.resolution, generator=torch.Generator().manual_seed(0))
    out, latents = synth.augment(images, ["a photo of a cat"] * 2, num_inference_steps=4, seeds=[0, 1],
                                 return_latents=True)  # fmt: skip
    assert not out.is_inference() and not latents.is_inference()
    weight = torch.ones(3, requires_grad=True)
    (out * weight[None, :, None, None]).sum().backward()
    assert weight.grad is not None
    out.mul_(0.5)
    buf = torch.zeros(2, 3, *synth.resolution, dtype=torch.uint8)
    synth.augment_into(buf, images, ["a photo of a cat"] * 2, num_inference_steps=4, seeds=[0, 1])
    assert not buf.is_inference() and int(buf.max()) > 0
    buf.add_(1)


def test_calls_run_under_the_synthesizers_device(tiny_sd1_path, monkeypatch):
    # On cuda:N, augment (VAE encode, sampling, decode) runs under torch.cuda.device(N): nothing uses device 0.
    from fusionloader.engine import sampler as sampler_module
    from fusionloader.engine import synthesizer as synthesizer_module

    entered = []

    class Scope:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(synthesizer_module, "device_scope", Scope)
    monkeypatch.setattr(sampler_module, "device_scope", Scope)
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim")
    synth.augment(_images(1), "a photo", strengths=0.5, num_inference_steps=2, seeds=[1])
    # _latents (encode) + _run + every submit and step of the sampler
    assert len(entered) >= 4 and set(entered) == {synth.device}


def test_memory_bounds_survive_pickling(tiny_sd1_path):
    synth = Synthesizer.from_pretrained(tiny_sd1_path, prompt_cache_size=7, decode_chunk=2)
    clone = pickle.loads(pickle.dumps(synth))
    assert clone.prompt_cache.max_size == 7 and clone.decode_chunk == 2
    from_pipe = Synthesizer(_pipe(tiny_sd1_path), prompt_cache_size=5, decode_chunk=3)
    clone = pickle.loads(pickle.dumps(from_pipe))
    assert clone.prompt_cache.max_size == 5 and clone.decode_chunk == 3
    with pytest.raises(ValueError, match="decode_chunk"):
        Synthesizer.from_pretrained(tiny_sd1_path, decode_chunk=0)
