"""FusionLoader: a swap-in ``DataLoader`` that mixes fresh diffusion variants of the images being trained on.

NOTE [Loader design]
~~~~~~~~~~~~~~~~~~~~

A real ``torch.utils.data.DataLoader`` does all real-image work; FusionLoader only chooses the keys it
fetches and replaces some samples afterwards.

* Validation. The constructor builds a plain ``DataLoader`` from the user's arguments (``self._dl``),
  so every argument is validated by torch itself and ``sampler``/``batch_sampler``/``collate_fn``/
  ``len()`` mean exactly what they mean there. That object is never iterated.
* Plan. At the start of every epoch the batches of indices are fixed up front (NOTE in plan.py): the
  default samplers' orders are reproduced (``seed=`` given: a pure function of (seed, epoch); under
  torch.distributed: ``DistributedSampler``'s), otherwise the user's sampler is iterated and its order
  recorded. Recording follows DataLoader's RNG draw order exactly: DataLoader draws its worker base
  seed from ``generator`` (or the global RNG) *before* the sampler draws its permutation; we draw the
  base seed, record the order, and hand the runner a generator replaying the pre-draw state, so workers
  get the same seeds and the user's generator ends in the same state. ``plan_epoch`` then adds one alpha
  coin, strength and seed per position.
* Runner. A second ``DataLoader`` (same workers, pin_memory, timeout, worker_init_fn, prefetch,
  persistence, multiprocessing context) iterates a wrapper dataset with a batch sampler yielding the
  planned keys ``(position, index, synthetic)``. Workers run ``dataset[index]`` unchanged (plus
  ``transform=`` when given) and collate with the user's ``collate_fn`` when the batch has no
  synthetic position — so ``alpha=0`` is bit-exact DataLoader output. Batches with synthetic positions
  come back uncollated; for those positions the worker also reports the raw image's form and size.
* Mix (main process). For a synthetic position the producer's image is taken from the pool (``take``
  with the late policy's timeout): fresh images go into the variant store. A late position gets a stored
  variant of the same index (``reuse``) or the real sample already fetched (``real``/``wait`` after its
  timeout; counted as fallback). Under ``real``/``wait`` the late job is cancelled; under ``reuse`` it
  keeps running and is *harvested* into the store when done (across epochs, bounded): cancelling every
  late job livelocks producers slower than the trainer (each would be cancelled in flight, nothing
  would finish, the store would stay empty). The synthetic image is resized back to the
  real image's size and form (PIL/array/tensor) and passed through the *same* train transform
  (``dataset.transform`` for ImageFolder/VisionDataset-style datasets, else ``transform=``) under an
  RNG seeded by the position's seed (so a resumed run reproduces it), then the batch is collated with the
  user's ``collate_fn``. The real sample of a synthetic position is fetched anyway: it costs what the
  DataLoader would have cost, carries the label, and makes fallback free.
* Requests. Before each batch, synthetic positions up to ``lookahead`` samples ahead are submitted to
  the ``ProducerPool`` in consumption order (job key = iteration base + position). When the window runs
  past the epoch's end and the coming epochs' order is a pure function of them (``seed=`` given, or
  distributed default sampling), as many coming epochs as the window covers are planned early and their
  positions requested, so producers never idle at an epoch boundary and, when slower than the trainer,
  can work far enough ahead to deliver in time (few-shot epochs are shorter than one job's latency); each
  ``iter()`` adopts its epoch's requests, or cancels them all if it turns out to be another epoch.
* Lifetime. Nothing is started before the first ``iter()``. ``close()`` (also ``__exit__``, ``__del__``
  and interpreter exit) cancels outstanding jobs, stops the runner's workers and closes the pool, whose
  own shutdown protocol (NOTE in producer.py) bounds it to a few seconds. A new ``iter()`` abandons the
  previous epoch iterator (its outstanding jobs are cancelled; if it is resumed it falls back to real).
* Epochs. ``set_epoch(e)`` sets the next epoch and is forwarded to the sampler; without it the loader
  counts epochs itself. Under torch.distributed with default sampling, ``sampler`` is a
  ``DistributedSampler`` with the same shard; a ``set_epoch`` made on it by a trainer is honoured.
* Resume. ``state_dict()`` holds (seed, epoch, batches consumed, the recorded order when the sampler's
  order cannot be recomputed, the user generator's state); ``load_state_dict`` makes the next ``iter()``
  continue there. Synthetic content is recomputed from the plan's seeds; nothing of the ring is saved.
  A state saved after the last batch of an epoch resumes at the next epoch.
"""

from __future__ import annotations

import atexit
import collections
import inspect
import logging
import math
import random
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .distributed import devices_for_rank, dist_info, local_info
from .plan import batch_order, distributed_order, mix_seed, normalize_strengths, plan_epoch, random_order, sequential_order
from .sources.dataset import DatasetError, ImageSource, RawInfo, describe, from_float, get_image, replace_image
from .stats import LoaderStats
from .store import VariantStore

__all__ = ["FusionLoader", "LATE_POLICIES"]

logger = logging.getLogger("fusionloader")

LATE_POLICIES = ("reuse", "real", "wait")
_KEY_STRIDE = 1 << 32  # job keys: iteration serial * stride + position
_MAX_EPOCHS_AHEAD = 64  # bounds the look-ahead in epochs (an epoch may hold a single sample)
_LIVE: "weakref.WeakSet[FusionLoader]" = weakref.WeakSet()
_HAS_IN_ORDER = "in_order" in inspect.signature(DataLoader.__init__).parameters  # torch >= 2.6


@atexit.register
def _close_live_loaders() -> None:
    for loader in list(_LIVE):
        try:
            loader.close()
        except Exception:  # interpreter exit: never let one loader stop the others closing
            pass


# --- what workers run --------------------------------------------------------------------------


class _Key(NamedTuple):
    position: int
    index: int
    synthetic: bool
    seed: int


def _seeded_call(fn, x, seed: int):
    """``fn(x)`` with torch's CPU RNG and Python's ``random`` seeded by ``seed``, restored afterwards: random
    train transforms become a function of the position (resumable) and leave the caller's RNG alone."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            return fn(x)
        finally:
            random.setstate(py_state)


class _Item(NamedTuple):
    position: int
    index: int
    synthetic: bool
    sample: Any
    info: RawInfo | None


class _Batch:
    """What a runner worker returns: collated data (no synthetic position) or the items to mix."""

    __slots__ = ("positions", "data", "items")

    def __init__(self, positions, data=None, items=None):
        self.positions, self.data, self.items = positions, data, items

    def pin_memory(self, device=None):  # called by DataLoader's pin-memory thread
        if self.data is not None:
            from torch.utils.data._utils.pin_memory import pin_memory

            self.data = pin_memory(self.data, device)
        return self


class _PlannedDataset(Dataset):
    """``dataset[index]`` for planned keys; errors name the index and path."""

    def __init__(self, dataset, source: ImageSource, transform):
        self.dataset, self.source, self.transform = dataset, source, transform
        self._infos: dict[int, RawInfo] = {}

    def __len__(self):
        return len(self.dataset)

    def _finish(self, key: _Key, sample) -> _Item:
        info = None
        try:
            if self.transform is not None:
                raw = get_image(sample)
                if key.synthetic:
                    info = describe(raw)
                sample = replace_image(sample, _seeded_call(self.transform, raw, key.seed))
            elif key.synthetic:
                info = self._infos.get(key.index)
                if info is None:
                    own = self.source._folder or self.source._raw_view is not None
                    info = self.source.info(key.index) if own else describe(get_image(sample))
                    if len(self._infos) < 100_000:
                        self._infos[key.index] = info
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(key.index, self.source.path(key.index), e) from e
        return _Item(key.position, key.index, key.synthetic, sample, info)

    def __getitem__(self, key: _Key) -> _Item:
        try:
            sample = self.dataset[key.index]
        except Exception as e:
            raise DatasetError(key.index, self.source.path(key.index), e) from e
        return self._finish(key, sample)

    def __getitems__(self, keys):
        getitems = getattr(self.dataset, "__getitems__", None)
        if not getitems:
            return [self[k] for k in keys]
        try:
            samples = getitems([k.index for k in keys])
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(keys[0].index, None, e) from e
        return [self._finish(k, s) for k, s in zip(keys, samples)]


class _WorkerCollate:
    """Collate in the worker when nothing needs mixing (the DataLoader path), else pass items through."""

    def __init__(self, collate_fn, auto_collation: bool):
        self.collate_fn, self.auto = collate_fn, auto_collation

    def __call__(self, data):
        items = data if self.auto else [data]
        positions = [it.position for it in items]
        if any(it.synthetic for it in items):
            return _Batch(positions, items=items)
        samples = [it.sample for it in items]
        return _Batch(positions, data=self.collate_fn(samples if self.auto else samples[0]))


class _TrackedDistributedSampler(torch.utils.data.DistributedSampler):
    """The shard of a rank under default sampling; remembers whether someone else called ``set_epoch``."""

    set_by_caller = False

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.set_by_caller = True


class _PlanSampler:
    """The runner's (batch) sampler: the planned keys from ``start`` on; reads the current plan lazily."""

    def __init__(self, batched: bool):
        self.batched = batched
        self.keys: list[list[_Key]] = []
        self.start = 0

    def set(self, plan, start: int) -> None:
        self.keys = [
            [_Key(p, int(plan.indices[p]), bool(plan.synthetic[p]), int(plan.sample_seed[p])) for p in range(s, e)]
            for s, e in zip(plan.batch_starts[:-1].tolist(), plan.batch_starts[1:].tolist())
        ]
        self.start = start

    def __iter__(self):
        for batch in self.keys[self.start :]:
            yield batch if self.batched else batch[0]

    def __len__(self):
        return len(self.keys) - self.start


# --- the front ---------------------------------------------------------------------------------


class FusionLoader:
    """A ``DataLoader`` that replaces a fraction ``alpha`` of samples with synthetic variants of themselves.

    Positional and DataLoader keyword arguments are exactly ``torch.utils.data.DataLoader``'s. The
    keyword-only arguments configure synthesis (defaults follow DA-Fusion: alpha 0.5, strength 0.5,
    guidance 7.5, 50 steps, M = 10 variants per image):

    synthesizer: a ``fusionloader.Synthesizer``, a checkpoint path, or a spec the producer pool accepts.
    alpha: probability that a position is synthetic (one coin per position).
    strengths: SDEdit strength: a float, a sequence (uniform choice), ``"randomized"`` (DA-Fusion's
        randomized intensity, uniform over {0.25, 0.5, 0.75, 1.0}) or ``None`` (text-only).
    prompts: a template string (``"a photo of a {}"``, filled with ``dataset.classes[label]`` or the
        label), a sequence indexed by class label, a mapping label -> prompt (a list value = uniform choice
        per sample), or a callable ``(index, label) -> prompt``. Default: ``"a photo of a {}"`` when the
        dataset has ``classes``, else ``"a photo"``.
    transform: the train transform, for datasets returning raw images: applied to real images in workers
        and to synthetic ones. Leave ``None`` for datasets with their own ``transform`` attribute
        (ImageFolder, VisionDataset): theirs is applied to both.
    producer_devices: one producer per device, split among the local ranks of a node.
    late_policy: what a synthetic position gets when its image is not ready: ``"reuse"`` a stored variant
        of the same index (real if none), ``"real"``, or ``"wait"`` up to ``wait_timeout`` s, then real.
    variants_per_index, store_bytes: bounds of the in-memory variant store.
    lookahead: how many samples ahead requests are submitted (default: adaptive, at least
        ``max(64, 8 * batch_size)`` and 1.5x what the trainer consumes during one producer job's latency).
    seed: one seed for coins, strengths, sample seeds and (when given, with default sampling) the order.
        Default: ``torch.initial_seed()``.
    return_meta: yield ``(batch, meta)`` with ``meta`` a dict of tensors ``index``, ``planned``
        (the coin), ``synthetic`` (delivered synthetic), ``fresh``, ``strength`` (NaN when real).
    """

    def __init__(
        self,
        dataset,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler=None,
        batch_sampler=None,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable | None = None,
        multiprocessing_context=None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        synthesizer=None,
        alpha: float = 0.5,
        strengths=0.5,
        prompts=None,
        transform: Callable | None = None,
        producer_devices=("cpu",),
        late_policy: str = "reuse",
        variants_per_index: int = 10,
        lookahead: int | None = None,
        seed: int | None = None,
        return_meta: bool = False,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        wait_timeout: float = 30.0,
        store_bytes: int = 1 << 30,
        image_size: int | None = None,
        producer_capacity: int = 8,
        producer_slots: int | None = None,
        producer_timeout: float | None = None,
        on_producer_error: str = "raise",
        max_restarts: int = 3,
        latent_cache_path: str | None = None,
        distributed: str | bool = "auto",
        progress=None,
        log_every: int = 0,
        pool_factory: Callable | None = None,
    ):
        # torch validates every DataLoader argument (and picks the default collate_fn / samplers).
        self._dl = DataLoader(
            dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory, drop_last,
            timeout, worker_init_fn, multiprocessing_context, generator, prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers, pin_memory_device=pin_memory_device,
            **({"in_order": in_order} if _HAS_IN_ORDER else {}),
        )
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if late_policy not in LATE_POLICIES:
            raise ValueError(f"late_policy must be one of {LATE_POLICIES}, got {late_policy!r}")
        if distributed not in ("auto", True, False):
            raise ValueError("distributed must be 'auto', True or False")
        normalize_strengths(strengths)  # validate now, not at the first iter()
        self._passthrough = isinstance(dataset, IterableDataset)
        if self._passthrough and alpha > 0:
            raise ValueError("synthesis needs a map-style dataset (an index per sample); "
                             "an IterableDataset works only with alpha=0")
        if alpha > 0 and synthesizer is None and pool_factory is None:
            raise ValueError("alpha > 0 needs a synthesizer (a Synthesizer, a checkpoint path or a spec)")
        if transform is not None and getattr(dataset, "transform", None) is not None:
            raise ValueError("the dataset applies its own transform; pass transform= only for datasets returning raw images")

        self.alpha = float(alpha)
        self.synthesizer = synthesizer
        self.strengths = strengths
        self.prompts = prompts
        self.transform = transform
        self.producer_devices = (producer_devices,) if isinstance(producer_devices, str) else tuple(producer_devices)
        self.late_policy = late_policy
        self.variants_per_index = variants_per_index
        self.lookahead = lookahead if lookahead is not None else max(64, 8 * (self._dl.batch_size or 1))
        self._adaptive_lookahead = lookahead is None
        self.return_meta = return_meta
        self.guidance_scale = float(guidance_scale)
        self.num_inference_steps = int(num_inference_steps)
        self.wait_timeout = float(wait_timeout)
        self.progress, self.log_every = progress, int(log_every)
        self._seed_given = seed is not None
        self.seed = int(seed) if seed is not None else torch.initial_seed()
        self._user_sampler = sampler is not None or batch_sampler is not None
        self._distributed = distributed
        self._pool_kwargs = dict(
            on_error=on_producer_error, max_restarts=max_restarts, latent_cache_path=latent_cache_path,
            capacity=producer_capacity, image_size=image_size, slots=producer_slots, timeout=producer_timeout,
            # Training does not wait for producers to load and warm up, except under late_policy="wait",
            # whose promise is that every planned position gets its own fresh image.
            wait_ready=late_policy == "wait",
            # A trainer that waits for every job needs them in order: made out of order, results far ahead
            # would hold the ring slots the awaited job needs (NOTE [Deadlines] in producer.py).
            deadlines=late_policy != "wait",
        )
        self._pool_factory = pool_factory
        self._store_bytes = store_bytes
        self._init_runtime()
        self._next_epoch = 0
        self._epoch_pinned = False
        self._resume: dict | None = None
        self._cur: dict | None = None  # the epoch in progress (for state_dict)
        self._iter_serial = 0
        self._stats = LoaderStats()

    def _init_runtime(self) -> None:
        self._source = ImageSource(self._dl.dataset, self.transform) if not self._passthrough else None
        self._store = VariantStore(self.variants_per_index, getattr(self, "_store_bytes", 1 << 30))
        self._pool = None
        self._runner: DataLoader | None = None
        self._plan_sampler: _PlanSampler | None = None
        self._active = None  # weakref to the live epoch iterator
        self._outstanding: set[int] = set()  # its submitted, not yet taken job keys
        self._ahead: dict[int, dict] = {}  # epoch -> requests already made for a coming epoch (see _plan_ahead)
        self._harvested = 0
        self._late: collections.deque = collections.deque()  # (key, index, strength): late jobs left running
        self._dist_sampler = None
        self._closed = False

    # -- DataLoader's face --------------------------------------------------------------------------

    dataset = property(lambda self: self._dl.dataset)
    batch_size = property(lambda self: self._dl.batch_size)
    drop_last = property(lambda self: self._dl.drop_last)
    num_workers = property(lambda self: self._dl.num_workers)
    collate_fn = property(lambda self: self._dl.collate_fn)
    pin_memory = property(lambda self: self._dl.pin_memory)
    timeout = property(lambda self: self._dl.timeout)
    worker_init_fn = property(lambda self: self._dl.worker_init_fn)
    generator = property(lambda self: self._dl.generator)
    prefetch_factor = property(lambda self: self._dl.prefetch_factor)
    persistent_workers = property(lambda self: self._dl.persistent_workers)
    multiprocessing_context = property(lambda self: self._dl.multiprocessing_context)

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
        if self._order_mode() == "distributed":
            rank, world = dist_info()
            n = len(self._dl.dataset)
            per_rank = math.ceil((n - world) / world) if self._dl.drop_last and n % world else math.ceil(n / world)
            bs = self._dl.batch_size
            if bs is None:
                return per_rank
            return per_rank // bs if self._dl.drop_last else math.ceil(per_rank / bs)
        return len(self._dl)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` epoch ``epoch``; forwarded to the sampler and batch sampler."""
        self._next_epoch = int(epoch)
        self._epoch_pinned = True
        self._resume = None if self._resume and self._resume["epoch"] != epoch else self._resume
        seen = set()
        for obj in (self.sampler, self.batch_sampler, getattr(self.batch_sampler, "sampler", None)):
            fn = getattr(obj, "set_epoch", None)
            if callable(fn) and id(obj) not in seen:
                seen.add(id(obj))
                fn(epoch)

    def _choose_epoch(self) -> int:
        """The epoch of a new ``iter()`` (no resume pending); see NOTE [Loader design], "Epochs"."""
        ds = self._distributed_sampler() if self._order_mode() == "distributed" else None
        cur = self._cur
        if ds is not None and ds.set_by_caller:  # a trainer (Lightning) called sampler.set_epoch
            epoch = ds.epoch
        elif self._epoch_pinned:
            epoch = self._next_epoch
        elif cur is not None and cur["batch"] == 0 and cur["num_batches"] > 0:
            epoch = cur["epoch"]  # the previous iter() yielded nothing (e.g. a trainer's iterability probe)
        else:
            epoch = self._next_epoch
        if ds is not None:
            ds.epoch, ds.set_by_caller = epoch, False
        self._epoch_pinned = False
        return epoch

    # -- ordering -----------------------------------------------------------------------------------

    def _order_mode(self) -> str:
        if self._passthrough:
            return "passthrough"
        if not self._user_sampler and self._distributed is not False and dist_info()[1] > 1:
            return "distributed"
        if not self._user_sampler and self._seed_given and self._dl.generator is None:
            return "seeded"
        return "recorded"

    @property
    def _order_seed(self) -> int:
        # DistributedSampler needs one seed on every rank; its default is 0.
        return self.seed if self._seed_given else 0

    def _distributed_sampler(self):
        rank, world = dist_info()
        ds = self._dist_sampler
        if ds is None or (ds.rank, ds.num_replicas) != (rank, world):
            ds = _TrackedDistributedSampler(self._dl.dataset, world, rank, shuffle=bool(self._shuffle),
                                            seed=self._order_seed, drop_last=self._dl.drop_last)
            self._dist_sampler = ds
        return ds

    @property
    def _shuffle(self) -> bool:
        from torch.utils.data import RandomSampler

        return isinstance(self._dl.sampler, RandomSampler)

    def _epoch_batches(self, epoch: int, fresh_runner_iter: bool):
        """(batches, runner generator, recorded?) for ``epoch``; see NOTE [Loader design]."""
        mode = self._order_mode()
        rank, world = dist_info() if mode == "distributed" else (0, 1)
        bs, drop = self._dl.batch_size, self._dl.drop_last
        if mode in ("distributed", "seeded"):
            n = len(self._dl.dataset)
            if mode == "distributed":
                order = distributed_order(n, rank, world, self._shuffle, self._order_seed, epoch, drop)
            else:
                order = random_order(n, self.seed, epoch) if self._shuffle else sequential_order(n)
            gen = torch.Generator()
            gen.manual_seed(mix_seed(self.seed, epoch, rank, 0xD1))
            return batch_order(order, bs, drop), gen, False
        user_gen = self._dl.generator
        gen = None
        if fresh_runner_iter:  # DataLoader draws the workers' base seed before the sampler draws
            state = user_gen.get_state() if user_gen is not None else torch.get_rng_state()
            torch.empty((), dtype=torch.int64).random_(generator=user_gen)
            gen = torch.Generator()
            gen.set_state(state)
        index_sampler = self._dl._index_sampler
        batches = [list(b) for b in index_sampler] if self._dl._auto_collation else [[i] for i in index_sampler]
        return batches, gen, True

    # -- iteration ----------------------------------------------------------------------------------

    def __iter__(self):
        if self._closed:
            raise RuntimeError("FusionLoader is closed")
        if self._passthrough:
            return iter(self._dl)
        self._abandon_active()
        rank, world = dist_info() if self._order_mode() == "distributed" else (0, 1)

        resume, self._resume = self._resume, None
        if resume is not None:
            epoch, start = resume["epoch"], resume["batch"]
        else:
            epoch, start = self._choose_epoch(), 0
        self._next_epoch = epoch + 1

        persistent = self._dl.persistent_workers and self._runner is not None
        if resume is not None and resume.get("batches") is not None:
            batches, gen, recorded = resume["batches"], torch.Generator(), True
            gen.manual_seed(mix_seed(self.seed, epoch, rank, 0xD2))
        else:
            batches, gen, recorded = self._epoch_batches(epoch, fresh_runner_iter=not persistent)
        plan = plan_epoch(batches, seed=self.seed, epoch=epoch, alpha=self.alpha, strengths=self.strengths,
                          rank=rank, world_size=world)
        start = min(start, len(plan.batches))
        self._cur = {
            "epoch": epoch, "batch": start, "num_batches": len(plan.batches),
            "batches": [list(b) for b in plan.batches] if recorded else None,
            "rng": self._order_rng_state() if recorded else None,
        }
        if self.alpha > 0:
            self._start_pool()
        runner_iter = self._runner_iter(plan, start, gen)
        ahead = self._ahead.pop(epoch, None)
        if (ahead is not None and resume is None
                and np.array_equal(ahead["plan"].indices, plan.indices)
                and np.array_equal(ahead["plan"].synthetic, plan.synthetic)
                # a curriculum may have changed alpha/strengths since the requests were made
                and np.array_equal(ahead["plan"].strength, plan.strength, equal_nan=True)):
            key_base, submitted = ahead["key_base"], ahead["submitted"]  # adopt what was requested ahead
            self._outstanding |= ahead["keys"]
            for e in [e for e in self._ahead if e < epoch]:  # skipped epochs (set_epoch jumped ahead)
                self._drop_ahead(e)
        else:
            # Later epochs' keys were made for consumption after this one's: they cannot follow new keys.
            if ahead is not None:
                self._ahead[epoch] = ahead
            self._drop_ahead()
            self._iter_serial += 1
            key_base, submitted = self._iter_serial * _KEY_STRIDE, None
        it = _EpochIterator(self, plan, start, runner_iter, key_base, submitted)
        self._active = weakref.ref(it)
        self._stats.begin(epoch)
        return it

    def _horizon(self) -> int:
        """How many samples ahead to request. A fixed ``lookahead`` when given; by default at least 2x
        the samples the trainer consumes while a producer makes one job (pool latency), so that when
        producers are slower than the trainer they make images for positions they can still reach in
        time (NOTE [Deadlines] in producer.py) instead of chasing the trainer and always arriving late."""
        if not self._adaptive_lookahead or self._pool is None:
            return self.lookahead
        # The rate over the whole run: an epoch's first batches say little (a few-shot epoch has few).
        total = self._stats.total
        latency = getattr(self._pool, "latency_s", 0.0)
        if total.wall_s <= 0 or latency <= 0:
            return self.lookahead
        rate = total.samples / total.wall_s  # samples per second
        return int(min(max(self.lookahead, math.ceil(2.0 * rate * latency)), 1 << 16))

    def _plan_ahead(self, epoch: int, positions: int) -> None:
        """Request the first ``positions`` samples from the start of ``epoch`` on (running into the epochs
        after it when it is shorter: a few-shot epoch can be shorter than the look-ahead) while the current
        epoch ends, so producers do not idle at the boundary and can make images in time -- only where an
        epoch's order is a pure function of it (``seed=`` given, or distributed default sampling) and nobody
        has pinned the next epoch. Keys grow with the epoch, as the pool's deadline order needs."""
        if self._pool is None or self._epoch_pinned or self._order_mode() not in ("seeded", "distributed"):
            return
        last = epoch
        for e in range(epoch, epoch + _MAX_EPOCHS_AHEAD):
            if positions <= 0:
                break
            last = e
            ahead = self._ahead.get(e)
            if ahead is None:
                rank, world = dist_info() if self._order_mode() == "distributed" else (0, 1)
                batches, _, _ = self._epoch_batches(e, fresh_runner_iter=False)
                plan = plan_epoch(batches, seed=self.seed, epoch=e, alpha=self.alpha, strengths=self.strengths,
                                  rank=rank, world_size=world)
                self._iter_serial += 1
                ahead = self._ahead[e] = {"plan": plan, "key_base": self._iter_serial * _KEY_STRIDE, "submitted": 0,
                                          "keys": set()}  # fmt: skip
            plan, done = ahead["plan"], ahead["submitted"]
            end = min(positions, plan.num_positions)
            if end > done:
                picked = np.flatnonzero(plan.synthetic[done:end]) + done
                jobs = [self._make_job(ahead["key_base"] + int(p), plan, int(p)) for p in picked]
                if jobs:
                    self._pool.submit(jobs)
                    ahead["keys"].update(j.key for j in jobs)
                ahead["submitted"] = end
            positions -= plan.num_positions
        # The look-ahead shrank: free what it no longer covers -- past a margin of three times as many epochs,
        # or a look-ahead that breathes with the latency estimate would cancel and re-request the same jobs.
        for e in [e for e in self._ahead if e > last + 3 * (last - epoch + 1)]:
            self._drop_ahead(e)

    def _drop_ahead(self, epoch: int | None = None) -> None:
        """Cancel the requests made ahead for ``epoch`` (default: every epoch)."""
        aheads = getattr(self, "_ahead", None) or {}
        for e in [epoch] if epoch is not None else list(aheads):
            ahead = aheads.pop(e, None)
            if ahead is not None and ahead["keys"] and self._pool is not None:
                try:
                    self._pool.cancel(list(ahead["keys"]))
                except Exception:  # a failed pool has nothing left to cancel
                    pass

    def _runner_iter(self, plan, start: int, gen):
        if self._runner is None:
            dl = self._dl
            auto = dl._auto_collation
            self._plan_sampler = _PlanSampler(batched=auto)
            wrapped = _PlannedDataset(dl.dataset, self._source, self.transform)
            kw = dict(
                num_workers=dl.num_workers, collate_fn=_WorkerCollate(dl.collate_fn, auto), pin_memory=dl.pin_memory,
                timeout=dl.timeout, worker_init_fn=dl.worker_init_fn, multiprocessing_context=dl.multiprocessing_context,
                prefetch_factor=dl.prefetch_factor if dl.num_workers > 0 else None, persistent_workers=dl.persistent_workers,
                pin_memory_device=dl.pin_memory_device,
            )
            if _HAS_IN_ORDER:
                kw["in_order"] = dl.in_order
            if auto:
                self._runner = DataLoader(wrapped, batch_sampler=self._plan_sampler, **kw)
            else:
                self._runner = DataLoader(wrapped, batch_size=None, sampler=self._plan_sampler, **kw)
        self._plan_sampler.set(plan, start)
        if gen is not None:
            self._runner.generator = gen
        return iter(self._runner)

    # -- synthesis plumbing -------------------------------------------------------------------------

    def _start_pool(self) -> None:
        if self._pool is not None:
            return
        local_rank, local_world = local_info()
        devices = devices_for_rank(self.producer_devices, local_rank, local_world)
        kwargs = {k: v for k, v in self._pool_kwargs.items() if v is not None}
        if self._pool_factory is not None:
            pool = self._pool_factory(self.synthesizer, self._source, devices=devices, **kwargs)
        else:
            from .producer import ProducerPool

            pool = ProducerPool(self.synthesizer, self._source, devices=devices, **kwargs)
        try:
            pool.start()
        except BaseException:
            pool.close()
            raise
        self._pool = pool
        _LIVE.add(self)

    def _make_job(self, key: int, plan, position: int):
        from .producer import Job

        index = int(plan.indices[position])
        return Job(
            key=key, index=index, prompt=self._prompt(index, float(plan.prompt_draw[position])),
            strength=plan.job_strength(position), guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps, seed=int(plan.sample_seed[position]),
        )

    def _prompt(self, index: int, draw: float) -> str:
        prompts = self.prompts
        if callable(prompts) and not isinstance(prompts, (str, Mapping, Sequence)):
            return str(prompts(index, self._source.label(index)))
        label = self._source.label(index)
        classes = getattr(self._dl.dataset, "classes", None)

        def name(lab):
            if classes is not None and isinstance(lab, (int, np.integer)) and 0 <= lab < len(classes):
                return str(classes[lab])
            return str(lab)

        if prompts is None:
            prompts = "a photo of a {}" if classes is not None else "a photo"
        if isinstance(prompts, str):
            value = prompts
        elif isinstance(prompts, Mapping):
            value = prompts[label]
        else:
            value = prompts[int(label)]
        if isinstance(value, (list, tuple)):
            value = value[min(int(draw * len(value)), len(value) - 1)]
        return value.format(name(label)) if "{}" in value else value

    def _synthetic_sample(self, item: _Item, image: torch.Tensor, seed: int):
        """The synthetic image in the real image's form, through the train transform, in the item's sample."""
        raw_like = from_float(image, item.info) if item.info is not None else image
        tf = self._source.transform
        if tf is not None:
            raw_like = _seeded_call(tf, raw_like, seed)
        return replace_image(item.sample, raw_like)

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where iteration stands: resume with ``load_state_dict`` on a loader built the same way."""
        cur = self._cur
        in_progress = cur is not None and cur["batch"] < cur["num_batches"]
        return {
            "version": 1,
            "seed": self.seed,
            "alpha": self.alpha,
            "next_epoch": cur["epoch"] if in_progress else self._next_epoch,
            "batch": cur["batch"] if in_progress else 0,
            "batches": cur["batches"] if in_progress else None,
            "rng": cur["rng"] if in_progress else self._order_rng_state(),
            "stats": self._stats.state_dict(),
        }

    def _order_objects(self):
        """Things whose state decides later epochs' orders: the generator, the (batch) sampler."""
        objs = {"generator": self._dl.generator, "sampler": self._dl.sampler, "batch_sampler": self._dl.batch_sampler}
        return {k: v for k, v in objs.items() if v is not None}

    def _order_rng_state(self) -> dict:
        # DataLoader leaves these to the user; a resumable loader must carry them (torchdata does too).
        out = {}
        for name, obj in self._order_objects().items():
            if isinstance(obj, torch.Generator):
                out[name] = ("generator", obj.get_state())
            elif callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
                out[name] = ("state_dict", obj.state_dict())
            elif isinstance(getattr(obj, "generator", None), torch.Generator) and obj.generator is not self._dl.generator:
                out[name] = ("attr_generator", obj.generator.get_state())
        return out

    def _load_order_rng_state(self, states: dict) -> None:
        objs = self._order_objects()
        for name, (kind, value) in states.items():
            obj = objs.get(name)
            if obj is None:
                continue
            if kind == "generator":
                obj.set_state(value)
            elif kind == "state_dict":
                obj.load_state_dict(value)
            elif isinstance(getattr(obj, "generator", None), torch.Generator):
                obj.generator.set_state(value)

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._drop_ahead()
        self._next_epoch = int(state["next_epoch"])
        if state.get("rng") is not None:
            self._load_order_rng_state(state["rng"])
        self._resume = {"epoch": int(state["next_epoch"]), "batch": int(state["batch"]), "batches": state.get("batches")}
        if self._resume["batch"] == 0 and self._resume["batches"] is None:
            self._resume = None  # an epoch boundary: the next iter() plans the epoch afresh
        self._epoch_pinned = True
        self._stats.load_state_dict(state.get("stats", {}))

    # -- stats --------------------------------------------------------------------------------------

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
                        "harvested": self._harvested}  # late jobs finished after their position: stored only
        return out

    # -- lifetime -----------------------------------------------------------------------------------

    def _abandon_active(self) -> None:
        """Cancel the jobs of the previous epoch iterator, whether or not it is still referenced."""
        active = self._active() if self._active is not None else None
        if active is not None:
            active.done = True
        keys, self._outstanding = self._outstanding, set()
        if keys and self._pool is not None:
            try:
                self._pool.cancel(list(keys))
            except Exception:  # a failed pool has nothing left to cancel
                pass

    def close(self) -> None:
        """Cancel outstanding jobs, stop workers and producers (idempotent; within a few seconds)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._abandon_active()
        self._drop_ahead()
        late, self._late = self._late, collections.deque()
        if late and self._pool is not None:
            try:
                self._pool.cancel([entry[0] for entry in late])
            except Exception:  # a failed pool has nothing left to cancel
                pass
        runner = self._runner
        it = getattr(runner, "_iterator", None) if runner is not None else None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        pool, self._pool = self._pool, None
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
        for key in ("_source", "_store", "_pool", "_runner", "_plan_sampler", "_active", "_outstanding", "_ahead", "_late",
                    "_dist_sampler", "_closed"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return (f"FusionLoader(alpha={self.alpha}, batch_size={self.batch_size}, late_policy={self.late_policy!r}, "
                f"strengths={self.strengths!r}, devices={self.producer_devices})")


class _EpochIterator:
    """One epoch: submits requests ahead, takes batches from the runner, mixes, counts."""

    def __init__(self, loader: FusionLoader, plan, start: int, runner_iter, key_base: int, submitted: int | None = None):
        self.loader, self.plan, self.runner_iter, self.key_base = loader, plan, runner_iter, key_base
        self.starts = plan.batch_starts.tolist()
        self.batch = start
        self.submitted = self.starts[start] if submitted is None else submitted
        self.outstanding = loader._outstanding  # shared, so close() can cancel after this is dropped
        self.done = False
        self.t_last = time.perf_counter()
        # strengths a reused variant may have this epoch (the current curriculum stage's)
        choices = normalize_strengths(loader.strengths)
        self.allowed = {None} if choices is None else {float(np.float32(c)) for c in choices}
        if loader._pool is not None:  # producers start on the first look-ahead window at once
            self._submit_upto(self.submitted + loader._horizon())

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.plan.batches)

    def __next__(self):
        if self.done:
            raise StopIteration
        L = self.loader
        if L._closed:
            self.done = True
            raise StopIteration
        pool = L._pool
        if pool is not None:
            pool.check()
            if L._late:
                self._harvest()
            horizon = self.starts[min(self.batch + 1, len(self.starts) - 1)] + L._horizon()
            self._submit_upto(horizon)
            if horizon > self.plan.num_positions:  # the window reaches into the next epoch
                L._plan_ahead(self.plan.epoch + 1, horizon - self.plan.num_positions)
        t0 = time.perf_counter()
        try:
            batch = next(self.runner_iter)
        except StopIteration:
            self._finish()
            raise
        L._stats.add_time("real_wait_s", time.perf_counter() - t0)
        out = self._mix(batch)
        now = time.perf_counter()
        L._stats.add_time("wall_s", now - self.t_last)
        self.t_last = now
        self.batch += 1
        L._cur["batch"] = self.batch
        L._stats.end_batch()
        if L.progress is not None:
            L.progress.set_postfix(L._stats.postfix(), refresh=False)
        if L.log_every and self.batch % L.log_every == 0:
            L._stats.log()
        if self.batch >= len(self.plan.batches):
            self._finish()
        return out

    def _submit_upto(self, end: int) -> None:
        plan, L = self.plan, self.loader
        end = min(end, plan.num_positions)
        if end <= self.submitted:
            return
        positions = np.flatnonzero(plan.synthetic[self.submitted : end]) + self.submitted
        jobs = [L._make_job(self.key_base + int(p), plan, int(p)) for p in positions]
        if jobs:
            L._pool.submit(jobs)
            self.outstanding.update(j.key for j in jobs)
        self.submitted = end

    def _mix(self, batch: _Batch):
        L, plan = self.loader, self.plan
        n = len(batch.positions)
        fresh = np.zeros(n, dtype=bool)
        delivered = np.zeros(n, dtype=bool)
        strength = np.full(n, np.nan, dtype=np.float32)
        if batch.items is None:
            L._stats.record("real", n)
            data = batch.data
        else:
            samples = []
            for j, item in enumerate(batch.items):
                if not item.synthetic:
                    L._stats.record("real")
                    samples.append(item.sample)
                    continue
                image, s, kind = self._resolve(item)
                L._stats.record(kind)
                if image is None:
                    samples.append(item.sample)
                    continue
                delivered[j], fresh[j], strength[j] = True, kind == "fresh", np.nan if s is None else s
                samples.append(L._synthetic_sample(item, image, int(plan.sample_seed[item.position])))
            auto = L._dl._auto_collation
            data = L._dl.collate_fn(samples if auto else samples[0])
            if getattr(self.runner_iter, "_pin_memory", False):
                from torch.utils.data._utils.pin_memory import pin_memory

                data = pin_memory(data, self.runner_iter._pin_memory_device)
        if not L.return_meta:
            return data
        pos = np.asarray(batch.positions)
        meta = {
            "index": torch.from_numpy(plan.indices[pos].copy()),
            "planned": torch.from_numpy(plan.synthetic[pos].copy()),
            "synthetic": torch.from_numpy(delivered),
            "fresh": torch.from_numpy(fresh),
            "strength": torch.from_numpy(strength),
        }
        return data, meta

    def _resolve(self, item: _Item):
        """(image or None, strength, "fresh" | "reused" | "fallback") for a synthetic position."""
        L = self.loader
        key = self.key_base + item.position
        pool = L._pool
        image = None
        if pool is not None and key in self.outstanding:
            t0 = time.perf_counter()
            image = pool.take(key, L.wait_timeout if L.late_policy == "wait" else 0.0)
            L._stats.add_time("stall_s", time.perf_counter() - t0)
            self.outstanding.discard(key)
            if image is None:
                if L.late_policy == "reuse":
                    # Keep it: when it is done it becomes a stored variant (see _harvest). Cancelling every
                    # late job livelocks producers that are slower than the trainer: each job would be
                    # cancelled in flight, nothing would ever finish, and the store would stay empty.
                    L._late.append((key, item.index, self.plan.job_strength(item.position)))
                    passed = getattr(pool, "passed", None)  # optional in the pool protocol (test stand-ins)
                    if passed is not None:
                        passed([key])
                else:
                    pool.cancel([key])
        strength = self.plan.job_strength(item.position)
        if image is not None:
            L._store.put(item.index, image, strength)
            return image, strength, "fresh"
        if L.late_policy == "reuse":
            chosen = L._store.choose(item.index, int(self.plan.sample_seed[item.position]), self.allowed)
            if chosen is not None:
                return chosen[0], chosen[1], "reused"
        return None, None, "fallback"

    def _harvest(self, scan: int = 64, keep: int = 256) -> None:
        """Move finished late jobs into the variant store (freeing their ring slots); forget lost ones;
        cancel the oldest beyond ``keep``. Looks at most ``scan`` keys per batch."""
        L, pool = self.loader, self.loader._pool
        late = L._late  # across epochs: a few-shot epoch can be shorter than one job's latency
        if len(late) > keep:
            pool.cancel([late.popleft()[0] for _ in range(len(late) - keep)])
        ready = getattr(pool, "ready_keys", lambda: ())()  # optional in the pool protocol (test stand-ins)
        if ready:
            # Whatever is finished, wherever it sits: producers make passed jobs out of order (NOTE
            # [Deadlines] in producer.py), and an unharvested result holds a ring slot.
            remaining = collections.deque()
            for entry in late:
                key, index, strength = entry
                image = pool.take(key, 0.0) if key in ready else None
                if image is not None:
                    L._store.put(index, image, strength)
                    L._harvested += 1
                else:
                    remaining.append(entry)
            late = L._late = remaining
        kept = collections.deque()
        for _ in range(min(scan, len(late))):
            key, index, strength = entry = late.popleft()
            image = pool.take(key, 0.0)
            if image is not None:
                L._store.put(index, image, strength)
                L._harvested += 1
            elif pool.state(key) == "pending":
                kept.append(entry)
            # else: lost, dropped (NaN/inf) or unknown: nothing will come
        kept.extend(late)
        L._late = kept

    def _cancel_outstanding(self) -> None:
        pool = self.loader._pool
        if pool is not None and self.outstanding:
            try:
                pool.cancel(list(self.outstanding))
            except Exception:
                pass
        self.outstanding.clear()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self._cancel_outstanding()
        L = self.loader
        if L.log_every or L.progress is not None:
            L._stats.log()
