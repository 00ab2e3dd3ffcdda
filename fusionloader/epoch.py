"""One epoch of a FusionLoader: its progress (what ``state_dict`` saves) and its iterator.

The iterator keeps the request window ahead, resolves each batch's synthetic positions as the runner
dispatches it -- deferring to the worker those whose job is not made yet, and settling them when the batch is
consumed (NOTE [Mixing] in mixing.py, "When") -- takes the runner's collated batches, records progress and counts.
It is handed its collaborators (pool, window, mixer, stats, config, and the loader's horizon/plan-ahead/length
callables) and reads nothing else of the loader.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import torch

from .config import FusionConfig
from .mixing import Mixer
from .plan import EpochPlan, normalize_strengths
from .stats import LoaderStats
from .worker import Batch, DispatchGate, Key

__all__ = ["EpochIterator", "EpochProgress"]


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


class EpochProgress:
    """How far the current epoch is: the consumed batches (a prefix plus out-of-order ones), the order's
    snapshot at its start, and per logical worker the RNG state after its last consumed batch."""

    def __init__(self, epoch: int, num_batches: int | None, snapshot: dict | None, prefix: int = 0,
                 extra=(), workers: dict | None = None, last_worker: int | None = None):  # fmt: skip
        self.epoch, self.num_batches, self.snapshot = epoch, num_batches, snapshot
        self.prefix, self.extra = prefix, set(extra)
        self.workers = dict(workers or {})
        self.last_worker = last_worker
        self.stored_rest: dict | None = None  # the remaining order, for samplers that cannot re-derive it
        self.plan = None  # the epoch's plan (not saved)
        self.draws_base_seed = True  # whether this epoch's iter() drew the workers' base seed (DataLoader's rule)

    @property
    def consumed(self) -> int:
        return self.prefix + len(self.extra)

    def consume(self, batch: int, worker: int | None, rng) -> None:
        if batch == self.prefix:
            self.prefix += 1
            while self.prefix in self.extra:
                self.extra.discard(self.prefix)
                self.prefix += 1
        elif batch > self.prefix:
            self.extra.add(batch)
        if worker is not None:
            self.workers[worker] = rng
            self.last_worker = worker

    def finished(self) -> bool:
        return self.num_batches is not None and self.prefix >= self.num_batches


class EpochIterator:
    """One epoch: requests ahead, resolves each batch's synthetic images as the runner dispatches it, takes
    the runner's collated batches, records progress and counts."""

    def __init__(self, plan: EpochPlan, progress: EpochProgress, key_base: int, submitted: int | None, *, pool, window,
                 mixer: Mixer, stats: LoaderStats, config: FusionConfig, horizon, plan_ahead, length,
                 gate: DispatchGate | None = None):  # fmt: skip
        self.plan, self.progress, self.key_base = plan, progress, key_base
        self.pool, self.window, self.mixer, self.stats, self.config = pool, window, mixer, stats, config
        # ``gate``: given when the runner's workers hand back batches in dispatch order; then a position whose
        # job is unfinished at dispatch is deferred to the worker (NOTE [Mixing], "When")
        self.gate = gate
        self.dispatched: collections.deque = collections.deque()  # (batch, dispatch number), in dispatch order
        self.deferred: dict[int, tuple] = {}  # position -> (job key, index, strength) until consumed
        self.horizon, self.plan_ahead, self.length = horizon, plan_ahead, length
        self.runner_iter = None  # set by the loader once the runner can dispatch to this iterator
        span = plan.span(progress.prefix)
        self.submitted = (span[0] if span else plan.order.known_positions) if submitted is None else submitted
        self.done = self.ended = False
        self.t_last = time.perf_counter()
        # strengths a reused variant may have this epoch (the current curriculum stage's)
        choices = normalize_strengths(plan.strengths)
        self.allowed = {None} if choices is None else {float(np.float32(c)) for c in choices}
        if pool is not None:  # producers start on the first look-ahead window at once
            self._submit_upto(self.submitted + horizon())

    def __iter__(self):
        return self

    def __len__(self) -> int:
        n = self.plan.num_batches
        return n if n is not None else self.length()

    def _submit_upto(self, end: int) -> None:
        self.submitted = max(self.submitted, self.window.submit(self.plan, self.key_base, self.submitted, end,
                                                                 self.window.outstanding))  # fmt: skip

    def _request_ahead(self, position: int) -> None:
        """Keep the window ``horizon`` samples ahead of ``position`` (into the next epochs when it ends)."""
        horizon = position + self.horizon()
        self._submit_upto(horizon)
        if self.plan.order.exhausted and horizon > self.plan.order.known_positions:
            self.plan_ahead(self.plan.epoch + 1, horizon - self.plan.order.known_positions)

    def dispatch(self, keys: list[Key]) -> list[Key]:
        """The runner hands this batch to a worker: resolve its synthetic positions (NOTE [Mixing])."""
        pool = self.pool
        if self.done:
            return keys
        seq = -1
        if self.gate is not None:
            seq = self.gate.next()
            self.dispatched.append((keys[0].batch, seq))
        if not any(k.synthetic for k in keys):
            return keys
        if pool is not None:
            pool.check()  # a dead producer raises here, before anything waits
            self._request_ahead(keys[-1].position + 1)
        # Defer (NOTE [Mixing], "When"): never under ``wait`` (it waits here, one deadline per batch), and only
        # with a ring the workers can read.
        ring = None
        if self.gate is not None and pool is not None and not self.mixer.policy.waits:
            reader = getattr(pool, "reader", None)  # optional in the pool protocol (test stand-ins)
            ring = reader() if reader is not None else None
        d = self.plan.draws(keys[0].position, keys[-1].position + 1)
        deadline = self.mixer.deadline()  # one deadline for the whole batch
        out = []
        for j, key in enumerate(keys):
            if not key.synthetic:
                out.append(key)
                continue
            job = self.key_base + key.position
            if job not in self.window.outstanding:
                job = None
            strength = self.plan.job_strength(d.strength[j])
            if job is not None and ring is not None:
                image = pool.take(job, 0.0)
                if image is None:  # not made yet: the worker may still find it (stays outstanding until consumed)
                    image, s, kind = self.mixer.meanwhile(key.index, key.seed, self.allowed)
                    self.deferred[key.position] = (job, key.index, strength)
                    out.append(key._replace(image=image, kind=kind, strength=_nan(s), job=job,
                                            job_strength=_nan(strength), seq=seq, ring=ring))  # fmt: skip
                    continue
                self.window.outstanding.discard(job)
                self.mixer.accept(key.index, image, strength)
                s, kind = strength, "fresh"
            else:
                self.window.outstanding.discard(job)
                image, s, kind, waited = self.mixer.resolve(pool, job, key.index, strength, key.seed, deadline,
                                                            self.allowed)  # fmt: skip
                self.stats.add_time("stall_s", waited)
            out.append(key._replace(image=image, kind=kind, strength=_nan(s)))
        return out

    def __next__(self):
        if self.done:  # also after the loader's close() or a new iter() (they mark it done)
            raise StopIteration
        pool, stats = self.pool, self.stats
        if pool is not None:
            pool.check()
            if self.mixer.late:
                self.mixer.harvest(pool)
            nxt = self.plan.span(self.progress.prefix + 1)
            self._request_ahead(nxt[0] if nxt else self.plan.order.known_positions)
        if self.gate is not None and self.dispatched:
            self.gate.want(self.dispatched[0][1])  # a worker holding this batch hands it back now
        t0 = time.perf_counter()
        try:
            batch = next(self.runner_iter)
        except StopIteration:
            self._finish()
            raise
        stats.add_time("real_wait_s", time.perf_counter() - t0)
        self._settle(batch)
        out = self._deliver(batch)
        self.progress.consume(batch.batch, batch.worker, batch.rng)
        self.plan.order.release(self.progress.prefix)
        now = time.perf_counter()
        stats.add_time("wall_s", now - self.t_last)
        self.t_last = now
        stats.end_batch()
        cfg = self.config
        if cfg.progress is not None:
            cfg.progress.set_postfix(stats.postfix(), refresh=False)
        if cfg.log_every and stats.current.batches % cfg.log_every == 0:
            stats.log()
        if self.progress.finished():
            self._end_of_epoch()  # not done: the runner's next call pulls the sampler past its end, as DataLoader's
        return out

    def _settle(self, batch: Batch) -> None:
        """The batch is consumed: its deferred positions' jobs are taken (served fresh) or gone past."""
        for j, (b, _) in enumerate(self.dispatched):
            if b == batch.batch:
                del self.dispatched[j]
                break
        if not self.deferred:
            return
        for position, kind in zip(batch.positions, batch.kinds):
            entry = self.deferred.pop(position, None)
            if entry is not None:
                job, index, strength = entry
                self.window.outstanding.discard(job)
                self.mixer.settle(self.pool, job, index, strength, fresh=kind == "fresh")

    def _deliver(self, batch: Batch):
        plan = self.plan
        for kind in batch.kinds:
            self.stats.record(kind)
        if not self.config.return_meta:
            return batch.data
        n = len(batch.positions)
        start = batch.positions[0] if n else 0
        d = plan.draws(start, start + n)  # a batch is a contiguous span of positions
        kinds = np.asarray(batch.kinds)
        if plan.order.integer:
            index = torch.from_numpy(np.asarray(plan.order.batch(batch.batch), dtype=np.int64).copy())
        else:
            index = torch.full((n,), -1, dtype=torch.int64)
        meta = {
            "index": index,
            "planned": torch.from_numpy(d.synthetic.copy()),
            "synthetic": torch.from_numpy((kinds == "fresh") | (kinds == "reused")),
            "fresh": torch.from_numpy(kinds == "fresh"),
            "strength": torch.tensor(batch.strengths, dtype=torch.float32),
        }
        if self.mixer.retrieval is not None:  # retrieved images (NOTE [Mixing]): which, and the pool id served
            retrieved = kinds == "retrieved"
            meta["retrieved"] = torch.from_numpy(retrieved)
            meta["pool_id"] = torch.from_numpy(self.mixer.pool_ids(index.numpy(), d.sample_seed, retrieved))
        return batch.data, meta

    def _end_of_epoch(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.window.cancel_outstanding()
        if self.config.log_every or self.config.progress is not None:
            self.stats.log()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self._end_of_epoch()
