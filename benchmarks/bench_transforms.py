"""Realistic-transform throughput (issue 10): ImageNet-style train transforms, FusionLoader vs DataLoader.

A map-style dataset of decoded images (seeded uint8, ``image_size`` = 256 x 320, a typical decoded
ImageNet size; 4096 of them, 16 batches per epoch, so the windows measure steady steps and not mostly epoch
starts) with a ``transform`` attribute, as a torchvision ``VisionDataset`` has: random resized crop
to 224 (scale 0.08-1, ratio 3/4-4/3, torchvision's algorithm), horizontal flip, to-tensor and ImageNet
normalisation -- written with PIL and torch here, since torchvision is not a dependency. Batch 256,
``num_workers`` DataLoader workers (>= 2) for both loaders.

FusionLoader runs at alpha = 0.5 (strength 0.5, guidance 7.5) with CPU producers and ``late_policy="reuse"``;
every synthetic image comes back at the generator's resolution and must be resized to the real image's
size, go through the same train transform and be collated -- the post-processing whose place (trainer thread
or workers) this benchmark measures. The trainer step is a simulated accelerator step (the host CPU is
free meanwhile), *calibrated in the same run*: the producers' capacity is measured first (a
``late_policy="wait"`` loader, synthetic images delivered per second), then the step is set so that demand
(alpha x batch per step) is ``demand_over_capacity`` (0.6) of it -- the producers keep up, and what is left
to compare is the loaders' own cost.

Then ``warmup_steps`` untimed FusionLoader steps (producers meet each index for the first time), and ``rounds``
rounds, each a DataLoader window and a FusionLoader window of ``timed_steps`` steps after
``burn_in`` untimed ones, both loaders warm (persistent workers, producers loaded; before each DataLoader
window the producers are let go quiet, so they take no CPU from it). ``fusion_vs_plain`` is the median over
rounds of the paired ratio of steps/s (1 / median step time); the loaders' figures are medians over rounds.
The JSON records, for the timed FusionLoader windows, ``fresh_fraction`` (fresh over *planned* synthetic
positions), ``capacity_over_demand`` (the calibrated capacity over the demand at FusionLoader's steps/s),
``made_over_demand`` (images the producers made during the windows over the demand), the producers' busy
rate over demand, ``trainer_overhead_s_per_step`` (the median wait for the next batch with FusionLoader less
DataLoader's) and the machine's load average -- so "producers keep up" is checked, not assumed.

    python -m fusionloader.benchmarks.bench_transforms [--quick] [--device cuda] [--json out/bench_transforms.json]
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fusionloader.benchmarks.common import (
    calibrated_step_s,
    environment,
    loader_bench_main,
    producers_ready,
    synthetic_capacity,
    tiny_sd_model,
)

__all__ = ["Compose", "Normalize", "RandomHorizontalFlip", "RandomResizedCrop", "Settings", "ToTensor", "run"]

ALPHA = 0.5
STRENGTH = 0.5
GUIDANCE = 7.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSES = ["cat", "dog", "bird", "car"]


# -- the train transform (PIL + torch; draws from torch's global RNG, which FusionLoader seeds per position) ----


class RandomResizedCrop:
    """torchvision's ``RandomResizedCrop``: a random area (``scale``) and aspect (``ratio``, log-uniform),
    10 tries, else a centre crop at the nearest allowed aspect; then a bilinear resize to ``size``."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.scale).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)).item())
                left = int(torch.randint(0, width - w + 1, (1,)).item())
                return left, top, left + w, top + h
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image):
        from PIL import Image

        return image.resize((self.size, self.size), Image.BILINEAR, box=self.box(*image.size))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image):
        from PIL import Image

        return image.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1).item() < self.p else image


class ToTensor:
    """PIL RGB -> float (3, H, W) in [0, 1]."""

    def __call__(self, image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


class Normalize:
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(self.mean).div_(self.std)


class Compose:
    def __init__(self, *steps):
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


def train_transform(crop: int) -> Compose:
    return Compose(RandomResizedCrop(crop), RandomHorizontalFlip(), ToTensor(), Normalize())


class DecodedImages(Dataset):
    """``n`` decoded RGB images as uint8 arrays (``distinct`` different pixel arrays, index i showing array
    ``i % distinct``: long epochs without their memory); ``__getitem__`` hands a PIL image to ``transform``
    (VisionDataset-style, so FusionLoader applies the same transform to synthetic images)."""

    classes = CLASSES

    def __init__(self, n: int, size: tuple[int, int], transform=None, distinct: int | None = None):
        rng = np.random.default_rng(0)
        h, w = size
        # Smooth colour gradients plus noise: a resize has real work to do (not a flat image).
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200
        distinct = min(n, distinct or n)
        self.arrays = [np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8) for _ in range(distinct)]
        self.n = n
        self.targets = [i % len(CLASSES) for i in range(n)]
        self.transform = transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from PIL import Image

        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} images")
        image = Image.fromarray(self.arrays[i % len(self.arrays)])
        return (self.transform(image) if self.transform is not None else image), self.targets[i]


@dataclass(frozen=True)
class Settings:
    """Sizes of one run (``QUICK`` and ``FULL`` below; the smoke test shrinks them further)."""

    # 16 batches per epoch: DataLoader and FusionLoader both restart their prefetch at every epoch, so with a
    # 2-batch epoch (512 images, an earlier setting) the windows measured mostly epoch starts, not steady steps.
    images: int = 4096
    distinct_images: int = 512  # pixel arrays held (index i shows array i % 512)
    image_size: tuple = (256, 320)  # (H, W) of the decoded real images
    crop: int = 224
    batch_size: int = 256
    num_workers: int = 2
    sampler_steps: int = 10  # at strength 0.5: 5 denoising steps per variant
    producers: int = 2
    producer_capacity: int = 16
    demand_over_capacity: float = 0.6  # the simulated step puts demand at 0.6x the measured capacity
    calibration_steps: int = 3
    burn_in: int = 2  # untimed steps at the start of every timed window (warm workers, ring refilled)
    # untimed FusionLoader steps once the producers are loaded, before the rounds: a producer encodes each index
    # the first time it sees it (its latent cache), so the first steps of a run are slower than the steady state
    warmup_steps: int = 10
    timed_steps: int = 10  # per loader and round
    rounds: int = 3  # rounds of (DataLoader window, FusionLoader window); figures are medians over rounds


QUICK = Settings(images=1024, distinct_images=256, batch_size=64, calibration_steps=4, warmup_steps=4, timed_steps=8,
                 rounds=2)
FULL = Settings()


def _window(batches, step_s: float, timed_steps: int, burn_in: int) -> dict:
    """``burn_in`` untimed then ``timed_steps`` timed steps from the endless iterator ``batches``; a step is
    waiting for the batch, then ``step_s`` of simulated accelerator time (the CPU is free meanwhile)."""
    for _ in range(burn_in):
        next(batches)
        time.sleep(step_s)
    step_times, waits, metas = [], [], []
    t0 = time.perf_counter()
    for _ in range(timed_steps):
        batch = next(batches)
        got = time.perf_counter()
        time.sleep(step_s)
        now = time.perf_counter()
        step_times.append(now - t0)
        waits.append(got - t0)
        metas.append(batch[1] if isinstance(batch[1], dict) else None)
        t0 = now
    out = {"steps_per_s": 1.0 / statistics.median(step_times), "data_wait_fraction": sum(waits) / sum(step_times),
           "median_wait_s": statistics.median(waits), "timed_steps": timed_steps, "seconds": sum(step_times)}  # fmt: skip
    if metas[0] is not None:
        synthetic = sum(int(m["synthetic"].sum()) for m in metas)
        fresh = sum(int(m["fresh"].sum()) for m in metas)
        planned = sum(int(m["planned"].sum()) for m in metas)
        samples = sum(len(m["index"]) for m in metas)
        out.update(synthetic=synthetic, fresh=fresh, planned=planned, samples=samples,
                   achieved_alpha=synthetic / samples, fresh_fraction=fresh / planned if planned else float("nan"))  # fmt: skip
    return out


def _cycle(loader):
    while True:
        yield from loader


def _made(loader) -> int:
    return int(loader.stats()["producer"].get("images", 0))


def _quiet(loader, settle_s: float = 1.0, limit_s: float = 60.0) -> None:
    """Wait until the producers have stopped making images (their look-ahead made or the ring full), so they
    take no CPU from the DataLoader window that follows."""
    t_end, last = time.monotonic() + limit_s, _made(loader)
    while time.monotonic() < t_end:
        time.sleep(settle_s)
        now = _made(loader)
        if now == last:
            return
        last = now


def _total(windows: list[dict]) -> dict:
    out = {"steps_per_s": statistics.median(w["steps_per_s"] for w in windows),
           "median_wait_s": statistics.median(w["median_wait_s"] for w in windows),
           "data_wait_fraction": statistics.median(w["data_wait_fraction"] for w in windows),
           "timed_steps": sum(w["timed_steps"] for w in windows)}  # fmt: skip
    if "synthetic" in windows[0]:
        for k in ("synthetic", "fresh", "planned", "samples"):
            out[k] = sum(w[k] for w in windows)
        out["achieved_alpha"] = out["synthetic"] / out["samples"]
        out["fresh_fraction"] = out["fresh"] / out["planned"] if out["planned"] else float("nan")
    return out


def run(quick: bool = False, model: str | None = None, device: str | None = None, settings: Settings | None = None) -> dict:
    """One run: capacity calibration, then ``rounds`` rounds of a DataLoader window and a FusionLoader
    (alpha 0.5) window at the calibrated step, both loaders warm (persistent workers, producers loaded)."""
    from fusionloader import FusionLoader

    s = settings or (QUICK if quick else FULL)
    if s.num_workers < 2:
        raise ValueError(f"num_workers must be >= 2 (the issue's setting), got {s.num_workers}")
    if s.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {s.rounds}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the trainer only waits and sleeps; workers and producers get the cores
    demand = ALPHA * s.batch_size  # synthetic images per step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = model or tiny_sd_model(os.path.join(tmp, "tiny"))
            ds = DecodedImages(s.images, tuple(s.image_size), train_transform(s.crop), s.distinct_images)

            def fusion(late_policy: str, seed: int):
                return FusionLoader(ds, batch_size=s.batch_size, shuffle=True, num_workers=s.num_workers,
                                    persistent_workers=True, synthesizer=path, alpha=ALPHA, strengths=STRENGTH,
                                    guidance_scale=GUIDANCE, num_inference_steps=s.sampler_steps,
                                    producer_devices=(device,) * s.producers, producer_capacity=s.producer_capacity,
                                    late_policy=late_policy, seed=seed, return_meta=True)  # fmt: skip

            with fusion("wait", seed=1) as loader:  # another seed than the timed run: no variant carried over
                cal = synthetic_capacity(loader, s.calibration_steps, s.burn_in)
            step_s = calibrated_step_s(cal["images_per_s"], demand, s.demand_over_capacity, cal["step_compute_s"])
            print(f"calibrated: {cal['images_per_s']:.1f} synthetic images/s -> step {step_s:.2f} s", file=sys.stderr, flush=True)
            plain_loader = DataLoader(ds, batch_size=s.batch_size, shuffle=True, num_workers=s.num_workers,
                                      persistent_workers=True, generator=torch.Generator().manual_seed(0))  # fmt: skip
            rounds = []
            with fusion("reuse", seed=0) as loader:
                fused_batches, plain_batches = _cycle(loader), _cycle(plain_loader)
                next(fused_batches)  # the first iter() starts the producers (untimed)
                t_ready = time.monotonic() + 600
                while not producers_ready(loader):
                    if time.monotonic() > t_ready:
                        raise RuntimeError("the producers did not become ready within 600 s")
                    time.sleep(0.2)
                for _ in range(s.warmup_steps):
                    next(fused_batches)
                    time.sleep(step_s)
                for _ in range(s.rounds):
                    _quiet(loader)
                    plain = _window(plain_batches, step_s, s.timed_steps, s.burn_in)
                    made0, t0 = _made(loader), time.perf_counter()
                    fused = _window(fused_batches, step_s, s.timed_steps, s.burn_in)
                    made_per_s = (_made(loader) - made0) / (time.perf_counter() - t0)
                    rounds.append({"plain": plain, "fusion": fused, "fusion_vs_plain": fused["steps_per_s"] / plain["steps_per_s"],
                                   "made_over_demand": made_per_s / (demand * fused["steps_per_s"])})  # fmt: skip
                    print(f"round {len(rounds)}: {rounds[-1]['fusion_vs_plain']:.3f}x, fresh {fused['fresh_fraction']:.2f}",
                          file=sys.stderr, flush=True)  # fmt: skip
                stats = loader.stats()
            del plain_batches, plain_loader  # its persistent workers end here
    finally:
        torch.set_num_threads(saved)
    plain, fused = _total([r["plain"] for r in rounds]), _total([r["fusion"] for r in rounds])
    busy = sum(p["busy_images_per_s"] for p in stats["producer"].get("producers", []))
    return {
        "plain_steps_per_s": plain["steps_per_s"],
        "fusion_steps_per_s": fused["steps_per_s"],
        "fusion_vs_plain": statistics.median(r["fusion_vs_plain"] for r in rounds),  # paired per round
        "fresh_fraction": fused["fresh_fraction"],  # of the planned synthetic positions in the timed windows
        "achieved_alpha": fused["achieved_alpha"],
        # the calibrated capacity (images/s a waiting trainer gets) over the demand at FusionLoader's steps/s
        "capacity_over_demand": cal["images_per_s"] / (demand * fused["steps_per_s"]),
        "made_over_demand": statistics.median(r["made_over_demand"] for r in rounds),  # made during the windows
        "busy_capacity_over_demand": busy / (demand * fused["steps_per_s"]),  # the producers' own busy rate
        # What FusionLoader adds to the trainer's wait per step, whatever the step: a slow CPU producer needs
        # a long calibrated step, beside which a fixed per-batch cost looks small in steps/s alone.
        "trainer_overhead_s_per_step": fused["median_wait_s"] - plain["median_wait_s"],
        "step_s": step_s,
        "rounds": rounds,
        "calibration": cal,
        "plain": plain,
        "fusion": fused,
        "stats_counts": {k: stats["cumulative"][k] for k in ("real", "fresh", "reused", "fallback")},
        "settings": asdict(s),
        "quick": quick,
        "producer_device": device,
        "load_average": os.getloadavg(),  # the machine's load when the run ended (a shared machine is noisy)
        "environment": environment(device),
    }


def main(argv=None) -> None:
    loader_bench_main(argv, __doc__, run, "out/bench_transforms.json",
                      ("plain", "fusion", "rounds", "environment", "settings", "calibration"))


if __name__ == "__main__":
    main()
