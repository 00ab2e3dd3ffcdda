"""Producer actors from the coordinator's side: the process supervisor's rules (start-up phases and budgets,
restarts up to ``max_restarts``, start retries, hang timeout, error messages naming producer and job) with Ray
actors in place of spawned processes (NOTE [Ray backend] in pool.py).

Liveness: the coordinator keeps one ``poll`` in flight per actor (answered within ``POLL_WAIT_S`` even while
the sampler steps: the actor is threaded). An actor whose process dies fails that call at once
(``RayActorError``); an actor whose node is gone, or that stopped answering, is declared dead when its poll has
been out for ``liveness_s`` seconds -- without waiting for Ray's own node health check.
"""

from __future__ import annotations

import logging
import os
import time

from .. import protocol as P
from ..protocol import ChildConfig, ErrorInfo
from ..supervisor import DEAD, STARTING, ProducerProcess, Supervisor
from .actor import ProducerActor

__all__ = ["ActorRecord", "RaySupervisor"]

log = logging.getLogger("fusionloader")

POLL_S = 0.05  # coordinator wake-up period
POLL_WAIT_S = 0.2  # how long a producer's poll waits for a message before answering empty


class _ActorProcess:
    """The part of ``multiprocessing.Process`` the supervisor's death handling reads."""

    def __init__(self, handle):
        self.handle, self.exitcode, self.killed = handle, None, False

    def kill(self) -> None:
        import ray

        self.killed = True
        self.exitcode = -9
        try:
            ray.kill(self.handle, no_restart=True)
        except Exception:  # already gone, or its node is
            pass

    def join(self, timeout=None) -> None:
        pass

    def is_alive(self) -> bool:
        return not self.killed


class ActorRecord(ProducerProcess):
    """The coordinator's record of one producer actor (replaced in place when it is restarted)."""

    def __init__(self, producer: int, device: str, resources: dict, threads: int | None):
        super().__init__(producer, device)
        self.resources, self.threads = resources, threads
        self.handle = None
        self.seq = 0
        self.poll_ref, self.poll_since, self.answered = None, 0.0, False

    def send(self, *msg) -> None:
        self.handle.send.remote(self.seq, msg)  # fire and forget: the actor orders by sequence number
        self.seq += 1

    def close_channels(self) -> None:
        self.handle = self.poll_ref = self.process = None


class RaySupervisor(Supervisor):
    """Starts and watches one producer actor per resource spec; ``deposit(slot, ref)`` receives each image."""

    def __init__(self, cfg, lock, cv, listener, clock=time.monotonic, *, resources, liveness_s: float = 10.0):
        super().__init__(cfg, lock, cv, listener, clock)
        self.procs = [ActorRecord(i, d, spec["options"], spec["threads"])
                      for i, (d, spec) in enumerate(zip(cfg.devices, resources))]
        self.liveness_s = liveness_s
        self.deposit = None  # set by the coordinator: ring.deposit
        self._remote = None

    def start(self) -> None:
        import ray

        self._remote = ray.remote(ProducerActor)
        super().start()

    def spawn(self, p: ActorRecord) -> None:
        cfg = self.cfg
        child = ChildConfig(p.producer, p.device, cfg.synthesizer, cfg.source, cfg.capacity, cfg.latent_cache_path,
                            os.getpid(), p.threads if p.threads is not None else cfg.threads, cfg.warmup,
                            cfg.slot_dtype, cfg.adapters, cfg.clip_filter)
        p.handle = self._remote.options(max_restarts=0, max_concurrency=4, **p.resources).remote(child)
        p.process = _ActorProcess(p.handle)
        now = self.clock()
        p.pid, p.state, p.t_heard, p.seq = None, STARTING, now, 0
        p.phase, p.phase_since, p.credits = P.BOOT, now, set()
        p.poll_ref, p.answered = None, False
        p.starts += 1
        if self.ring_handle is not None:
            p.send(P.RING, self.ring_handle)

    def share_ring(self, handle) -> None:
        self.ring_handle = handle
        for p in self.procs:
            if p.state != DEAD and p.handle is not None:
                p.send(P.RING, handle)

    def collect_once(self) -> None:
        import ray

        with self.lock:
            now = self.clock()
            waiting = {}
            for p in self.procs:
                if p.state == DEAD or p.handle is None:
                    continue
                if p.poll_ref is None:
                    p.poll_ref, p.poll_since = p.handle.poll.remote(POLL_WAIT_S), now
                waiting[p.poll_ref] = p
        if not waiting:
            time.sleep(POLL_S)
            return
        refs = list(waiting)
        ready, rest = ray.wait(refs, num_returns=1, timeout=POLL_S)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        with self.lock:
            if self.thread_stop.is_set():
                return
            dead = []
            for ref in ready:
                p = waiting[ref]
                if p.poll_ref is not ref:  # replaced meanwhile
                    continue
                p.poll_ref = None
                try:
                    messages = ray.get(ref, timeout=self.liveness_s)
                except Exception as e:  # RayActorError, ActorDiedError, ActorUnavailableError, GetTimeoutError
                    p.error_info = p.error_info or ErrorInfo(p.pid, f"Ray actor died: {type(e).__name__}: {e}")
                    p.process.exitcode = -9  # like a signal: a producer lost while starting is started again
                    dead.append(p)
                    continue
                p.answered = True
                for msg in messages:
                    if msg[0] == P.DONE:
                        if msg[2] in p.credits:
                            self.deposit(msg[2], msg[5])
                        msg = msg[:5]
                    self.on_message(p, msg)
                    if msg[0] == P.ERROR:  # the producer's thread ended with this error
                        dead.append(p)
            now = self.clock()
            for p in self.procs:
                if p.state == DEAD or p in dead:
                    continue
                if p.process is not None and p.process.killed:  # check_stalls killed it
                    dead.append(p)
                elif p.answered and p.poll_ref is not None and now - p.poll_since > self.liveness_s:
                    p.error_info = ErrorInfo(p.pid, f"Ray actor gave no answer for {now - p.poll_since:.0f} s "
                                                    f"(its node lost?)")
                    p.process.exitcode = -9
                    dead.append(p)
            for p in dict.fromkeys(dead):
                if p.state != DEAD:
                    if p.process is not None and not p.process.killed:
                        p.process.kill()
                    self.on_death(p)
            self.check_stalls()
            self.listener.tick()

    def close(self) -> None:
        import ray

        self.thread_stop.set()
        if self.thread is not None:
            self.thread.join(timeout=1.0)
        for p in self.procs:
            if p.handle is not None:
                try:
                    p.send(P.STOP)
                except Exception:
                    pass
                try:
                    ray.kill(p.handle, no_restart=True)
                except Exception:
                    pass
                p.close_channels()
