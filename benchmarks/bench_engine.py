"""Per-image cost of ``Synthesizer.augment`` against diffusers and against the model compute it cannot avoid.

One batch of N images, each at its own strength drawn from DA-Fusion's randomized intensity
{0.25, 0.5, 0.75, 1.0}, guidance 7.5, the same scheduler and step count everywhere:

- ``fusion``: ``Synthesizer.augment`` on the whole batch (continuous batching, fused kernels).
- ``diffusers_pipeline``: ``StableDiffusionImg2ImgPipeline`` on the same batch; a pipeline call has one
  strength, so one call per strength group (the best a pipeline user can do).
- ``dafusion_style``: DA-Fusion's way -- one pipeline call per image, prompt and image encoded every call.
- ``model_compute``: the same UNet evaluations (the same batch sizes step by step: 2 rows per active
  sample for CFG, samples leave as their strength's steps run out), the same VAE encode and decodes,
  timed alone: the floor any implementation pays (prompts are encoded once, outside, as the engine's
  prompt cache does).

    python -m fusionloader.benchmarks.bench_engine --json out/bench_engine.json [--model DIR]

All four are timed in the same run (median of repeats). Without ``--model`` a tiny random SD-1.x-shaped
model is built from a config (``common.tiny_sd_model``: 64 px, a VAE that downsamples by 8 as SD's does).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from fusionloader.benchmarks.common import environment, median_seconds, tiny_sd_model, warn_if_interpreting, write_json

__all__ = ["run"]

STRENGTHS = (0.25, 0.5, 0.75, 1.0)  # DA-Fusion's randomized intensity


def _model_compute(synth, images, emb, strengths, steps, guidance):
    """The engine's unavoidable model work, call for call, with nothing around it.

    The same calls ``augment`` makes when every sample fits in the UNet batch: one VAE encode of the batch,
    then per step one UNet call on the active samples (x2 rows with CFG), and one decode per group of
    samples finishing together (strength s runs ``int(s * steps)`` steps). ``emb`` holds the prompt
    embeddings (cond rows, then the negative prompt's), encoded once as the engine's prompt cache does.
    """
    c = synth.components
    n_i = [min(int(steps * s), steps) for s in strengths]
    with torch.inference_mode():  # the cheapest way to run them (augment samples in inference mode too)
        posterior = c.vae.encode((images * 2 - 1).to(c.device, c.vae.dtype)).latent_dist
        x = (posterior.sample() * c.vae.config.scaling_factor).to(c.unet.dtype)
        for k in range(max(n_i)):
            active = [i for i, n in enumerate(n_i) if n > k]
            rows, hidden = x[active], emb[active]
            if guidance > 1:
                rows, hidden = torch.cat([rows, rows]), torch.cat([hidden, emb[-1:].expand(len(active), -1, -1)])
            t = torch.full((rows.shape[0],), 500, device=c.device)
            c.unet(rows, t, encoder_hidden_states=hidden).sample
            done = [i for i, n in enumerate(n_i) if n == k + 1]
            if done:
                c.vae.decode(x[done].to(c.vae.dtype) / c.vae.config.scaling_factor).sample


def _encode_prompts(c, prompts):
    ids = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(c.device)  # fmt: skip
    with torch.no_grad():
        return c.text_encoder(ids)[0].to(c.unet.dtype)


def run(quick: bool = False, model: str | None = None, device: str | None = None, batch: int = 8,
        steps: int | None = None, repeats: int | None = None) -> dict:  # fmt: skip
    """Median ms per image of the four ways (see the module docstring), from one run."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from fusionloader import Synthesizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = steps or (20 if quick else 50)
    repeats = repeats or (9 if quick else 15)
    guidance = 7.5
    with tempfile.TemporaryDirectory() as tmp:
        path = model or tiny_sd_model(tmp)
        synth = Synthesizer.from_pretrained(path, device=device, scheduler="ddim")
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = type(synth.scheduler).from_config(synth.scheduler.config)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)

    g = torch.Generator().manual_seed(0)
    h, w = synth.resolution
    images = torch.rand(batch, 3, h, w, generator=g).to(device)
    strengths = [STRENGTHS[i] for i in torch.randint(len(STRENGTHS), (batch,), generator=g).tolist()]
    prompts = [f"a photo of a {name}" for name in ("cat", "dog", "bird", "car", "plane", "ship", "truck", "horse")]
    prompts = [prompts[i % len(prompts)] for i in range(batch)]
    seeds = list(range(batch))

    def fusion():
        with torch.no_grad():
            synth.augment(images, prompts, strengths=strengths, guidance_scale=guidance, num_inference_steps=steps, seeds=seeds)

    def pipeline_grouped():
        for s in sorted(set(strengths)):
            idx = [i for i, v in enumerate(strengths) if v == s]
            pipe([prompts[i] for i in idx], image=images[idx], strength=s, guidance_scale=guidance,
                 num_inference_steps=steps, generator=[torch.Generator().manual_seed(i) for i in idx], output_type="pt")  # fmt: skip

    def dafusion():
        for i in range(batch):
            pipe(prompts[i], image=images[i : i + 1], strength=strengths[i], guidance_scale=guidance,
                 num_inference_steps=steps, generator=torch.Generator().manual_seed(i), output_type="pt")  # fmt: skip

    emb = _encode_prompts(synth.components, prompts + [""])

    def compute():
        _model_compute(synth, images, emb, strengths, steps, guidance)

    timings = {}
    # Interleave the four so drift in machine load hits them alike, rotating the order each repeat. Each
    # timed call follows an untimed one of the same method: the first call after another model's runs on
    # cold caches (10-30% slower here), which a producer calling augment back to back never pays.
    order = (("fusion", fusion), ("model_compute", compute), ("diffusers_pipeline", pipeline_grouped), ("dafusion_style", dafusion))
    for name, fn in order:
        fn()  # warm-up (allocator, lazy init, prompt cache)
    runs = {name: [] for name, _ in order}
    for r in range(repeats):
        for name, fn in order[r % len(order):] + order[: r % len(order)]:
            runs[name].append(median_seconds(fn, repeats=1, warmup=1, device=device)["median_s"])
    for name, times in runs.items():
        timings[f"{name}_ms_per_image"] = 1e3 * statistics.median(times) / batch
        timings[f"{name}_times_s"] = times  # in round order
    # Ratios pair the calls of one round (adjacent in time, so slow drift in machine load cancels), then
    # take the median over rounds.
    def paired(a, b):
        return statistics.median(x / y for x, y in zip(runs[a], runs[b]))

    timings["fusion_over_model_compute"] = paired("fusion", "model_compute")
    timings["speedup_vs_diffusers_pipeline"] = paired("diffusers_pipeline", "fusion")
    timings["speedup_vs_dafusion_style"] = paired("dafusion_style", "fusion")
    timings.update(batch=batch, steps=steps, guidance_scale=guidance, strengths=strengths, repeats=repeats,
                   model=model or "tiny random SD-1.x-shaped (benchmarks.common.tiny_sd_model)", environment=environment(device))  # fmt: skip
    return timings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default="out/bench_engine.json")
    args = parser.parse_args(argv)
    warn_if_interpreting()
    result = run(args.quick, args.model, args.device)
    write_json(args.json, result)
    print({k: v for k, v in result.items() if not k.endswith("times_s")})


if __name__ == "__main__":
    main()
