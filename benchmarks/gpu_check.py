"""One prepared GPU check (<= 5 minutes on one GPU): everything issue 14 wants measured on CUDA, in one JSON.

    python -m fusionloader.benchmarks.gpu_check --json out/gpu_check.json [--model PATH] [--device cuda:0]
    python -m fusionloader.benchmarks.gpu_check --dry-run --json out/gpu_check_dry.json   # CPU, tiny model

Sections (each records its own error instead of stopping the run):

- ``kernels``: every kernel against its torch reference on the device (fp32 and fp16 storage), max error
  relative to the output's scale, against the tolerances in the kernels' docstrings.
- ``oracle``: ``Synthesizer`` against diffusers' ``StableDiffusionImg2ImgPipeline`` sharing the same modules,
  DDIM from the checkpoint's config, one generator per image. Tolerance on the [0, 1] images: fp32 max |diff|
  <= 1e-3; fp16 (GPU) mean |diff| <= 5e-3 and max |diff| <= 0.1 (fp16 UNet, the engine's step math in fp32
  vs the pipeline's in fp16; differences grow with the number of steps).
- ``throughput``: images/s of ``Synthesizer.augment`` and of the pipeline on the same batch and settings
  (median of repeats, both in this run).
- ``memory``: ``Synthesizer.memory_estimate`` for the sampler that then runs, against
  ``torch.cuda.max_memory_allocated`` over that run (the estimate leaves out the CUDA context).
- ``syncs``: host syncs per steady-state step and per finished batch, counted on CUDA with
  ``torch.cuda.set_sync_debug_mode("warn")`` (on CPU: ``fusionloader.engine.syncs.SyncDetector``).
- ``producer``: a producer on the device feeding ``FusionLoader`` (public API, ``late_policy="wait"``,
  ``return_meta=True``): every planned synthetic sample must arrive fresh.

The model is the embedded ``fusionloader/assets/digits-ldm`` by default (``--model PATH`` for an SD checkpoint
folder); ``--dry-run`` runs the same code on CPU with a tiny random SD-1.x-shaped model (tests run it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

__all__ = ["main", "run"]

_KERNEL_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check_kernels(device) -> dict:
    from fusionloader import kernels as K

    dev = torch.device(device)
    out = {"backend": "triton" if dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch"}
    g = torch.Generator().manual_seed(0)
    B, shape = 5, (4, 24, 17)
    ok = True
    for dtype in (torch.float32, torch.float16):
        tol = _KERNEL_RTOL[dtype]
        x0 = torch.randn(B, *shape, generator=g).to(dev, dtype)
        cx, cn = torch.rand(B, generator=g).to(dev), torch.rand(B, generator=g).to(dev)
        seeds = torch.randint(0, 2**62, (B,), generator=g).to(dev)
        model_out = torch.randn(2 * B, *shape, generator=g).to(dev, dtype)
        guidance = (torch.rand(B, generator=g) * 8).to(dev)
        uncond = torch.tensor([B + i if i % 2 == 0 else -1 for i in range(B)]).to(dev)
        coefs = torch.randn(B, 7, generator=g).to(dev)
        prev = torch.randn(B, *shape, generator=g).to(dev, dtype)
        decoded = (torch.randn(B, 3, 40, 33, generator=g) * 1.2).to(dev, dtype)
        errs = {}
        with K.backend(out["backend"]):
            errs["add_noise"] = _rel(K.add_noise(x0, cx, cn, seeds=seeds), K.add_noise_reference(x0, cx, cn, seeds=seeds))
            got = K.cfg_step(model_out, x0, guidance, uncond, coefs, prev_x0=prev, seeds=seeds, streams=3)
            ref = K.cfg_step_reference(model_out, x0, guidance, uncond, coefs, prev_x0=prev, seeds=seeds, streams=3)
            errs["cfg_step"] = max(_rel(got[0], ref[0]), _rel(got[1], ref[1]))
            errs["philox_randn"] = _rel(K.philox_randn(seeds, 2, 1000), K.philox_randn_reference(seeds, 2, 1000))
            u8 = torch.empty(B, 3, 40, 33, dtype=torch.uint8, device=dev)
            u8_ref = torch.empty_like(u8)
            K.postprocess(decoded, u8)
            K.postprocess_reference(decoded, u8_ref)
            errs["postprocess_uint8_mismatches"] = int((u8 != u8_ref).sum())
        _sync(dev)
        passed = all(v <= tol for k, v in errs.items() if k != "postprocess_uint8_mismatches")
        passed = passed and errs["postprocess_uint8_mismatches"] == 0 and errs["philox_randn"] <= 1e-5
        ok = ok and passed
        out[str(dtype).replace("torch.", "")] = dict(errs, rtol=tol, passed=passed)
    out["fallback_reason"] = K.fallback_reason(dev) if out["backend"] == "triton" else None
    out["passed"] = ok
    return out


def _pipe(model, device, dtype):
    from diffusers import StableDiffusionImg2ImgPipeline

    from fusionloader.engine.schedules import get_scheduler

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    pipe.scheduler = get_scheduler("ddim", dict(config, clip_sample=False, thresholding=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_oracle(pipe, synth, images, prompts, strength, steps) -> dict:
    dev = synth.device

    def gens():
        return [torch.Generator(dev).manual_seed(100 + i) for i in range(len(images))]

    with torch.no_grad():
        ref = pipe(prompts, image=images, strength=strength, guidance_scale=7.5, num_inference_steps=steps,
                   generator=gens(), output_type="pt").images  # fmt: skip
    got = synth.augment(images, prompts, strengths=strength, guidance_scale=7.5, num_inference_steps=steps,
                        generator=gens())  # fmt: skip
    diff = (got.float() - ref.float().to(got.device)).abs()
    mean, peak = float(diff.mean()), float(diff.max())
    if synth.dtype == torch.float32:
        tolerance, passed = "max <= 1e-3", peak <= 1e-3
    else:
        tolerance, passed = "mean <= 5e-3 and max <= 0.1", mean <= 5e-3 and peak <= 0.1
    return {"dtype": str(synth.dtype), "images": len(images), "steps": steps, "strength": strength,
            "mean_abs_diff": mean, "max_abs_diff": peak, "tolerance": tolerance, "passed": passed}  # fmt: skip


def check_throughput(pipe, synth, images, prompts, strength, steps, repeats) -> dict:
    dev = synth.device

    def engine():
        synth.augment(images, prompts, strengths=strength, guidance_scale=7.5, num_inference_steps=steps,
                      seeds=list(range(len(images))))  # fmt: skip
        _sync(dev)

    def pipeline():
        with torch.no_grad():
            pipe(prompts, image=images, strength=strength, guidance_scale=7.5, num_inference_steps=steps,
                 output_type="pt")  # fmt: skip
        _sync(dev)

    from fusionloader.kernels import _dispatch

    x = torch.zeros(1, device=dev)
    out = {"images": len(images), "steps": steps, "strength": strength, "repeats": repeats,
           "kernel_backend": _dispatch.resolve(x)}  # (the Triton interpreter on CPU is slow: not a speed figure)
    for name, fn in (("engine", engine), ("diffusers_pipeline", pipeline)):
        fn()  # warm-up: kernels compiled, allocator grown
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{name}_median_s"] = statistics.median(times)
        out[f"{name}_images_per_s"] = len(images) / statistics.median(times)
    out["speedup"] = out["engine_images_per_s"] / out["diffusers_pipeline_images_per_s"]
    return out


def _requests(synth, n, steps, key0=0):
    from fusionloader.engine import Request

    g = torch.Generator().manual_seed(key0)
    reqs = []
    for k in range(n):
        mean = torch.randn(synth.latent_shape, generator=g).to(synth.device)
        reqs.append(Request(key0 + k, "a photo of a digit", (0.5, 0.75, 1.0)[k % 3], 7.5, steps, seed=key0 + k,
                            latent_mean=mean, latent_std=torch.full_like(mean, 0.1)))  # fmt: skip
    return reqs


def check_memory(synth, capacity, steps) -> dict:
    est = synth.memory_estimate(capacity)
    out = {"estimate": est, "measured_peak": None, "ratio": None}
    sampler = synth.sampler(capacity=capacity)
    if synth.device.type == "cuda":
        _sync(synth.device)
        torch.cuda.reset_peak_memory_stats(synth.device)
        base = torch.cuda.memory_allocated(synth.device)
    with torch.inference_mode():
        for r in _requests(synth, 2 * capacity, steps):
            sampler.submit(r)
        done = sum(1 for _ in sampler.drain())
    out["finished"] = done
    if synth.device.type == "cuda":
        _sync(synth.device)
        peak = torch.cuda.max_memory_allocated(synth.device)
        out["measured_peak"] = int(peak)
        out["allocated_before"] = int(base)
        out["ratio"] = est["total"] / peak
    return out


def check_syncs(synth, capacity, steps) -> dict:
    steps = max(steps, 10)  # strengths >= 0.5: every sample runs >= 5 steps, none finishes in the steady phase
    sampler = synth.sampler(capacity=capacity)
    for r in _requests(synth, capacity, steps, key0=1000):
        sampler.submit(r)
    steady = finished_batches = 0
    counts = {"steady": 0, "drain": 0}
    with torch.inference_mode():
        sampler.step()  # admission, first use of the schedules
        if synth.device.type == "cuda":
            for phase in ("steady", "drain"):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        if phase == "steady":
                            for _ in range(2):
                                sampler.step()
                                steady += 1
                        else:
                            while not sampler.idle:
                                finished_batches += bool(sampler.step())
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                counts[phase] = sum("synchroniz" in str(w.message) for w in caught)
            method = "torch.cuda.set_sync_debug_mode"
        else:
            from fusionloader.engine.syncs import SyncDetector

            with SyncDetector() as det:
                for _ in range(2):
                    sampler.step()
                    steady += 1
            counts["steady"] = det.count
            with SyncDetector() as det:
                while not sampler.idle:
                    finished_batches += bool(sampler.step())
            counts["drain"] = det.count
            method = "SyncDetector (CPU)"
    return {"method": method, "steady_steps": steady, "syncs_steady": counts["steady"],
            "syncs_per_step": counts["steady"] / max(steady, 1), "finished_batches": finished_batches,
            "syncs_per_finished_batch": counts["drain"] / max(finished_batches, 1),
            "passed": counts["steady"] == 0 and counts["drain"] <= finished_batches}  # fmt: skip


class _Images(torch.utils.data.Dataset):
    def __init__(self, n, size):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.classes = [str(i) for i in range(10)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 10


def check_producer(model, device, n, steps, size, timeout) -> dict:
    from fusionloader import FusionLoader

    t0 = time.perf_counter()
    loader = FusionLoader(
        _Images(n, size), batch_size=4, shuffle=False, synthesizer=model, alpha=0.5, strengths=0.5,
        prompts="a photo of a {}", producer_devices=[str(device)], late_policy="wait", wait_timeout=timeout,
        num_inference_steps=steps, guidance_scale=2.0, return_meta=True, seed=0, producer_timeout=timeout,
    )  # fmt: skip
    planned = synthetic = fresh = 0
    try:
        for _, meta in loader:
            planned += int(meta["planned"].sum())
            synthetic += int(meta["synthetic"].sum())
            fresh += int(meta["fresh"].sum())
        stats = loader.stats()
    finally:
        loader.close()
    return {"samples": n, "planned_synthetic": planned, "delivered_synthetic": synthetic, "fresh": fresh,
            "seconds": time.perf_counter() - t0, "cumulative": stats.get("cumulative"),
            "passed": planned > 0 and fresh == planned}  # fmt: skip


def _section(result: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        result[name] = fn()
    except Exception as e:  # noqa: BLE001 - one failing section must not hide the others
        result[name] = {"error": f"{type(e).__name__}: {e}", "passed": False}
    result[name]["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"[gpu_check] {name}: {'ok' if result[name].get('passed', True) else 'FAILED'} "
          f"({result[name]['seconds']} s)", file=sys.stderr, flush=True)  # fmt: skip


def run(model: str | None = None, device: str = "cuda:0", dry_run: bool = False) -> dict:
    from fusionloader import Synthesizer
    from fusionloader.benchmarks.common import environment

    if dry_run:
        device = "cpu"
        folder = tempfile.mkdtemp(prefix="gpu-check-")
        if model is None:
            from fusionloader.testing import save_tiny_pipeline

            model = save_tiny_pipeline(folder)
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; use --dry-run for the CPU rehearsal")
    model = model or os.path.join(os.path.dirname(os.path.dirname(__file__)), "fusionloader", "assets", "digits-ldm")
    if not os.path.isdir(model):
        from importlib import resources

        model = str(resources.files("fusionloader") / "assets" / "digits-ldm")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    sizes = dict(images=8 if cuda else 2, steps=20 if cuda else 4, capacity=8 if cuda else 2, repeats=3 if cuda else 1,
                 producer_samples=32 if cuda else 8)  # fmt: skip
    result = {"dry_run": dry_run, "model": model, "device": str(dev), "environment": environment(dev), "sizes": sizes}
    result["note"] = "no GPU run: CPU rehearsal of the same code paths" if dry_run else "GPU run"
    _section(result, "kernels", lambda: check_kernels(dev))
    pipe = _pipe(model, dev, dtype)
    shared = Synthesizer(pipe)  # the pipeline's own modules: any difference is the engine's
    res = shared.resolution
    images = torch.rand(sizes["images"], 3, *res, generator=torch.Generator().manual_seed(1)).to(dev)
    prompts = ["a photo of a digit"] * sizes["images"]
    _section(result, "oracle", lambda: check_oracle(pipe, shared, images, prompts, 0.6, sizes["steps"]))
    _section(result, "throughput", lambda: check_throughput(pipe, shared, images, prompts, 0.6, sizes["steps"],
                                                            sizes["repeats"]))  # fmt: skip
    del pipe, shared
    if cuda:
        torch.cuda.empty_cache()
    synth = Synthesizer.from_pretrained(model, device=str(dev))  # the defaults a producer gets
    result["defaults"] = {"dtype": str(synth.dtype), "vae_dtype": str(synth.components.vae_dtype),
                          "scheduler": type(synth.scheduler).__name__}  # fmt: skip
    _section(result, "memory", lambda: check_memory(synth, sizes["capacity"], sizes["steps"]))
    _section(result, "syncs", lambda: check_syncs(synth, sizes["capacity"], sizes["steps"]))
    del synth
    size = res[0]
    _section(result, "producer", lambda: check_producer(model, dev, sizes["producer_samples"], 4, size,
                                                        120.0 if cuda else 300.0))  # fmt: skip
    result["passed"] = all(v.get("passed", True) for v in result.values() if isinstance(v, dict) and "seconds" in v)
    return result


def main(argv=None) -> int:
    from fusionloader.benchmarks.common import write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded digits-ldm)")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny random model: rehearse every code path")
    p.add_argument("--json", default="out/gpu_check.json")
    args = p.parse_args(argv)
    result = run(args.model, args.device, args.dry_run)
    write_json(args.json, result)
    print(f"[gpu_check] wrote {args.json}; passed={result['passed']}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
