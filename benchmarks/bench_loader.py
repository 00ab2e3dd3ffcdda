"""Loader benchmark (issue 3): a small CPU classifier trained from

(a) ``plain``   — torch DataLoader, no synthesis;
(b) ``inline``  — the diffusers img2img pipeline called inside ``__getitem__`` (with probability alpha);
(c) ``offline`` — DA-Fusion's way: M variants per image generated and written as PNG first, then
                  training reads real + variant images (time to first step includes generation);
(d) ``fusion``  — FusionLoader at alpha = 0.5 with producers (spawned processes) on ``--device``.

Two regimes: ``ample`` (producer capacity >= demand: few sampler steps, a heavier training step) and
``scarce`` (capacity < demand: more sampler steps, a light step; ``late_policy="reuse"``). Every step
is timed; steps/s is 1 / median step time after a burn-in. The model is the tiny random SD-shaped
pipeline of ``fusionloader.testing`` (no download), so absolute numbers say nothing about SD-1.5; the
ratios are what the issue's targets are about.

    python benchmarks/bench_loader.py [--quick] [--device cuda] [--model PATH] [--out benchmarks/results/bench_loader.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

RES = 32  # tiny pipeline resolution


class Images(Dataset):
    """Seeded random uint8 images, as a decoded dataset would hand them over; ``transform`` to float."""

    classes = ["cat", "dog", "bird", "car"]

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, RES, RES), dtype=torch.uint8, generator=g)
        self.targets = [i % len(self.classes) for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float() / 255, self.targets[i]


class InlineSynthesis(Dataset):
    """(b): generation inside ``__getitem__``: the way to do it online without fusionloader."""

    def __init__(self, base: Images, pipe, alpha: float, steps: int):
        self.base, self.pipe, self.alpha, self.steps = base, pipe, alpha, steps
        self.device = pipe.device

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        if np.random.default_rng(i + 7919 * int(time.time_ns() % 1000)).random() < self.alpha:
            with torch.no_grad():
                x = self.pipe(f"a photo of a {self.base.classes[y]}", image=x[None].to(self.device), strength=0.5,
                              guidance_scale=7.5, num_inference_steps=self.steps, output_type="pt",
                              generator=torch.Generator().manual_seed(i)).images[0].float().cpu()
        return x, y


class PNGFolder(Dataset):
    """(c): real images plus M written variants per image; a variant replaces the real with prob. alpha."""

    def __init__(self, base: Images, root: str, m: int, alpha: float):
        self.base, self.root, self.m, self.alpha = base, root, m, alpha
        self.rng = np.random.default_rng(0)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        from PIL import Image

        x, y = self.base[i]
        if self.rng.random() < self.alpha:
            k = int(self.rng.integers(self.m))
            png = np.array(Image.open(os.path.join(self.root, f"{i}_{k}.png")))
            x = torch.from_numpy(png).permute(2, 0, 1).float() / 255
        return x, y


def model_for(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * width, 4),
    )


def train(loader, steps: int, width: int, sim_step_s: float = 0.0, burn_in: int = 3, t_start: float | None = None) -> dict:
    """Train ``steps`` steps (cycling epochs); per-step times include waiting for the batch.

    ``sim_step_s``: host time the step waits for a (simulated) accelerator, during which the CPU is free —
    what a GPU trainer looks like to its data pipeline; 0 means a purely CPU-bound step."""
    torch.manual_seed(0)
    model = model_for(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    times, first = [], None
    t_start = time.perf_counter() if t_start is None else t_start
    done = 0
    while done < steps:
        t0 = time.perf_counter()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sim_step_s:
                time.sleep(sim_step_s)
            now = time.perf_counter()
            if first is None:
                first = now - t_start
            times.append(now - t0)
            t0 = now
            done += 1
            if done >= steps:
                break
    timed = times[burn_in:] or times
    return {"steps_per_s": 1.0 / statistics.median(timed), "time_to_first_step_s": first, "total_s": sum(times)}


def regime(name: str, *, quick: bool, device: str, pipe_path: str) -> dict:
    from fusionloader.loader import FusionLoader
    from fusionloader.engine import Synthesizer  # noqa: F401  (fail early if the engine is missing)

    n = 32 if quick else 64
    bs = 8 if quick else 16
    steps = 48 if quick else 200
    m = 2 if quick else 10  # DA-Fusion's M
    # ample: 2 sampler steps, a long (simulated accelerator) step; scarce: 8 sampler steps, a short step
    sampler_steps, width, sim_step_s = (2, 32, 0.4) if name == "ample" else (8, 16, 0.01)
    if name == "scarce":
        # short steps: run long enough (~15 s) for producers to start in the background (the trainer does
        # not wait for them) and reach a steady state
        steps *= 30 if quick else 6
    burn_in = 2 * (n // bs)  # two epochs: producers warm, the store filled
    alpha = 0.5
    base = Images(n)
    out: dict = {"sampler_steps": sampler_steps, "model_width": width, "sim_step_s": sim_step_s, "images": n,
                 "batch_size": bs, "steps": steps, "burn_in": burn_in}

    out["plain"] = train(DataLoader(base, batch_size=bs, shuffle=True), steps, width, sim_step_s, burn_in)

    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(pipe_path, safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(device)  # (b) and (c) generate on the producers' device: same hardware for every way
    pipe.set_progress_bar_config(disable=True)
    out["inline"] = train(DataLoader(InlineSynthesis(base, pipe, alpha, sampler_steps), batch_size=bs, shuffle=True),
                          min(max(4, steps // 8), 48), width, sim_step_s, burn_in=1)

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        from PIL import Image

        for i in range(n):
            x, y = base[i]
            for k in range(m):
                with torch.no_grad():
                    img = pipe(f"a photo of a {base.classes[y]}", image=x[None].to(device), strength=0.5, guidance_scale=7.5,
                               num_inference_steps=sampler_steps, output_type="np",
                               generator=torch.Generator().manual_seed(i * m + k)).images[0]
                Image.fromarray((img * 255).round().astype(np.uint8)).save(os.path.join(root, f"{i}_{k}.png"))
        written = sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root))
        offline = train(DataLoader(PNGFolder(base, root, m, alpha), batch_size=bs, shuffle=True), steps, width,
                        sim_step_s, burn_in, t_start=t0)
        offline["disk_bytes"] = written
        out["offline"] = offline

    t0 = time.perf_counter()
    with FusionLoader(base, batch_size=bs, shuffle=True, synthesizer=pipe_path, alpha=alpha, strengths=0.5,
                      guidance_scale=7.5, num_inference_steps=sampler_steps, producer_devices=(device,),
                      late_policy="reuse", seed=0) as loader:
        fusion = train(loader, steps, width, sim_step_s, burn_in, t_start=t0)
        s = loader.stats()
        fusion.update(
            disk_bytes=0,  # nothing synthetic is written: the store and the ring live in memory
            achieved_alpha=s["cumulative"]["achieved_alpha"], fresh_fraction=s["cumulative"]["fresh_fraction"],
            stall_fraction=s["cumulative"]["stall_fraction"], stall_s=s["cumulative"]["stall_s"],
            producer_images_per_s=s["producer"].get("images_per_s", 0.0),
            counts={k: s["cumulative"][k] for k in ("real", "fresh", "reused", "fallback")},
        )
        # after the burn-in epochs (producers warm): the steady state the targets are about
        steady = [e for k, e in s["per_epoch"].items() if int(k) >= 2]
        fresh, synthetic = sum(e["fresh"] for e in steady), sum(e["fresh"] + e["reused"] for e in steady)
        fusion["fresh_fraction_steady"] = fresh / synthetic if synthetic else float("nan")
        fusion["achieved_alpha_steady"] = synthetic / max(1, sum(e["samples"] for e in steady))
        out["fusion"] = fusion
    return out


def run(quick: bool = False, model: str | None = None, device: str | None = None) -> dict:
    """Both regimes; the top-level keys summarise the ``ample`` regime (the issue's first targets).

    ``model``: a diffusers img2img checkpoint (default: the tiny random pipeline, 32 px); ``device``: the
    producers' device (default: CUDA when available — the spare device — else CPU, where producers and
    the trainer share the cores, which caps what (d) can reach).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        # CPU producers take cores from the trainer (ProducerPool gives each cpu_count // (producers + 1)
        # threads); every way trains with the rest, so none is slowed by oversubscribed OpenMP threads.
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    try:
        return _run(quick, model, device)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, model: str | None, device: str) -> dict:
    from fusionloader.benchmarks.common import environment
    from fusionloader.testing import save_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = model or save_tiny_pipeline(os.path.join(tmp, "tiny"), prediction_type="epsilon")
        regimes = {name: regime(name, quick=quick, device=device, pipe_path=path) for name in ("ample", "scarce")}
    a = regimes["ample"]
    return {
        "plain_steps_per_s": a["plain"]["steps_per_s"],
        "fusion_steps_per_s": a["fusion"]["steps_per_s"],
        "inline_steps_per_s": a["inline"]["steps_per_s"],
        "offline_time_to_first_step_s": a["offline"]["time_to_first_step_s"],
        "fusion_time_to_first_step_s": a["fusion"]["time_to_first_step_s"],
        "offline_disk_bytes": a["offline"]["disk_bytes"],
        "fusion_disk_bytes": a["fusion"]["disk_bytes"],
        "achieved_alpha": a["fusion"]["achieved_alpha"],
        "fresh_fraction": a["fusion"]["fresh_fraction"],
        "stall_fraction": a["fusion"]["stall_fraction"],
        "quick": quick,
        "producer_device": device,
        "environment": environment(device),
        "trainer_threads": torch.get_num_threads(),
        "regimes": regimes,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None, help="producer device (default: cuda if available, else cpu)")
    parser.add_argument("--model", default=None, help="diffusers checkpoint (default: tiny random pipeline)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_loader.json"))
    args = parser.parse_args()
    result = run(quick=args.quick, model=args.model, device=args.device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "regimes"}, indent=2))
