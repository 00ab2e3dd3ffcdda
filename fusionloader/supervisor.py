"""Producer processes from the trainer's side: spawning, start-up phases, liveness, restarts, shutdown.

The ``Supervisor`` owns one ``ProducerProcess`` per device and the collector thread that waits on every
result pipe and every process sentinel (NOTE [Producer protocol] in producer.py). It knows nothing of jobs
or slots: what a message means for them, and what a death costs, it hands to its ``listener`` (the pool),
always under the pool's lock:

* ``listener.on_message(p, msg)`` -- ``ready``, ``done``, ``dropped``, ``beat``;
* ``listener.on_death(p) -> list[Job]`` -- reclaim the producer's slots; return the jobs it lost;
* ``listener.busy(p) -> bool`` -- holding jobs *and* slot credits (only then is silence a hang);
* ``listener.tick()`` -- after each round (dispatch).

Start-up (issue 14): each phase the child reports (``boot`` until its first message, then ``download`` /
``load`` / ``warmup``) has its own budget (``StartupBudget``); a producer killed by a signal while
starting (the OOM killer, a stray SIGKILL) is started again, at most ``start_retries`` times in all; one
that fails with an error, or exits on its own, is not (that is deterministic: a bad path, a script
without a main guard). Shutdown is NOTE [Shutdown] in producer.py, steps 1-4.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import traceback
from multiprocessing.connection import wait as wait_connections

from . import protocol as P
from .portable import portable, spawning
from .producer_child import producer_main
from .protocol import ChildConfig, ErrorInfo, PoolConfig, ProducerError

__all__ = ["ProducerProcess", "Supervisor", "startup_overdue"]

log = logging.getLogger("fusionloader")

POLL_S = 0.05  # collector wake-up period
JOIN_S = 2.0  # close(): time all producers get to exit cleanly after "stop"
STARTING, READY, DEAD = "starting", "ready", "dead"


class ProducerProcess:
    """The trainer's record of one producer process (replaced in place when it is restarted)."""

    def __init__(self, producer: int, device: str):
        self.producer, self.device = producer, device
        self.process = None
        self.requests = None
        self.results = None
        self.state = STARTING  # starting -> ready -> dead (-> starting again on a restart)
        self.phase, self.phase_since = P.BOOT, time.monotonic()
        self.pid = None
        self.starts = 0  # processes started for this producer so far (restarts make it > 1)
        self.credits: set[int] = set()  # ring slots credited to it (the pool's)
        self.images = 0
        self.busy_s = 0.0
        self.memory: dict | None = None
        self.t_ready = None
        self.t_heard = time.monotonic()
        self.error_info: ErrorInfo | None = None

    def send(self, *msg) -> None:
        self.requests.put(msg)  # never blocks: the queue's feeder thread does the writing

    def close_channels(self) -> None:
        """Release a (dead or stopped) producer's queue, pipe and process object; idempotent."""
        for res in (self.requests, self.results):
            try:
                res.close()
            except Exception:
                pass
        try:
            self.process.close()
            self.process = None
        except ValueError:  # still running after SIGKILL (uninterruptible sleep): leave it to the OS
            pass
        except AttributeError:  # never started
            pass


def startup_overdue(phase: str, since: float, now: float, budget: P.StartupBudget) -> str | None:
    """Why a producer still starting has run out of time in ``phase``, or None."""
    limit = budget.limit(phase)
    if now - since <= limit:
        return None
    return f"start-up phase {phase!r} took more than {limit:g} s (StartupBudget.{phase}_s)"


class Supervisor:
    """Spawns and watches the producer processes of one pool (see the module docstring)."""

    def __init__(self, cfg: PoolConfig, lock, cv, listener, clock=time.monotonic):
        self.cfg, self.lock, self.cv, self.listener, self.clock = cfg, lock, cv, listener, clock
        self.ctx = mp.get_context("spawn")
        self.procs = [ProducerProcess(i, d) for i, d in enumerate(cfg.devices)]
        self.stop_event = None
        self.thread: threading.Thread | None = None
        self.thread_stop = threading.Event()
        self.ring_handle = None
        self.restarts = 0
        self.start_retries = 0
        self.error: ProducerError | None = None
        self.notices: list[str] = []  # restart warnings for the trainer's thread (ProducerPool.check)

    # -- processes ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.stop_event = self.ctx.Event()
        for p in self.procs:
            self.spawn(p)
        self.thread = threading.Thread(target=self.collect, name="fusionloader-collector", daemon=True)
        self.thread.start()

    def spawn(self, p: ProducerProcess) -> None:
        cfg = self.cfg
        child = ChildConfig(p.producer, p.device, cfg.synthesizer, portable(cfg.source), cfg.capacity, cfg.latent_cache_path,
                            os.getpid(), cfg.threads, cfg.warmup, cfg.slot_dtype, cfg.adapters, cfg.clip_filter)
        p.requests = self.ctx.Queue()
        p.requests.cancel_join_thread()  # never let a dead producer's full pipe hang our exit
        reader, writer = self.ctx.Pipe(duplex=False)
        p.process = self.ctx.Process(target=producer_main, args=(child, p.requests, writer, self.stop_event),
                                     name=f"fusionloader-producer-{p.producer}", daemon=True)
        try:
            with spawning():  # notebooks / stdin scripts (NOTE in portable.py)
                p.process.start()
        except BaseException:
            reader.close()
            writer.close()
            raise
        writer.close()  # the child holds the only writer, so its death shows as EOF
        now = self.clock()
        p.results, p.pid, p.state, p.t_heard = reader, p.process.pid, STARTING, now
        p.phase, p.phase_since, p.credits = P.BOOT, now, set()
        p.starts += 1
        if self.ring_handle is not None:
            p.send(P.RING, self.ring_handle)

    def share_ring(self, handle) -> None:
        """Send the ring to every live producer, and to every one spawned later."""
        self.ring_handle = handle
        for p in self.procs:
            if p.state != DEAD and p.requests is not None:  # not spawned yet: spawn() sends it
                p.send(P.RING, handle)

    def all_ready(self) -> bool:
        return all(p.state == READY for p in self.procs)

    def ready(self) -> list[ProducerProcess]:
        return [p for p in self.procs if p.state == READY]

    # -- the collector thread -------------------------------------------------------------------------

    def collect(self) -> None:
        try:
            while not self.thread_stop.is_set():
                self.collect_once()
        except BaseException as e:  # a bug here must not leave the trainer waiting on a silent pool
            with self.lock:
                if self.error is None:
                    self.error = ProducerError(f"fusionloader collector thread failed: {type(e).__name__}: {e}\n\n"
                                               + traceback.format_exc())
                self.cv.notify_all()

    def collect_once(self) -> None:
        with self.lock:
            waitables = {}  # snapshot: a restart may replace a process's pipe and process meanwhile
            for p in self.procs:
                if p.state != DEAD:
                    waitables[p.results] = (p, p.results)
                    waitables[p.process.sentinel] = (p, None)
        try:
            ready = wait_connections(list(waitables), timeout=POLL_S)
        except OSError:  # a pipe closed under us by close(); loop and re-check the stop flag
            return
        with self.lock:
            if self.thread_stop.is_set():
                return
            dead = []
            for obj in ready:
                p, pipe = waitables[obj]
                if pipe is not p.results:  # a sentinel, or a pipe of an already replaced process
                    if pipe is None and p.process is not None and obj == p.process.sentinel:
                        dead.append(p)
                elif not self.drain(p):
                    dead.append(p)
            for p in dict.fromkeys(dead):
                if p.state != DEAD:
                    self.drain(p)
                    self.on_death(p)
            self.check_stalls()
            self.listener.tick()

    def drain(self, p: ProducerProcess) -> bool:
        """Take in every message waiting on ``p``'s pipe; False once it is closed (the producer is gone)."""
        try:
            while p.results.poll():
                self.on_message(p, p.results.recv())
        except (EOFError, OSError):
            return False
        return True

    def on_message(self, p: ProducerProcess, msg) -> None:
        p.t_heard = self.clock()
        kind = msg[0]
        if kind == P.PHASE:
            p.phase, p.phase_since = msg[1], p.t_heard
        elif kind == P.LOG:
            _, level, name, text = msg
            log.log(level, "producer %d (%s) [%s]: %s", p.producer, p.device, name, text)
        elif kind == P.ERROR:
            p.error_info = msg[1]
        else:
            if kind == P.READY:
                info: P.ReadyInfo = msg[1]
                p.state, p.pid, p.t_ready, p.memory = READY, info.pid, p.t_heard, info.memory
            self.listener.on_message(p, msg)
        self.cv.notify_all()

    def check_stalls(self) -> None:
        now = self.clock()
        for p in self.procs:
            reason = None
            if p.state == STARTING:
                reason = startup_overdue(p.phase, p.phase_since, now, self.cfg.startup)
            elif p.state == READY and self.listener.busy(p) and now - p.t_heard > self.cfg.timeout:
                # Silence counts only while the producer could make progress (jobs *and* credits in hand).
                reason = f"no progress for {now - p.t_heard:.0f} s (timeout={self.cfg.timeout:g})"
            if reason is not None and p.process is not None:
                p.error_info = ErrorInfo(p.pid, reason)
                p.process.kill()  # seen through its sentinel at the next round

    def on_death(self, p: ProducerProcess) -> None:
        starting = p.state == STARTING
        p.state = DEAD
        p.process.join(timeout=1.0)
        code = p.process.exitcode
        p.close_channels()
        lost = self.listener.on_death(p)
        info = p.error_info or ErrorInfo(p.pid, "")
        p.error_info = None
        keys = list(info.keys) or [j.key for j in lost[:1]]
        indices = list(info.indices) or [j.index for j in lost[:1]]
        killed = code is not None and code < 0
        how = info.error or (f"died unexpectedly (killed by signal {-code})" if killed
                             else f"died unexpectedly (exit code {code})")
        where = f"producer {p.producer} (device {p.device}, pid {p.pid})"
        what = f" on job key={keys[0]} index={indices[0]}" if keys else ""
        if len(keys) > 1:
            what += f" (batch keys {keys}, indices {indices})"
        message = f"{where} failed{what}: {how}"
        if info.traceback:
            message += "\n\nProducer traceback:\n" + info.traceback
        elif starting and not killed and code is not None and code > 0:
            # The child died before our code could report: an import-time failure, most often a training
            # script without a main guard, which spawn re-runs in the child (its traceback is on stderr).
            message += ("\n(the producer exited while starting; see its traceback on stderr -- producers are "
                        "spawned, so the training script's entry point must sit under `if __name__ == '__main__':`)")
        if starting and killed and not info.error and self.start_retries < self.cfg.start_retries:
            self.start_retries += 1
            text = f"{message}; starting it again ({self.start_retries}/{self.cfg.start_retries})"
            self._restart(p, text)
        elif self.cfg.on_error == "restart" and not starting and self.restarts < self.cfg.max_restarts:
            self.restarts += 1
            text = (f"{message.split(chr(10))[0]}; restarting it ({self.restarts}/{self.cfg.max_restarts}), "
                    f"{len(lost)} job(s) lost, their samples fall back to real")
            self._restart(p, text)
        elif self.error is None:
            if self.cfg.on_error == "restart" and not starting:
                message += f"\n(max_restarts={self.cfg.max_restarts} exhausted)"
            elif starting and killed and self.cfg.start_retries:
                message += f"\n(start_retries={self.cfg.start_retries} exhausted)"
            self.error = ProducerError(message, p.producer, p.device, p.pid, keys, indices)
        self.cv.notify_all()

    def _restart(self, p: ProducerProcess, text: str) -> None:
        log.warning(text)
        self.notices.append(text)
        self.spawn(p)

    # -- liveness for waiters ---------------------------------------------------------------------------

    def stalled(self) -> list[int]:
        """Producers known not to be making progress now: dead (not being restarted), silent while busy for
        longer than ``timeout`` (about to be killed), past a start-up phase budget, or starting again after
        a failure (a restart reloads the model: minutes on a real checkpoint)."""
        now = self.clock()
        out = []
        for p in self.procs:
            if p.state == DEAD:
                out.append(p.producer)
            elif p.state == STARTING and (p.starts > 1 or startup_overdue(p.phase, p.phase_since, now,
                                                                          self.cfg.startup)):
                out.append(p.producer)
            elif p.state == READY and self.listener.busy(p) and now - p.t_heard > self.cfg.timeout:
                out.append(p.producer)
        return out

    # -- shutdown (NOTE [Shutdown] in producer.py) ------------------------------------------------------

    def close(self) -> None:
        self.thread_stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=1.0)
        if self.stop_event is not None:
            self.stop_event.set()
        # pid is None for a process whose start() failed: nothing to stop or join, only channels to close.
        unstarted = [p for p in self.procs if p.process is not None and p.process.pid is None]
        running = [p for p in self.procs if p.process is not None and p.process.pid is not None]
        for p in unstarted:
            p.close_channels()
        for p in running:
            try:
                p.send(P.STOP)
            except Exception:
                pass
        deadline = time.monotonic() + JOIN_S
        for p in running:
            p.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for signal_them in ("terminate", "kill"):
            alive = [p for p in running if p.process.is_alive()]
            for p in alive:
                getattr(p.process, signal_them)()
            for p in alive:
                p.process.join(timeout=0.5)
        for p in running:
            p.close_channels()
