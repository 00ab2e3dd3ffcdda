"""The two classifier protocols, trained in lockstep on the same batches, and mean per-class accuracy.

* ``linear`` (DA-Fusion's): a frozen backbone and a trained linear head. On the embedded default the backbone
  is :class:`~fusionloader.demo.SmallCNN`'s feature extractor trained on the digits *generator* split (the
  analogue of an ImageNet-pretrained ResNet-50: pretrained on the generator's data, never on the few-shot
  classes' training or test images); elsewhere a user-given module (``--backbone``).
* ``full``: a :class:`~fusionloader.demo.SmallCNN` trained from scratch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Backbone", "Lockstep", "PROTOCOLS", "affine", "load_backbone", "mean_per_class_accuracy", "train_digits_backbone"]

PROTOCOLS = ("linear", "full")


def affine(x: torch.Tensor, g: torch.Generator, degrees: float = 15.0, translate: float = 2.0) -> torch.Tensor:
    """DA-Fusion's standard augmentation for digits: a random rotation (+-15 deg) and shift (+-2 px, a small
    random crop) per image, drawn from ``g`` (no flips: a flipped digit is another symbol)."""
    n, _, h, w = x.shape
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(degrees)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * translate * 2 / torch.tensor([w, h], dtype=torch.float32)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, tuple(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, align_corners=False, padding_mode="zeros")


class Backbone(nn.Module):
    """A frozen feature extractor: images (N, 3, H, W) in [0, 1] -> (N, D) features."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).flatten(1)

    def train(self, mode: bool = True):  # stays in eval mode (frozen batch-norm statistics)
        return super().train(False)


def train_digits_backbone(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 15, seed: int = 0,
                          width: int = 16) -> Backbone:
    """SmallCNN trained on (x, y) (the generator split) with the standard augmentation; its features frozen."""
    from fusionloader.demo import SmallCNN

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SmallCNN(num_classes, width)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = order[i : i + 64]
            loss = F.cross_entropy(model(affine(x[b], g)), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return Backbone(nn.Sequential(model.features, nn.Flatten()))


def load_backbone(path: str) -> Backbone:
    """A user's backbone: a TorchScript file or a whole pickled ``nn.Module`` taking [0, 1] images."""
    try:
        module = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError):
        module = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(module, nn.Module):
        raise TypeError(f"--backbone {path!r}: expected a TorchScript file or a pickled nn.Module, got {type(module).__name__}")
    return Backbone(module)


@torch.no_grad()
def mean_per_class_accuracy(logits_fn, x: torch.Tensor, y: torch.Tensor, num_classes: int, device) -> float:
    """Accuracy per class, averaged over the classes present in ``y`` (DA-Fusion's metric)."""
    pred = torch.cat([logits_fn(x[i : i + 512].to(device)).argmax(1).cpu() for i in range(0, len(y), 512)])
    accs = [(pred[y == c] == c).float().mean().item() for c in range(num_classes) if (y == c).any()]
    return float(sum(accs) / len(accs))


class Lockstep:
    """Both protocols' models and optimisers; ``step(x, y)`` trains each on the same batch."""

    def __init__(self, backbone: Backbone | None, num_classes: int, image_size: int, lr: float, device, width: int = 16):
        from fusionloader.demo import SmallCNN

        self.device, self.num_classes = device, num_classes
        self.models: dict[str, nn.Module] = {}
        self.backbone = backbone.to(device) if backbone is not None else None
        if backbone is not None:
            with torch.no_grad():
                dim = backbone(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1]
            self.models["linear"] = nn.Linear(dim, num_classes).to(device)
        self.models["full"] = SmallCNN(num_classes, width).to(device)
        self.opts = {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in self.models.items()}

    def logits(self, name: str, x: torch.Tensor) -> torch.Tensor:
        model = self.models[name]
        return model(self.backbone(x)) if name == "linear" else model(x)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(self.device), y.to(self.device)
        feats = self.backbone(x) if self.backbone is not None else None
        for name, model in self.models.items():
            model.train()
            out = model(feats) if name == "linear" else model(x)
            loss = F.cross_entropy(out, y)
            self.opts[name].zero_grad(set_to_none=True)
            loss.backward()
            self.opts[name].step()

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        out = {}
        for name, model in self.models.items():
            model.eval()
            out[name] = mean_per_class_accuracy(lambda b, n=name: self.logits(n, b), x, y, self.num_classes, self.device)
        return out
