"""The variant store: recent synthetic variants per dataset index, in memory, bounded.

DA-Fusion keeps M variants per real image and, when the alpha coin says synthetic, uses one of the
image's *own* variants chosen uniformly. Online, the store plays that role for positions whose fresh
sample is late (``late_policy="reuse"``): it holds up to ``variants_per_index`` most recent variants of
each index (older ones drop out first) and at most ``max_bytes`` overall; beyond that the least
recently used index loses its oldest variant. Nothing is written to disk.

Images are kept as uint8 (3, R, R) — the precision a PNG of the offline method would have — so a
gigabyte holds about 1,300 variants at 512 px.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np
import torch

__all__ = ["VariantStore"]


class VariantStore:
    def __init__(self, variants_per_index: int = 10, max_bytes: int = 1 << 30):
        if variants_per_index < 0:
            raise ValueError("variants_per_index must be >= 0")
        self.variants_per_index = variants_per_index
        self.max_bytes = max_bytes
        self._by_index: OrderedDict[int, deque] = OrderedDict()  # LRU order: oldest first
        self.nbytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_index.values())

    def __contains__(self, index: int) -> bool:
        return index in self._by_index

    def count(self, index: int) -> int:
        return len(self._by_index.get(index, ()))

    def put(self, index: int, image: torch.Tensor, strength: float | None = None) -> None:
        """Keep ``image`` (float (3, R, R) in [0, 1], or uint8) as the newest variant of ``index``."""
        if self.variants_per_index == 0:
            return
        q8 = image if image.dtype == torch.uint8 else (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        q8 = q8.cpu().contiguous()
        if q8.nbytes > self.max_bytes:
            return
        variants = self._by_index.setdefault(index, deque())
        self._by_index.move_to_end(index)
        variants.append((q8, strength))
        self.nbytes += q8.nbytes
        if len(variants) > self.variants_per_index:
            self._drop(index)
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._by_index)))

    def choose(self, index: int, seed: int, allowed=None) -> tuple[torch.Tensor, float | None] | None:
        """A variant of ``index`` chosen uniformly with ``seed`` as float (3, R, R), and its strength;
        ``None`` when the store has none. ``allowed``: a set of strengths (``None`` in it = text-only)
        to choose among, so a curriculum stage never gets an earlier stage's variants; default: any."""
        variants = self._by_index.get(index)
        if variants and allowed is not None:
            variants = [v for v in variants if v[1] in allowed]
        if not variants:
            return None
        self._by_index.move_to_end(index)
        k = int(np.random.default_rng(seed & 0xFFFFFFFFFFFFFFFF).integers(len(variants)))
        q8, strength = variants[k]
        return q8.float() / 255.0, strength

    def clear(self) -> None:
        self._by_index.clear()
        self.nbytes = 0

    def _drop(self, index: int) -> None:
        variants = self._by_index[index]
        q8, _ = variants.popleft()
        self.nbytes -= q8.nbytes
        self.evicted += 1
        if not variants:
            del self._by_index[index]
