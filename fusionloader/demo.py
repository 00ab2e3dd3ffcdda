"""``fusionloader demo``: train a small classifier with and without FusionLoader and show what happened.

By default everything is embedded: the digits data (scikit-learn) and the diffusion model trained on a
disjoint split of it (``fusionloader.pretrained``), so it runs on a CPU with no network in a few minutes.
``--model`` / ``--images`` / ``--devices`` point the same run at a real Stable Diffusion checkpoint, an
ImageFolder-style directory and producer GPUs.

The two runs share everything (classifier, optimiser, seed, epochs, train transform); the only difference is
the loader: ``torch.utils.data.DataLoader`` for the baseline, ``FusionLoader`` (alpha, strengths, prompts)
for the other. Few-shot by default (``--per-class 10``), DA-Fusion's home ground.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DemoConfig", "RandomAffine", "SmallCNN", "run_demo"]


@dataclass
class DemoConfig:
    model: str | None = None  # diffusers folder or hub id; default: the embedded digits model
    images: str | None = None  # ImageFolder root (root/<class>/<image>); default: the embedded digits
    out: str = "fusionloader-demo"  # where the PNGs and summary.json go
    devices: tuple[str, ...] = ("cpu",)  # producer devices
    train_device: str = "cpu"
    epochs: int = 30
    per_class: int = 10  # few-shot training images per class (DA-Fusion evaluates k in 1..16)
    batch_size: int = 32
    alpha: float = 0.5  # DA-Fusion's default
    strengths: object = "randomized"  # DA-Fusion's randomized intensity {0.25, 0.5, 0.75, 1.0}
    guidance_scale: float = 3.0  # the embedded model is small; 7.5 is SD's default (--guidance)
    steps: int = 10  # scheduler steps (strength s runs int(s * steps) of them)
    prompt: str | None = None  # template with {} for the class name; default: the model's own
    # "wait": every synthetic position gets its own fresh variant. A CPU producer is slower than this
    # small trainer, so the demo shows the stall that costs; "reuse" trades freshness for no stall.
    late_policy: str = "wait"
    image_size: int = 32  # classifier input size for --images
    seed: int = 0
    lr: float = 1e-3
    progress: bool = True
    extra: dict = field(default_factory=dict)


class RandomAffine:
    """Random rotation (+-degrees) and translation (+-translate px) of a float (3, H, W) tensor.

    DA-Fusion's classifier protocol uses flips and 15-degree rotations; digits must not be flipped.
    Draws from torch's global RNG, which FusionLoader seeds per synthetic position (reproducible).
    """

    def __init__(self, degrees: float = 15.0, translate: float = 2.0):
        self.degrees, self.translate = degrees, translate

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        angle = math.radians((torch.rand(()).item() * 2 - 1) * self.degrees)
        tx, ty = ((torch.rand(2) * 2 - 1) * self.translate * 2 / torch.tensor([w, h])).tolist()
        theta = torch.tensor([[math.cos(angle), -math.sin(angle), tx], [math.sin(angle), math.cos(angle), ty]])
        grid = F.affine_grid(theta[None], (1, *x.shape), align_corners=False)
        return F.grid_sample(x[None].float(), grid, align_corners=False, padding_mode="zeros")[0]


class _ToTensor:
    """PIL -> float (3, size, size) in [0, 1]."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image) -> torch.Tensor:
        import numpy as np

        image = image.convert("RGB").resize((self.size, self.size))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class _Compose:
    def __init__(self, *fns):
        self.fns = fns

    def __call__(self, x):
        for fn in self.fns:
            x = fn(x)
        return x


class TensorImages(torch.utils.data.Dataset):
    """``(image, label)`` pairs from a float (N, 3, H, W) tensor; raw images, the loader applies the transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes):
        self.images, self.labels, self.classes = images, labels, list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head on a 4x4 grid of features (any input size ≥ 16 px).

    The head keeps a coarse spatial layout (adaptive pooling to 4x4, not global pooling): where the
    strokes are is what tells digits apart.
    """

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )  # fmt: skip
        self.head = nn.Linear(2 * w * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _few_shot(labels: torch.Tensor, per_class: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        keep += idx[torch.randperm(len(idx), generator=g)[:per_class]].tolist()
    return sorted(keep)


def _datasets(cfg: DemoConfig):
    """(train dataset, test images, test labels, classes, prompt template, default model path, loader transform)."""
    affine = RandomAffine()
    if cfg.images is None:
        from fusionloader.pretrained import PROMPT_TEMPLATE, class_names, default_model_path, load_digits_splits

        splits = load_digits_splits()
        keep = _few_shot(splits.train.labels, cfg.per_class, cfg.seed)
        train = TensorImages(splits.train.images[keep], splits.train.labels[keep], class_names)
        return train, splits.test.images, splits.test.labels, class_names, PROMPT_TEMPLATE, default_model_path(), affine
    from fusionloader.sources.folder import ImageFolder

    folder = ImageFolder(cfg.images)
    labels = torch.tensor(folder.targets)
    keep = set(_few_shot(labels, cfg.per_class, cfg.seed))
    # The test split: every image not used for training, at most 50 per class.
    test_keep, per_class = [], {}
    for i, label in enumerate(folder.targets):
        if i not in keep and per_class.get(label, 0) < 50:
            test_keep.append(i)
            per_class[label] = per_class.get(label, 0) + 1
    train = copy.copy(folder)
    train.samples = [folder.samples[i] for i in sorted(keep)]
    train.targets = [label for _, label in train.samples]
    train.transform = _Compose(_ToTensor(cfg.image_size), affine)  # ImageFolder-style: its own transform
    to_tensor = _ToTensor(cfg.image_size)
    test_x = torch.stack([to_tensor(folder.loader(folder.samples[i][0])) for i in test_keep])
    test_y = torch.tensor([folder.targets[i] for i in test_keep])
    names = [c.replace("_", " ") for c in folder.classes]
    return train, test_x, test_y, names, "a photo of a {}", None, None


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), 256):
        correct += (model(x[i : i + 256].to(device)).argmax(1).cpu() == y[i : i + 256]).sum().item()
    model.train()
    return correct / len(y)


def _train(loader, num_classes: int, test_x, test_y, cfg: DemoConfig, name: str, on_batch=None) -> dict:
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.train_device)
    model = SmallCNN(num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    accuracy, samples, first_step = [], 0, None
    start = time.perf_counter()
    bar = tqdm(total=cfg.epochs * len(loader), desc=name, disable=not cfg.progress, dynamic_ncols=True)
    for _ in range(cfg.epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            first_step = first_step or time.perf_counter() - start
            samples += len(y)
            bar.update(1)
            bar.set_postfix(on_batch() if on_batch else {"loss": f"{loss.item():.3f}"}, refresh=False)
        accuracy.append(_accuracy(model, test_x, test_y, device))
    bar.close()
    wall = time.perf_counter() - start
    return {"accuracy": accuracy, "final_accuracy": accuracy[-1], "best_accuracy": max(accuracy),
            "wall_s": wall, "images_per_s": samples / wall, "time_to_first_step_s": first_step}  # fmt: skip


def _preview(synth, test_x, test_y, classes, template: str, cfg: DemoConfig, path: str) -> str:
    from fusionloader.plots import image_grid

    picks = []  # one test image per class (up to 10 classes)
    for c in range(min(len(classes), 10)):
        idx = (test_y == c).nonzero().flatten()
        if len(idx):
            picks.append(int(idx[0]))
    res = synth.resolution
    real = F.interpolate(test_x[picks].float(), size=res, mode="bilinear", align_corners=False).clamp(0, 1)
    prompts = [template.format(classes[int(test_y[i])]) for i in picks]
    strengths = (0.25, 0.5, 0.75, 1.0)
    columns = [real]
    for k, s in enumerate(strengths):
        seeds = [cfg.seed * 1000 + 10 * k + i for i in range(len(picks))]
        columns.append(synth.augment(real, prompts, strengths=s, guidance_scale=cfg.guidance_scale,
                                     num_inference_steps=cfg.steps, seeds=seeds))  # fmt: skip
    columns.append(synth.generate(prompts, guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.steps,
                                  seeds=[cfg.seed * 1000 + 99 + i for i in range(len(picks))]))  # fmt: skip
    rows = [[col[r] for col in columns] for r in range(len(picks))]
    labels = ["real"] + [f"s={s}" for s in strengths] + ["text only"]
    return image_grid(rows, path, labels=labels)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; write ``preview.png``, ``stats.png`` and ``summary.json`` under ``cfg.out``."""
    from fusionloader import FusionLoader, Synthesizer
    from fusionloader.extras import require
    from fusionloader.plots import save_loader_plot

    # Before any work: the plots need matplotlib, the embedded digits scikit-learn (the [demo] extra).
    require("matplotlib", "fusionloader demo", "demo")
    if cfg.images is None:
        require("sklearn.datasets", "fusionloader demo", "demo")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    cpu_producers = sum(1 for d in cfg.devices if torch.device(d).type == "cpu")
    if cpu_producers and torch.device(cfg.train_device).type == "cpu":
        # Share the cores with the CPU producers (each takes its share, see ProducerPool(threads=)):
        # oversubscribed intra-op threads slow both sides down several times.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - cpu_producers))
    train, test_x, test_y, classes, template, default_model, transform = _datasets(cfg)
    model = cfg.model or default_model
    if model is None:
        raise ValueError("--images needs --model (a Stable Diffusion checkpoint folder or hub id)")
    template = cfg.prompt or template
    started = time.perf_counter()

    g = torch.Generator().manual_seed(cfg.seed)
    base_ds = train if transform is None else _Transformed(train, transform)
    baseline_loader = torch.utils.data.DataLoader(base_ds, batch_size=cfg.batch_size, shuffle=True, generator=g)
    baseline = _train(baseline_loader, len(classes), test_x, test_y, cfg, "real only")

    loader = FusionLoader(
        train, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed),
        synthesizer=model, alpha=cfg.alpha, strengths=cfg.strengths, prompts=template, transform=transform,
        producer_devices=cfg.devices, late_policy=cfg.late_policy, guidance_scale=cfg.guidance_scale,
        num_inference_steps=cfg.steps, seed=cfg.seed,
    )  # fmt: skip

    def postfix():
        s = loader.stats()
        cur, prod = s["current"], s.get("producer", {})
        post = {"alpha": f"{cur['achieved_alpha']:.2f}", "fresh": f"{cur['fresh_fraction']:.2f}",
                "stall": f"{100 * cur['stall_fraction']:.1f}%"}  # fmt: skip
        if "images_per_s" in prod:
            post["gen/s"] = f"{prod['images_per_s']:.1f}"
        return post

    with loader:
        fusion = _train(loader, len(classes), test_x, test_y, cfg, f"FusionLoader a={cfg.alpha}", postfix)
        stats = loader.stats()
    cumulative = stats["cumulative"]

    synth = Synthesizer.from_pretrained(model, device=cfg.devices[0] if cfg.devices else "cpu")
    preview = _preview(synth, test_x, test_y, classes, template, cfg, os.path.join(cfg.out, "preview.png"))
    plot = save_loader_plot(stats["per_epoch"], {"real only": baseline["accuracy"], "FusionLoader": fusion["accuracy"]},
                            os.path.join(cfg.out, "stats.png"))  # fmt: skip
    summary = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"} | {"model": model},
        "train_images": len(train),
        "test_images": len(test_y),
        "accuracy_real_only": baseline["final_accuracy"],
        "accuracy_fusion": fusion["final_accuracy"],
        "best_accuracy_real_only": baseline["best_accuracy"],
        "best_accuracy_fusion": fusion["best_accuracy"],
        "achieved_alpha": cumulative["achieved_alpha"],
        "fresh_fraction": cumulative["fresh_fraction"],
        "stall_fraction": cumulative["stall_s"] / fusion["wall_s"],
        "images_per_s_real_only": baseline["images_per_s"],
        "images_per_s_fusion": fusion["images_per_s"],
        "producer": stats.get("producer", {}),
        "counts": {k: cumulative[k] for k in ("real", "fresh", "reused", "fallback")},
        "wall_s": time.perf_counter() - started,
        "files": {"preview": preview, "stats_plot": plot},
    }
    with open(os.path.join(cfg.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary


class _Transformed(torch.utils.data.Dataset):
    """The baseline's view of a raw-image dataset: the same train transform, applied in ``__getitem__``."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return self.transform(image), label


def format_summary(summary: dict) -> str:
    """The end-of-demo report, a few lines for a terminal."""
    c = summary["counts"]
    lines = [
        f"test accuracy   real only {100 * summary['accuracy_real_only']:.1f}%   "
        f"with FusionLoader {100 * summary['accuracy_fusion']:.1f}%   "
        f"(best epoch {100 * summary['best_accuracy_real_only']:.1f}% / {100 * summary['best_accuracy_fusion']:.1f}%)",
        f"delivered       real {c['real']}  fresh {c['fresh']}  reused {c['reused']}  fallback {c['fallback']}   "
        f"achieved alpha {summary['achieved_alpha']:.3f}  fresh fraction {summary['fresh_fraction']:.3f}",
        f"speed           {summary['images_per_s_fusion']:.0f} images/s with FusionLoader "
        f"({summary['images_per_s_real_only']:.0f} real only), stall {100 * summary['stall_fraction']:.1f}% of training time",
        f"files           {summary['files']['preview']}  {summary['files']['stats_plot']}",
        f"total           {summary['wall_s']:.0f} s",
    ]
    return "\n".join(lines)
