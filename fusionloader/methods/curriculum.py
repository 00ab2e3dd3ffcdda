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

DisCL's *adaptive* curriculum is :class:`AdaptiveCurriculum`: at each stage, for every candidate lambda, it
generates variants of a set of hard samples at that guidance level, fine-tunes a throw-away copy of the current
model on them for a few steps, and keeps the lambda whose synthetic data most raises the true-class probability
of the held-out hard samples (the paper's rule), logging every stage's measured gains. Which samples are hard
comes from the trainer (``loader.report``, the mixing policy ``HardWeighted``); the CLIP-score filter runs in
the producers (engine/clip_filter.py).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..plan import RANDOMIZED_INTENSITY, check_alpha as _check_alpha, normalize_strengths

__all__ = ["AdaptiveCurriculum", "Constant", "Curriculum", "DiverseToSpecific", "RandomizedIntensity", "apply",
           "lambda_to_strength"]

log = logging.getLogger("fusionloader")

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


def lambda_to_strength(lam: float) -> float | None:
    """DisCL's image-guidance level -> SDEdit strength: ``1 - lambda``; lambda 0 is text-only (None). Lambda 1 (the
    real image itself) has no strength: callers serve it as real data."""
    if lam <= 0.0:
        return None
    rounded = round(1.0 - lam, 9)  # 1 - 0.7 is 0.30000000000000004 otherwise
    return rounded if rounded > 0 else 1.0 - lam


def _check_lambdas(lambdas) -> tuple[float, ...]:
    if isinstance(lambdas, (str, bytes)) or not isinstance(lambdas, Sequence):
        raise TypeError(f"lambdas must be a sequence of image-guidance levels in [0, 1], got {lambdas!r}")
    values = []
    for i, v in enumerate(lambdas):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"lambdas[{i}] must be an image-guidance level in [0, 1], got {v!r}")
        values.append(float(v))
    if not values:
        raise ValueError("lambdas is empty: give at least one image-guidance level in [0, 1]")
    if len(set(values)) != len(values):
        raise ValueError(f"lambdas has repeated values: {values}")
    return tuple(values)


def _sgd_update(steps: int, lr: float, transform):
    def update(model, images, labels):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(transform(images)), labels).backward()
            opt.step()

    return update


class AdaptiveCurriculum:
    """DisCL's adaptive curriculum: per stage, the lambda whose synthetic data most raises the hard samples'
    true-class probability.

        adaptive = AdaptiveCurriculum((0.0, 0.3, 0.6, 0.9), synth, model, hard_x, hard_y,
                                      prompts=lambda y: f"a photo of a {names[y]}", num_inference_steps=25)
        for stage in range(stages):
            adaptive.choose()                     # measured on the model as it is now; logged
            for epoch in stage_epochs(stage):
                apply(loader, adaptive, epoch)    # alpha and strength = 1 - lambda for the loader
                ...

    ``choose()`` runs, for each lambda in ``lambdas`` (image-guidance levels in [0, 1]; strength = 1 - lambda,
    lambda 0 text-only, lambda 1 the real images themselves): ``variants`` variants of every hard image
    (``synthesizer.augment``, the same seeds for every lambda of a stage: the candidates differ only in lambda),
    labelled with its true class; a deep copy of ``model`` fine-tuned on them (``update(copy, images, labels)``;
    default ``probe_steps`` full-batch SGD steps at ``probe_lr`` on cross-entropy); and the mean true-class
    probability of the held-out hard samples (``eval_images``/``eval_labels``, default the hard samples) under
    that copy (eval mode, softmax of ``model(transform(x))``). The gain is that probability minus the current
    model's; the largest gain wins (ties: the earlier lambda). ``model`` itself is never changed.

    ``hard_images``: float (N, 3, H, W) in [0, 1] at the model's input size (resized to the synthesizer's
    resolution for generation and back). ``prompts``: one string per hard image or ``callable(label) -> str``.
    ``transform``: applied to image batches before the model (e.g. normalisation), default none. ``log``: one
    dict per stage (``stage``, ``lambdas``, ``gains``, ``probs``, ``base_prob``, ``chosen``), also logged.
    As a :class:`Curriculum` (for :func:`apply`): ``strengths`` = 1 - the chosen lambda (None = text-only),
    ``alpha`` = ``alpha`` (0 when lambda 1 wins: real only).
    """

    def __init__(self, lambdas: Sequence[float], synthesizer, model: torch.nn.Module, hard_images: torch.Tensor,
                 hard_labels, *, prompts, eval_images: torch.Tensor | None = None, eval_labels=None,
                 variants: int = 1, guidance_scale: float = 10.0, num_inference_steps: int = 50, seed: int = 0,
                 alpha: float = 0.5, probe_steps: int = 10, probe_lr: float = 0.01,
                 update: Callable | None = None, transform: Callable | None = None):  # fmt: skip
        self.lambdas = _check_lambdas(lambdas)
        if not callable(getattr(synthesizer, "augment", None)) and any(v < 1.0 for v in self.lambdas):
            raise TypeError(f"synthesizer must have augment() (a fusionloader Synthesizer), got {type(synthesizer).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value in (("variants", variants), ("num_inference_steps", num_inference_steps),
                            ("probe_steps", probe_steps)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(probe_lr, (int, float)) or not probe_lr > 0 or not math.isfinite(probe_lr):
            raise ValueError(f"probe_lr must be a finite number > 0, got {probe_lr!r}")
        self.synthesizer, self.model = synthesizer, model
        self.variants, self.guidance_scale, self.num_inference_steps = variants, guidance_scale, num_inference_steps
        self.seed = int(seed)
        self._alpha = _check_alpha(alpha)
        self.transform = transform if transform is not None else (lambda x: x)
        self.update = update if update is not None else _sgd_update(probe_steps, float(probe_lr), self.transform)
        self.prompts = prompts
        self.hard_images, self.hard_labels = self._check_set("hard_images", "hard_labels", hard_images, hard_labels)
        self.eval_images, self.eval_labels = (
            (self.hard_images, self.hard_labels) if eval_images is None
            else self._check_set("eval_images", "eval_labels", eval_images, eval_labels)
        )  # fmt: skip
        self.log: list[dict] = []
        self.current: float | None = None

    @staticmethod
    def _check_set(name: str, labels_name: str, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or not len(images):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{name} must be a non-empty float tensor (N, 3, H, W) in [0, 1], got {shape}")
        if not images.is_floating_point() or images.min() < 0 or images.max() > 1:
            raise ValueError(f"{name} must be float in [0, 1]")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{labels_name}: {len(labels)} labels for {len(images)} images")
        return images, labels

    # -- one stage -------------------------------------------------------------------------------------------

    def _prompt_list(self, labels: torch.Tensor, prompts) -> list[str]:
        if callable(prompts) and not isinstance(prompts, (str, Sequence)):
            return [str(prompts(int(y))) for y in labels]
        if isinstance(prompts, str):
            return [prompts] * len(labels)
        prompts = list(prompts)
        if len(prompts) != len(labels):
            raise ValueError(f"prompts: {len(prompts)} prompts for {len(labels)} hard images")
        return prompts

    def synthetic(self, lam: float, images: torch.Tensor, labels: torch.Tensor, prompts, stage: int) -> torch.Tensor:
        """The ``variants`` variants per image at guidance ``lam`` (rows image-major), at the images' size."""
        x = images.repeat_interleave(self.variants, 0)
        if lam >= 1.0:
            return x.clone()  # lambda 1: the real image itself
        texts = [p for p in self._prompt_list(labels, prompts) for _ in range(self.variants)]
        size = tuple(images.shape[-2:])
        res = tuple(self.synthesizer.resolution)
        src = x if size == res else F.interpolate(x, size=res, mode="bilinear", antialias=True, align_corners=False)
        # Common random numbers: every lambda of a stage uses the same seeds, so only lambda differs.
        seeds = [self.seed + 1_000_003 * stage + k for k in range(len(x))]
        out = self.synthesizer.augment(src.clamp(0, 1), texts, strengths=lambda_to_strength(lam),
                                       guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                                       seeds=seeds)  # fmt: skip
        out = out.to(images.device, images.dtype)
        if tuple(out.shape[-2:]) != size:
            out = F.interpolate(out, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return out

    @torch.no_grad()
    def true_class_prob(self, model: torch.nn.Module, images=None, labels=None) -> float:
        """Mean true-class probability of ``images`` (default the held-out hard samples) under ``model`` (eval)."""
        images = self.eval_images if images is None else images
        labels = self.eval_labels if labels is None else labels
        was = model.training
        model.eval()
        try:
            p = F.softmax(model(self.transform(images)).float(), dim=-1)
        finally:
            model.train(was)
        return float(p[torch.arange(len(labels)), labels.to(p.device)].mean())

    def choose(self, hard_images=None, hard_labels=None, prompts=None, eval_images=None, eval_labels=None) -> float:
        """Measure every lambda's gain on the model as it is now and return the best (see the class docstring).
        New hard/held-out sets may be given per stage (the hard samples change as the model learns)."""
        if hard_images is not None:
            self.hard_images, self.hard_labels = self._check_set("hard_images", "hard_labels", hard_images, hard_labels)
        if eval_images is not None:
            self.eval_images, self.eval_labels = self._check_set("eval_images", "eval_labels", eval_images, eval_labels)
        prompts = self.prompts if prompts is None else prompts
        stage = len(self.log)
        base = self.true_class_prob(self.model)
        probs, gains = {}, {}
        rng = torch.random.get_rng_state()
        try:
            for lam in self.lambdas:
                data = self.synthetic(lam, self.hard_images, self.hard_labels, prompts, stage)
                labels = self.hard_labels.repeat_interleave(self.variants).to(data.device)
                probe = copy.deepcopy(self.model)
                torch.manual_seed(self.seed + stage)  # the same dropout/augmentation draws for every lambda
                self.update(probe, data, labels)
                probs[lam] = self.true_class_prob(probe)
                gains[lam] = probs[lam] - base
                del probe
        finally:
            torch.random.set_rng_state(rng)  # choosing leaves the trainer's random stream as it was
        chosen = max(self.lambdas, key=lambda v: (gains[v], -self.lambdas.index(v)))
        self.current = chosen
        entry = {"stage": stage, "lambdas": list(self.lambdas), "base_prob": base, "probs": probs, "gains": gains,
                 "chosen": chosen}  # fmt: skip
        self.log.append(entry)
        log.info("adaptive curriculum stage %d: lambda %s (true-class prob %.4f -> %s)", stage, chosen, base,
                 ", ".join(f"{v}: {g:+.4f}" for v, g in gains.items()))  # fmt: skip
        return chosen

    # -- as a Curriculum (apply) -----------------------------------------------------------------------------

    def _chosen(self) -> float:
        if self.current is None:
            raise RuntimeError("AdaptiveCurriculum: call choose() at the start of a stage before apply()")
        return self.current

    def strengths(self, epoch: int) -> float | None:
        _check_epoch(epoch)
        lam = self._chosen()
        return 0.5 if lam >= 1.0 else lambda_to_strength(lam)  # lambda 1: real only, the strength is unused

    def alpha(self, epoch: int) -> float:
        _check_epoch(epoch)
        return 0.0 if self._chosen() >= 1.0 else self._alpha

    def __repr__(self) -> str:
        return f"AdaptiveCurriculum(lambdas={self.lambdas}, stages={len(self.log)}, current={self.current})"


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
