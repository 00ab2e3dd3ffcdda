"""The synthesis settings of a FusionLoader: one typed, documented object, each field validated once.

``FusionLoader(dataset, ..., alpha=0.5, strengths="randomized")`` builds a :class:`FusionConfig` from its
keyword arguments (the DataLoader arguments stay DataLoader's); ``FusionLoader(dataset, ..., config=cfg)``
takes one directly, keyword arguments overriding its fields. Every field is checked in ``__post_init__``
with an error naming the argument and the value, so a bad setting fails at construction, not inside a
producer after the model loads. Checks that need the dataset (prompts covering every label) are in
:meth:`FusionConfig.check_dataset`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch

from .plan import check_alpha, normalize_strengths
from .policies import mixing_policy

__all__ = ["LATE_POLICIES", "FusionConfig", "LatePolicy"]

LATE_POLICIES = ("reuse", "real", "wait")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name" (resolved by the engine, not a local path)


@dataclass(frozen=True)
class LatePolicy:
    """What a synthetic position gets when its fresh image is not ready (``FusionConfig.late_policy``).

    ``reuse``: a stored variant of the same index (real when none); the late job keeps running and is
    harvested into the store. ``real``: the real sample; the late job is cancelled. ``wait``: wait up to
    ``wait_timeout`` seconds per *batch* (one deadline for all its positions), then real.
    """

    name: str

    def __post_init__(self):
        if self.name not in LATE_POLICIES:
            raise ValueError(f"late_policy must be one of {LATE_POLICIES}, got {self.name!r}")

    @classmethod
    def of(cls, value) -> "LatePolicy":
        return value if isinstance(value, LatePolicy) else cls(value)

    @property
    def waits(self) -> bool:
        """The trainer blocks for fresh images (up to the batch's deadline)."""
        return self.name == "wait"

    @property
    def reuses(self) -> bool:
        """Late positions get stored variants; late jobs keep running and are harvested (not cancelled):
        cancelling every late job livelocks producers slower than the trainer (nothing would ever finish)."""
        return self.name == "reuse"

    @property
    def producers_wait_ready(self) -> bool:
        """Producers load and warm up before the first batch (only ``wait`` promises fresh images from it)."""
        return self.waits

    @property
    def deadline_order(self) -> bool:
        """Producers may skip jobs they cannot finish in time (NOTE [Deadlines] in producer.py); a trainer
        that waits for every job needs them in order instead."""
        return not self.waits

    def __str__(self) -> str:
        return self.name


def _int(name: str, value, minimum: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (hasattr(value, "__index__")):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _float(name: str, value, minimum: float | None = None, strict: bool = False, optional: bool = False,
           allow_inf: bool = False) -> float | None:  # fmt: skip
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(out) or (math.isinf(out) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (out < minimum or (strict and out == minimum)):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return out


def check_device(name: str, device) -> str:
    """``device`` as a string torch accepts and this build can use (a ``cuda:N`` needs a CUDA build and N GPUs)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name}: {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {device!r} needs CUDA, which this torch build or machine does not have "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False)")  # fmt: skip
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name}: {device!r} does not exist; this machine has {count} CUDA device(s)")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"{name}: device type {dev.type!r} of {device!r} is not supported for producers")
    return str(dev)


def check_synthesizer(value):
    """A path that does not exist is ``FileNotFoundError`` naming it (not a failed hub connection later)."""
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.exists(os.path.expanduser(path)):
            local = os.path.isabs(path) or path.startswith((".", "~")) or not _HUB_ID.match(path)
            if local:
                raise FileNotFoundError(f"synthesizer: no such checkpoint directory {path!r}")
    return value


@dataclass
class FusionConfig:
    """How a FusionLoader synthesises (defaults follow DA-Fusion: alpha 0.5, strength 0.5, guidance 7.5,
    50 steps, M = 10 variants per image)."""

    #: a ``fusionloader.Synthesizer``, a checkpoint path (must exist) or hub id, or a spec the pool accepts.
    synthesizer: Any = None
    #: probability that a position is synthetic (one coin per position), in [0, 1].
    alpha: float = 0.5
    #: SDEdit strength: a float in (0, 1], a sequence (uniform choice), ``"randomized"`` (DA-Fusion's
    #: {0.25, 0.5, 0.75, 1.0}) or ``None`` (text-only).
    strengths: Any = 0.5
    #: a template (``"a photo of a {}"``), a sequence indexed by label, a mapping label -> prompt (a list value
    #: = uniform choice), or a callable ``(index, label) -> prompt``. Default: ``"a photo of a {}"`` with
    #: ``dataset.classes``, else ``"a photo"``.
    prompts: Any = None
    #: the train transform for datasets returning raw images (applied to real and synthetic); leave None for
    #: datasets with their own ``transform`` (ImageFolder, VisionDataset): theirs is applied to both.
    transform: Callable | None = None
    #: one producer per device ("cpu", "cuda:1", ...), split among the local ranks of a node; under
    #: ``producer_backend="ray"``: N actors or a list of Ray resource dicts, one pool for all ranks.
    producer_devices: Any = ("cpu",)
    #: "process" (spawned producers per rank, the default) or "ray" (the job's shared Ray actor pool; extra [ray]).
    producer_backend: str = "process"
    #: "reuse", "real" or "wait" (a :class:`LatePolicy`).
    late_policy: Any = "reuse"
    #: in-memory variant store: variants kept per index, and bytes overall.
    variants_per_index: int = 10
    store_bytes: int = 1 << 30
    #: samples requested ahead (default: adaptive, at least ``max(64, 8 * batch_size)``).
    lookahead: int | None = None
    #: one seed for coins, strengths, sample seeds and (with default sampling) the order; default
    #: ``torch.initial_seed()``.
    seed: int | None = None
    #: yield ``(batch, meta)`` (index, planned, synthetic, fresh, strength tensors; with ``retrieval``: also
    #: retrieved and pool_id).
    return_meta: bool = False
    #: the mixing policy (fusionloader/policies.py, NOTE [Mixing policies]): ``"replace"`` (per-index replacement
    #: at ``alpha``, DA-Fusion; the default), ``"concat"`` (every real image plus one generated variant of each
    #: per epoch, Bansal & Grover; ``len()`` counts both; ``alpha`` must stay 0.5), ``"hard"`` (DisCL: hard
    #: samples requested first and given ``share`` of the synthetic positions; feedback via
    #: ``FusionLoader.report``), or a policy object (``Replace()``, ``Concat()``, ``HardWeighted(share=0.5,
    #: threshold=0.5, tail_class_size=20)``).
    mixing: Any = "replace"
    #: a ``fusionloader.methods.retrieval.RetrievedVariants``: synthetic positions are served retrieved images
    #: (labelled with the class that retrieved them; kind ``"retrieved"``) instead of generated ones (no
    #: ``synthesizer``: no producers start) or, with a synthesizer too, for half of them (NOTE [Mixing policies]).
    retrieval: Any = field(default=None, repr=False)
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    #: producer speed options per job (docs/CONTRACTS.md "Engine speed options"): DeepCache-style feature
    #: caching (a full UNet call every N steps, the shallow branch between; None: off) and the decoder
    #: (``"vae"``, or ``"tiny"``: the synthesizer's tiny decoder, its checkpoint's ``vae_tiny/`` folder).
    deepcache_interval: int | None = None
    decoder: str = "vae"
    #: seconds a batch may wait for its fresh images under ``late_policy="wait"`` (one deadline per batch).
    wait_timeout: float = 30.0
    #: producers' slot resolution (default: the model's), a multiple of 8.
    image_size: int | None = None
    producer_capacity: int = 8
    #: ring slots (images made and not yet consumed). Default: ``4 * producer_capacity`` per producer, raised to
    #: the synthetic positions of the batches in flight plus ``2 * producer_capacity`` per producer (a deferred
    #: position keeps its image's slot until its batch is consumed, NOTE [Worker side]; without the headroom the
    #: producers stall on a full ring and deliver just in time).
    producer_slots: int | None = None
    producer_timeout: float | None = None
    on_producer_error: str = "raise"
    max_restarts: int = 3
    latent_cache_path: Any = None
    #: "auto" (shard like DistributedSampler when torch.distributed is initialised), True or False.
    distributed: Any = "auto"
    #: a tqdm-like object (``set_postfix``) for live counts; ``log_every`` batches between log lines (0: never).
    progress: Any = None
    log_every: int = 0
    #: DA-Fusion's data-centric leakage prevention: refuse (``ValueError`` at construction, naming the prompt
    #: and the class) any prompt whose encoded token ids contain a name of ``dataset.classes``; learned
    #: tokens pass. Needs ``dataset.classes`` and a Synthesizer or checkpoint path (for its tokenizer).
    leakage_guard: bool = False
    #: per-class concept-erased UNet weights for the producers (a ``fusionloader.engine.adapters.ClassAdapters``
    #: or a folder of per-class deltas); passed unchanged to the pool as ``adapters=`` when not None.
    adapters: Any = field(default=None, repr=False)
    #: a ``fusionloader.engine.clip_filter.ClipFilter`` run by the producers on their decoded images (rejects are
    #: regenerated with the next seed); passed unchanged to the pool as ``clip_filter=`` when not None.
    clip_filter: Any = field(default=None, repr=False)
    #: a ``ProducerPool``-like factory ``(synthesizer, source, devices=..., **kwargs)`` (tests, custom pools).
    pool_factory: Callable | None = field(default=None, repr=False)

    def __post_init__(self):
        self.alpha = check_alpha(self.alpha)
        self.mixing = mixing_policy(self.mixing)
        self.mixing.check(self.alpha)
        if self.retrieval is not None and not (callable(getattr(self.retrieval, "choose", None))
                                               and callable(getattr(self.retrieval, "pick", None))):  # fmt: skip
            raise TypeError(f"retrieval must be a fusionloader.methods.retrieval.RetrievedVariants (choose/pick), "
                            f"got {type(self.retrieval).__name__}")  # fmt: skip
        if self.adapters is not None and isinstance(self.adapters, (str, os.PathLike)):
            if not os.path.isdir(os.path.expanduser(os.fspath(self.adapters))):
                raise FileNotFoundError(f"adapters: no such folder of per-class deltas {os.fspath(self.adapters)!r}")
        elif self.adapters is not None and isinstance(self.adapters, (bool, int, float)):
            raise TypeError(f"adapters must be a ClassAdapters or a folder path, got {self.adapters!r}")
        if self.clip_filter is not None and isinstance(self.clip_filter, (bool, int, float, str)):
            raise TypeError(f"clip_filter must be a ClipFilter object (fusionloader.engine.clip_filter), got {self.clip_filter!r}")
        choices = normalize_strengths(self.strengths)
        self.late_policy = LatePolicy.of(self.late_policy)
        if self.producer_backend not in ("process", "ray"):
            raise ValueError(f"producer_backend must be 'process' or 'ray', got {self.producer_backend!r}")
        if self.producer_backend == "ray":  # resource specs, placed by Ray (fusionloader/ray_backend/specs.py)
            from .ray_backend.specs import check_producer_devices

            self.producer_devices = check_producer_devices(self.producer_devices)
        else:
            devices = (self.producer_devices,) if isinstance(self.producer_devices, (str, torch.device)) else self.producer_devices
            try:
                devices = tuple(devices)
            except TypeError:
                raise TypeError(f"producer_devices must be a device or a sequence of devices, got {self.producer_devices!r}") from None
            if not devices:
                raise ValueError("producer_devices must name at least one device, got ()")
            self.producer_devices = tuple(check_device("producer_devices", d) for d in devices)
        self.variants_per_index = _int("variants_per_index", self.variants_per_index, 0)
        self.store_bytes = _int("store_bytes", self.store_bytes, 0)
        self.lookahead = _int("lookahead", self.lookahead, 1, optional=True)
        if self.seed is not None:
            self.seed = _int("seed", self.seed)
        self.return_meta = bool(self.return_meta)
        self.guidance_scale = _float("guidance_scale", self.guidance_scale, 0.0)
        self.num_inference_steps = _int("num_inference_steps", self.num_inference_steps, 1)
        self.deepcache_interval = _int("deepcache_interval", self.deepcache_interval, 1, optional=True)
        if self.decoder not in ("vae", "tiny"):
            raise ValueError(f"decoder must be 'vae' or 'tiny', got {self.decoder!r}")
        if self.alpha > 0:  # strengths are unused while alpha is 0 (a real-only curriculum stage)
            self.check_steps(choices)
        self.wait_timeout = _float("wait_timeout", self.wait_timeout, 0.0, strict=True, allow_inf=True)
        self.image_size = _int("image_size", self.image_size, 8, optional=True)
        if self.image_size is not None and self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (the VAE's downsampling), got {self.image_size!r}")
        self.producer_capacity = _int("producer_capacity", self.producer_capacity, 1)
        self.producer_slots = _int("producer_slots", self.producer_slots, 1, optional=True)
        self.producer_timeout = _float("producer_timeout", self.producer_timeout, 0.0, strict=True, optional=True)
        if self.on_producer_error not in ("raise", "restart"):
            raise ValueError(f"on_producer_error must be 'raise' or 'restart', got {self.on_producer_error!r}")
        self.max_restarts = _int("max_restarts", self.max_restarts, 0)
        if self.latent_cache_path is not None and not isinstance(self.latent_cache_path, (str, os.PathLike)):
            raise TypeError(f"latent_cache_path must be a path, got {self.latent_cache_path!r}")
        if self.distributed not in ("auto", True, False):
            raise ValueError(f"distributed must be 'auto', True or False, got {self.distributed!r}")
        if self.progress is not None and not callable(getattr(self.progress, "set_postfix", None)):
            raise TypeError(f"progress must have set_postfix (a tqdm bar), got {self.progress!r}")
        self.log_every = _int("log_every", self.log_every, 0)
        if not isinstance(self.leakage_guard, bool):
            raise TypeError(f"leakage_guard must be True or False, got {self.leakage_guard!r}")
        for name in ("transform", "pool_factory"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable, got {value!r}")
        if not (self.prompts is None or isinstance(self.prompts, (str, Mapping, Sequence)) or callable(self.prompts)):
            raise TypeError(f"prompts must be a template, a sequence, a mapping or a callable, got {self.prompts!r}")
        if self.alpha > 0 and self.synthesizer is None and self.pool_factory is None and self.retrieval is None:
            raise ValueError(f"alpha={self.alpha} > 0 needs a synthesizer (a Synthesizer, a checkpoint path or a spec) "
                             "or a retrieval source (retrieval=)")  # fmt: skip
        if self.pool_factory is None:  # a custom pool gives ``synthesizer`` its own meaning
            check_synthesizer(self.synthesizer)

    def check_steps(self, choices) -> None:
        """Every strength must leave at least one denoising step (diffusers: ``int(steps * strength)``), unless
        the synthesizer runs every step at any strength (``scheduler="lcm_span"``: its engine checks each job)."""
        spec = self.synthesizer if isinstance(self.synthesizer, Mapping) else {}
        if getattr(self.synthesizer, "spans_strength", False) or str(spec.get("scheduler", "")).lower() == "lcm_span":
            return
        for s in choices or ():
            if int(self.num_inference_steps * s) < 1:
                raise ValueError(f"strengths={self.strengths!r} with num_inference_steps={self.num_inference_steps}: "
                                 f"strength {s} leaves int({self.num_inference_steps} * {s}) = 0 denoising steps")  # fmt: skip

    @property
    def generates(self) -> bool:
        """Whether producers are needed: something synthetic is planned and a synthesizer (or pool) is given."""
        return self.alpha > 0 and (self.synthesizer is not None or self.pool_factory is not None)

    def with_synthesis(self, alpha=None, strengths=..., mixing=None) -> "FusionConfig":
        """A copy with a new ``alpha``, ``strengths`` and/or ``mixing``, validated (the curriculum hook's check)."""
        changes = {}
        if alpha is not None:
            changes["alpha"] = alpha
        if strengths is not ...:
            changes["strengths"] = strengths
        if mixing is not None:
            changes["mixing"] = mixing
        return replace(self, **changes)

    def check_dataset(self, dataset, labels) -> None:
        """Prompts given per label must cover every label of the dataset (``labels``: the known label set)."""
        prompts = self.prompts
        if labels is None or self.alpha == 0 or prompts is None or isinstance(prompts, str) or callable(prompts) \
                and not isinstance(prompts, (Mapping, Sequence)):  # fmt: skip
            return
        for label in labels:
            if isinstance(prompts, Mapping):
                ok = label in prompts
            else:
                ok = isinstance(label, (int,)) and 0 <= label < len(prompts)
            if not ok:
                raise ValueError(f"prompts has no prompt for label {label!r} of the dataset "
                                 f"({type(prompts).__name__} with {len(prompts)} entries)")  # fmt: skip

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
