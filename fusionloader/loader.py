"""FusionLoader: a swap-in ``DataLoader`` that mixes fresh diffusion variants of the images being trained on.

NOTE [Loader design]
~~~~~~~~~~~~~~~~~~~~

A real ``torch.utils.data.DataLoader`` does all real-image work; FusionLoader only chooses the keys it
fetches and replaces some samples afterwards. This file is the front, the iteration state and the lifetime;
the parts it composes each have their own file and NOTE (docs/ARCHITECTURE.md draws the map):

* Validation. The constructor builds a plain ``DataLoader`` from the user's arguments (``self._dl``), so
  every DataLoader argument is validated by torch itself and ``sampler``/``batch_sampler``/``collate_fn``/
  ``len()`` mean exactly what they mean there; that object is never iterated. The synthesis settings are a
  :class:`~fusionloader.config.FusionConfig` (config.py), each field validated once at construction;
  assigning ``batch_size``, ``sampler``, ... afterwards raises ``ValueError`` as DataLoader does.
* Order (order.py, NOTE [Epoch order]) and plan (plan.py, NOTE [Plan draws]). An epoch's order is read a
  batch at a time: the default samplers' orders are reproduced as numpy arrays (``seed=`` given; under
  torch.distributed ``DistributedSampler``'s), any other sampler is iterated lazily exactly as DataLoader
  iterates it. RNG draw order: DataLoader draws its workers' base seed from ``generator`` (or the global RNG)
  *before* the sampler draws; so do we -- we draw the base seed, hand the runner a generator replaying the
  pre-draw state (workers get DataLoader's seeds), then iterate the sampler, so the user's generator and
  the global RNG end in DataLoader's states. Coins, strengths and seeds per position come from a
  counter-based generator, drawn per batch.
* Runner (worker.py, NOTE [Worker side]). A second ``DataLoader`` (same workers, pin_memory, timeout,
  worker_init_fn, prefetch, persistence, multiprocessing context, in_order) iterates a wrapper dataset with
  a (batch) sampler yielding the planned keys; ``alpha=0`` is bit-exact DataLoader output, and a dataset's
  exception reaches the trainer with its own type.
* Requests (window.py, NOTE [Request window]) and mixing (mixing.py, NOTE [Mixing]): synthetic positions
  are requested ahead from the ``ProducerPool`` (only through its public methods), resolved against the
  late policy (a :class:`~fusionloader.config.LatePolicy`), post-processed and collated.
* Epoch (epoch.py): ``iter()`` returns an ``EpochIterator`` handed its collaborators; its ``EpochProgress``
  (consumed batches, worker RNG states) is what ``state_dict()`` saves mid-epoch.
* Lifetime. Nothing is started before the first ``iter()``. ``close()`` (also ``__exit__``, ``__del__``
  and interpreter exit) cancels outstanding jobs, stops the runner's workers and the pool. A new ``iter()`` abandons the previous epoch iterator (its jobs are cancelled).
* Epochs. ``set_epoch(e)`` sets the next epoch and is forwarded to the sampler; without it the loader
  counts epochs itself. Under torch.distributed with default sampling, ``sampler`` is a
  ``DistributedSampler`` with the same shard; a ``set_epoch`` made on it by a trainer is honoured.
  ``set_synthesis(alpha=, strengths=, mixing=)`` changes what the next epochs synthesise (the curriculum hook).
* Mixing policy (policies.py, NOTE [Mixing policies]). ``mixing=`` decides which positions are synthetic: the
  plan binds it per epoch (``Replace``: the alpha coin; ``Concat``: the epoch is the dataset doubled, so the
  loader's own orders, ``len()`` and the distributed shard are those of ``2N`` virtual indices; ``HardWeighted``:
  the hard-sample mask of feedback.py taken when the epoch is planned, saved in ``state_dict`` mid-epoch).
  ``report(indices, values, kind=)`` feeds the hard-sample tracker (feedback.py). ``retrieval=`` serves
  synthetic positions from a ``RetrievedVariants`` (mixing.py); no producer job is made for them, and without a
  synthesizer no pool starts.
* Resume (torchdata's contract). ``state_dict()`` holds the epoch, the batches consumed (a prefix plus the
  few consumed out of order under ``in_order=False``), the order's snapshot at the epoch's start (NOTE
  [Epoch order]: generator/global RNG/sampler state -- never the order itself, except for a sampler whose
  order cannot be re-derived), the workers' RNG states (NOTE [Worker side]) and the counts; it is
  JSON-serialisable. ``load_state_dict`` makes the next ``iter()`` continue there, and ``state_dict()``
  before that ``iter()`` returns the loaded position. Synthetic content is recomputed from the plan's seeds.
  DataLoader draws the workers' base seed only when it starts workers (once, with ``persistent_workers``);
  the state records whether the saved epoch drew one, and the resumed epoch does the same.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import math
import weakref
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from .config import LATE_POLICIES, FusionConfig, LatePolicy
from .distributed import dist_info
from .epoch import EpochIterator, EpochProgress
from .mixing import Mixer
from .feedback import HardSampleTracker, tail_classes
from .order import (ArrayOrder, OrderSnapshot, StreamOrder, distributed_order, from_json, mix_seed, random_order,
                    recomputable, sequential_order, to_json)  # fmt: skip
from .plan import EpochPlan
from .requests import JobMaker, start_pool
from .sources.dataset import ImageSource
from .stats import LoaderStats
from .store import VariantStore
from .window import RequestWindow
from .worker import DispatchGate, PlannedDataset, PlanSampler, WorkerCollate, WorkerInit

__all__ = ["LATE_POLICIES", "FusionConfig", "FusionLoader", "LatePolicy"]

logger = logging.getLogger("fusionloader")

T_co = TypeVar("T_co", covariant=True)
_LIVE: "weakref.WeakSet[FusionLoader]" = weakref.WeakSet()
_HAS_IN_ORDER = "in_order" in inspect.signature(DataLoader.__init__).parameters  # torch >= 2.6
_STATE_VERSION = 2
# DataLoader refuses these after init (DataLoader.__setattr__); so do we, with its message.
_FROZEN = ("batch_size", "batch_sampler", "sampler", "drop_last", "dataset", "persistent_workers")


@atexit.register
def _close_live_loaders() -> None:
    for loader in list(_LIVE):
        try:
            loader.close()
        except Exception:  # interpreter exit: never let one loader stop the others closing
            pass


class _TrackedDistributedSampler(torch.utils.data.DistributedSampler):
    """The shard of a rank under default sampling; remembers whether someone else called ``set_epoch``."""

    set_by_caller = False

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.set_by_caller = True


class FusionLoader(Generic[T_co]):
    """A ``DataLoader`` that replaces a fraction ``alpha`` of samples with synthetic variants of themselves.

    Positional and DataLoader keyword arguments are exactly ``torch.utils.data.DataLoader``'s. The synthesis
    settings are a :class:`~fusionloader.config.FusionConfig`: pass ``config=`` or its fields as keyword
    arguments (``synthesizer=``, ``alpha=``, ``strengths=``, ``prompts=``, ``transform=``, ``late_policy=``,
    ``seed=``, ``return_meta=``, ...; keyword arguments override ``config``'s fields). See config.py for
    every field and its meaning; each is validated here, with an error naming it and the value.
    """

    def __init__(
        self,
        dataset,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler=None,
        batch_sampler=None,
        num_workers: int = 0,
        collate_fn=None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn=None,
        multiprocessing_context=None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        config: FusionConfig | None = None,
        **settings,
    ):
        # torch validates every DataLoader argument (and picks the default collate_fn / samplers).
        self._dl = DataLoader(
            dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory, drop_last,
            timeout, worker_init_fn, multiprocessing_context, generator, prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers, pin_memory_device=pin_memory_device,
            **({"in_order": in_order} if _HAS_IN_ORDER else {}),
        )
        unknown = sorted(set(settings) - set(FusionConfig.field_names()))
        if unknown:
            raise TypeError(f"FusionLoader got unexpected keyword argument(s) {unknown}; the synthesis settings are "
                            f"FusionConfig's fields: {', '.join(FusionConfig.field_names())}")  # fmt: skip
        if config is not None and not isinstance(config, FusionConfig):
            raise TypeError(f"config must be a FusionConfig, got {config!r}")
        cfg = FusionConfig(**settings) if config is None else config.__class__(**{**vars(config), **settings})
        self._passthrough = isinstance(dataset, IterableDataset)
        if self._passthrough and cfg.alpha > 0:
            raise ValueError(f"alpha={cfg.alpha}: synthesis needs a map-style dataset (an index per sample); "
                             "an IterableDataset works only with alpha=0")  # fmt: skip
        if cfg.transform is not None and getattr(dataset, "transform", None) is not None:
            raise ValueError("transform: the dataset applies its own transform; pass transform= only for datasets "
                             "returning raw images")  # fmt: skip
        self.config = cfg
        self._seed = cfg.seed if cfg.seed is not None else torch.initial_seed()
        self._user_sampler = sampler is not None or batch_sampler is not None
        self._check_mixing(cfg)
        self._init_runtime()
        self._feedback = None if self._passthrough else HardSampleTracker(len(dataset))
        if not self._passthrough:
            cfg.check_dataset(dataset, self._source.label_set())
            self._check_retrieval(cfg)
            if cfg.leakage_guard:
                self._jobs.check_leakage()
        self._next_epoch = 0
        self._epoch_pinned = False
        self._resume: dict | None = None  # a loaded state, until the next iter() continues from it
        self._progress: EpochProgress | None = None  # the epoch in progress (for state_dict)
        self._stats = LoaderStats()
        self._initialized = True

    def _check_mixing(self, cfg: FusionConfig) -> None:
        if cfg.mixing.copies > 1 and self._user_sampler:
            raise ValueError(f"sampler: mixing={cfg.mixing.name!r} orders the doubled epoch itself (every real index "
                             "once plus one generated copy of each); a sampler or batch_sampler orders only the real "
                             "indices. Leave sampler/batch_sampler unset (shuffle= picks sequential or random)")  # fmt: skip
        if self._passthrough and cfg.mixing.copies > 1:
            raise ValueError(f"mixing={cfg.mixing.name!r} needs a map-style dataset (an index per sample)")

    def _check_retrieval(self, cfg: FusionConfig) -> None:
        """The retrieval source must know every class of the dataset (labels are its class ids)."""
        if cfg.retrieval is None:
            return
        labels = self._source.label_set()
        num_classes = getattr(cfg.retrieval, "num_classes", None)
        if labels is None or num_classes is None:
            return  # checked per position (RetrievedVariants raises naming the label)
        for label in labels:
            if not isinstance(label, (int, np.integer)) or not 0 <= int(label) < int(num_classes):
                raise ValueError(f"retrieval: the dataset has label {label!r} but the retrieval source covers class ids "
                                 f"0 .. {int(num_classes) - 1} (retrieve with num_classes= the dataset's classes)")  # fmt: skip

    def _init_runtime(self) -> None:
        cfg = self.config
        self._source = ImageSource(self._dl.dataset, cfg.transform) if not self._passthrough else None
        self._store = VariantStore(cfg.variants_per_index, cfg.store_bytes)
        split = cfg.synthesizer is not None or cfg.pool_factory is not None
        source = self._source  # not the loader (a cycle through the mixer would keep a dropped loader alive)
        self._mixer = Mixer(self._store, cfg.late_policy, cfg.wait_timeout, retrieval=cfg.retrieval,
                            label_of=lambda index: int(source.label(index)), split=split)  # fmt: skip
        self._tail = None  # the tail-class mask (HardWeighted), computed once from the labels
        self._jobs = None if self._passthrough else JobMaker(cfg, self._source, self._dl.dataset, self._mixer.retrieves)
        self._window = RequestWindow(self._jobs)
        self._pool = None
        self._runner: DataLoader | None = None
        self._gate = DispatchGate()  # shared with the runner's workers (NOTE [Worker side])
        self._plan_sampler: PlanSampler | None = None
        self._worker_init: WorkerInit | None = None
        self._active = None  # weakref to the live epoch iterator
        self._dist_sampler = None
        self._closed = False

    def __setattr__(self, name: str, value) -> None:
        if name in _FROZEN and self.__dict__.get("_initialized", False):
            raise ValueError(f"{name} attribute should not be set after {type(self).__name__} is initialized")
        super().__setattr__(name, value)

    # -- DataLoader's face --------------------------------------------------------------------------

    dataset = property(lambda self: self._dl.dataset)
    batch_size = property(lambda self: self._dl.batch_size)
    drop_last = property(lambda self: self._dl.drop_last)
    collate_fn = property(lambda self: self._dl.collate_fn)
    pin_memory = property(lambda self: self._dl.pin_memory)
    timeout = property(lambda self: self._dl.timeout)
    worker_init_fn = property(lambda self: self._dl.worker_init_fn)
    generator = property(lambda self: self._dl.generator)
    prefetch_factor = property(lambda self: self._dl.prefetch_factor)
    persistent_workers = property(lambda self: self._dl.persistent_workers)
    multiprocessing_context = property(lambda self: self._dl.multiprocessing_context)

    @property
    def num_workers(self) -> int:
        return self._dl.num_workers

    @num_workers.setter
    def num_workers(self, value: int) -> None:  # DataLoader allows it; takes effect with the next runner
        self._dl.num_workers = value
        self._runner = None

    @property
    def sampler(self):
        return self._distributed_sampler() if self._order_mode() == "distributed" else self._dl.sampler

    @property
    def batch_sampler(self):
        if self._order_mode() == "distributed":
            from torch.utils.data import BatchSampler

            bs = self._dl.batch_size
            return None if bs is None else BatchSampler(self._distributed_sampler(), bs, self._dl.drop_last)
        return self._dl.batch_sampler

    def __len__(self) -> int:
        copies = 1 if self._passthrough else self.config.mixing.copies
        if self._order_mode() == "distributed":
            rank, world = dist_info()
            n = len(self._dl.dataset) * copies
            per_rank = math.ceil((n - world) / world) if self._dl.drop_last and n % world else math.ceil(n / world)
        elif copies > 1:  # a doubled epoch (Concat), ordered by the loader itself
            per_rank = len(self._dl.dataset) * copies
        else:
            return len(self._dl)
        bs = self._dl.batch_size
        if bs is None:
            return per_rank
        return per_rank // bs if self._dl.drop_last else math.ceil(per_rank / bs)

    # -- synthesis settings ---------------------------------------------------------------------------

    alpha = property(lambda self: self.config.alpha)
    strengths = property(lambda self: self.config.strengths)
    late_policy = property(lambda self: self.config.late_policy.name)
    seed = property(lambda self: self._seed)
    synthesizer = property(lambda self: self.config.synthesizer)
    return_meta = property(lambda self: self.config.return_meta)

    mixing = property(lambda self: self.config.mixing)
    retrieval = property(lambda self: self.config.retrieval)

    @property
    def synthesizes(self) -> bool:
        """Whether this loader can replace samples (it was given a synthesizer, a pool factory or a retrieval source)."""
        cfg = self.config
        return cfg.synthesizer is not None or cfg.pool_factory is not None or cfg.retrieval is not None

    def set_synthesis(self, alpha: float | None = None, strengths=..., mixing=None) -> None:
        """Change ``alpha``, ``strengths`` and/or ``mixing`` for the epochs planned from now on (the next
        ``iter()``); validated as at construction. The hook for schedules (``fusionloader.methods.curriculum.apply``)."""
        cfg = self.config.with_synthesis(alpha, strengths, mixing)
        if cfg.alpha > 0 and self._passthrough:
            raise ValueError(f"alpha={cfg.alpha}: synthesis needs a map-style dataset")
        self._check_mixing(cfg)
        self.config = cfg

    # -- feedback (DisCL) -------------------------------------------------------------------------------

    def report(self, indices, values, kind: str = "prob") -> None:
        """Trainer feedback: per-sample true-class probabilities (``kind="prob"``) or cross-entropy losses
        (``kind="loss"``) for dataset ``indices`` (e.g. ``meta["index"]``). Cheap (vectorised; callable every
        step); the latest value per index is kept, saved in ``state_dict``, and shapes the epochs planned after
        it under ``mixing="hard"`` (NOTE [Mixing policies]). ``ValueError`` naming the argument for bad input."""
        if self._feedback is None:
            raise ValueError("report: an IterableDataset has no dataset indices to report on")
        self._feedback.report(indices, values, kind)

    def hard_samples(self) -> np.ndarray:
        """The dataset indices the hard-sample policy counts as hard now (``HardWeighted``'s rules; its defaults
        when another policy is in use), sorted."""
        if self._feedback is None:
            raise ValueError("hard_samples: an IterableDataset has no dataset indices")
        return np.flatnonzero(self._hard_mask())

    def _hard_mask(self) -> np.ndarray:
        from .policies import HardWeighted

        policy = self.config.mixing if isinstance(self.config.mixing, HardWeighted) else HardWeighted()
        if self._tail is None or self._tail[0] != policy.tail_class_size:
            labels = self._labels()
            self._tail = (policy.tail_class_size, tail_classes(labels, policy.tail_class_size))
        return self._feedback.hard(policy.threshold) | self._tail[1]

    def _labels(self) -> np.ndarray:
        """Every index's label (without images when the dataset has ``targets``/``samples``)."""
        targets = getattr(self._dl.dataset, "targets", None)
        if targets is not None and len(targets) == len(self._dl.dataset):
            arr = np.asarray(targets.tolist() if isinstance(targets, torch.Tensor) else targets)
            if arr.ndim == 1:
                return arr
        labels = [self._source.label(i) for i in range(len(self._dl.dataset))]
        return np.asarray([str(v) if not isinstance(v, (int, np.integer)) else int(v) for v in labels])

    # -- epochs ---------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` epoch ``epoch``; forwarded to the sampler and batch sampler."""
        self._next_epoch = int(epoch)
        self._epoch_pinned = True
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None
        seen = set()
        for obj in (self.sampler, self.batch_sampler, getattr(self.batch_sampler, "sampler", None)):
            fn = getattr(obj, "set_epoch", None)
            if callable(fn) and id(obj) not in seen:
                seen.add(id(obj))
                fn(epoch)

    def _choose_epoch(self) -> int:
        """The epoch of a new ``iter()`` (no resume pending); see NOTE [Loader design], "Epochs"."""
        ds = self._distributed_sampler() if self._order_mode() == "distributed" else None
        cur = self._progress
        if ds is not None and ds.set_by_caller:  # a trainer (Lightning) called sampler.set_epoch
            epoch = ds.epoch
        elif self._epoch_pinned:
            epoch = self._next_epoch
        elif cur is not None and cur.consumed == 0 and cur.num_batches != 0:
            epoch = cur.epoch  # the previous iter() yielded nothing (e.g. a trainer's iterability probe)
        else:
            epoch = self._next_epoch
        if ds is not None:
            ds.epoch, ds.set_by_caller = epoch, False
        self._epoch_pinned = False
        return epoch

    # -- orders ---------------------------------------------------------------------------------------

    def _order_mode(self) -> str:
        if self._passthrough:
            return "passthrough"
        if not self._user_sampler and self.config.distributed is not False and dist_info()[1] > 1:
            return "distributed"
        if not self._user_sampler and self.config.seed is not None and self._dl.generator is None:
            return "seeded"
        if self.config.mixing.copies > 1:  # a doubled epoch: always the loader's own order, from the loader's seed
            return "seeded"
        return "sampler"

    def _rank_world(self) -> tuple[int, int]:
        return dist_info() if self._order_mode() == "distributed" else (0, 1)

    def _distributed_sampler(self):
        rank, world = dist_info()
        ds = self._dist_sampler
        if ds is None or (ds.rank, ds.num_replicas) != (rank, world):
            # DistributedSampler needs one seed on every rank; its default is 0.
            seed = self.config.seed if self.config.seed is not None else 0
            ds = _TrackedDistributedSampler(self._dl.dataset, world, rank, shuffle=isinstance(self._dl.sampler, RandomSampler),
                                            seed=seed, drop_last=self._dl.drop_last)  # fmt: skip
            self._dist_sampler = ds
        return ds

    def _order_objects(self) -> dict:
        """Things whose state decides a sampler's order (besides the generator)."""
        objs = {"sampler": self._dl.sampler, "batch_sampler": self._dl.batch_sampler}
        return {k: v for k, v in objs.items() if v is not None}

    def _index_sampler(self):
        return self._dl.batch_sampler if self._dl.batch_sampler is not None else self._dl.sampler

    def _array_order(self, epoch: int) -> ArrayOrder:
        n = len(self._dl.dataset)
        copies = self.config.mixing.copies  # Concat: the order of 2N virtual indices (NOTE [Mixing policies])
        shuffle = isinstance(self._dl.sampler, RandomSampler)
        if self._order_mode() == "distributed":
            rank, world = dist_info()
            seed = self.config.seed if self.config.seed is not None else 0
            order = distributed_order(n * copies, rank, world, shuffle, seed, epoch, self._dl.drop_last)
        else:
            order = random_order(n * copies, self._seed, epoch) if shuffle else sequential_order(n * copies)
        if copies > 1:
            return ArrayOrder.doubled(order, n, self._dl.batch_size, self._dl.drop_last)
        return ArrayOrder.batched(order, self._dl.batch_size, self._dl.drop_last)

    def _plan(self, epoch: int, order, saved_mixing: dict | None = None) -> EpochPlan:
        """The epoch's plan; its mixing policy is bound now (``saved_mixing``: the bound state a resumed epoch had)."""
        rank, world = self._rank_world()
        cfg = self.config
        if saved_mixing is not None:
            mixing = cfg.mixing.restore(saved_mixing.get("state"), cfg.alpha)
        else:
            mixing = cfg.mixing.bind(cfg.alpha, self._hard_mask() if cfg.mixing.uses_feedback else None)
        return EpochPlan(order, seed=self._seed, epoch=epoch, alpha=cfg.alpha, strengths=cfg.strengths,
                         rank=rank, world_size=world, mixing=mixing)  # fmt: skip

    def _epoch_order(self, epoch: int, fresh_workers: bool):
        """(order, runner generator or None, snapshot or None) for ``epoch``; NOTE [Loader design], "Order"."""
        if self._order_mode() in ("distributed", "seeded"):
            gen = torch.Generator()
            gen.manual_seed(mix_seed(self._seed, epoch, self._rank_world()[0], 0xD1))
            return self._array_order(epoch), gen, None
        user_gen = self._dl.generator
        snapshot = OrderSnapshot.take(user_gen, self._order_objects())
        gen = None
        if fresh_workers:  # DataLoader draws the workers' base seed before the sampler draws
            state = user_gen.get_state() if user_gen is not None else torch.get_rng_state()
            torch.empty((), dtype=torch.int64).random_(generator=user_gen)
            gen = torch.Generator()
            gen.set_state(state)
        index_sampler = self._index_sampler()
        try:
            num_batches = len(index_sampler)
        except TypeError:
            num_batches = None
        order = StreamOrder(iter(index_sampler), self._dl.batch_sampler is not None, num_batches)
        order.extend_to(1)  # the sampler draws now, as DataLoader's first batch would make it draw
        return order, gen, snapshot

    # -- iteration ------------------------------------------------------------------------------------

    def __iter__(self):
        if self._closed:
            raise RuntimeError("FusionLoader is closed")
        if self._passthrough:
            return iter(self._dl)
        self._abandon_active()
        resume, self._resume = self._resume, None
        epoch = resume["epoch"] if resume is not None else self._choose_epoch()
        self._next_epoch = epoch + 1
        persistent = self._dl.persistent_workers and self._runner is not None
        if resume is not None and resume.get("stored_rest") is not None:
            rest = resume["stored_rest"]
            order = ArrayOrder.from_batches(rest["batches"], rest["first_batch"], rest["first_position"])
            gen, snapshot, draw = torch.Generator(), None, True
            gen.manual_seed(mix_seed(self._seed, epoch, 0xD2))
        else:
            # DataLoader draws a base seed only when it starts workers; persistent ones are started once. A resumed
            # epoch follows what the saved run did, even if it needs to start workers now.
            draw = not persistent if resume is None else bool(resume.get("draws_base_seed", True))
            order, gen, snapshot = self._epoch_order(epoch, fresh_workers=draw)
            if gen is None and self._runner is None:  # new workers the saved run did not draw a seed for
                gen = torch.Generator()
                gen.manual_seed(mix_seed(self._seed, epoch, 0xD3))
        plan = self._plan(epoch, order, resume.get("epoch_mixing") if resume is not None else None)
        progress = EpochProgress(epoch, plan.num_batches, snapshot)
        progress.plan = plan
        progress.draws_base_seed = draw
        if resume is not None:
            progress.prefix, progress.extra = resume["batch"], set(resume.get("extra", ()))
            progress.workers = dict(resume.get("workers", {}))
            progress.last_worker = resume.get("last_worker")
        self._progress = progress
        if self.config.generates:  # retrieval alone needs no producers
            self._start_pool()
        adopted = self._window.adopt(plan) if resume is None else (self._window.drop_ahead() or None)
        key_base, submitted = (self._window.new_key_base(), None) if adopted is None else adopted
        self._stats.begin(epoch)
        # deferred positions need workers that hand batches back in dispatch order (NOTE [Mixing], "When")
        gate = self._gate if self._dl.num_workers > 0 and getattr(self._dl, "in_order", True) else None
        it = EpochIterator(plan, progress, key_base, submitted, pool=self._pool, window=self._window, mixer=self._mixer,
                            stats=self._stats, config=self.config, horizon=self._horizon, plan_ahead=self._plan_ahead,
                            length=self.__len__, gate=gate)  # requests its first window now; fmt: skip
        # the runner dispatches its first batches at iter(): their synthetic images are resolved then
        it.runner_iter = self._runner_iter(plan, progress, gen, resumed=resume is not None, dispatch=it.dispatch)
        self._active = weakref.ref(it)
        return it

    def _runner_iter(self, plan: EpochPlan, progress: EpochProgress, gen, resumed: bool, dispatch):
        dl = self._dl
        auto = dl.batch_sampler is not None
        if self._runner is None:
            self._plan_sampler = PlanSampler(batched=auto)
            self._worker_init = WorkerInit(dl.worker_init_fn)
            wrapped = PlannedDataset(dl.dataset, self._source, self.config.transform, self._gate.tensor)  # picklable
            kw = dict(
                num_workers=dl.num_workers, collate_fn=WorkerCollate(dl.collate_fn, auto), pin_memory=dl.pin_memory,
                timeout=dl.timeout, worker_init_fn=self._worker_init, multiprocessing_context=dl.multiprocessing_context,
                prefetch_factor=dl.prefetch_factor if dl.num_workers > 0 else None, persistent_workers=dl.persistent_workers,
                pin_memory_device=dl.pin_memory_device,
            )
            if _HAS_IN_ORDER:
                kw["in_order"] = dl.in_order
            if auto:
                self._runner = DataLoader(wrapped, batch_sampler=self._plan_sampler, **kw)
            else:
                self._runner = DataLoader(wrapped, batch_size=None, sampler=self._plan_sampler, **kw)
        w = max(dl.num_workers, 1)
        if resumed and progress.consumed:
            # NOTE [Worker side]: physical worker i continues logical worker (shift + i) % W's stream.
            self._worker_init.shift = 0 if progress.last_worker is None else (progress.last_worker + 1) % w
            self._worker_init.states = {int(k): v for k, v in progress.workers.items()}
        else:
            self._worker_init.shift, self._worker_init.states = 0, {}
        self._plan_sampler.set(plan, progress.prefix, progress.extra, dispatch)
        if gen is not None:
            self._runner.generator = gen
        return iter(self._runner)

    # -- synthesis plumbing -----------------------------------------------------------------------------

    def _horizon(self) -> int:
        """How many samples ahead to request (NOTE [Request window]). A fixed ``lookahead`` when given; by
        default at least 2x the samples the trainer consumes while a producer makes one job (pool latency)."""
        floor = max(64, 8 * (self._dl.batch_size or 1))
        if self.config.lookahead is not None:
            return self.config.lookahead
        if self._pool is None:
            return floor
        total = self._stats.total  # the rate over the whole run: an epoch's first batches say little
        latency = getattr(self._pool, "latency_s", 0.0)
        if total.wall_s <= 0 or latency <= 0:
            return floor
        rate = total.samples / total.wall_s
        return int(min(max(floor, math.ceil(2.0 * rate * latency)), 1 << 16))

    def _plan_ahead(self, epoch: int, positions: int) -> None:
        """Requests for coming epochs, only where their order is a pure function of the epoch."""
        if self._pool is None or self._epoch_pinned or self._order_mode() not in ("seeded", "distributed"):
            return
        self._window.plan_ahead(epoch, positions, lambda e: self._plan(e, self._array_order(e)))

    def _start_pool(self) -> None:
        if self._pool is not None:
            return
        self._pool = self._window.pool = start_pool(self.config, self._source, self._slot_dtype(), self._in_flight())
        _LIVE.add(self)

    def _in_flight(self) -> int:
        """Synthetic positions that can be dispatched to workers and not yet consumed: the batch being made plus
        ``prefetch_factor`` per worker (DataLoader's bound), at ``alpha`` of the batch."""
        dl = self._dl
        ahead = (dl.prefetch_factor or 0) * dl.num_workers if dl.num_workers > 0 else 0
        return math.ceil(self.config.alpha * (dl.batch_size or 1)) * (ahead + 1)

    def _slot_dtype(self) -> torch.dtype:
        """uint8 ring slots when the raw images are 8-bit (PIL, uint8 arrays/tensors): what reaches the train
        transform is quantised to 8 bits anyway (``from_float``), and the ring in /dev/shm is 4x smaller."""
        try:
            info = self._source.info(0)
        except Exception:  # an unreadable first image is the runner's to report, with its index
            return torch.float32
        eight_bit = info.kind == "pil" and info.dtype in ("RGB", "L") or info.dtype == "uint8"
        return torch.uint8 if eight_bit else torch.float32

    def prompt(self, index: int, draw: float = 0.0) -> str:
        """The prompt a synthetic variant of dataset item ``index`` gets when its position's prompt draw is
        ``draw`` in [0, 1) (several prompts per class are chosen among by the draw)."""
        return self._jobs.prompt(index, draw)

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where iteration stands (JSON-serialisable): resume with ``load_state_dict`` on a loader built the
        same way. Right after ``load_state_dict`` (before ``iter()``) it is the loaded position."""
        if self._resume is not None:
            return dict(self._resume["raw"])
        cur = self._progress
        in_progress = cur is not None and cur.consumed > 0 and not cur.finished()
        state: dict[str, Any] = {"version": _STATE_VERSION, "seed": self._seed, "alpha": self.config.alpha,
                                 "stats": self._stats.state_dict()}  # fmt: skip
        if self._feedback is not None and self._feedback.reports:
            state["feedback"] = self._feedback.state_dict()
        if (in_progress or cur is not None and cur.consumed == 0 and not cur.finished() and not self._epoch_pinned) \
                and cur.plan is not None and self.config.mixing.uses_feedback:  # fmt: skip
            # the hard set this epoch was planned with (the tracker has moved on since)
            state["epoch_mixing"] = {"state": cur.plan.mixing.state()}
        if in_progress:
            state.update(next_epoch=cur.epoch, batch=cur.prefix, extra=sorted(cur.extra), draws_base_seed=cur.draws_base_seed,
                         workers={str(k): v for k, v in cur.workers.items()}, last_worker=cur.last_worker)  # fmt: skip
            if cur.snapshot is not None and not (recomputable(self._dl.sampler) and recomputable(self._dl.batch_sampler)):
                cur.snapshot = None  # this sampler cannot re-derive its order: store what is left of it
            if cur.snapshot is not None:
                state["order"] = cur.snapshot
            elif self._order_mode() == "sampler":
                state["stored_rest"] = self._stored_rest()
        elif cur is not None and cur.consumed == 0 and not cur.finished() and not self._epoch_pinned:
            # iter() was called but nothing consumed (a trainer's probe): that epoch, from its start
            state.update(next_epoch=cur.epoch, batch=0, draws_base_seed=cur.draws_base_seed)
            if cur.snapshot is not None:
                state["order"] = cur.snapshot
        else:
            state.update(next_epoch=self._next_epoch, batch=0,
                         draws_base_seed=not (self._dl.persistent_workers and self._runner is not None))
            if cur is not None and cur.plan is not None and not cur.plan.order.exhausted:
                cur.plan.order.extend_to(1 << 62)  # the sampler's draws past its end (DataLoader's next call)
            if self._order_mode() == "sampler":
                state["order"] = OrderSnapshot.take(self._dl.generator, self._order_objects())
        return to_json(state)

    def _stored_rest(self) -> dict:
        cur = self._progress
        if cur.stored_rest is None:
            order = cur.plan.order
            order.extend_to(1 << 62)
            batches, first_position = [], None
            for b in range(cur.prefix, order.num_batches):
                if first_position is None:
                    first_position = order.span(b)[0]
                batches.append([int(i) for i in order.batch(b)])
            cur.stored_rest = {"first_batch": cur.prefix, "first_position": first_position or 0, "batches": batches}
        rest = cur.stored_rest
        drop = cur.prefix - rest["first_batch"]
        if drop > 0:  # consumed since it was stored
            skipped = sum(len(b) for b in rest["batches"][:drop])
            rest = {"first_batch": cur.prefix, "first_position": rest["first_position"] + skipped,
                    "batches": rest["batches"][drop:]}  # fmt: skip
        return rest

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` at the next ``iter()``."""
        raw = state
        state = from_json(state)
        if state.get("version", 1) != _STATE_VERSION:
            raise ValueError(f"state version {state.get('version', 1)} is not {_STATE_VERSION}: saved by another "
                             "fusionloader version")  # fmt: skip
        self._seed = int(state["seed"])
        self._window.drop_ahead()
        self._next_epoch = int(state["next_epoch"])
        if state.get("order") is not None and self._order_mode() == "sampler":
            OrderSnapshot.restore(state["order"], self._dl.generator, self._order_objects())
        resume = {"raw": raw, "epoch": int(state["next_epoch"]), "batch": int(state["batch"]),
                  "extra": state.get("extra", []), "workers": state.get("workers", {}),
                  "last_worker": state.get("last_worker"), "stored_rest": state.get("stored_rest"),
                  "draws_base_seed": state.get("draws_base_seed", True)}  # fmt: skip
        if "epoch_mixing" in state:
            resume["epoch_mixing"] = state["epoch_mixing"]
        if self._feedback is not None:
            self._feedback = HardSampleTracker(len(self._dl.dataset))
            if state.get("feedback") is not None:
                self._feedback.load_state_dict(state["feedback"])
        self._resume = resume
        self._epoch_pinned = True
        self._stats.load_state_dict(state.get("stats", {}))
        if self._dl.persistent_workers:
            self._shutdown_runner()  # restored worker RNG needs fresh workers

    # -- stats ----------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Per-epoch and cumulative counts (see stats.py) plus the producers' figures."""
        producer = {}
        if self._pool is not None and not self._closed:
            try:
                producer = self._pool.stats()
            except Exception as e:  # a failed pool still lets the user read the loader's counts
                producer = {"error": str(e)}
        out = self._stats.as_dict(producer)
        out["store"] = {"variants": len(self._store), "bytes": self._store.nbytes, "evicted": self._store.evicted,
                        "harvested": self._mixer.harvested, "late_running": len(self._mixer.late)}  # fmt: skip
        return out

    # -- lifetime -------------------------------------------------------------------------------------

    def _abandon_active(self) -> None:
        """Cancel the jobs of the previous epoch iterator, whether or not it is still referenced."""
        active = self._active() if self._active is not None else None
        if active is not None:
            active.done = True
        self._gate.release_all()  # workers holding its batches hand them back (they are drained or dropped)
        self._window.cancel_outstanding()

    def _shutdown_runner(self) -> None:
        runner, self._runner = self._runner, None
        it = getattr(runner, "_iterator", None) if runner is not None else None  # persistent workers live there
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def close(self) -> None:
        """Cancel outstanding jobs, stop workers, threads and producers (idempotent; within a few seconds)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._abandon_active()
        self._window.drop_ahead()
        self._mixer.cancel_late(self._pool)
        self._shutdown_runner()
        pool, self._pool = self._pool, None
        self._window.pool = None
        if pool is not None:
            pool.close()
        _LIVE.discard(self)

    def __enter__(self) -> "FusionLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        # Pickled to spawned trainer processes (Lightning's ddp_spawn): runtime state stays behind.
        state = self.__dict__.copy()
        for key in ("_source", "_store", "_mixer", "_jobs", "_window", "_pool", "_runner", "_plan_sampler",
                    "_worker_init", "_active", "_dist_sampler", "_closed", "_progress", "_gate"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__["_progress"] = None
        self._init_runtime()
        if self.config.leakage_guard and self._jobs is not None:  # the spawned trainer checks its prompts too
            self._jobs.check_leakage()

    def __repr__(self) -> str:
        cfg = self.config
        return (f"FusionLoader(alpha={cfg.alpha}, batch_size={self.batch_size}, late_policy={cfg.late_policy.name!r}, "
                f"strengths={cfg.strengths!r}, mixing={cfg.mixing!r}, devices={cfg.producer_devices}"
                f"{', retrieval=' + repr(cfg.retrieval) if cfg.retrieval is not None else ''})")


def _signature() -> inspect.Signature:
    """``FusionLoader.__init__``'s signature as tools show it: DataLoader's parameters, ``config``, and every
    ``FusionConfig`` field as a keyword-only parameter with its default (they arrive through ``**settings``)."""
    import dataclasses

    own = inspect.signature(FusionLoader.__init__)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for f in dataclasses.fields(FusionConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=f.type))
    return own.replace(parameters=params)


FusionLoader.__init__.__signature__ = _signature()
