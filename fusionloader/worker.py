"""What the runner's DataLoader workers run: the planned keys, ``dataset[index]``, collation, worker RNG.

NOTE [Worker side]
~~~~~~~~~~~~~~~~~~

* Keys. The runner's (batch) sampler (:class:`PlanSampler`) yields :class:`Key` s -- (position, index,
  coin, seed, batch, and for a synthetic position the image resolved for it) -- reading the plan lazily,
  batch by batch, skipping batches already consumed before a resume. It runs in the trainer's process, as
  any DataLoader sampler does, when DataLoader hands a batch to a worker; that is when the epoch's mixing
  resolves the batch's synthetic images (NOTE [Mixing]); they travel to the worker with the keys (tensors
  through shared memory, as DataLoader's results travel back).
* Deferred positions (``Key.job >= 0``: the job was not made at dispatch). The worker makes the batch as
  usual with what the position gets meanwhile, then *holds* it: every few ms it looks for the deferred jobs'
  images in the ring (``SlotRing.peek``: a copy, no state change -- the trainer still owns the slot and
  takes it when the batch is consumed; a slot re-credited during the copy is detected and skipped), and
  post-processes each one found in place of the stand-in, until every deferred job is found or the trainer
  asks for this batch: the :class:`DispatchGate`, one int64 in shared memory, holds the dispatch number of
  the batch the trainer is waiting for (set just before it waits; all in-flight batches are released on a
  new ``iter()`` or ``close()``). The gate is read *before* each look, so an image published before the
  trainer asked is always found. A held batch costs the trainer nothing it would not wait for anyway: it is
  handed back within one poll of being asked for, already post-processed.
* Items. :class:`PlannedDataset` runs ``dataset[index]`` unchanged (plus ``transform=`` when given, seeded
  per position). For a position with a synthetic image it then does the post-processing -- resize back to
  the real image's size and form, the train transform under the position's seed, the real sample's
  structure (:func:`synthetic_sample`) -- so synthetic images cost the trainer's thread nothing, exactly as
  real ones. An exception keeps the dataset's own type and object, as DataLoader's: the loader adds a note
  naming the index and path (PEP 678), which torch's ``ExceptionWrapper`` carries into the message it
  re-raises in the trainer.
* Collation. :class:`WorkerCollate` collates every batch with the user's ``collate_fn`` in the worker; a
  batch without synthetic images is exactly DataLoader's (``alpha=0`` is bit-exact).
* Worker RNG (resume). After each batch a worker attaches its RNG states (torch, ``random``, numpy) and
  its *logical* id to the batch. The loader keeps, per logical worker, the state after its last consumed
  batch; a resumed run's :class:`WorkerInit` (after the user's ``worker_init_fn``, as torchdata restores
  after it) gives physical worker ``w`` the state of logical worker ``(shift + w) % W``, where ``shift`` is
  the logical worker due to make the next batch: DataLoader hands batches to workers round-robin from
  worker 0, so the resumed batches meet the same RNG streams. A logical worker with no consumed batch in
  the epoch is seeded as torch seeds it (``base_seed + id``; the base seed is re-drawn from the restored
  generator). With ``in_order=False`` or ``persistent_workers=True`` this is best effort (README).
"""

from __future__ import annotations

import random
import time
import weakref
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .sources.dataset import ImageSource, RawInfo, describe, from_float, get_image, replace_image

__all__ = ["Batch", "DispatchGate", "Item", "Key", "PlanSampler", "PlannedDataset", "WorkerCollate", "WorkerInit", "rng_state",
           "seeded_call", "set_rng_state", "synthetic_sample"]  # fmt: skip


class Key(NamedTuple):
    position: int
    index: Any  # an int; any object a sampler yields for real-only positions (batch_size=None with lists)
    synthetic: bool  # the coin
    seed: int
    batch: int
    image: Any = None  # the synthetic image resolved for this position at dispatch (None: serve the real one)
    kind: str = "real"  # "real" | "fresh" | "reused" | "fallback"
    strength: float = float("nan")  # of the delivered synthetic image (NaN when real)
    # A deferred position (its job unfinished at dispatch): the job's key (-1: none) and strength, the batch's
    # dispatch number (for the DispatchGate) and the ring to peek it in; ``image``/``kind`` are then what is
    # served if the job is still not made when the trainer needs the batch.
    job: int = -1
    job_strength: float = float("nan")
    seq: int = -1
    ring: Any = None


class Item(NamedTuple):
    position: int
    sample: Any
    kind: str
    strength: float
    batch: int


def synthetic_sample(sample, image: torch.Tensor, info: RawInfo | None, transform, seed: int):
    """The synthetic image in the real image's form and size (DA-Fusion resizes back), through the train
    transform under the position's seed, in the real sample's structure (its label kept)."""
    if info is not None:
        raw_like = from_float(image, info)
    else:
        raw_like = image.float() / 255 if image.dtype == torch.uint8 else image
    if transform is not None:
        raw_like = seeded_call(transform, raw_like, seed)
    return replace_image(sample, raw_like)


def seeded_call(fn, x, seed: int):
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


def _note(e: BaseException, index, path: str | None) -> BaseException:
    where = f"fusionloader: raised reading dataset index {index}" + (f" (path {path!r})" if path else "")
    if where not in getattr(e, "__notes__", ()):
        e.add_note(where)
    return e


# --- worker RNG ----------------------------------------------------------------------------------------

_LOGICAL_ID: int | None = None  # this worker's logical id (set by WorkerInit in the worker process)


def rng_state() -> dict:
    """This process's RNG states (torch CPU, ``random``, numpy's global), JSON-friendly."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().numpy().tobytes(), "random": [version, list(internal), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}  # fmt: skip


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


class WorkerInit:
    """The runner's ``worker_init_fn``: the user's, then the restored RNG streams (NOTE [Worker side])."""

    def __init__(self, user_fn=None):
        self.user_fn = user_fn
        self.shift = 0
        self.states: dict[int, dict] = {}  # logical id -> state after its last consumed batch

    def __call__(self, worker_id: int) -> None:
        global _LOGICAL_ID
        if self.user_fn is not None:
            self.user_fn(worker_id)
        info = get_worker_info()
        logical = (self.shift + worker_id) % info.num_workers
        _LOGICAL_ID = logical
        if not self.shift and not self.states:
            return  # a fresh epoch: DataLoader's own seeding stands
        state = self.states.get(logical)
        if state is not None:
            set_rng_state(state)
        elif logical != worker_id:
            from torch.utils.data._utils.worker import _generate_state

            base = info.seed - worker_id
            random.seed(base + logical)
            torch.manual_seed(base + logical)
            np.random.seed(_generate_state(base, logical))


# --- the runner's dataset, sampler and collate -----------------------------------------------------------


class Batch:
    """What a runner worker returns: the collated batch, each position's kind and strength, and the worker's
    logical id and RNG state after making it (NOTE [Worker side])."""

    __slots__ = ("positions", "batch", "data", "kinds", "strengths", "worker", "rng")

    def __init__(self, positions, batch, data, kinds, strengths):
        self.positions, self.batch, self.data, self.kinds, self.strengths = positions, batch, data, kinds, strengths
        self.worker, self.rng = None, None
        if get_worker_info() is not None:
            self.worker = _LOGICAL_ID if _LOGICAL_ID is not None else get_worker_info().id
            self.rng = rng_state()

    def pin_memory(self, device=None):  # called by DataLoader's pin-memory thread
        from torch.utils.data._utils.pin_memory import pin_memory

        self.data = pin_memory(self.data, device)
        return self


class DispatchGate:
    """The dispatch number of the batch the trainer is waiting for, in shared memory: a worker holding a batch
    with deferred positions (NOTE [Worker side]) returns it as soon as the trainer asks for it, not before.

    Trainer side: ``next()`` numbers each dispatched batch, ``want(seq)`` before waiting for a batch,
    ``release_all()`` when the batches in flight are abandoned (a new ``iter()``, ``close()``). Worker side:
    ``wanted(tensor)`` reads it (the tensor travels with the runner's dataset, once per worker)."""

    def __init__(self):
        self.tensor = torch.full((1,), -1, dtype=torch.int64).share_memory_()
        self.seq = -1

    def next(self) -> int:
        self.seq += 1
        return self.seq

    def want(self, seq: int) -> None:
        if seq > int(self.tensor[0]):
            self.tensor[0] = seq

    def release_all(self) -> None:
        self.want(self.seq)

    @staticmethod
    def wanted(tensor) -> int:
        return int(tensor[0]) if tensor is not None else 1 << 62


HOLD_POLL_S = 0.004  # how often a holding worker looks at the ring and the gate
HOLD_CAP_S = 600.0  # never hold a batch longer (the gate always releases sooner; a safety net)


class PlannedDataset(Dataset):
    """``dataset[index]`` for planned keys; exceptions keep their type and gain a note naming index and path.
    ``gate``: the :class:`DispatchGate`'s tensor (deferred positions, NOTE [Worker side])."""

    def __init__(self, dataset, source: ImageSource, transform, gate=None):
        self.dataset, self.source, self.transform, self.gate = dataset, source, transform, gate
        self._infos: dict[int, RawInfo] = {}
        self._rings: dict = {}  # ring name -> SlotRing attached in this (worker) process

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_rings"] = {}  # mappings are per process
        return state

    def __len__(self):
        return len(self.dataset)

    def _path(self, index):
        return self.source.path(index) if isinstance(index, (int, np.integer)) else None

    def _finish(self, key: Key, sample, raw: bool = False) -> Item:
        """``raw``: ``sample`` was read with the image transform off (a synthetic position's, see below)."""
        try:
            if key.image is not None:  # a synthetic image was resolved for this position at dispatch
                if self.transform is not None:
                    info = describe(get_image(sample))
                else:
                    info = self._infos.get(key.index)
                    if info is None:
                        info = self.source.info(key.index) if self.source.reads_raw and not raw else describe(get_image(sample))
                        if len(self._infos) < 100_000:
                            self._infos[key.index] = info
                sample = synthetic_sample(sample, key.image, info, self.source.transform, key.seed)
            elif self.transform is not None:
                sample = replace_image(sample, seeded_call(self.transform, get_image(sample), key.seed))
        except Exception as e:
            raise _note(e, key.index, self._path(key.index))
        return Item(key.position, sample, key.kind, key.strength, key.batch)

    def _read(self, key: Key):
        try:
            sample = self.source.untransformed(key.index) if key.image is not None else None
            raw = sample is not None
            if not raw:
                sample = self.dataset[key.index]
        except Exception as e:
            raise _note(e, key.index, self._path(key.index))
        return sample, raw

    def __getitem__(self, key: Key) -> Item:
        sample, raw = self._read(key)
        item = self._finish(key, sample, raw)
        if key.job >= 0:
            item = self._hold([key], [(sample, raw)], [item])[0]
        return item

    def __getitems__(self, keys):
        getitems = getattr(self.dataset, "__getitems__", None)
        if not getitems:
            reads, items = [], []
            for k in keys:  # one key after the other, as DataLoader's fetcher reads them
                reads.append(self._read(k))
                items.append(self._finish(k, *reads[-1]))
        else:
            try:
                samples = getitems([k.index for k in keys])
            except Exception as e:
                raise _note(e, [k.index for k in keys], None)
            reads = [(s, False) for s in samples]
            items = [self._finish(k, s) for k, s in zip(keys, samples)]
        if any(k.job >= 0 for k in keys):
            items = self._hold(keys, reads, items)
        return items

    def _ring(self, handle):
        ring = self._rings.get(handle.name)
        if ring is None:
            from .ring import SlotRing

            ring = self._rings[handle.name] = SlotRing.attach(handle)
        return ring

    def _hold(self, keys, reads, items):
        """Deferred positions (NOTE [Worker side]): until the trainer asks for this batch (the gate) or every
        deferred job is made, look for their images in the ring; each one found replaces what the position
        was to be served (post-processed at once, so nothing is left to do when the trainer asks)."""
        pending = {j: k for j, k in enumerate(keys) if k.job >= 0}
        ring = self._ring(next(iter(pending.values())).ring)
        seq = max(k.seq for k in pending.values())
        t0 = time.monotonic()
        while True:
            # the gate first: an image published before the trainer asked is then seen by the peek below
            released = DispatchGate.wanted(self.gate) >= seq or time.monotonic() - t0 > HOLD_CAP_S
            found = ring.peek([k.job for k in pending.values()])
            for j in [j for j, k in pending.items() if k.job in found]:
                k = pending.pop(j)
                fresh = k._replace(image=found[k.job], kind="fresh", strength=k.job_strength)
                items[j] = self._finish(fresh, *reads[j])
            if not pending or released:
                return items
            time.sleep(HOLD_POLL_S)


class WorkerCollate:
    """Collate with the user's ``collate_fn`` in the worker, synthetic positions included."""

    def __init__(self, collate_fn, auto_collation: bool):
        self.collate_fn, self.auto = collate_fn, auto_collation

    def __call__(self, data):
        items = data if self.auto else [data]
        samples = [it.sample for it in items]
        return Batch([it.position for it in items], items[0].batch, self.collate_fn(samples if self.auto else samples[0]),
                     [it.kind for it in items], [it.strength for it in items])  # fmt: skip


class PlanSampler:
    """The runner's (batch) sampler: the plan's keys batch by batch from ``start``, skipping ``skip``.

    Reads the plan lazily, so the user's sampler is iterated no faster than DataLoader would iterate it plus
    the request window's look-ahead. ``dispatch(keys)`` (the epoch's mixing) returns the keys with the
    synthetic images resolved, as DataLoader hands the batch to a worker (NOTE [Mixing])."""

    def __init__(self, batched: bool):
        self.batched = batched
        self.plan, self.start, self.skip, self.dispatch = None, 0, frozenset(), None

    def set(self, plan, start: int, skip=frozenset(), dispatch=None) -> None:
        self.plan, self.start, self.skip = plan, start, frozenset(skip)
        # weakly: the epoch iterator owns the runner's iterator, and a dropped loader must be collectable
        self.dispatch = weakref.WeakMethod(dispatch) if dispatch is not None else None

    def keys(self, b: int) -> list[Key] | None:
        plan = self.plan
        span = plan.span(b)
        if span is None:
            return None
        s, e = span
        indices = plan.order.batch(b)
        d = plan.draws(s, e)
        if d.synthetic.any() and not plan.order.integer:
            plan.synthetic_between(s, e)  # raises the clear error
        return [Key(s + j, int(i) if plan.order.integer else i, bool(d.synthetic[j]), int(d.sample_seed[j]), b)
                for j, i in enumerate(indices)]  # fmt: skip

    def __iter__(self):
        b = self.start
        while True:
            if b in self.skip:
                b += 1
                continue
            keys = self.keys(b)
            if keys is None:
                return
            dispatch = self.dispatch() if self.dispatch is not None else None
            if dispatch is not None:
                keys = dispatch(keys)
            yield keys if self.batched else keys[0]
            b += 1

    def __len__(self):
        n = self.plan.num_batches
        if n is None:
            raise TypeError("the sampler has no len()")
        return max(0, n - self.start - len([b for b in self.skip if b >= self.start]))
