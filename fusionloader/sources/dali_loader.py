"""DaliFusionLoader: FusionLoader's per-index replacement with DALI doing the real images and the transform.

NOTE [DALI loader]
~~~~~~~~~~~~~~~~~~

What it shares with FusionLoader, so the two serve the same positions the same way:

* Order. Epoch ``e`` on shard ``shard_id`` of ``num_shards`` is ``distributed_order`` (DistributedSampler's,
  seed ``seed or 0``) when ``num_shards > 1``; with one shard, ``random_order(n, seed, e)`` under
  ``shuffle=True`` and ``sequential_order`` otherwise -- FusionLoader's "distributed" and "seeded" orders.
  Batches are ``ArrayOrder.batched(order, batch_size, drop_last)``.
* Plan. ``EpochPlan(order, seed=, epoch=, alpha=, strengths=, rank=shard_id, world_size=num_shards)``:
  the same coins, strengths and sample seeds per position as FusionLoader's plan (NOTE [Plan draws]).
* Requests and mixing. The same ``RequestWindow`` (jobs keyed by the iteration's base plus the position),
  ``Mixer`` (late policy, one deadline per batch, variant store) and pool (``ProducerPool`` with uint8 slots,
  or ``pool_factory``); producers read raw images through ``ImageSource(dataset)``.

What DALI does (NOTE [DALI pipeline] in dali_pipeline.py): reading the files (``shard_id``/``num_shards``),
decoding (CPU or nvJPEG), the synthetic images' resize-back and, for both, the train transform -- its random
draws taken from the position's sample seed (dali_transform.py), so seeds reproduce. The external source's
callback resolves a batch's synthetic positions when DALI asks for it (``prefetch_queue_depth`` batches
ahead, as the runner's dispatch does in FusionLoader; NOTE [Mixing]).

Iteration is DALI's PyTorch plugin: ``DALIGenericIterator`` over the epoch's pipeline, ``reader_name=``
``"Reader"`` and ``LastBatchPolicy.PARTIAL`` (``DROP`` with ``drop_last``); each step yields its list with
one dict (``data``, ``label``, and with ``return_meta`` ``index``, ``kind``, ``strength``).

Not here (FusionLoader has them): ``state_dict``/resume, look-ahead into the next epochs, user samplers,
adaptive look-ahead, progress bars. ``set_epoch`` is honoured.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import torch

from ..config import FusionConfig
from ..distributed import dist_info
from ..mixing import Mixer
from ..order import ArrayOrder, distributed_order, random_order, sequential_order
from ..plan import EpochPlan, normalize_strengths
from ..store import VariantStore
from ..requests import JobMaker, start_pool
from ..window import RequestWindow
from .dali_pipeline import KINDS, READER, build_pipeline, output_map, placeholder
from .dali_transform import DaliTrainTransform
from .dataset import ImageSource

__all__ = ["DaliFusionLoader"]

_UNSUPPORTED = {"transform": None, "progress": None, "log_every": 0, "leakage_guard": False}


def _to_hwc_uint8(image: torch.Tensor) -> np.ndarray:
    """A pool's image (3, H, W) uint8 or float in [0, 1] as HWC uint8 (``from_float``'s quantisation)."""
    x = image.detach().cpu()
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


class DaliFusionLoader:
    """Per-index replacement at ``alpha`` over an ImageFolder-style dataset, read, decoded and transformed by DALI.

    ``dataset``: a folder ``root/<class>/<image>`` (a path) or an ImageFolder-style object (``samples``,
    ``classes``, ``loader``; e.g. :class:`~fusionloader.sources.dali.DaliImageFolder`) without a transform.
    ``transform``: a :class:`~fusionloader.sources.dali_transform.DaliTrainTransform`. ``device_id``: None
    runs the pipeline on CPU, an int on that GPU. ``shard_id``/``num_shards``: default the torch.distributed
    rank and world size (``distributed=False`` for one shard). The synthesis settings are FusionConfig's
    (``config=`` or keyword arguments), as for FusionLoader.
    """

    def __init__(self, dataset, batch_size: int = 1, *, transform: DaliTrainTransform, shuffle: bool = False,
                 drop_last: bool = False, device_id: int | None = None, shard_id: int | None = None,
                 num_shards: int | None = None, num_threads: int = 2, prefetch_queue_depth: int = 2,
                 config: FusionConfig | None = None, **settings):  # fmt: skip
        from ..extras import require

        require("nvidia.dali", "DaliFusionLoader", "dali")
        unknown = sorted(set(settings) - set(FusionConfig.field_names()))
        if unknown:
            raise TypeError(f"DaliFusionLoader got unexpected keyword argument(s) {unknown}")
        cfg = FusionConfig(**settings) if config is None else config.__class__(**{**vars(config), **settings})
        for name, default in _UNSUPPORTED.items():
            if getattr(cfg, name) != default:
                raise ValueError(f"{name}={getattr(cfg, name)!r} is not supported by DaliFusionLoader (the train "
                                 "transform is transform=DaliTrainTransform(...), run in DALI)")  # fmt: skip
        if not isinstance(transform, DaliTrainTransform):
            raise TypeError(f"transform must be a DaliTrainTransform, got {transform!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        for name, value in (("num_threads", num_threads), ("prefetch_queue_depth", prefetch_queue_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.dataset = self._dataset(dataset)
        self.files = [str(p) for p, _ in self.dataset.samples]
        self.labels = [int(t) for _, t in self.dataset.samples]
        self.shard_id, self.num_shards = self._shard(shard_id, num_shards, cfg.distributed, len(self.files), drop_last)
        self.device_id = self._device(device_id)
        self.config, self.transform = cfg, transform
        self.batch_size, self.shuffle, self.drop_last = batch_size, bool(shuffle), bool(drop_last)
        self.num_threads, self.prefetch_queue_depth = num_threads, prefetch_queue_depth
        self.seed = cfg.seed if cfg.seed is not None else torch.initial_seed()
        self._source = ImageSource(self.dataset)
        cfg.check_dataset(self.dataset, self._source.label_set())
        self._store = VariantStore(cfg.variants_per_index, cfg.store_bytes)
        self._mixer = Mixer(self._store, cfg.late_policy, cfg.wait_timeout)
        if cfg.retrieval is not None or cfg.mixing.name != "replace":  # FusionLoader has them; this loader not yet
            raise ValueError(f"DaliFusionLoader supports mixing='replace' without retrieval, got mixing="
                             f"{cfg.mixing.name!r}, retrieval={cfg.retrieval!r}: use FusionLoader for these")  # fmt: skip
        self._jobs = JobMaker(cfg, self._source, self.dataset, self._mixer.retrieves)
        if cfg.leakage_guard:
            self._jobs.check_leakage()
        self._window = RequestWindow(self._jobs)
        self._pool = None
        self._epoch = 0
        self._counts: Counter = Counter()
        self._closed = False

    # -- construction checks ----------------------------------------------------------------------

    @staticmethod
    def _dataset(dataset):
        if isinstance(dataset, (str, os.PathLike)):
            root = os.fspath(dataset)
            if not os.path.isdir(root):
                raise FileNotFoundError(f"dataset: no such image folder {root!r}")
            from .dali import DaliImageFolder

            dataset = DaliImageFolder(root)
        samples = getattr(dataset, "samples", None)
        if samples is None or not callable(getattr(dataset, "loader", None)):
            raise TypeError(f"dataset must be a folder path or ImageFolder-style (samples, loader), got {dataset!r}")
        if getattr(dataset, "transform", None) is not None:
            raise ValueError("dataset.transform is set: the DALI loader transforms in DALI (transform=DaliTrainTransform); "
                             "pass the dataset without a transform")  # fmt: skip
        if not samples:
            raise ValueError(f"dataset has no images ({dataset!r})")
        for path, _ in samples:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"dataset: no such image file {path!r}")
        return dataset

    @staticmethod
    def _shard(shard_id, num_shards, distributed, n: int, drop_last: bool) -> tuple[int, int]:
        if (shard_id is None) != (num_shards is None):
            raise ValueError(f"give shard_id and num_shards together, got shard_id={shard_id!r}, num_shards={num_shards!r}")
        if shard_id is None:
            shard_id, num_shards = dist_info() if distributed is not False else (0, 1)
        for name, value in (("shard_id", shard_id), ("num_shards", num_shards)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id={shard_id!r} is not a shard of num_shards={num_shards!r} (0 <= shard_id < num_shards)")
        per_shard = math.ceil((n - num_shards) / num_shards) if drop_last and n % num_shards else math.ceil(n / num_shards)
        if per_shard < 1:
            raise ValueError(f"num_shards={num_shards} leaves shard {shard_id} no image of {n} with drop_last=True")
        return int(shard_id), int(num_shards)

    @staticmethod
    def _device(device_id):
        if device_id is None:
            return None
        if isinstance(device_id, bool) or not isinstance(device_id, (int, np.integer)) or device_id < 0:
            raise ValueError(f"device_id must be None (CPU) or a GPU index, got {device_id!r}")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device_id >= count:
            raise ValueError(f"device_id={device_id} does not exist: this machine has {count} CUDA device(s) "
                             "(device_id=None runs the DALI pipeline on CPU)")  # fmt: skip
        return int(device_id)

    # -- epochs -----------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def order(self, epoch: int, shard_id: int | None = None) -> np.ndarray:
        """The dataset indices shard ``shard_id`` (default: this one) reads in ``epoch`` (NOTE [DALI loader])."""
        n, world = len(self.files), self.num_shards
        shard = self.shard_id if shard_id is None else shard_id
        if world > 1:
            seed = self.config.seed if self.config.seed is not None else 0
            return distributed_order(n, shard, world, self.shuffle, seed, epoch, self.drop_last)
        return random_order(n, self.seed, epoch) if self.shuffle else sequential_order(n)

    def plan(self, epoch: int) -> EpochPlan:
        order = ArrayOrder.batched(self.order(epoch), self.batch_size, self.drop_last)
        return EpochPlan(order, seed=self.seed, epoch=epoch, alpha=self.config.alpha, strengths=self.config.strengths,
                         rank=self.shard_id, world_size=self.num_shards)  # fmt: skip

    def __len__(self) -> int:
        per_shard = len(self.order(0))
        return per_shard // self.batch_size if self.drop_last else math.ceil(per_shard / self.batch_size)

    def __iter__(self):
        if self._closed:
            raise RuntimeError("DaliFusionLoader is closed")
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._window.cancel_outstanding()  # a previous epoch left unfinished
        epoch, self._epoch = self._epoch, self._epoch + 1
        plan = self.plan(epoch)
        if self.config.alpha > 0:
            self._start_pool()
        feed = _EpochFeed(plan, self._window.new_key_base(), pool=self._pool, window=self._window, mixer=self._mixer,
                          transform=self.transform, batch_size=self.batch_size, horizon=self._horizon())  # fmt: skip
        # every shard's order, concatenated: DALI's contiguous shard ``shard_id`` of it is this shard's order
        global_order = np.concatenate([self.order(epoch, s) for s in range(self.num_shards)])
        pipe = build_pipeline([self.files[i] for i in global_order], [self.labels[i] for i in global_order],
                              feed, self.transform, batch_size=self.batch_size, shard_id=self.shard_id,
                              num_shards=self.num_shards, device_id=self.device_id, num_threads=self.num_threads,
                              prefetch_queue_depth=self.prefetch_queue_depth, meta=self.config.return_meta,
                              seed=self.seed & 0x7FFFFFFF)  # fmt: skip
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        iterator = DALIGenericIterator([pipe], output_map(self.config.return_meta), reader_name=READER,
                                       last_batch_policy=policy, auto_reset=False)  # fmt: skip
        return _Epoch(iterator, feed, len(self), self._counts, self._window)

    def _horizon(self) -> int:
        """Samples requested ahead: ``lookahead``, else FusionLoader's floor ``max(64, 8 * batch_size)``."""
        cfg = self.config
        return cfg.lookahead if cfg.lookahead is not None else max(64, 8 * self.batch_size)

    # -- synthesis --------------------------------------------------------------------------------

    def _start_pool(self) -> None:
        if self._pool is None:
            self._pool = self._window.pool = start_pool(self.config, self._source, torch.uint8)  # 8-bit files

    # -- stats and lifetime -----------------------------------------------------------------------

    def stats(self) -> dict:
        """Positions served by kind since construction, plus the producers' figures."""
        out = {k: int(self._counts[k]) for k in KINDS}
        out["store"] = {"variants": len(self._store), "bytes": self._store.nbytes}
        out["producer"] = self._pool.stats() if self._pool is not None and not self._closed else {}
        return out

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._window.cancel_outstanding()
        self._mixer.cancel_late(self._pool)
        pool, self._pool = self._pool, None
        self._window.pool = None
        if pool is not None:
            pool.close()

    def __enter__(self) -> "DaliFusionLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _EpochFeed:
    """One epoch's external-source batches: the plan's keys for DALI iteration ``b``, synthetic images
    resolved as FusionLoader's dispatch resolves them (NOTE [Mixing])."""

    def __init__(self, plan: EpochPlan, key_base: int, *, pool, window: RequestWindow, mixer: Mixer,
                 transform: DaliTrainTransform, batch_size: int, horizon: int):  # fmt: skip
        self.plan, self.key_base, self.pool, self.window, self.mixer = plan, key_base, pool, window, mixer
        self.transform, self.batch_size, self.horizon = transform, batch_size, horizon
        self.submitted = 0
        self.kinds: dict[int, list[str]] = {}  # batch -> kinds, until the iterator delivers it
        choices = normalize_strengths(plan.strengths)
        self.allowed = {None} if choices is None else {float(np.float32(c)) for c in choices}

    def __call__(self, b: int):
        plan, bs, pool, window, mixer = self.plan, self.batch_size, self.pool, self.window, self.mixer
        span = plan.span(b)
        start, end = span if span is not None else (0, 0)  # None: the reader's padding past a dropped last batch
        indices = plan.order.batch(b) if span is not None else []
        d = plan.draws(start, end)
        if pool is not None:
            pool.check()
            self.submitted = max(self.submitted, window.submit(plan, self.key_base, self.submitted,
                                                               end + self.horizon, window.outstanding))  # fmt: skip
        deadline = mixer.deadline()  # one deadline for the whole batch
        images, kinds, strengths = [], [], []
        for j in range(end - start):
            if not d.synthetic[j]:
                images.append(placeholder()), kinds.append("real"), strengths.append(np.nan)
                continue
            job = self.key_base + start + j
            if job in window.outstanding:
                window.outstanding.discard(job)
            else:
                job = None
            image, s, kind, _ = mixer.resolve(pool, job, int(indices[j]), plan.job_strength(d.strength[j]),
                                              int(d.sample_seed[j]), deadline, self.allowed)  # fmt: skip
            images.append(placeholder() if image is None else _to_hwc_uint8(image))
            kinds.append(kind)
            strengths.append(np.nan if s is None else s)
        if pool is not None and mixer.late:
            mixer.harvest(pool)
        self.kinds[b] = kinds
        crop, mirror = self.transform.draw(d.sample_seed)
        n = end - start
        synthetic = [np.array(k in ("fresh", "reused")) for k in kinds]
        index = [np.array(int(i), dtype=np.int64) for i in indices]
        kind_codes = [np.array(KINDS.index(k), dtype=np.int32) for k in kinds]
        strength = [np.array(s, dtype=np.float32) for s in strengths]
        crops, mirrors = list(crop), [np.array(m, dtype=np.int32) for m in mirror]
        # the reader always makes full batches (pad_last_batch): pad with real placeholders; the iterator trims them
        for _ in range(bs - n):
            synthetic.append(np.array(False)), images.append(placeholder()), index.append(np.array(-1, dtype=np.int64))
            crops.append(np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)), mirrors.append(np.array(0, dtype=np.int32))
            kind_codes.append(np.array(0, dtype=np.int32)), strength.append(np.array(np.nan, dtype=np.float32))
        return synthetic, images, crops, mirrors, index, kind_codes, strength


class _Epoch:
    """DALIGenericIterator's batches for one epoch; counts kinds as batches are delivered and cancels what
    is still requested when the epoch ends."""

    def __init__(self, iterator, feed: _EpochFeed, length: int, counts: Counter, window: RequestWindow):
        self.iterator, self.feed, self.length, self.counts, self.window = iterator, feed, length, counts, window
        self.batch = 0

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return self.length

    def __next__(self):
        if self.batch >= self.length:
            self.window.cancel_outstanding()
            raise StopIteration
        out = next(self.iterator)
        self.counts.update(self.feed.kinds.pop(self.batch, []))
        self.batch += 1
        return out
