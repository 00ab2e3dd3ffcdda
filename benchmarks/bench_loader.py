"""Loader benchmark (issue 3): a small CPU classifier trained from

(a) ``plain``   -- torch DataLoader, no synthesis;
(b) ``inline``  -- the diffusers img2img pipeline called inside ``__getitem__`` (with probability alpha);
(c) ``offline`` -- DA-Fusion's way: M variants per image generated and written as PNG first, then
                   training reads real + variant images (time to first step includes the generation);
(d) ``fusion``  -- FusionLoader at alpha = 0.5 with ``producers`` producer processes on ``--device``.

Every way generates with the same settings (img2img, strength 0.5, guidance 7.5, ``sampler_steps``) on the
same device. Two regimes differ only in demand, set by the training step: a (simulated) accelerator step
during which the host CPU is free -- what a GPU trainer looks like to its data pipeline. The step is
calibrated in the same run: first the producers' capacity is *measured* (a FusionLoader under
``late_policy="wait"`` with the same producers, the trainer computing beside them, synthetic images
delivered per second), then each regime's step is set so that demand (alpha x batch per step) is a fixed
fraction of that capacity:

- ``ample``: demand 0.6x capacity (capacity 1.67x demand), so the producers keep up even when the machine
  is loaded (a fixed step turned scarce on a busy machine: capacity 0.69x demand, 42% fresh in one run);
- ``scarce``: demand 4x capacity (``late_policy="reuse"`` fills the gap).

Each regime still records demand and capacity as they were during its own timed steps, so which one it ran
in is measured, not assumed. Per way: steps/s
= 1 / median step time over the timed steps (after producers are ready and a burn-in), time to first step,
and the stall fraction (time waiting for the next batch / step time, timed steps). For (d) the fresh and
synthetic counts come from ``return_meta`` on the timed steps, and are checked against ``loader.stats()``.

    python -m fusionloader.benchmarks.bench_loader [--quick] [--device cuda] [--model PATH] [--json out/bench_loader.json]

JSON: the ample regime's figures under the names issue 4 fixed (``fusion_steps_per_s``, ``plain_steps_per_s``,
``inline_steps_per_s``, ``stall_fraction``, ``fresh_fraction``, ``achieved_alpha``, ``*_time_to_first_step_s``,
``*_disk_bytes``), every regime's beside them as ``<regime>_<name>``, the calibration under ``calibration``
and everything per way under ``regimes``.

The model is the tiny random SD-shaped pipeline the engine benchmark uses (no download), so absolute
numbers say nothing about SD-1.5; the ratios are what the issue's targets are about. CPU "producers"
stand in for spare GPUs: each takes one core's worth of threads, and the trainer the rest.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusionloader.benchmarks.common import (
    calibrated_step_s,
    environment,
    loader_bench_main,
    producers_ready,
    synthetic_capacity,
    tiny_sd_model,
)

__all__ = ["Regime", "Settings", "run"]

CLASSES = ["cat", "dog", "bird", "car"]
ALPHA = 0.5
STRENGTH = 0.5
GUIDANCE = 7.5


@dataclass(frozen=True)
class Regime:
    name: str
    demand_over_capacity: float  # sets the simulated step: demand / the capacity measured at the run's start
    timed_steps: int


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run (``QUICK`` and ``FULL`` below; tests shrink them further)."""

    images: int = 64
    batch_size: int = 16
    variants: int = 10  # DA-Fusion's M
    sampler_steps: int = 20  # at strength 0.5: 10 denoising steps per variant
    producers: int = 2
    producer_capacity: int = 16  # continuous batch per producer: 16 samples (32 UNet rows) is a CPU's best
    regimes: tuple = (Regime("ample", 0.6, 120), Regime("scarce", 4.0, 600))
    inline_steps: int = 8
    burn_in: int = 8  # steps after the producers are ready (the look-ahead and the store settle)
    width: int = 16  # classifier width
    calibration_steps: int = 40  # capacity measurement: timed steps under late_policy="wait" (after burn_in)


QUICK = Settings(images=32, regimes=(Regime("ample", 0.6, 60), Regime("scarce", 4.0, 300)), inline_steps=10,
                 calibration_steps=24)  # fmt: skip
FULL = Settings()


class Images(Dataset):
    """Seeded random uint8 images, as a decoded dataset hands them over; float in [0, 1] out."""

    classes = CLASSES

    def __init__(self, n: int, res: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g)
        self.targets = [i % len(CLASSES) for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float() / 255, self.targets[i]


def _generate(pipe, image, label, seed, steps, output_type):
    with torch.no_grad():
        return pipe(f"a photo of a {CLASSES[label]}", image=image[None].to(pipe.device), strength=STRENGTH,
                    guidance_scale=GUIDANCE, num_inference_steps=steps, output_type=output_type,
                    generator=torch.Generator().manual_seed(seed)).images[0]  # fmt: skip


class InlineSynthesis(Dataset):
    """(b): generation inside ``__getitem__`` -- the way to do it online without fusionloader."""

    def __init__(self, base: Images, pipe, steps: int):
        self.base, self.pipe, self.steps = base, pipe, steps
        self.rng = np.random.default_rng(0)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        if self.rng.random() < ALPHA:
            x = _generate(self.pipe, x, y, int(self.rng.integers(1 << 31)), self.steps, "pt").float().cpu()
        return x, y


class PNGFolder(Dataset):
    """(c): real images plus M written variants per image; a variant replaces the real with prob. alpha."""

    def __init__(self, base: Images, root: str, m: int):
        self.base, self.root, self.m = base, root, m
        self.rng = np.random.default_rng(0)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        from PIL import Image

        x, y = self.base[i]
        if self.rng.random() < ALPHA:
            png = np.array(Image.open(os.path.join(self.root, f"{i}_{int(self.rng.integers(self.m))}.png")))
            x = torch.from_numpy(png).permute(2, 0, 1).float() / 255
        return x, y


def write_variants(pipe, base: Images, root: str, m: int, steps: int) -> int:
    """DA-Fusion's offline step: M variants per image as PNG files; returns the bytes written."""
    from PIL import Image

    for i in range(len(base)):
        x, y = base[i]
        for k in range(m):
            img = _generate(pipe, x, y, i * m + k, steps, "np")
            Image.fromarray((img * 255).round().astype(np.uint8)).save(os.path.join(root, f"{i}_{k}.png"))
    return sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root))


def classifier(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * width, len(CLASSES)),
    )  # fmt: skip


def train(loader, timed_steps: int, width: int, step_s: float, burn_in: int, ready=lambda: True,
          stall_s=lambda: 0.0, t_start: float | None = None) -> dict:  # fmt: skip
    """Train until ``timed_steps`` steps ran after ``ready()`` turned true plus ``burn_in`` steps (cycling epochs).

    A step is: wait for the batch, forward/backward/SGD on the CPU, then ``step_s`` of (simulated) accelerator
    time during which the CPU is free. Batches may come as ``(batch, meta)`` (``return_meta=True``).
    ``data_wait_fraction``: time waiting for the next batch (loading, mixing, collating, stalls) over step
    time; ``stall_fraction``: the part of it spent waiting for synthetic images (``stall_s()``: a running
    total of the loader's stall seconds), over the timed steps."""
    torch.manual_seed(0)
    model = classifier(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    t_start = time.perf_counter() if t_start is None else t_start
    step_times, waits, first, timed_from, metas, stall0 = [], [], None, None, [], 0.0
    while timed_from is None or len(step_times) - timed_from < timed_steps:
        t0 = time.perf_counter()
        for batch in loader:
            got = time.perf_counter()
            (x, y), meta = batch if isinstance(batch[1], dict) else (batch, None)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            time.sleep(step_s)
            now = time.perf_counter()
            first = first if first is not None else now - t_start
            step_times.append(now - t0)
            waits.append(got - t0)
            if timed_from is None and ready():
                timed_from = len(step_times) + burn_in
            if timed_from is not None and len(step_times) == timed_from:
                stall0 = stall_s()
            if timed_from is not None and len(step_times) > timed_from:
                metas.append(meta)
                if len(step_times) - timed_from >= timed_steps:
                    break
            t0 = now
    timed, wait = step_times[timed_from:], waits[timed_from:]
    out = {"steps_per_s": 1.0 / statistics.median(timed), "time_to_first_step_s": first,
           "data_wait_fraction": sum(wait) / sum(timed), "stall_fraction": (stall_s() - stall0) / sum(timed),
           "steps": len(step_times), "timed_steps": len(timed), "untimed_steps": timed_from}  # fmt: skip
    if metas and metas[0] is not None:
        synthetic = sum(int(m["synthetic"].sum()) for m in metas)
        fresh = sum(int(m["fresh"].sum()) for m in metas)
        samples = sum(len(m["index"]) for m in metas)
        out.update(synthetic=synthetic, fresh=fresh, samples=samples, achieved_alpha=synthetic / samples,
                   fresh_fraction=fresh / synthetic if synthetic else float("nan"))  # fmt: skip
    return out


def _fusion_loader(base, s: Settings, path: str, device: str, late_policy: str, seed: int):
    from fusionloader import FusionLoader

    return FusionLoader(base, batch_size=s.batch_size, shuffle=True, synthesizer=path, alpha=ALPHA, strengths=STRENGTH,
                        guidance_scale=GUIDANCE, num_inference_steps=s.sampler_steps, producer_devices=(device,) * s.producers,
                        producer_capacity=s.producer_capacity, late_policy=late_policy, seed=seed, return_meta=True)  # fmt: skip


def calibrate(base, s: Settings, path: str, device: str) -> dict:
    """The producers' capacity, measured: synthetic images per second a ``late_policy="wait"`` loader with the
    same producers delivers while the trainer runs its CPU step (forward/backward/SGD) beside them -- so the
    load of this machine right now is in the figure. Also the median CPU part of a training step."""
    torch.manual_seed(0)
    model = classifier(s.width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(batch):
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with _fusion_loader(base, s, path, device, "wait", seed=1) as loader:  # another seed: no variant reused later
        return synthetic_capacity(loader, s.calibration_steps, s.burn_in, step)


def fusion(base, s: Settings, r: Regime, path: str, device: str, step_s: float) -> dict:
    t0 = time.perf_counter()
    with _fusion_loader(base, s, path, device, "reuse", seed=0) as loader:
        out = train(loader, r.timed_steps, s.width, step_s, s.burn_in, ready=lambda: producers_ready(loader),
                    stall_s=lambda: loader.stats()["cumulative"]["stall_s"], t_start=t0)  # fmt: skip
        stats = loader.stats()
    c, p = stats["cumulative"], stats["producer"]
    out.update(
        disk_bytes=0,  # nothing synthetic is written: the store and the ring live in memory
        capacity_images_per_s=sum(q["busy_images_per_s"] for q in p["producers"]),
        demand_images_per_s=ALPHA * s.batch_size * out["steps_per_s"],
        stats_counts={k: c[k] for k in ("real", "fresh", "reused", "fallback")},
        stats_fresh_fraction=c["fresh_fraction"],
    )
    return out


def regime(r: Regime, s: Settings, base, pipe, path: str, device: str, offline: dict, threads: dict, cal: dict) -> dict:
    out: dict = asdict(r)
    step_s = calibrated_step_s(cal["images_per_s"], ALPHA * s.batch_size, r.demand_over_capacity, cal["step_compute_s"])
    out["step_s"] = step_s  # the simulated accelerator time per step this regime ran with
    torch.set_num_threads(threads["trainer"])
    out["plain"] = train(DataLoader(base, batch_size=s.batch_size, shuffle=True), r.timed_steps, s.width, step_s, s.burn_in)
    # Inline generation has the machine to itself: all cores (the producers' and the trainer's) are its own.
    torch.set_num_threads(threads["generation"])
    inline = DataLoader(InlineSynthesis(base, pipe, s.sampler_steps), batch_size=s.batch_size, shuffle=True)
    out["inline"] = train(inline, s.inline_steps, s.width, step_s, burn_in=1)
    torch.set_num_threads(threads["trainer"])
    # The variants on disk are the same for both regimes (same generation settings): generated once, and
    # each regime's time to first step is that generation time plus its own time to the first step.
    png = DataLoader(PNGFolder(base, offline["root"], s.variants), batch_size=s.batch_size, shuffle=True)
    out["offline"] = train(png, r.timed_steps, s.width, step_s, s.burn_in)
    out["offline"]["time_to_first_step_s"] += offline["generation_s"]
    out["offline"].update(generation_s=offline["generation_s"], disk_bytes=offline["disk_bytes"])
    out["fusion"] = fusion(base, s, r, path, device, step_s)
    return out


def run(quick: bool = False, model: str | None = None, device: str | None = None, settings: Settings | None = None) -> dict:
    """Both regimes from one run; top-level keys summarise them for ``run_all``'s targets.

    ``model``: a diffusers img2img checkpoint (default: the tiny random SD-shaped pipeline, 64 px); ``device``:
    the producers' device, also where (b) and (c) generate (default: CUDA when available, else CPU)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    s = settings or (QUICK if quick else FULL)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cores = os.cpu_count() or 2
    cpu = torch.device(device).type == "cpu"
    # CPU producers take one core's worth of threads each (ProducerPool's default split); the trainer the rest.
    threads = {"trainer": max(1, cores // (s.producers + 1)) if cpu else cores, "generation": cores}
    saved = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = model or tiny_sd_model(os.path.join(tmp, "tiny"))
            pipe = StableDiffusionImg2ImgPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
            pipe = pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            res = pipe.unet.config.sample_size * pipe.vae_scale_factor
            base = Images(s.images, res)
            root = os.path.join(tmp, "variants")
            os.makedirs(root)
            torch.set_num_threads(threads["generation"])
            t0 = time.perf_counter()
            disk_bytes = write_variants(pipe, base, root, s.variants, s.sampler_steps)
            offline = {"root": root, "generation_s": time.perf_counter() - t0, "disk_bytes": disk_bytes}
            torch.set_num_threads(threads["trainer"])
            cal = calibrate(base, s, path, device)  # the producers' capacity, measured before any regime runs
            regimes = {r.name: regime(r, s, base, pipe, path, device, offline, threads, cal) for r in s.regimes}
    finally:
        torch.set_num_threads(saved)
    required = _summary(regimes["ample"]) if "ample" in regimes else {}
    return {
        # issue 4's keys (loader.fusion_steps_per_s, ...) hold the ample regime; every regime's sit beside them
        **required,
        **{f"{name}_{k}": v for name in regimes for k, v in _summary(regimes[name]).items()},
        "calibration": cal,
        "settings": asdict(s),
        "quick": quick,
        "producer_device": device,
        "threads": threads,
        "resolution": res,
        "environment": environment(device),
        "regimes": regimes,
    }


def _summary(r: dict) -> dict:
    p, i, o, f = r["plain"], r["inline"], r["offline"], r["fusion"]
    return {
        "plain_steps_per_s": p["steps_per_s"],
        "inline_steps_per_s": i["steps_per_s"],
        "fusion_steps_per_s": f["steps_per_s"],
        "fusion_vs_plain": f["steps_per_s"] / p["steps_per_s"],
        "fusion_vs_inline": f["steps_per_s"] / i["steps_per_s"],
        "stall_fraction": f["stall_fraction"],
        "data_wait_fraction": f["data_wait_fraction"],
        "plain_data_wait_fraction": p["data_wait_fraction"],
        "fresh_fraction": f["fresh_fraction"],
        "achieved_alpha": f["achieved_alpha"],
        "capacity_over_demand": f["capacity_images_per_s"] / f["demand_images_per_s"],
        "offline_time_to_first_step_s": o["time_to_first_step_s"],
        "fusion_time_to_first_step_s": f["time_to_first_step_s"],
        "first_step_vs_offline": f["time_to_first_step_s"] / o["time_to_first_step_s"],
        "offline_disk_bytes": o["disk_bytes"],
        "fusion_disk_bytes": f["disk_bytes"],
    }


def main(argv=None) -> None:
    loader_bench_main(argv, __doc__, run, "out/bench_loader.json", ("regimes", "environment", "settings"))


if __name__ == "__main__":
    main()
