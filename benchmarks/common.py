"""Shared timing and reporting helpers for the benchmarks (burn-in, synchronise, then time; report medians)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

__all__ = ["environment", "median_seconds", "synchronize", "write_json"]


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
