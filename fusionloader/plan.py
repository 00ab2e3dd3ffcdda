"""The epoch plan: which index comes at which position, which positions are synthetic, and how each
synthetic sample is made. Pure functions of (seed, epoch, rank, world size) — nothing here touches a
global RNG — so a run can be resumed from ``(epoch, batches consumed)`` alone.

Order. For the default samplers the order is reproduced exactly:

- :func:`sequential_order` — ``SequentialSampler``;
- :func:`random_order` — ``RandomSampler(generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))``;
- :func:`distributed_order` — ``DistributedSampler(num_replicas, rank, shuffle, seed, drop_last)``
  after ``set_epoch(epoch)`` (same padding and truncation rules).

A user sampler's order is recorded by iterating it (the loader does that, then calls :func:`plan_epoch`).

Coins, strengths, prompt choices and per-sample seeds are drawn from one Philox stream keyed by
``(seed, epoch, rank, world_size)``: one alpha coin per position (DA-Fusion's per-draw replacement with
probability alpha), a strength per synthetic position (fixed, or DA-Fusion's randomized intensity:
uniform over ``RANDOMIZED_INTENSITY``), and a 63-bit sample seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "RANDOMIZED_INTENSITY",
    "TEXT_ONLY",
    "EpochPlan",
    "batch_order",
    "distributed_order",
    "mix_seed",
    "normalize_strengths",
    "plan_epoch",
    "random_order",
    "sequential_order",
]

#: DA-Fusion's randomized intensity: t0 drawn uniformly from {0.25, 0.5, 0.75, 1.0} (k = 4).
RANDOMIZED_INTENSITY = (0.25, 0.5, 0.75, 1.0)
#: strength value recorded for text-only (txt2img) positions; real positions record NaN.
TEXT_ONLY = -1.0


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (order-sensitive, well mixed)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def sequential_order(n: int) -> list[int]:
    return list(range(n))


def random_order(n: int, seed: int, epoch: int) -> list[int]:
    """What ``RandomSampler(generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))`` yields."""
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, epoch))
    return torch.randperm(n, generator=g).tolist()


def distributed_order(n: int, rank: int, world_size: int, shuffle: bool, seed: int, epoch: int,
                      drop_last: bool) -> list[int]:
    """What ``DistributedSampler`` yields on ``rank`` after ``set_epoch(epoch)`` (torch's rules)."""
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        indices = torch.randperm(n, generator=g).tolist()
    else:
        indices = list(range(n))
    if drop_last and n % world_size != 0:
        num_samples = math.ceil((n - world_size) / world_size)
    else:
        num_samples = math.ceil(n / world_size)
    total = num_samples * world_size
    if not drop_last:
        padding = total - len(indices)
        if padding <= len(indices):
            indices += indices[:padding]
        else:
            indices += (indices * math.ceil(padding / len(indices)))[:padding]
    else:
        indices = indices[:total]
    return indices[rank:total:world_size]


def batch_order(order: Sequence[int], batch_size: int | None, drop_last: bool) -> list[list[int]]:
    """``BatchSampler`` rules; ``batch_size=None`` (no auto-batching) gives one index per "batch"."""
    if batch_size is None:
        return [[i] for i in order]
    batches = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def normalize_strengths(strengths) -> tuple[float, ...] | None:
    """``0.5`` -> (0.5,); ``"randomized"`` -> RANDOMIZED_INTENSITY; a sequence -> uniform over it;
    ``None`` -> text-only generation (no source image)."""
    if strengths is None:
        return None
    if isinstance(strengths, str):
        if strengths in ("randomized", "random", "da-fusion"):
            return RANDOMIZED_INTENSITY
        raise ValueError(f"unknown strengths {strengths!r}; use a float, a sequence, 'randomized' or None")
    if isinstance(strengths, (int, float)):
        strengths = (float(strengths),)
    out = tuple(float(s) for s in strengths)
    if not out or any(not 0.0 < s <= 1.0 for s in out):
        raise ValueError(f"strengths must lie in (0, 1], got {out}")
    return out


@dataclass(frozen=True)
class EpochPlan:
    """One epoch on one rank. Positions count samples in consumption order, across batches."""

    seed: int
    epoch: int
    rank: int
    world_size: int
    batches: tuple[tuple[int, ...], ...]
    indices: np.ndarray  # (N,) int64
    synthetic: np.ndarray  # (N,) bool — the alpha coins
    strength: np.ndarray  # (N,) float32: NaN for real positions, TEXT_ONLY for text-only ones
    sample_seed: np.ndarray  # (N,) int64
    prompt_draw: np.ndarray  # (N,) float64 in [0, 1): picks among several prompts/templates

    @property
    def num_positions(self) -> int:
        return int(self.indices.shape[0])

    @property
    def batch_starts(self) -> np.ndarray:
        """Position of the first sample of every batch (plus the end)."""
        return np.concatenate([[0], np.cumsum([len(b) for b in self.batches])]).astype(np.int64)

    def job_strength(self, position: int) -> float | None:
        s = float(self.strength[position])
        return None if s == TEXT_ONLY else s


def plan_epoch(
    batches: Sequence[Sequence[int]],
    *,
    seed: int,
    epoch: int,
    alpha: float,
    strengths=0.5,
    rank: int = 0,
    world_size: int = 1,
) -> EpochPlan:
    """Coins, strengths and seeds for an epoch whose batches of indices are ``batches``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    choices = normalize_strengths(strengths)
    batches = tuple(tuple(int(i) for i in b) for b in batches)
    indices = np.fromiter((i for b in batches for i in b), dtype=np.int64)
    n = indices.shape[0]
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, rank, world_size])))
    coins = rng.random(n) < alpha
    pick = rng.integers(0, len(choices) if choices else 1, size=n)
    sample_seed = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
    prompt_draw = rng.random(n)
    if choices is None:
        strength = np.full(n, TEXT_ONLY, dtype=np.float32)
    else:
        strength = np.asarray(choices, dtype=np.float32)[pick]
    strength = np.where(coins, strength, np.float32(np.nan)).astype(np.float32)
    return EpochPlan(seed, epoch, rank, world_size, batches, indices, coins, strength, sample_seed, prompt_draw)
