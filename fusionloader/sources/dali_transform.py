"""The train transform run inside a DALI pipeline: random resized crop, horizontal flip, normalise.

A :class:`DaliTrainTransform` is a *spec*: its random parameters are drawn on the host, per position, from the
position's sample seed (NOTE [Plan draws] in plan.py, word 2) by :meth:`DaliTrainTransform.draw`, and enter
the pipeline as per-sample argument inputs; :meth:`DaliTrainTransform.apply` builds the DALI operators that
use them. So a position's crop and flip are a function of ``(seed, epoch, rank, position)`` alone -- the
same for a real and a synthetic image, whatever the batch, the shard or the pipeline's own seed -- which is
what makes a run reproducible and a synthetic position comparable with the real one it replaces. DALI's own
random operators (``fn.random_resized_crop``) draw from the pipeline's RNG in execution order, so they
could not give that.

The crop follows torchvision's ``RandomResizedCrop`` draw (area fraction uniform in ``scale``, log aspect
ratio uniform in ``log(ratio)``, the box placed uniformly), except that a box larger than the image is
clamped to it instead of redrawn up to 10 times (a pipeline graph cannot loop); with the default
``scale``/``ratio`` this matters only for the rare draws torchvision would redraw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["DaliTrainTransform", "crop_box"]

# draw(): per sample, float32 [area fraction, log aspect ratio, x placement, y placement] and an int32 mirror flag
N_CROP_PARAMS = 4


def _pair(name: str, value, positive: bool = True) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers, got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)) or a > b or (positive and a <= 0):
        raise ValueError(f"{name} must be finite (lo, hi) with {'0 < ' if positive else ''}lo <= hi, got {value!r}")
    return a, b


@dataclass(frozen=True)
class DaliTrainTransform:
    """Random resized crop to ``size`` (h, w), horizontal flip with probability ``flip``, then
    ``(x / 255 - mean) / std`` per channel, CHW float32 out (torchvision's ``ToTensor`` + ``Normalize``)."""

    size: tuple[int, int] | int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    std: Sequence[float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        size = (self.size, self.size) if isinstance(self.size, int) and not isinstance(self.size, bool) else self.size
        try:
            size = tuple(int(s) for s in size)
        except (TypeError, ValueError):
            raise TypeError(f"size must be an int or a pair of ints (h, w), got {self.size!r}") from None
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be positive (h, w), got {self.size!r}")
        object.__setattr__(self, "size", size)
        lo, hi = _pair("scale", self.scale)
        if hi > 1:
            raise ValueError(f"scale must lie in (0, 1], got {self.scale!r}")
        object.__setattr__(self, "scale", (lo, hi))
        object.__setattr__(self, "ratio", _pair("ratio", self.ratio))
        if not 0.0 <= float(self.flip) <= 1.0:
            raise ValueError(f"flip must be a probability in [0, 1], got {self.flip!r}")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")

    # -- host side: the per-position draws --------------------------------------------------------

    def draw(self, seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(crop (n, 4) float32, mirror (n,) int32)`` for the positions' sample seeds."""
        lo, hi = self.scale
        rlo, rhi = math.log(self.ratio[0]), math.log(self.ratio[1])
        crop = np.empty((len(seeds), N_CROP_PARAMS), dtype=np.float32)
        mirror = np.empty(len(seeds), dtype=np.int32)
        for k, seed in enumerate(seeds):
            # a stream of its own per position, apart from the producer's noise (which uses the seed itself)
            u = np.random.Generator(np.random.Philox(key=[int(seed) & 0xFFFFFFFFFFFFFFFF, 0xDA11])).random(5)
            crop[k] = (lo + (hi - lo) * u[0], rlo + (rhi - rlo) * u[1], u[2], u[3])
            mirror[k] = u[4] < self.flip
        return crop, mirror

    # -- pipeline side ----------------------------------------------------------------------------

    def apply(self, image, height, width, crop, mirror):
        """DALI operators: ``image`` (HWC uint8, ``height`` x ``width``, data nodes of floats) cropped by the
        drawn ``crop`` box, resized, flipped by ``mirror`` and normalised; runs where ``image`` lives."""
        from nvidia.dali import fn, types
        import nvidia.dali.math as dmath

        area = crop[0] * height * width
        ratio = dmath.exp(crop[1])
        w = dmath.min(dmath.sqrt(area * ratio), width)
        h = dmath.min(dmath.sqrt(area / ratio), height)
        x0 = crop[2] * (width - w)
        y0 = crop[3] * (height - h)
        resized = fn.resize(image, size=list(self.size), roi_start=fn.stack(y0, x0), roi_end=fn.stack(y0 + h, x0 + w),
                            roi_relative=False, antialias=True, dtype=types.UINT8)  # fmt: skip
        return fn.crop_mirror_normalize(resized, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255.0 * m for m in self.mean], std=[255.0 * s for s in self.std])  # fmt: skip


def crop_box(height: int, width: int, crop) -> tuple[float, float, float, float]:
    """``(y0, x0, y1, x1)`` in pixels of one drawn ``crop`` on a ``height`` x ``width`` image: what
    :meth:`DaliTrainTransform.apply` computes in the graph, on the host (references, tests)."""
    c = np.asarray(crop, dtype=np.float32)
    area = c[0] * np.float32(height) * np.float32(width)
    ratio = np.exp(c[1])
    w = min(float(np.sqrt(area * ratio)), float(width))
    h = min(float(np.sqrt(area / ratio)), float(height))
    x0 = float(c[2]) * (width - w)
    y0 = float(c[3]) * (height - h)
    return y0, x0, y0 + h, x0 + w
