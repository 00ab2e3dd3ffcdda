"""Per-epoch synthesis schedules: DA-Fusion's intensities and DisCL's diverse-to-specific curriculum.

    curriculum = DiverseToSpecific(epochs_per_level=2)
    for epoch in range(curriculum.num_epochs + 10):
        apply(loader, curriculum, epoch)          # loader.set_synthesis(alpha=..., strengths=...)
        loader.set_epoch(epoch)
        for x, y in loader: ...

A curriculum is a pure, picklable object answering two questions per epoch: the SDEdit ``strengths`` (what
:class:`~fusionloader.FusionLoader` accepts: a float, a tuple to draw from uniformly, or None for text-only) and
the synthetic fraction ``alpha``. FusionLoader plans each epoch at ``iter()`` from its current ``alpha`` and
``strengths`` (``loader.py``, ``FusionLoader.__iter__``), so :func:`apply` -- which calls the loader's public
hook ``set_synthesis`` -- before ``iter()`` is all it takes.

DisCL (Liang, Bhardwaj, Zhou 2024; METHODS.md section 4) speaks of the image-guidance level lambda in [0, 1]:
img2img with strength = 1 - lambda, lambda = 0 the text-only end, lambda = 1 the real image itself. Strength
must lie in (0, 1], so a lambda = 1 stage is served as "real only" (alpha 0).

Not here: DisCL's *adaptive* curriculum (per stage, the lambda whose synthetic data most raises the true-class
probability of held-out hard samples) needs trainer feedback and per-sample selection; its hard-sample and
CLIP-score filters are selection policies, not schedules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..plan import RANDOMIZED_INTENSITY, check_alpha as _check_alpha, normalize_strengths

__all__ = ["Constant", "Curriculum", "DiverseToSpecific", "RandomizedIntensity", "apply"]

#: DisCL's guidance levels as lambda (strength = 1 - lambda), ascending: diverse -> specific; 1.0 = real only.
DISCL_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@runtime_checkable
class Curriculum(Protocol):
    """What FusionLoader should synthesise in ``epoch``."""

    def strengths(self, epoch: int) -> float | tuple[float, ...] | None:
        """SDEdit strength(s): a float, a tuple (one drawn uniformly per sample) or None (text-only)."""
        ...

    def alpha(self, epoch: int) -> float:
        """Probability that a position is synthetic."""
        ...


def _strengths_value(strengths) -> float | tuple[float, ...] | None:
    values = normalize_strengths(strengths)  # validates: (0, 1], "randomized", None
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def _check_epoch(epoch) -> int:
    epoch = int(epoch)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return epoch


class Constant:
    """The same strengths and alpha every epoch (DA-Fusion's single strength: ``Constant(0.5, 0.5)``)."""

    def __init__(self, strengths=0.5, alpha: float = 0.5):
        self._strengths = _strengths_value(strengths)
        self._alpha = _check_alpha(alpha)

    def strengths(self, epoch: int) -> float | tuple[float, ...] | None:
        _check_epoch(epoch)
        return self._strengths

    def alpha(self, epoch: int) -> float:
        _check_epoch(epoch)
        return self._alpha

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), self._strengths, self._alpha))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strengths={self._strengths!r}, alpha={self._alpha})"


class RandomizedIntensity(Constant):
    """DA-Fusion's randomized intensity: each synthetic sample's strength uniform over {0.25, 0.5, 0.75, 1.0}."""

    def __init__(self, alpha: float = 0.5):
        super().__init__(RANDOMIZED_INTENSITY, alpha)

    def __repr__(self) -> str:
        return f"RandomizedIntensity(alpha={self._alpha})"


class DiverseToSpecific:
    """DisCL's long-tail curriculum: guidance lambda ascending, equal epochs per level, then real only.

    ``levels``: image-guidance lambdas in [0, 1], strictly ascending; level ``k`` runs for epochs
    ``[k * epochs_per_level, (k + 1) * epochs_per_level)`` with strength ``1 - lambda`` at ``alpha``. A level of
    1.0 (the real image) is a real-only stage (alpha 0). Every epoch after the last level is real only;
    ``real_epochs_after`` only says how many the run is meant to have (``num_epochs``). The default levels
    0.1 ... 1.0 use strengths 0.9 ... 0.1 and end with a real-only stage; DisCL's generated spectrum
    ("strengths 0.1 ... 1.0" in METHODS.md) also has lambda = 0, strength 1.0: ``levels=(0.0, 0.1, ..., 1.0)``.
    In real-only epochs ``strengths`` repeats the last synthetic stage's value (never used: alpha is 0).
    """

    def __init__(self, levels: Sequence[float] = DISCL_LEVELS, epochs_per_level: int = 1, alpha: float = 0.5,
                 real_epochs_after: int = 0):  # fmt: skip
        self.levels = tuple(float(v) for v in levels)
        if not self.levels or any(not 0.0 <= v <= 1.0 for v in self.levels):
            raise ValueError(f"levels must be image-guidance values in [0, 1], got {self.levels}")
        if any(b <= a for a, b in zip(self.levels, self.levels[1:])):
            raise ValueError(f"diverse -> specific needs strictly ascending levels, got {self.levels}")
        if self.levels[0] >= 1.0:
            raise ValueError("levels has no synthetic stage (every lambda is 1.0, the real image)")
        if int(epochs_per_level) < 1 or int(real_epochs_after) < 0:
            raise ValueError(f"epochs_per_level must be >= 1 and real_epochs_after >= 0, got {epochs_per_level}, {real_epochs_after}")
        self.epochs_per_level = int(epochs_per_level)
        self.real_epochs_after = int(real_epochs_after)
        self._alpha = _check_alpha(alpha)

    @property
    def num_epochs(self) -> int:
        """Epochs of the whole schedule: every level, then ``real_epochs_after`` real-only epochs."""
        return len(self.levels) * self.epochs_per_level + self.real_epochs_after

    def level(self, epoch: int) -> float:
        """The image-guidance lambda of ``epoch`` (1.0 once the levels are done: the real images)."""
        k = _check_epoch(epoch) // self.epochs_per_level
        return self.levels[k] if k < len(self.levels) else 1.0

    def strengths(self, epoch: int) -> float:
        lam = self.level(epoch)
        if lam >= 1.0:
            lam = max(v for v in self.levels if v < 1.0)
        strength = 1.0 - lam
        rounded = round(strength, 9)  # 1 - 0.7 is 0.30000000000000004 otherwise
        return rounded if rounded > 0 else strength

    def alpha(self, epoch: int) -> float:
        return 0.0 if self.level(epoch) >= 1.0 else self._alpha

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((self.levels, self.epochs_per_level, self.real_epochs_after, self._alpha))

    def __repr__(self) -> str:
        return (f"DiverseToSpecific(levels={self.levels}, epochs_per_level={self.epochs_per_level}, "
                f"alpha={self._alpha}, real_epochs_after={self.real_epochs_after})")  # fmt: skip


def apply(loader, curriculum: Curriculum, epoch: int) -> tuple[float, float | tuple[float, ...] | None]:
    """Give the loader ``epoch``'s alpha and strengths through its public hook
    (``FusionLoader.set_synthesis``); call before ``iter(loader)``.

    Returns ``(alpha, strengths)``. Both are validated here (and again by the loader, with its settings: a
    strength must leave a denoising step at its ``num_inference_steps``), so a bad schedule fails at this call
    rather than at the next ``iter()``. The epoch's plan is drawn from the loader's own epoch counter (``set_epoch``); after
    ``load_state_dict`` apply the epoch being resumed before iterating, since the plan is redrawn from the
    current values.
    """
    alpha = _check_alpha(curriculum.alpha(epoch))
    strengths = _strengths_value(curriculum.strengths(epoch))
    if alpha > 0 and not loader.synthesizes:
        raise ValueError(f"epoch {epoch}: alpha {alpha} > 0 needs a loader built with a synthesizer")
    loader.set_synthesis(alpha=alpha, strengths=strengths)
    return alpha, strengths
