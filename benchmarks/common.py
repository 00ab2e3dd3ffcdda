"""Shared timing and reporting helpers for the benchmarks (burn-in, synchronise, then time; report medians)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

__all__ = ["environment", "median_seconds", "synchronize", "tiny_sd_model", "write_json"]


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
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # triton absent or broken: the torch references run
        env["triton"] = None
    return env


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
