"""Mixing policies: which positions of an epoch are served a generated (or retrieved) image instead of the real one.

NOTE [Mixing policies]
~~~~~~~~~~~~~~~~~~~~~~

One pluggable concept (``FusionLoader(mixing=...)``: a name or a policy object), three policies. A policy has two
faces: the *epoch shape* (``copies``: how many positions each real index gets per epoch) and, bound to one epoch
(:meth:`bind`), an :class:`EpochMixing` that turns the plan's per-position uniforms (word 0 of NOTE [Plan draws])
into the synthetic coins and orders a window's requests. Everything a bound epoch uses is frozen at ``iter()``
(alpha, and for :class:`HardWeighted` the hard-sample mask), saved in ``state_dict`` when it cannot be
recomputed, so coins stay a pure function of ``(seed, epoch, rank, world_size, position)`` plus that snapshot.

* :class:`Replace` (DA-Fusion, the default): a position is synthetic iff ``u < alpha`` -- per-index
  replacement, each replaced sample a variant of its own index. Bit-identical to the loader before policies.
* :class:`Concat` (Bansal & Grover): real and generated concatenated 1:1. The epoch is the dataset doubled --
  virtual index ``v`` in ``[0, 2N)`` is index ``v mod N``, generated iff ``v >= N`` -- and the loader's own
  sampling (sequential, ``RandomSampler``-like from the seed, or ``DistributedSampler``'s rank split with its
  padding) runs over the ``2N`` virtual indices. So every epoch holds every real index once and one generated
  variant of each (before a ``DistributedSampler``-style split: in each rank's shard), ``len()`` counts ``2N``,
  and ranks shard the doubled epoch without overlap. ``alpha`` is not used: it must stay at its default 0.5
  (a concat epoch *is* half generated); a user ``sampler``/``batch_sampler`` is refused (it orders ``N`` indices).
* :class:`HardWeighted` (DisCL): hard samples -- a reported true-class probability below ``threshold``
  (``FusionLoader.report``, fusionloader/feedback.py) or any image of a tail class (fewer than
  ``tail_class_size`` images) -- are *requested first* within every window the loader submits (producers
  make jobs in submission order) and get ``share`` of the synthetic positions. With ``h`` the hard fraction of
  the dataset, the coin is ``u < p_hard`` for a hard index and ``u < p_easy`` otherwise, where
  ``h * p_hard = share * alpha * c`` and ``(1 - h) * p_easy = (1 - share) * alpha * c``; ``c = 1`` unless one
  side cannot take its part (then ``c < 1`` shrinks both, so ``share`` holds exactly in expectation and the
  achieved alpha drops below ``alpha``: ``stats()`` shows it). With no hard sample known (``h = 0``, before any
  report) or every sample hard, the coin is ``u < alpha`` -- :class:`Replace` exactly. The hard set is taken
  when an epoch is planned: reports during an epoch shape the next one (DisCL re-assesses per stage). Each
  rank keeps its own tracker: under DDP report the gathered values on every rank (``all_gather`` of indices
  and values), or a rank knows only the samples it saw -- its next shard holds other ones.

Retrieval (``retrieval=``, fusionloader/methods/retrieval.py) is a *source*, not a policy: a synthetic position is
served by a retrieved image instead of a producer's. With both a synthesizer and a retrieval source, the
position's source is the top bit of its 63-bit sample seed (:func:`retrieval_positions`): half each, independent
of the coins and a pure function of the position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = [
    "AlphaCoins",
    "Concat",
    "ConcatCoins",
    "EpochMixing",
    "HardCoins",
    "HardWeighted",
    "MIXING_POLICIES",
    "MixingPolicy",
    "Replace",
    "mixing_policy",
    "retrieval_positions",
]

#: the names ``FusionLoader(mixing=...)`` accepts
MIXING_POLICIES = ("replace", "concat", "hard")


def retrieval_positions(sample_seeds, split: bool) -> np.ndarray:
    """Which synthetic positions a retrieval source serves: all when ``split`` is False (no synthesizer), else
    those whose sample seed has bit 62 set (half, independent of the coin and the strength)."""
    seeds = np.asarray(sample_seeds, dtype=np.int64)
    if not split:
        return np.ones(seeds.shape, dtype=bool)
    return ((seeds >> np.int64(62)) & np.int64(1)).astype(bool)


# --- one epoch's mixing (what an EpochPlan holds) -----------------------------------------------------------


class EpochMixing:
    """A policy bound to one epoch. ``coins(u, indices, generated)``: the synthetic coins of a span of positions
    from their uniforms ``u``; ``indices()`` / ``generated()`` are called only when the policy needs them (the
    span's dataset indices / the order's generated mask). ``priority(indices)``: the order in which to submit
    a window's jobs (a permutation), or None for consumption order. ``state()``: what must be saved to rebuild
    it (None: it is recomputed from the settings)."""

    name = "replace"

    def coins(self, u: np.ndarray, indices: Callable[[], np.ndarray], generated: Callable[[], np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def priority(self, indices: np.ndarray) -> np.ndarray | None:
        return None

    def key(self) -> tuple:
        """Equal keys: the same coins (requests made ahead for one epoch serve the other)."""
        raise NotImplementedError

    def state(self) -> dict | None:
        return None


class AlphaCoins(EpochMixing):
    """Per-index replacement: synthetic iff ``u < alpha`` (DA-Fusion)."""

    def __init__(self, alpha: float):
        self.alpha = float(alpha)

    def coins(self, u, indices, generated):
        return u < self.alpha

    def key(self):
        return ("alpha", self.alpha)


class ConcatCoins(EpochMixing):
    """1:1 concatenation: synthetic iff the position holds the generated copy of its index (from the order)."""

    name = "concat"

    def coins(self, u, indices, generated):
        return np.asarray(generated(), dtype=bool).copy()

    def key(self):
        return ("concat",)


class HardCoins(EpochMixing):
    """Hard-sample weighted coins (NOTE [Mixing policies]): ``u < p_hard`` at hard indices, ``u < p_easy`` else."""

    name = "hard"

    def __init__(self, hard: np.ndarray, p_hard: float, p_easy: float):
        self.hard = np.asarray(hard, dtype=bool)
        self.p_hard, self.p_easy = float(p_hard), float(p_easy)

    def coins(self, u, indices, generated):
        idx = indices()
        return u < np.where(self.hard[idx], self.p_hard, self.p_easy)

    def priority(self, indices):
        # hard first, each group in consumption order (a stable sort)
        return np.argsort(~self.hard[np.asarray(indices, dtype=np.int64)], kind="stable")

    def key(self):
        return ("hard", self.p_hard, self.p_easy, self.hard.tobytes())

    def state(self):
        return {"hard": np.packbits(self.hard), "n": len(self.hard), "p_hard": self.p_hard, "p_easy": self.p_easy}

    @classmethod
    def from_state(cls, state: dict) -> "HardCoins":
        hard = np.unpackbits(np.asarray(state["hard"], dtype=np.uint8), count=int(state["n"])).astype(bool)
        return cls(hard, state["p_hard"], state["p_easy"])


# --- policies -----------------------------------------------------------------------------------------------


class MixingPolicy:
    """Base of the mixing policies (NOTE [Mixing policies])."""

    name = "?"
    #: positions per real index per epoch (2: the epoch is the dataset doubled)
    copies = 1
    #: whether the policy needs the trainer's feedback (``FusionLoader.report``) and the labels
    uses_feedback = False

    def check(self, alpha: float) -> None:
        """Cross-field validation against the loader's ``alpha`` (``ValueError`` naming the argument)."""

    def bind(self, alpha: float, hard: np.ndarray | None = None) -> EpochMixing:
        raise NotImplementedError

    def restore(self, state: dict | None, alpha: float) -> EpochMixing:
        """The epoch's mixing from a saved :meth:`EpochMixing.state` (None: recomputed)."""
        return self.bind(alpha)

    def to_json(self) -> dict:
        return {"name": self.name}


@dataclass(frozen=True)
class Replace(MixingPolicy):
    """Per-index replacement at ``alpha`` (DA-Fusion; the default)."""

    name = "replace"

    def bind(self, alpha, hard=None):
        return AlphaCoins(alpha)


@dataclass(frozen=True)
class Concat(MixingPolicy):
    """Real and generated concatenated 1:1 (Bansal & Grover): every real index once plus one generated variant of
    each per epoch; ``len()`` counts both."""

    name = "concat"
    copies = 2

    def check(self, alpha):
        if alpha != 0.5:
            raise ValueError(f"alpha={alpha!r} with mixing='concat': a concat epoch is every real image plus one "
                             "generated variant of each (half generated by construction); leave alpha at its default 0.5")  # fmt: skip

    def bind(self, alpha, hard=None):
        return ConcatCoins()


def _unit(name: str, value, closed_low: bool = True) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= out <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return out


@dataclass(frozen=True)
class HardWeighted(MixingPolicy):
    """DisCL's hard-sample weighting: hard samples (reported true-class probability < ``threshold``, or every
    image of a class with fewer than ``tail_class_size`` images; 0 turns the tail rule off) are requested first
    and get ``share`` of the synthetic positions (NOTE [Mixing policies])."""

    share: float = 0.5
    threshold: float = 0.5
    tail_class_size: int = 20

    name = "hard"
    uses_feedback = True

    def __post_init__(self):
        object.__setattr__(self, "share", _unit("share", self.share))
        object.__setattr__(self, "threshold", _unit("threshold", self.threshold))
        t = self.tail_class_size
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"tail_class_size must be an integer >= 0, got {t!r}")
        if t < 0:
            raise ValueError(f"tail_class_size must be >= 0, got {t!r}")
        object.__setattr__(self, "tail_class_size", int(t))

    def probabilities(self, alpha: float, h: float) -> tuple[float, float]:
        """(p_hard, p_easy) for a hard fraction ``h`` of the dataset (NOTE [Mixing policies])."""
        if h <= 0.0 or h >= 1.0:
            return alpha, alpha
        want_hard, want_easy = self.share * alpha, (1.0 - self.share) * alpha
        c = 1.0
        if want_hard > h:
            c = min(c, h / want_hard)
        if want_easy > 1.0 - h:
            c = min(c, (1.0 - h) / want_easy)
        return min(1.0, want_hard * c / h), min(1.0, want_easy * c / (1.0 - h))

    def bind(self, alpha, hard=None):
        if hard is None or not len(hard):
            return AlphaCoins(alpha)
        hard = np.asarray(hard, dtype=bool)
        h = float(np.count_nonzero(hard)) / len(hard)
        if h <= 0.0 or h >= 1.0:
            return AlphaCoins(alpha)
        p_hard, p_easy = self.probabilities(alpha, h)
        return HardCoins(hard, p_hard, p_easy)

    def restore(self, state, alpha):
        return HardCoins.from_state(state) if state is not None else AlphaCoins(alpha)

    def to_json(self):
        return {"name": self.name, "share": self.share, "threshold": self.threshold,
                "tail_class_size": self.tail_class_size}  # fmt: skip


_BY_NAME = {"replace": Replace, "concat": Concat, "hard": HardWeighted}


def mixing_policy(value) -> MixingPolicy:
    """``"replace"`` / ``"concat"`` / ``"hard"`` (defaults) or a policy object -> a policy; the one validation."""
    if isinstance(value, MixingPolicy):
        return value
    if isinstance(value, str):
        cls = _BY_NAME.get(value)
        if cls is None:
            raise ValueError(f"mixing must be one of {MIXING_POLICIES} or a policy from fusionloader.policies "
                             f"(Replace(), Concat(), HardWeighted(share=, threshold=, tail_class_size=)), got {value!r}")  # fmt: skip
        return cls()
    raise TypeError(f"mixing must be one of {MIXING_POLICIES} or a policy object from fusionloader.policies, got {value!r}")
