"""What a loader asks its producers for: the prompt of each sample, the jobs of planned positions, and the pool.

Shared by :class:`~fusionloader.loader.FusionLoader` and :class:`~fusionloader.sources.dali_loader.DaliFusionLoader`,
so both loaders encode the same prompts (through the same leakage guard), make the same jobs from the same
draws, and start the same pool for the same configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .config import FusionConfig
from .distributed import devices_for_rank, local_info
from .plan import EpochPlan
from .sources.dataset import DatasetError

__all__ = ["JobMaker", "ring_slots", "start_pool"]


def _is_prompt_callable(prompts) -> bool:
    return callable(prompts) and not isinstance(prompts, (str, Mapping, Sequence))


class JobMaker:
    """Prompts and producer jobs for planned positions (config.py ``prompts``: a template, per-label entries
    -- a list is drawn from with the position's prompt draw -- or a callable ``(index, label)``).

    ``retrieves(sample_seeds) -> bool array`` marks the synthetic positions a retrieval source serves (they get
    no job). :meth:`check_leakage` (``config.leakage_guard``, at the loader's construction) checks every prompt
    the run can encode; a callable's prompts are then checked as they are made.
    """

    def __init__(self, config: FusionConfig, source, dataset, retrieves=None):
        self.config, self.source, self.retrieves = config, source, retrieves
        self.classes = getattr(dataset, "classes", None)
        self.guard = None

    def __call__(self, key_base: int, plan: EpochPlan, positions, indices, draws) -> list:
        from .protocol import Job

        cfg = self.config
        if self.retrieves is not None:  # positions the retrieval source serves get no producer job
            keep = ~self.retrieves(draws.sample_seed)
            positions, indices, draws = positions[keep], indices[keep], type(draws)(*(a[keep] for a in draws))
        # the class selects a producer's ESD delta and the CLIP filter's prompt; read here only when needed
        needs_label = cfg.adapters is not None or cfg.clip_filter is not None
        label = self.source.label if needs_label else (lambda index: None)
        perm = plan.priority(indices) if len(indices) else None
        if perm is not None:  # e.g. hard samples first (HardWeighted): producers make jobs in submission order
            positions, indices, draws = positions[perm], indices[perm], type(draws)(*(a[perm] for a in draws))
        return [
            Job(key=key_base + int(p), index=int(i), prompt=self.prompt(int(i), float(pd)),
                strength=plan.job_strength(s), guidance_scale=cfg.guidance_scale,
                num_inference_steps=cfg.num_inference_steps, seed=int(sd), label=label(int(i)),
                deepcache_interval=cfg.deepcache_interval, decoder=cfg.decoder)
            for p, i, s, sd, pd in zip(positions, indices, draws.strength, draws.sample_seed, draws.prompt_draw)
        ]  # fmt: skip

    def prompt(self, index: int, draw: float) -> str:
        """The prompt of dataset item ``index`` for a position whose prompt draw is ``draw`` in [0, 1)."""
        try:
            return self._prompt_of(index, draw)
        except DatasetError as e:  # reading the label: the dataset's own exception, as the runner raises it
            cause = e.__cause__ if e.__cause__ is not None else e
            cause.add_note(f"fusionloader: raised reading dataset index {e.index}" + (f" (path {e.path!r})" if e.path else ""))
            raise cause from None

    def _prompt_of(self, index: int, draw: float) -> str:
        prompts = self.config.prompts
        if _is_prompt_callable(prompts):
            prompt = str(prompts(index, self.source.label(index)))
            if self.guard is not None:
                self.guard.check([prompt])
            return prompt
        try:
            choices = self.choices(self.source.label(index))
        except ValueError as e:
            raise ValueError(f"{e} (dataset index {index})") from None
        return choices[min(int(draw * len(choices)), len(choices) - 1)]

    def choices(self, label) -> list[str]:
        """The prompts a sample of ``label`` may get (one is drawn per sample); not for callable prompts."""
        prompts, classes = self.config.prompts, self.classes

        def name(lab):
            if classes is not None and isinstance(lab, (int, np.integer)) and 0 <= lab < len(classes):
                return str(classes[lab])
            return str(lab)

        if prompts is None:
            prompts = "a photo of a {}" if classes is not None else "a photo"
        if isinstance(prompts, str):
            value = prompts
        else:
            try:
                value = prompts[label] if isinstance(prompts, Mapping) else prompts[int(label)]
            except (KeyError, IndexError, TypeError, ValueError):
                raise ValueError(f"prompts has no prompt for label {label!r}") from None
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return [v.format(name(label)) if "{}" in v else v for v in values]

    def check_leakage(self) -> None:
        """Check every prompt the run can encode now, and a callable's from now on (DA-Fusion's data-centric
        leakage prevention); ``LeakageError`` (a ValueError) names the prompt and the class."""
        from .engine.leakage import LeakageGuard, tokenizer_of

        if not self.classes:
            raise ValueError("leakage_guard=True needs dataset.classes (the class names to keep from the text encoder)")
        guard = LeakageGuard(tokenizer_of(self.config.synthesizer), [str(c) for c in self.classes])
        if not _is_prompt_callable(self.config.prompts):
            labels = self.source.label_set()
            labels = range(len(self.classes)) if labels is None else labels
            guard.check([p for label in labels for p in self.choices(label)])
        self.guard = guard


def ring_slots(config: FusionConfig, producers: int, in_flight: int = 0) -> int | None:
    """``producer_slots``, or its default for ``producers`` producers when ``in_flight`` synthetic positions can
    be dispatched and not yet consumed (their images keep their slots until then: NOTE [Worker side]); None:
    the pool's own default (``4 * capacity`` per producer)."""
    if config.producer_slots is not None or in_flight <= 0:
        return config.producer_slots
    per = config.producer_capacity * max(1, producers)
    return max(4 * per, in_flight + 2 * per)


def start_pool(config: FusionConfig, source, slot_dtype: torch.dtype, in_flight: int = 0):
    """Start the producers ``config`` asks for: this rank's share of ``producer_devices`` (process backend) or
    the job's one Ray pool (``producer_backend="ray"``), or ``config.pool_factory``'s pool. ``in_flight``: the
    synthetic positions the loader can have dispatched and not consumed (sizes the default ring,
    :func:`ring_slots`). Started, or closed and the error raised."""
    cfg = config
    local_rank, local_world = local_info()
    ray = cfg.producer_backend == "ray"  # one pool for every rank: no split of the devices
    devices = cfg.producer_devices if ray else devices_for_rank(cfg.producer_devices, local_rank, local_world)
    producers = devices if isinstance(devices, int) else len(devices)
    kwargs = dict(on_error=cfg.on_producer_error, max_restarts=cfg.max_restarts, latent_cache_path=cfg.latent_cache_path,
                  capacity=cfg.producer_capacity, image_size=cfg.image_size, slots=ring_slots(cfg, producers, in_flight),
                  timeout=cfg.producer_timeout, wait_ready=cfg.late_policy.producers_wait_ready,
                  deadlines=cfg.late_policy.deadline_order, adapters=cfg.adapters,
                  clip_filter=cfg.clip_filter)  # fmt: skip
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # adapters/clip_filter only when given
    if cfg.pool_factory is not None:
        pool = cfg.pool_factory(cfg.synthesizer, source, devices=devices, **kwargs)
    elif ray:
        from .ray_backend import RayProducerPool

        pool = RayProducerPool(cfg.synthesizer, source, devices=devices, slot_dtype=slot_dtype, **kwargs)
    else:
        from .producer import ProducerPool

        pool = ProducerPool(cfg.synthesizer, source, devices=devices, slot_dtype=slot_dtype, **kwargs)
    try:
        pool.start()
    except BaseException:
        pool.close()
        raise
    return pool
