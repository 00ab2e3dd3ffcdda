"""The epoch plan: an epoch order (order.py) plus, for every position, how it is served -- drawn lazily.

NOTE [Plan draws]
~~~~~~~~~~~~~~~~~

Position ``p`` of epoch ``e`` on ``rank`` of ``world_size`` gets four 64-bit words from a counter-based
generator: Philox-4x64 keyed by ``mix_seed(seed, e, rank, world_size)`` at counter ``p`` (``advance(p)``):

* word 0 -> the synthetic coin's uniform ``u``, turned into the coin by the epoch's mixing policy (NOTE [Mixing
  policies] in policies.py): ``Replace`` (default, DA-Fusion's per-draw replacement) is synthetic iff
  ``u < alpha``; ``HardWeighted`` compares ``u`` with a per-index probability; ``Concat`` ignores ``u`` (its
  coins are the doubled order's generated copies);
* word 1 -> the strength, uniform over the choices (fixed, a sequence, or ``RANDOMIZED_INTENSITY``);
* word 2 -> the 63-bit sample seed (noise, transform RNG, the choice among stored variants; its top bit also
  picks retrieval or synthesis when a loader has both, ``policies.retrieval_positions``);
* word 3 -> the prompt draw in [0, 1) (picks among several prompts/templates).

So any span of positions is drawn vectorised in O(span) time and memory without the positions before it,
a resume needs only ``(seed, epoch, position)``, and nothing here touches a global RNG. ``u`` is
``(word >> 11) * 2**-53``. The order itself is never materialised beyond a window (NOTE [Epoch order]).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .order import ArrayOrder, mix_seed
from .policies import AlphaCoins, EpochMixing

__all__ = [
    "RANDOMIZED_INTENSITY",
    "TEXT_ONLY",
    "Draws",
    "EpochPlan",
    "check_alpha",
    "normalize_strengths",
    "plan_epoch",
]

#: DA-Fusion's randomized intensity: t0 drawn uniformly from {0.25, 0.5, 0.75, 1.0} (k = 4).
RANDOMIZED_INTENSITY = (0.25, 0.5, 0.75, 1.0)
#: strength value recorded for text-only (txt2img) positions; real positions record NaN.
TEXT_ONLY = -1.0
_U53 = 2.0**-53


def check_alpha(alpha) -> float:
    """``alpha`` as a float in [0, 1]; the one validation of it."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    return value


def normalize_strengths(strengths) -> tuple[float, ...] | None:
    """``0.5`` -> (0.5,); ``"randomized"`` -> RANDOMIZED_INTENSITY; a sequence -> uniform over it;
    ``None`` -> text-only generation (no source image). The one validation of ``strengths``."""
    if strengths is None:
        return None
    if isinstance(strengths, str):
        if strengths in ("randomized", "random", "da-fusion"):
            return RANDOMIZED_INTENSITY
        raise ValueError(f"unknown strengths {strengths!r}; use a float, a sequence, 'randomized' or None")
    if isinstance(strengths, (int, float, np.floating, np.integer)):
        strengths = (float(strengths),)
    try:
        out = tuple(float(s) for s in strengths)
    except (TypeError, ValueError):
        raise TypeError(f"strengths must be a float, a sequence of floats, 'randomized' or None, got {strengths!r}") from None
    if not out or any(not 0.0 < s <= 1.0 for s in out):
        raise ValueError(f"strengths must lie in (0, 1], got {strengths!r}")
    return out


class Draws(NamedTuple):
    """Per-position draws for a span of positions (NOTE [Plan draws])."""

    synthetic: np.ndarray  # bool: the alpha coins
    strength: np.ndarray  # float32: NaN for real positions, TEXT_ONLY for text-only ones
    sample_seed: np.ndarray  # int64, 63-bit
    prompt_draw: np.ndarray  # float64 in [0, 1)


class EpochPlan:
    """One epoch on one rank: an order plus lazily drawn coins, strengths and seeds."""

    def __init__(self, order, *, seed: int, epoch: int, alpha: float, strengths=0.5, rank: int = 0,
                 world_size: int = 1, mixing: EpochMixing | None = None):  # fmt: skip
        self.order, self.seed, self.epoch, self.rank, self.world_size = order, int(seed), int(epoch), rank, world_size
        self.alpha = check_alpha(alpha)
        #: the epoch's bound mixing policy (policies.py); default: per-index replacement at ``alpha``
        self.mixing = AlphaCoins(self.alpha) if mixing is None else mixing
        self.strengths = strengths
        self.choices = normalize_strengths(strengths)
        words = np.random.SeedSequence([mix_seed(self.seed, self.epoch, rank, world_size)]).generate_state(2, np.uint64)
        self._key = words

    # -- draws ---------------------------------------------------------------------------------------

    def draws(self, start: int, end: int) -> Draws:
        n = max(0, end - start)
        bg = np.random.Philox(key=self._key)
        if start:
            bg.advance(start)
        raw = bg.random_raw(4 * n).reshape(n, 4) if n else np.zeros((0, 4), dtype=np.uint64)
        u = (raw[:, 0] >> np.uint64(11)).astype(np.float64) * _U53
        coins = self.mixing.coins(u, lambda: self._indices(start, start + n),
                                  lambda: self.order.generated_between(start, start + n))
        if self.choices is None:
            strength = np.full(n, TEXT_ONLY, dtype=np.float32)
        else:
            k = len(self.choices)
            pick = np.minimum(((raw[:, 1] >> np.uint64(11)).astype(np.float64) * _U53 * k).astype(np.int64), k - 1)
            strength = np.asarray(self.choices, dtype=np.float32)[pick]
        strength = np.where(coins, strength, np.float32(np.nan)).astype(np.float32)
        sample_seed = (raw[:, 2] >> np.uint64(1)).astype(np.int64)
        prompt_draw = (raw[:, 3] >> np.uint64(11)).astype(np.float64) * _U53
        return Draws(coins, strength, sample_seed, prompt_draw)

    def _indices(self, start: int, end: int) -> np.ndarray:
        if not self.order.integer:
            raise ValueError(f"mixing={self.mixing.name!r} needs one integer dataset index per position; this sampler "
                             "yields other keys (e.g. lists with batch_size=None)")  # fmt: skip
        return self.order.indices_between(start, end)

    def priority(self, indices) -> np.ndarray | None:
        """The order in which to request a window's synthetic positions (a permutation; None: as they come)."""
        return self.mixing.priority(indices)

    def job_strength(self, strength: float) -> float | None:
        """The strength a producer job gets for a recorded plan strength (None = text-only)."""
        s = float(strength)
        return None if s == TEXT_ONLY else s

    # -- the order -----------------------------------------------------------------------------------

    @property
    def num_batches(self) -> int | None:
        return self.order.num_batches

    def span(self, b: int) -> tuple[int, int] | None:
        return self.order.span(b)

    def synthetic_between(self, start: int, end: int):
        """(positions, indices, draws) of the synthetic positions in ``start`` .. ``end`` (clipped to the epoch)."""
        end = min(end, self.order.extend_to(end))
        if end <= start:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, self.draws(0, 0)
        d = self.draws(start, end)
        picked = np.flatnonzero(d.synthetic)
        if len(picked) and not self.order.integer:
            raise ValueError("synthesis needs one integer dataset index per position; this sampler yields "
                             "other keys (e.g. lists with batch_size=None): use alpha=0 with it")  # fmt: skip
        if not len(picked):
            return picked.astype(np.int64), picked.astype(np.int64), Draws(*(a[picked] for a in d))
        indices = self.order.indices_between(start, end)[picked]
        return picked + start, indices, Draws(*(a[picked] for a in d))

    # -- whole-epoch views (array orders: tests, small epochs) ---------------------------------------

    def _whole(self) -> Draws:
        if not isinstance(self.order, ArrayOrder):
            raise TypeError("whole-epoch arrays exist only for array orders")
        return self.draws(0, self.order.known_positions)

    @property
    def num_positions(self) -> int:
        return self.order.known_positions

    @property
    def indices(self) -> np.ndarray:
        return self.order.indices

    @property
    def batch_starts(self) -> np.ndarray:
        return self.order.starts

    synthetic = property(lambda self: self._whole().synthetic)
    strength = property(lambda self: self._whole().strength)
    sample_seed = property(lambda self: self._whole().sample_seed)
    prompt_draw = property(lambda self: self._whole().prompt_draw)

    def same_as(self, other: "EpochPlan") -> bool:
        """Whether ``other`` draws the same epoch (requests made ahead for one serve the other)."""
        return (isinstance(other, EpochPlan) and (self.seed, self.epoch, self.rank, self.world_size, self.alpha,
                self.choices) == (other.seed, other.epoch, other.rank, other.world_size, other.alpha, other.choices)
                and self.mixing.key() == other.mixing.key()
                and isinstance(self.order, ArrayOrder) and isinstance(other.order, ArrayOrder)
                and np.array_equal(self.order.indices, other.order.indices)
                and np.array_equal(self.order.starts, other.order.starts)
                and np.array_equal(self.order.generated_between(0, self.order.known_positions),
                                   other.order.generated_between(0, other.order.known_positions)))  # fmt: skip


def plan_epoch(batches, *, seed: int, epoch: int, alpha: float, strengths=0.5, rank: int = 0,
               world_size: int = 1, mixing: EpochMixing | None = None) -> EpochPlan:  # fmt: skip
    """The plan of an epoch whose batches of indices are ``batches`` (a list of lists)."""
    return EpochPlan(ArrayOrder.from_batches(batches), seed=seed, epoch=epoch, alpha=alpha, strengths=strengths,
                     rank=rank, world_size=world_size, mixing=mixing)  # fmt: skip

