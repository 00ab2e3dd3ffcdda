"""The job's one producer pool as a named Ray actor: ``_PoolCore`` (the process pool's JobBook, deadline
dispatch, slot credits, death handling) with producer actors and object-store slots, serving every rank.

Every rank's keys are mapped to one key space, ``key * world_size + rank``, so the JobBook orders the jobs of
all ranks together by when they were submitted and by the deadline rule (NOTE [Deadlines] in producer.py), and
its consumption rate is the job's, all ranks together. A finished image is *delivered* to its rank (its
reference handed over at the rank's next ``sync``) but holds its slot until the rank says it took it (the ack
rides on the next call): the slots bound what sits in the object store, and the rate counts consumption, not
delivery. The actor is threaded: a rank's ``sync`` may wait for its image while other ranks' calls run.
"""

from __future__ import annotations

import os
import threading
import time

from ..producer import _PoolCore
from ..protocol import PoolConfig, ProducerError
from .slots import ObjectSlotRing
from .supervisor import RaySupervisor

__all__ = ["Coordinator"]

LEASE_S = 60.0  # a coordinator no rank has called for this long closes itself (every rank died without close)


def _error_tuple(error: ProducerError | None):
    if error is None:
        return None
    return (str(error), error.producer, error.device, error.pid, error.keys, error.indices)


class Coordinator:
    """Wrapped with ``ray.remote`` by the pool (its options: named, detached, threaded, no CPU)."""

    def __init__(self, cfg: PoolConfig, resources: list, world_size: int, fingerprint, liveness_s: float):
        def supervisor(cfg, lock, cv, listener):
            return RaySupervisor(cfg, lock, cv, listener, resources=resources, liveness_s=liveness_s)

        self.core = _PoolCore(cfg, supervisor_factory=supervisor, ring_factory=ObjectSlotRing)
        self.core.supervisor.deposit = lambda slot, ref: self.core.ring.deposit(slot, ref)
        self.world, self.fingerprint = world_size, fingerprint
        self.delivered: dict[int, int] = {}  # global key -> slot, handed to its rank, not yet acknowledged
        self.clients: dict[int, float] = {}  # rank -> when it last called
        self.notices: dict[int, list[str]] = {}
        self.outcomes_seen: dict[int, int] = {}  # rank -> lost + dropped count at its last look
        self.closing = False
        threading.Thread(target=self._lease, daemon=True, name="fl-lease").start()

    # -- lifetime -------------------------------------------------------------------------------------

    def attach(self, rank: int, fingerprint):
        """Register ``rank``; the settings it would have created the pool with must be this pool's."""
        if fingerprint != self.fingerprint:
            return f"this job's Ray producer pool was created with {self.fingerprint}, rank {rank} asks for {fingerprint}"
        self.clients[rank] = time.monotonic()
        self.notices.setdefault(rank, [])
        return None

    def start(self, rank: int):
        """Start the producers (the first caller) and wait until they are ready, or for the error."""
        core = self.core
        self.clients[rank] = time.monotonic()
        with core.lock:
            first = not core.started
        try:
            if first:
                core.start()
            elif core.cfg.wait_ready:
                with core.lock:
                    while not core.supervisor.all_ready() and core.error is None and not core.closed:
                        core.cv.wait(0.5)
        except ProducerError as e:
            return _error_tuple(e)
        return _error_tuple(core.error)

    def detach(self, rank: int) -> int:
        """``rank`` is done; when no rank is left, stop every producer and drop every object. Returns how many
        ranks remain."""
        self.clients.pop(rank, None)
        if not self.clients:
            self.close()
        return len(self.clients)

    def close(self) -> None:
        self.closing = True
        self.core.close()
        self.delivered.clear()

    def _lease(self) -> None:
        while not self.closing:
            time.sleep(1.0)
            if self.clients and time.monotonic() - max(self.clients.values()) > LEASE_S:
                self.close()  # the producers are stopped; then this detached actor's process goes too
                os._exit(0)

    # -- the ranks' calls -----------------------------------------------------------------------------

    def _g(self, rank: int, key: int) -> int:
        return key * self.world + rank

    def _status(self, rank: int) -> tuple:
        core = self.core
        texts = core.supervisor.notices + core.notices
        core.supervisor.notices, core.notices = [], []
        for r in self.notices:  # every rank hears every warning
            self.notices[r].extend(texts)
        mine, self.notices[rank] = self.notices.get(rank, []), []
        return _error_tuple(core.error), mine, core.supervisor.stalled() if core.started and not core.closed else []

    def submit(self, rank: int, jobs: list) -> tuple:
        import dataclasses

        core = self.core
        self.clients[rank] = time.monotonic()
        with core.lock:
            if core.error is None and not core.closed:
                core.book.submit([dataclasses.replace(j, key=self._g(rank, j.key)) for j in jobs])
                core.dispatch()
            return self._status(rank)

    def sync(self, rank: int, acks: list, want: int | None, wait_s: float) -> tuple:
        """Acknowledge taken keys (their slots go free), wait up to ``wait_s`` for ``want`` (making it urgent),
        and return (this rank's newly delivered (key, ref) pairs, its keys that ended without an image and how,
        whether ``want`` is blocked, (error, notices, stalled))."""
        core, world = self.core, self.world
        self.clients[rank] = time.monotonic()
        deadline = time.monotonic() + wait_s
        with core.lock:
            for key in acks:
                slot = self.delivered.pop(self._g(rank, key), None)
                if slot is not None and core.book.take(self._g(rank, key)) is not None:
                    core.ring.release(slot)
                    core.free.append(slot)
            if acks:
                core.dispatch()
            g = None if want is None else self._g(rank, want)
            blocked = False
            while g is not None and core.error is None and not core.closed:
                if g in core.book.ready or not core.book.live(g):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if core.blocked(g):
                    blocked = True
                    break
                if core.book.wait_for(g):
                    core.dispatch()
                core.cv.wait(min(remaining, 0.25))
            out = []
            for gk, slot in core.book.ready.items():
                if gk % world == rank and gk not in self.delivered:
                    ref = core.ring.pop(slot)
                    if ref is not None:
                        self.delivered[gk] = slot
                        out.append((gk // world, ref))
            ended = []
            ended_count = core.book.counters["lost"] + core.book.counters["nonfinite_dropped"]
            if ended_count != self.outcomes_seen.get(rank, 0):
                for gk, how in list(core.book.outcomes.items()):
                    if gk % world == rank:
                        core.book.settle(gk)
                        ended.append((gk // world, how))
                self.outcomes_seen[rank] = ended_count
            return out, ended, blocked, self._status(rank)

    def cancel(self, rank: int, keys: list) -> None:
        core = self.core
        if core.closed or not core.started:
            return
        with core.lock:
            per_producer = {}
            for key in keys:
                gk = self._g(rank, key)
                self.delivered.pop(gk, None)
                where = core.book.cancel(gk)
                if where is None:
                    continue
                place, at = where
                if place == "owned":
                    per_producer.setdefault(at, []).append(gk)
                elif place == "ready":
                    core.ring.release(at)
                    core.free.append(at)
            for producer, ks in per_producer.items():
                core.supervisor.procs[producer].send("cancel", ks)
            core.dispatch()

    def passed(self, rank: int, keys: list) -> None:
        core = self.core
        with core.lock:
            for producer, ks in core.book.mark_passed([self._g(rank, k) for k in keys]).items():
                core.supervisor.procs[producer].send("passed", ks)
            core.dispatch()

    def heartbeat(self, rank: int) -> tuple:
        self.clients[rank] = time.monotonic()
        with self.core.lock:
            return self._status(rank)

    def stats(self) -> dict:
        out = self.core.stats()
        out["ranks"] = sorted(self.clients)
        out["delivered"] = len(self.delivered)
        return out

    def latency_s(self) -> float:
        return self.core.book.latency_s

    def producer_handles(self) -> list:
        """The live producer actors' handles (tests: ``ray.kill`` one)."""
        return [p.handle for p in self.core.supervisor.procs if p.handle is not None]

    def producer_pids(self) -> list:
        return [p.pid for p in self.core.supervisor.procs if p.pid is not None]
