"""Mixing: which image a synthetic position gets (fresh, reused, or its real sample), and making it a sample.

NOTE [Mixing]
~~~~~~~~~~~~~

* When. A batch's synthetic positions are first looked at when DataLoader hands the batch to a runner
  worker (the runner's sampler calls the epoch's dispatch hook; NOTE [Worker side]): with ``num_workers=0``
  that is the trainer's ``next()``; with workers it is up to ``prefetch_factor * num_workers`` batches
  earlier. A job already made is taken then (fresh). A job not made yet is, with workers that hand batches
  back in order (``in_order=True``) and a host ring (``pool.reader()``), *deferred* rather than gone past: the
  key carries the job's key and what the position gets meanwhile (:meth:`Mixer.meanwhile`: a stored
  variant under ``reuse``, else the real sample), and the worker looks for the job's image in the ring until
  the trainer asks for that batch (NOTE [Worker side], the dispatch gate). So a position is served fresh if
  its job is made any time before the trainer needs the batch -- not only before dispatch, which at the
  start of a run (every position requested at ``iter()``) or of each epoch is too early. The deferred job
  stays outstanding until the batch is consumed, then :meth:`Mixer.settle` takes it (served fresh: into the
  store, its slot freed) or applies the late policy (gone past). Under ``wait`` nothing is deferred: the
  dispatch waits, one deadline per batch, as below. The request window is kept ahead of dispatch.
* Resolve (:meth:`Mixer.resolve`). For each synthetic position of a batch the producer's image is taken
  from the pool. Under ``wait`` the whole batch shares ONE deadline (``wait_timeout`` from the batch's
  arrival), and a pool that reports its producers stuck (``stalled()``, when the pool has it) ends the wait at
  once; ``check()`` raises for dead producers before anything waits. Fresh images go into the variant
  store. A late position gets a stored variant of the same index (``reuse``) or the real sample already
  fetched (``real``/``wait``; counted as fallback). Under ``real``/``wait`` the late job is cancelled; under
  ``reuse`` it keeps running and is harvested into the store when done (:meth:`Mixer.harvest`).
* Retrieved (``retrieval=``, NOTE [Mixing policies]). A synthetic position that the retrieval source serves
  (all of them without a synthesizer; half, by the sample seed's top bit, with one) gets
  ``retrieval.choose(index, label_of(index), seed)`` -- a pure function, so a resume gets the same image --
  at once, never late: kind ``"retrieved"``; no producer job was made for it. A class with nothing retrieved
  gives the real sample (``fallback``). The image is read here, in the trainer's process at dispatch (a dict
  lookup for tensor-backed pools, one file decode for path-backed ones); resize and train transform happen in
  the workers like a generated image's.
* Post-process (worker.py, :func:`~fusionloader.worker.synthetic_sample`). In the runner's workers: the
  image is resized back to the real image's size and form (PIL/array/tensor) and passed through the *same*
  train transform under an RNG seeded by the position's seed (a resumed run reproduces it; the worker's own
  RNG streams are left as they were), then the batch is collated with the user's ``collate_fn``.
"""

from __future__ import annotations

import collections
import time

import torch

import numpy as np

from .config import LatePolicy
from .policies import retrieval_positions
from .store import VariantStore

__all__ = ["Mixer"]


class Mixer:
    """Resolves synthetic positions against the pool and the variant store; harvests late jobs."""

    def __init__(self, store: VariantStore, policy: LatePolicy, wait_timeout: float, retrieval=None, label_of=None,
                 split: bool = False):  # fmt: skip
        self.store, self.policy, self.wait_timeout = store, policy, wait_timeout
        self.late: collections.deque = collections.deque()  # (key, index, strength): late jobs left running
        self.harvested = 0
        # retrieval: a RetrievedVariants; label_of(index) -> class id; split: a synthesizer serves the other half
        self.retrieval, self.label_of, self.split = retrieval, label_of, split

    def retrieves(self, seeds) -> np.ndarray:
        """bool per synthetic position (by its sample seed): served by the retrieval source."""
        if self.retrieval is None:
            return np.zeros(np.shape(seeds), dtype=bool)
        return retrieval_positions(seeds, self.split)

    def pool_ids(self, indices, seeds, retrieved) -> np.ndarray:
        """The pool id of each retrieved position (-1 elsewhere): ``return_meta``'s ``pool_id``."""
        out = np.full(len(indices), -1, dtype=np.int64)
        for j in np.flatnonzero(retrieved):
            pid = self.retrieval.pick(int(indices[j]), self.label_of(int(indices[j])), int(seeds[j]))
            out[j] = -1 if pid is None else pid
        return out

    def deadline(self) -> float:
        """The batch's one deadline (monotonic seconds)."""
        return time.monotonic() + (self.wait_timeout if self.policy.waits else 0.0)

    def resolve(self, pool, key: int | None, index: int, strength: float | None, seed: int, deadline: float,
                allowed) -> tuple[torch.Tensor | None, float | None, str, float]:  # fmt: skip
        """(image or None, strength, "fresh" | "reused" | "retrieved" | "fallback", seconds waited) for a synthetic
        position; ``key`` is None when nothing was requested for it."""
        if self.retrieval is not None and bool(self.retrieves(seed)):
            got = self.retrieval.choose(index, self.label_of(index), seed)
            if got is None:  # nothing retrieved for this class
                return None, None, "fallback", 0.0
            return got[0], None, "retrieved", 0.0
        image, waited = None, 0.0
        if pool is not None and key is not None:
            timeout = max(0.0, deadline - time.monotonic())
            stalled = getattr(pool, "stalled", None)  # optional in the pool protocol (being added by producers)
            if timeout > 0 and callable(stalled) and stalled():
                timeout = 0.0  # a producer known to be stuck: waiting cannot help
            t0 = time.perf_counter()
            image = pool.take(key, timeout)
            waited = time.perf_counter() - t0
            if image is None:
                self.went_past(pool, key, index, strength)
        if image is not None:
            self.accept(index, image, strength)
            return image, strength, "fresh", waited
        if self.policy.reuses:
            chosen = self.store.choose(index, seed, allowed)
            if chosen is not None:
                return chosen[0], chosen[1], "reused", waited
        return None, None, "fallback", waited

    def accept(self, index: int, image: torch.Tensor, strength: float | None) -> None:
        """A fresh image taken for ``index`` (kept in the store for later reuse)."""
        self.store.put(index, image, strength)

    def went_past(self, pool, key: int, index: int, strength: float | None) -> None:
        """The trainer went past ``key``'s position without its image: under ``reuse`` the job keeps running
        (harvested into the store later), otherwise it is cancelled."""
        if self.policy.reuses:
            self.late.append((key, index, strength))
            passed = getattr(pool, "passed", None)  # optional in the pool protocol (test stand-ins)
            if passed is not None:
                passed([key])
        else:
            pool.cancel([key])

    def meanwhile(self, index: int, seed: int, allowed) -> tuple[torch.Tensor | None, float | None, str]:
        """What a deferred position (its job unfinished at dispatch, NOTE [Mixing] "When") is served if its
        image is still not made when the trainer needs the batch: a stored variant under ``reuse``, else its
        real sample (None)."""
        if self.policy.reuses:
            chosen = self.store.choose(index, seed, allowed)
            if chosen is not None:
                return chosen[0], chosen[1], "reused"
        return None, None, "fallback"

    def settle(self, pool, key: int, index: int, strength: float | None, fresh: bool) -> None:
        """A deferred position was consumed: ``fresh`` when the worker served the job's image (taken from the
        ring now, into the store, freeing its slot), else the trainer went past it."""
        if fresh:
            image = pool.take(key, 0.0)
            if image is not None:
                self.accept(index, image, strength)
                return
        self.went_past(pool, key, index, strength)

    def harvest(self, pool, scan: int = 64, keep: int = 256) -> None:
        """Move finished late jobs into the store (freeing their ring slots); forget lost ones; cancel the
        oldest beyond ``keep``. Looks at most ``scan`` keys per batch beyond those the pool reports ready."""
        late = self.late  # across epochs: a few-shot epoch can be shorter than one job's latency
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
                    self.store.put(index, image, strength)
                    self.harvested += 1
                else:
                    remaining.append(entry)
            late = self.late = remaining
        kept = collections.deque()
        for _ in range(min(scan, len(late))):
            key, index, strength = entry = late.popleft()
            image = pool.take(key, 0.0)
            if image is not None:
                self.store.put(index, image, strength)
                self.harvested += 1
            elif pool.state(key) == "pending":
                kept.append(entry)
            # else: lost, dropped (NaN/inf) or unknown: nothing will come
        kept.extend(late)
        self.late = kept

    def cancel_late(self, pool) -> None:
        late, self.late = self.late, collections.deque()
        if late and pool is not None:
            try:
                pool.cancel([entry[0] for entry in late])
            except Exception:  # a failed pool has nothing left to cancel
                pass
