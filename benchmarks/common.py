"""Shared timing and reporting helpers for the benchmarks (burn-in, synchronise, then time; report medians)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

__all__ = [
    "calibrated_step_s",
    "environment",
    "interpreting",
    "loader_bench_main",
    "median_seconds",
    "producers_ready",
    "synchronize",
    "synthetic_capacity",
    "tiny_sd_model",
    "warn_if_interpreting",
    "write_json",
]


def loader_bench_main(argv, doc: str, run: Callable[..., dict], default_json: str, hide: tuple[str, ...]) -> None:
    """The loader benchmarks' command line: ``--quick``, ``--device``, ``--model``, ``--json``; prints the
    headline figures (the result less the ``hide`` keys)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None, help="producer device (default: cuda if available, else cpu)")
    parser.add_argument("--model", default=None, help="diffusers checkpoint (default: tiny random pipeline)")
    parser.add_argument("--json", default=default_json)
    args = parser.parse_args(argv)
    warn_if_interpreting()
    result = run(quick=args.quick, model=args.model, device=args.device)
    write_json(args.json, result)
    print({k: v for k, v in result.items() if k not in hide})


def synchronize(device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device="cpu") -> dict:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times}


def environment(device="cpu") -> dict:
    """What a reader needs to compare figures: device, library versions, threads."""
    import diffusers

    device = torch.device(device)
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # Under TRITON_INTERPRET=1 the CPU path runs the kernels in Triton's Python interpreter (the tests'
        # setting), tens of times slower than the torch references a CPU user gets: such figures are not speeds.
        "triton_interpret": interpreting(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # triton absent or broken: the torch references run
        env["triton"] = None
    return env


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set (kernels on CPU tensors then run in Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def warn_if_interpreting() -> None:
    """Say on stderr, before a timed run, that ``TRITON_INTERPRET=1`` makes its CPU figures meaningless."""
    if interpreting():
        print("warning: TRITON_INTERPRET=1 is set: kernels on CPU run in Triton's Python interpreter and the "
              "timings measure it, not fusionloader; unset it for speed figures (the JSON records "
              "environment.triton_interpret)", file=sys.stderr, flush=True)  # fmt: skip


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as indented JSON, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def tiny_sd_model(folder: str, wide: bool = False) -> str:
    """Save the benchmarks' default model into ``folder``: a tiny random SD-1.x-shaped pipeline, no download.

    64 px and a VAE that downsamples by 8 as SD's does, so the UNet sees 8x8 latents: SD's pixel/latent
    proportions (and its costly full-resolution decoder) at a size a CPU runs quickly. The UNet (32/64
    channels) is small enough that per-call overhead, not arithmetic, bounds small batches -- as on a GPU,
    which a batch of one leaves mostly idle. ``wide=True``: UNet 64/128 and a wider text encoder, where a
    CPU's arithmetic dominates at every batch size (what batching cannot buy there)."""
    from fusionloader.testing import save_tiny_pipeline

    unet, text = ((64, 128), 64) if wide else ((32, 64), 32)
    return save_tiny_pipeline(folder, sample_size=64, unet_channels=unet, vae_channels=(32, 32, 64, 64), text_hidden=text)


def synthetic_capacity(loader, steps: int, burn_in: int, step: Callable[[object], object] = lambda batch: None) -> dict:
    """The producers' capacity as a trainer sees it: synthetic images per second that ``loader`` delivers.

    ``loader``: a FusionLoader with ``late_policy="wait"`` (every synthetic position waits for its own image,
    so the rate is what the producers make, not what a policy papers over) and ``return_meta=True``. After
    ``burn_in`` untimed batches (producers warm, look-ahead filled), ``steps`` batches are timed, each passed
    to ``step`` (the trainer's own CPU work, so its load on the machine is in the figure). Epochs cycle.
    Returns ``images_per_s``, the counts, and ``step_compute_s``: the median time ``step`` took."""
    batches = _cycle(loader)
    for _ in range(burn_in):
        batch, _meta = next(batches)
        step(batch)
    synthetic = fresh = samples = 0
    compute = []
    t0 = time.perf_counter()
    for _ in range(steps):
        batch, meta = next(batches)
        t = time.perf_counter()
        step(batch)
        compute.append(time.perf_counter() - t)
        synthetic += int(meta["synthetic"].sum())
        fresh += int(meta["fresh"].sum())
        samples += len(meta["index"])
    seconds = time.perf_counter() - t0
    if synthetic == 0:
        raise RuntimeError(f"no synthetic sample in {steps} calibration steps: raise the steps or alpha")
    return {"images_per_s": synthetic / seconds, "synthetic": synthetic, "fresh": fresh, "samples": samples,
            "seconds": seconds, "steps": steps, "step_compute_s": statistics.median(compute) if compute else 0.0}  # fmt: skip


def calibrated_step_s(capacity_images_per_s: float, synthetic_per_step: float, demand_over_capacity: float,
                      compute_s: float = 0.0) -> float:  # fmt: skip
    """The simulated accelerator time per step that puts demand at ``demand_over_capacity`` x capacity.

    A step that takes T seconds asks for ``synthetic_per_step / T`` images per second; T is chosen so that
    is ``demand_over_capacity * capacity``, and the part of T the trainer's CPU already spends
    (``compute_s``) is not slept again. Never negative: a demand the CPU step alone exceeds gives 0."""
    if capacity_images_per_s <= 0 or demand_over_capacity <= 0:
        raise ValueError(f"capacity and demand_over_capacity must be positive, got {capacity_images_per_s}, {demand_over_capacity}")
    step = synthetic_per_step / (demand_over_capacity * capacity_images_per_s)
    return max(0.0, step - compute_s)


def _cycle(loader):
    while True:
        yield from loader


def producers_ready(loader) -> bool:
    """Whether every producer of a FusionLoader has loaded its model (from ``loader.stats()``)."""
    producers = loader.stats()["producer"].get("producers", [])
    return bool(producers) and all(p["state"] == "ready" for p in producers)
