"""Producer processes: one per spare device, each owning one engine, writing finished images into a SlotRing.

NOTE [Producer protocol]
~~~~~~~~~~~~~~~~~~~~~~~~

Processes and channels. ``ProducerPool.start`` spawns (never forks: CUDA and torch threads do not survive
fork) one daemon process per device. Producer ``i`` has

* a request queue (consumer -> producer, ``multiprocessing.Queue``; the consumer is its only writer, so the
  queue's write lock can never be held by a dead process). Messages: ``("ring", handle)``,
  ``("jobs", [Job])``, ``("credit", [slot])``, ``("cancel", [key])``, ``("stop",)``.
* a result pipe (producer -> consumer, one ``Pipe`` per producer, so a SIGKILLed producer can corrupt
  or block nobody else). Messages: ``("ready", info)``, ``("done", key, slot, busy_s, latency_s)``,
  ``("dropped", key, reason)``, ``("beat", busy_s)`` (after a sampler step when nothing was sent for
  a second), ``("error", info)``.

A collector thread in the consumer (the training process) waits on every result pipe *and* every
process sentinel with ``multiprocessing.connection.wait`` (50 ms timeout), so results are taken in, jobs
dispatched and slots credited while the training step runs, and a death (exception, SIGKILL, OOM
kill) is seen at once, not at the next ``take``.

Scheduling. The consumer keeps every submitted job in consumption order and hands each ready producer
at most ``2 * capacity`` outstanding jobs the consumer still wants (least-loaded first); a producer serves
them FIFO, jobs the consumer has passed after them (at most half its sampler), and keeps its
continuous-batching sampler full (up to ``capacity`` in flight), so what is due next is made first.
The consumer alone allocates ring slots: it credits each producer up to ``capacity`` free slots (see
NOTE [Slot protocol] in ring.py). A producer admits a job into its sampler only with a credit in hand,
and that slot stays reserved for the job: the sampler's fused post-process writes the image straight
into it when the ring lives on the producer's device (a CPU producer and a host ring), otherwise the
finished image is copied in. No credit, no admission: when the trainer does not take results, the
producers stop (back-pressure). A key taken or cancelled frees its slot for new credits.

NOTE [Deadlines]. Serving strictly in order is wrong when producers are slower than the trainer: the
job due next would be finished after the trainer has passed it, and so would every job after it, so
no fresh image would ever arrive in time. The pool therefore estimates the consumption rate R (jobs
taken or passed per second; a late job collected later for the store is not counted twice) and the job
latency L (receipt to done, measured by the producer less the time it waited for a free slot: that wait
is back-pressure from a trainer that is behind, not slowness, and counting it would feed on itself), and
dispatches first the pending jobs at least 1.25 R L jobs ahead of the trainer (jobs it went past do not
count as ahead); the nearer ones are made only if a producer has nothing else to do, and a ``take``
waiting on a job makes it urgent (dispatched first). Keys must therefore increase in consumption order
(the loader's do, across epochs). When producers keep up, R L is smaller than what is already in flight
and the order is plain FIFO. Jobs the trainer passes (``passed``) stay queued for the variant store but
go behind every job it still wants, in the pool and in the producer, and take at most half a sampler.

Outcomes. A finished image is checked for NaN/inf; a non-finite one is dropped and reported
(``nonfinite_dropped`` in ``stats()``; ``take`` returns None at once so the consumer falls back to real).

Faults. A producer that raises sends ``("error", info)`` naming its id, device, pid and the job(s) it
was working on (key and dataset index), with the traceback, then exits. A producer that dies silently
(SIGKILL) is noticed through its sentinel. A producer holding jobs and slot credits that sends nothing
(not even a heartbeat, which follows any sampler step after a second of silence) for ``timeout``
seconds is hung: it is killed and treated the same. Then:

* ``on_error="raise"``: the failure is stored and re-raised as ``ProducerError`` in the training
  process by the next ``check``/``take``/``submit``/``stats``, and by every one after (like torch's
  DataLoader: a failed pool stays failed).
* ``on_error="restart"`` (up to ``max_restarts`` restarts in all): every job the producer held is
  reported *lost* (``take`` returns None at once, ``stats()["lost"]`` counts them, ``state(key)`` says
  ``"lost"``), slots credited to it are reclaimed, a warning is logged at once and raised through
  ``warnings`` in the training thread at its next call, and a fresh producer is spawned on the same
  device. Failures during ``start`` always raise (they are almost always deterministic).

NOTE [Shutdown]
~~~~~~~~~~~~~~~

Follows torch's DataLoader shutdown NOTE. Every blocking call has a timeout: producers poll their
request queue (0.1 s) and a shared stop event; the consumer waits on pipes with a timeout and ``take``
waits at most its ``timeout``. ``close`` (idempotent, also run by ``__exit__``, by a
``weakref.finalize`` when the pool is garbage-collected, and at interpreter exit through the same
finalizer's atexit hook; should multiprocessing's own exit hook run first, it terminates the daemonic
producers and ``close`` only reaps and unlinks) does, within ~3.5 s in the worst case:

1. stop the collector thread (join <= 1 s);
2. set the stop event and send ``("stop",)`` to every producer; join all for up to 2 s in total;
3. ``terminate`` (SIGTERM) the survivors, join 0.5 s; ``kill`` (SIGKILL) what is left, join;
4. close the queues without joining their feeder threads (``cancel_join_thread``) and the pipes;
5. unlink the ring's shared-memory segment (only after no producer can write to it).

The training process's KeyboardInterrupt unwinds through ``with``/``del``/atexit into the same path;
producers ignore SIGINT so a Ctrl-C in a terminal (which signals the whole process group) reaches only
the trainer, which then shuts them down in order. If the trainer dies without running any of this
(SIGKILL), each producer's watchdog thread sees its parent pid change within 0.5 s and exits
(``os._exit``), and Python's resource tracker, shared by the trainer and its spawned children,
unlinks the leaked segment when the last of them has gone.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import os
import queue
import signal
import statistics
import threading
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_connections

import torch

from .portable import portable, spawning  # notebooks / stdin scripts (see portable.py)
from .ring import SlotRing

__all__ = ["Job", "ProducerError", "ProducerPool"]

log = logging.getLogger(__name__)

_POLL_S = 0.05  # consumer: collector thread wake-up period
_CHILD_POLL_S = 0.1  # producer: request-queue get timeout while idle
_WATCHDOG_S = 0.5  # producer: parent-alive check period
_HEARTBEAT_S = 1.0  # producer: longest silence while sampling (the consumer's hang check needs a pulse)
_CPU_NICE = 10  # niceness added to CPU producers (see _producer_main)
_DEADLINE_MARGIN = 1.25  # NOTE [Deadlines]: dispatch this many latencies' worth of jobs ahead
_LATENCY_WINDOW = 32  # jobs in the latency median
_JOIN_S = 2.0  # close(): time all producers get to exit cleanly after "stop"
_OUTCOMES_KEPT = 1 << 16  # remembered lost/dropped keys (for take() and state())


@dataclass(frozen=True)
class Job:
    """One synthetic sample to make: an SDEdit variant of dataset item ``index`` (text-only if ``strength`` is None)."""

    key: int  # unique per job within a pool's lifetime (chosen by the loader)
    index: int  # dataset index whose image is the SDEdit source
    prompt: str
    strength: float | None  # None = text-only (txt2img from pure noise)
    guidance_scale: float
    num_inference_steps: int
    seed: int


class ProducerError(RuntimeError):
    """A producer failed; says which producer, on which device, and on which job(s)."""

    def __init__(self, message: str, producer: int | None = None, device: str | None = None, pid: int | None = None,
                 keys=(), indices=()):
        super().__init__(message)
        self.producer, self.device, self.pid = producer, device, pid
        self.keys, self.indices = list(keys), list(indices)

    def fresh(self) -> "ProducerError":
        # Raise a new instance each time: re-raising the stored one would pile tracebacks onto it and
        # keep every frame they reference (and so the pool) alive.
        return ProducerError(str(self), self.producer, self.device, self.pid, self.keys, self.indices)


# ---------------------------------------------------------------------------------------------------------
# Producer side (runs in the spawned child)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChildConfig:
    producer: int
    device: str
    synthesizer: object  # a Synthesizer load spec (dict) or a checkpoint path
    source: object  # .raw(index) -> (image float [0,1] (3,H,W), label)
    capacity: int
    latent_cache_path: str | None
    parent_pid: int
    threads: int | None
    warmup: bool


def _load_engine(synthesizer, device: str):
    """The producer's own engine on its own device, from a checkpoint path or a Synthesizer load spec."""
    from .engine import Synthesizer

    if isinstance(synthesizer, dict):  # ProducerPool turns a Synthesizer into its load spec (see __init__)
        return Synthesizer.from_pretrained(**{**synthesizer, "device": device})
    return Synthesizer.from_pretrained(os.fspath(synthesizer), device=device)


def _watch_parent(parent_pid: int) -> None:
    # Daemon thread: if the trainer dies without shutting us down (SIGKILL), our parent pid changes.
    while True:
        time.sleep(_WATCHDOG_S)
        if os.getppid() != parent_pid:
            os._exit(0)


class _Producer:
    """State of one producer process; ``serve`` is its main loop (see NOTE [Producer protocol]).

    A job is admitted into the sampler only with a slot credit in hand, and the slot stays reserved
    for it until it finishes: when the ring lives where the producer computes (a CPU producer and a
    host ring) the sampler's fused post-process writes the image straight into that slot (``out_row``);
    otherwise the finished image is copied in (resized first if the ring's resolution differs).
    """

    def __init__(self, cfg: _ChildConfig, requests, results, stop_event):
        self.cfg, self.requests, self.results, self.stop_event = cfg, requests, results, stop_event
        self.ring: SlotRing | None = None
        self.direct = False
        self.backlog: collections.deque[Job] = collections.deque()
        self.deferred: collections.deque[Job] = collections.deque()  # passed by the trainer: made last
        self.inflight: dict[int, tuple[Job, int]] = {}  # key -> (job, reserved slot)
        self.credits: collections.deque[int] = collections.deque()
        self.cancelled: set[int] = set()
        self.current: list[Job] = []  # the job(s) being worked on, for error messages
        self.busy_s = 0.0
        self.t_sent = time.monotonic()
        # Job latency as NOTE [Deadlines] needs it: receipt to done, less the time this producer could not
        # admit for want of a free slot (back-pressure from a consumer that is behind, not slowness).
        self.received: dict[int, tuple[float, float]] = {}  # key -> (when, starved_s then; at admission: of it)
        self.starved_s, self.starved_since = 0.0, None
        self._cache = None

    def load(self) -> None:
        from .engine import Request

        self.Request = Request
        self.engine = _load_engine(self.cfg.synthesizer, self.cfg.device)
        self.resolution = tuple(self.engine.resolution)
        self.sampler = self.engine.sampler(capacity=self.cfg.capacity)
        if self.cfg.warmup:  # the first call pays for lazy init, allocator growth, kernel compilation
            self.sampler.submit(self._request(Job(-1, -1, "", None, 2.0, 2, 0)))
            while not self.sampler.step():
                pass

    def attach(self, handle) -> None:
        self.ring = SlotRing.attach(handle, pin=torch.device(self.cfg.device).type == "cuda")
        fits = tuple(self.ring.shape) == (3, *self.resolution) and self.ring.dtype.is_floating_point
        self.direct = fits and torch.device(self.ring.device) == torch.device(self.cfg.device)
        if self.direct:
            self.sampler = self.engine.sampler(capacity=self.cfg.capacity, out=self.ring._data)

    @property
    def cache(self):
        if self._cache is None:  # at the generation resolution: these latents feed the sampler
            self._cache = self.engine.latent_cache(path=self.cfg.latent_cache_path)
        return self._cache

    def _request(self, job: Job, slot: int | None = None):
        mean = std = None
        if job.strength is not None:
            mean, std = self.cache.get([job.index], lambda i: self.cfg.source.raw(i)[0])
            mean, std = mean[0], (None if std is None else std[0])
        return self.Request(job.key, job.prompt, job.strength, job.guidance_scale, job.num_inference_steps,
                            seed=job.seed, latent_mean=mean, latent_std=std, out_row=slot if self.direct else None)

    def send(self, *msg) -> None:
        self.results.send(msg)
        self.t_sent = time.monotonic()

    def handle(self, msg) -> bool:
        kind = msg[0]
        if kind == "jobs":
            self.backlog.extend(msg[1])
            now = time.perf_counter()
            self.received.update((job.key, (now, self.starved(now))) for job in msg[1])
        elif kind == "credit":
            self.credits.extend(msg[1])
        elif kind == "cancel":
            keys = set(msg[1])
            self.backlog = collections.deque(j for j in self.backlog if j.key not in keys)
            self.deferred = collections.deque(j for j in self.deferred if j.key not in keys)
            self.cancelled |= keys & self.inflight.keys()
            for key in keys - self.inflight.keys():
                self.received.pop(key, None)
        elif kind == "passed":
            # The trainer went past these: what still waits here goes behind every job it can still use.
            keys = set(msg[1])
            for key in keys - self.inflight.keys():  # made last on purpose: their wait says nothing of latency
                self.received.pop(key, None)
            self.deferred.extend(j for j in self.backlog if j.key in keys)
            self.backlog = collections.deque(j for j in self.backlog if j.key not in keys)
        elif kind == "ring":
            self.attach(msg[1])
        elif kind == "stop":
            return False
        return True

    def starved(self, now: float) -> float:
        """Seconds so far that jobs waited here with room in the sampler but no slot credit."""
        return self.starved_s + (now - self.starved_since if self.starved_since is not None else 0.0)

    def serve(self) -> None:
        while not self.stop_event.is_set():
            now = time.perf_counter()
            waiting = bool(self.backlog or self.deferred) and not self.credits and len(self.inflight) < self.cfg.capacity
            if waiting and self.starved_since is None:
                self.starved_since = now
            elif not waiting and self.starved_since is not None:
                self.starved_s, self.starved_since = self.starved(now), None
            idle = not self.inflight and not ((self.backlog or self.deferred) and self.credits)
            msgs = []
            try:
                msgs.append(self.requests.get(timeout=_CHILD_POLL_S) if idle else self.requests.get_nowait())
                while True:
                    msgs.append(self.requests.get_nowait())
            except queue.Empty:
                pass
            for msg in msgs:
                if not self.handle(msg):
                    return
            self.admit()
            if self.inflight:
                self.step()

    def admit(self) -> None:
        # Keep the sampler full; each job takes its slot credit now (no credit, no admission: back-pressure).
        # Passed jobs take at most half the sampler, so a job that can still arrive in time never waits for
        # a whole batch of them to finish (continuous batching admits it at the next step).
        while self.credits and len(self.inflight) < self.cfg.capacity and (
                self.backlog or (self.deferred and 2 * len(self.inflight) < self.cfg.capacity)):  # fmt: skip
            job = (self.backlog or self.deferred).popleft()
            slot = self.credits.popleft()
            if job.key in self.received:  # its wait for a slot ends here
                when, starved = self.received[job.key]
                self.received[job.key] = (when, self.starved(time.perf_counter()) - starved)
            self.current = [job]
            t0 = time.perf_counter()
            try:
                self.sampler.submit(self._request(job, slot))
            except BaseException:
                self.credits.appendleft(slot)
                raise
            self.busy_s += time.perf_counter() - t0
            self.inflight[job.key] = (job, slot)
        self.current = []

    def step(self) -> None:
        self.current = [job for job, _ in self.inflight.values()]
        t0 = time.perf_counter()
        finished = self.sampler.step()
        for f in finished:
            job, slot = self.inflight.pop(f.key)
            self.current = [job]
            received = self.received.pop(f.key, None)
            if f.key in self.cancelled:
                self.cancelled.discard(f.key)
                self.credits.appendleft(slot)  # still WRITING and ours: reuse the credit
                continue
            image = f.image
            if not f.finite or not bool(torch.isfinite(image).all()):
                self.credits.appendleft(slot)
                self.send("dropped", f.key, "nonfinite")
                continue
            if self.direct:
                self.ring.publish(slot, f.key, self.cfg.producer)
            else:
                if tuple(image.shape[-2:]) != tuple(self.ring.shape[-2:]):
                    image = torch.nn.functional.interpolate(image[None].float(), size=tuple(self.ring.shape[-2:]),
                                                            mode="bilinear", antialias=True)[0].clamp_(0, 1)
                self.ring.write(slot, f.key, image, self.cfg.producer)
            now = time.perf_counter()
            latency = now - received[0] - received[1] if received else None
            self.send("done", f.key, slot, self.busy_s + now - t0, latency)
        self.busy_s += time.perf_counter() - t0
        self.current = []
        if time.monotonic() - self.t_sent > _HEARTBEAT_S:  # long samples: show we are alive, not hung
            self.send("beat", self.busy_s)


def _producer_main(cfg: _ChildConfig, requests, results, stop_event) -> None:
    """Entry point of a producer process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle (NOTE [Shutdown])
    threading.Thread(target=_watch_parent, args=(cfg.parent_pid,), daemon=True, name="fl-watchdog").start()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if torch.device(cfg.device).type == "cpu":
        # A CPU producer stands in for a spare device and shares the cores with the trainer it feeds: at a
        # lower priority it gets what the trainer leaves, and never slows a training step down.
        try:
            os.nice(_CPU_NICE)
        except OSError:  # not permitted here: run at the trainer's priority
            pass
    producer = _Producer(cfg, requests, results, stop_event)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            producer.load()
            producer.send("ready", {"pid": os.getpid(), "load_s": time.perf_counter() - t0,
                                    "resolution": producer.resolution})
            producer.serve()
    except BaseException as e:  # noqa: BLE001 - everything goes back to the trainer
        info = {
            "pid": os.getpid(),
            "keys": [j.key for j in producer.current],
            "indices": [j.index for j in producer.current],
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
        try:
            producer.send("error", info)
        except Exception:
            pass
        os._exit(1)  # skip interpreter teardown: nothing here needs it, and it can hang on CUDA state
    finally:
        if producer.ring is not None:
            producer.ring.close()


# ---------------------------------------------------------------------------------------------------------
# Consumer side (the training process)
# ---------------------------------------------------------------------------------------------------------


class _Handle:
    """The consumer's view of one producer process."""

    def __init__(self, producer: int, device: str):
        self.producer, self.device = producer, device
        self.process = None
        self.requests = None
        self.results = None
        self.state = "starting"  # starting -> ready -> dead
        self.pid = None
        self.assigned: dict[int, Job] = {}  # dispatched, not finished, in order
        self.credits: set[int] = set()
        self.images = 0
        self.busy_s = 0.0
        self.t_ready = None
        self.t_heard = time.monotonic()
        self.error_info = None

    def send(self, *msg) -> None:
        self.requests.put(msg)  # never blocks: the queue's feeder thread does the writing


def _close_channels(h: _Handle) -> None:
    """Release a (dead or stopped) producer's queue, pipe and process object; idempotent."""
    for res in (h.requests, h.results):
        try:
            res.close()
        except Exception:
            pass
    try:
        h.process.close()
        h.process = None
    except ValueError:  # still running after SIGKILL (uninterruptible sleep): leave it to the OS
        pass


class _Core:
    """Everything a pool owns; separate from ProducerPool so a finalizer can close it after the pool is gone."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.ctx = mp.get_context("spawn")
        self.lock = threading.RLock()
        self.cv = threading.Condition(self.lock)
        self.closed = False
        self.started = False
        self.stop_event = None
        self.thread: threading.Thread | None = None
        self.thread_stop = threading.Event()
        self.handles: list[_Handle] = []
        self.ring: SlotRing | None = None
        self.free: collections.deque[int] = collections.deque()
        self.pending: collections.OrderedDict[int, Job] = collections.OrderedDict()  # submitted, not dispatched
        self.owner: dict[int, int] = {}  # key -> producer, for dispatched jobs not yet finished
        self.ready: dict[int, int] = {}  # key -> slot
        self.outcomes: collections.OrderedDict[int, str] = collections.OrderedDict()  # key -> "lost" | "dropped"
        self.error: ProducerError | None = None
        self.warnings: list[str] = []
        self.counters = collections.Counter()
        self.t_start = None
        self.urgent: set[int] = set()  # pending keys a take() is waiting for: dispatched first, never skipped
        self.behind: set[int] = set()  # keys the consumer went past, still pending, made or ready (for the store)
        self.t_dispatched: dict[int, float] = {}  # key -> when it went to a producer (for the latency estimate)
        self.latency_s = 0.0  # median latency of the last jobs (NOTE [Deadlines]): cold starts do not skew it
        self._latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        self.consume_rate = 0.0  # EMA of jobs the consumer takes or passes per second
        self._consumed, self._t_rate = 0, time.monotonic()

    # -- processes ----------------------------------------------------------------------------------

    def spawn(self, h: _Handle) -> None:
        cfg = self.cfg
        child = _ChildConfig(h.producer, h.device, cfg["synthesizer"], portable(cfg["source"]), cfg["capacity"],
                             cfg["latent_cache_path"], os.getpid(), cfg["threads"], cfg["warmup"])
        h.requests = self.ctx.Queue()
        h.requests.cancel_join_thread()  # never let a dead producer's full pipe hang our exit
        reader, writer = self.ctx.Pipe(duplex=False)
        h.process = self.ctx.Process(target=_producer_main, args=(child, h.requests, writer, self.stop_event),
                                     name=f"fusionloader-producer-{h.producer}", daemon=True)
        try:
            with spawning():
                h.process.start()
        except BaseException:
            reader.close()
            writer.close()
            raise
        writer.close()  # the child holds the only writer, so its death shows as EOF
        h.results, h.pid, h.state, h.t_heard = reader, h.process.pid, "starting", time.monotonic()
        h.assigned, h.credits = {}, set()
        if self.ring is not None:
            h.send("ring", self.ring.handle)

    def start(self) -> None:
        with self.lock:
            if self.closed:
                raise RuntimeError("ProducerPool is closed")
            if self.started:
                return
            self.started, self.t_start = True, time.monotonic()
            load_spec = getattr(self.cfg["synthesizer"], "load_spec", None)
            if load_spec is not None:  # send the recipe, not the object: each child loads onto its own device
                self.cfg["synthesizer"] = load_spec()
            self.stop_event = self.ctx.Event()
            if self.cfg["image_size"] is not None:
                self.make_ring()
            self.handles = [_Handle(i, str(d)) for i, d in enumerate(self.cfg["devices"])]
            for h in self.handles:
                self.spawn(h)
            self.thread = threading.Thread(target=self.collect, name="fusionloader-collector", daemon=True)
            self.thread.start()
            if not self.cfg["wait_ready"]:
                return  # the collector makes the ring and dispatches as producers report ready (check_stalls times out)
            deadline = time.monotonic() + self.cfg["timeout"]
            while not all(h.state == "ready" for h in self.handles):
                if self.error is not None:
                    raise self.error.fresh()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    late = [f"{h.producer} ({h.device})" for h in self.handles if h.state != "ready"]
                    raise ProducerError(f"producer(s) {', '.join(late)} not ready after {self.cfg['timeout']:.0f} s")
                self.cv.wait(min(remaining, 0.5))
            if self.ring is None:
                self.make_ring()
            self.dispatch()

    def make_ring(self) -> None:
        size = self.cfg["image_size"] or self.cfg.get("resolution")
        if size is None:
            raise ValueError("the producers could not tell the model's resolution; pass image_size")
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.ring = SlotRing(self.cfg["slots"], (3, *size), torch.float32, device=self.cfg["ring_device"])
        self.free = collections.deque(range(self.ring.capacity))
        for h in self.handles:
            if h.state != "dead":
                h.send("ring", self.ring.handle)

    # -- the collector thread -----------------------------------------------------------------------

    def collect(self) -> None:
        try:
            while not self.thread_stop.is_set():
                self.collect_once()
        except BaseException as e:  # a bug here must not leave the trainer waiting on a silent pool
            with self.lock:
                if self.error is None and not self.closed:
                    self.error = ProducerError(f"fusionloader collector thread failed: {type(e).__name__}: {e}\n\n"
                                               + traceback.format_exc())
                self.cv.notify_all()

    def collect_once(self) -> None:
        with self.lock:
            waitables = {}  # snapshot: a restart may replace a handle's pipe and process meanwhile
            for h in self.handles:
                if h.state != "dead":
                    waitables[h.results] = (h, h.results)
                    waitables[h.process.sentinel] = (h, None)
        try:
            ready = wait_connections(list(waitables), timeout=_POLL_S)
        except OSError:  # a pipe closed under us by close(); loop and re-check the stop flag
            return
        with self.lock:
            if self.closed:
                return
            dead = []
            for obj in ready:
                h, pipe = waitables[obj]
                if pipe is not h.results:  # a sentinel, or a pipe of an already replaced process
                    if pipe is None and h.process is not None and obj == h.process.sentinel:
                        dead.append(h)
                elif not self.drain(h):
                    dead.append(h)
            for h in dict.fromkeys(dead):
                if h.state != "dead":
                    self.drain(h)
                    self.on_death(h)
            self.check_stalls()
            if self.ring is not None and self.started:
                self.dispatch()

    def drain(self, h: _Handle) -> bool:
        """Take in every message waiting on ``h``'s pipe; False once it is closed (the producer is gone)."""
        try:
            while h.results.poll():
                self.on_message(h, h.results.recv())
        except (EOFError, OSError):
            return False
        return True

    def on_message(self, h: _Handle, msg) -> None:
        h.t_heard = time.monotonic()
        kind = msg[0]
        if kind == "done":
            _, key, slot, busy_s, latency = msg
            h.credits.discard(slot)
            h.busy_s = busy_s
            if self.owner.get(key) == h.producer:
                del self.owner[key]
                h.assigned.pop(key, None)
                self.ready[key] = slot
                h.images += 1
                self.counters["produced"] += 1
                if self.t_dispatched.pop(key, None) is not None and latency is not None:  # not for jobs made last
                    self._latencies.append(latency)
                    self.latency_s = statistics.median(self._latencies)
            else:  # cancelled while being made
                self.ring.release(slot)
                self.free.append(slot)
        elif kind == "dropped":
            _, key, reason = msg
            self.t_dispatched.pop(key, None)
            if self.owner.get(key) == h.producer:
                del self.owner[key]
                h.assigned.pop(key, None)
                self.remember(key, "dropped")
            self.counters["nonfinite_dropped"] += 1
        elif kind == "beat":
            h.busy_s = msg[1]
        elif kind == "ready":
            h.state, h.pid, h.t_ready = "ready", msg[1]["pid"], time.monotonic()
            if self.cfg.get("resolution") is None:
                self.cfg["resolution"] = msg[1].get("resolution")
            if self.ring is None and not self.cfg["wait_ready"]:
                self.make_ring()  # start() did not wait: the first ready producer tells the resolution
        elif kind == "error":
            h.error_info = msg[1]
        self.cv.notify_all()

    def remember(self, key: int, outcome: str) -> None:
        self.outcomes[key] = outcome
        while len(self.outcomes) > _OUTCOMES_KEPT:
            self.outcomes.popitem(last=False)

    def check_stalls(self) -> None:
        now = time.monotonic()
        for h in self.handles:
            if h.state == "starting" and self.t_start is not None and now - self.t_start > self.cfg["timeout"]:
                # only reachable when start() did not wait (wait_ready=False): the same limit, in the background
                h.error_info = {"pid": h.pid, "keys": [], "indices": [], "traceback": "",
                                "error": f"not ready after {self.cfg['timeout']:.0f} s"}
                h.process.kill()
                continue
            # Silence only counts while the producer could make progress: holding jobs *and* slot credits
            # (without credits it is waiting for the trainer, which is back-pressure, not a fault).
            if h.state == "ready" and h.assigned and h.credits and now - h.t_heard > self.cfg["timeout"]:
                h.error_info = {"pid": h.pid, "keys": list(h.assigned)[:1],
                                "indices": [j.index for j in list(h.assigned.values())[:1]],
                                "error": f"no progress for {now - h.t_heard:.0f} s (timeout={self.cfg['timeout']:g})",
                                "traceback": ""}
                h.process.kill()

    def on_death(self, h: _Handle) -> None:
        starting = h.state == "starting"
        h.state = "dead"
        h.process.join(timeout=1.0)
        code = h.process.exitcode
        _close_channels(h)
        for slot in h.credits:  # reclaim: a half-written slot is never READY (NOTE [Slot protocol])
            self.ring.release(slot)
            self.free.append(slot)
        h.credits = set()
        lost = list(h.assigned.values())
        h.assigned = {}
        for job in lost:
            self.owner.pop(job.key, None)
            self.t_dispatched.pop(job.key, None)
        info = h.error_info or {}
        keys = info.get("keys") or [j.key for j in lost[:1]]
        indices = info.get("indices") or [j.index for j in lost[:1]]
        how = info.get("error") or (
            f"died unexpectedly (killed by signal {-code})" if code is not None and code < 0
            else f"died unexpectedly (exit code {code})"
        )
        where = f"producer {h.producer} (device {h.device}, pid {h.pid})"
        what = f" on job key={keys[0]} index={indices[0]}" if keys else ""
        if len(keys) > 1:
            what += f" (batch keys {keys}, indices {indices})"
        message = f"{where} failed{what}: {how}"
        if info.get("traceback"):
            message += "\n\nProducer traceback:\n" + info["traceback"]
        elif starting and code is not None and code > 0:
            # The child died before our code could report: an import-time failure, most often a training
            # script without a main guard, which spawn re-runs in the child (its traceback is on stderr).
            message += ("\n(the producer exited while starting; see its traceback on stderr -- producers are "
                        "spawned, so the training script's entry point must sit under `if __name__ == '__main__':`)")
        h.error_info = None
        restart = self.cfg["on_error"] == "restart" and not starting and self.counters["restarts"] < self.cfg["max_restarts"]
        if restart:
            for job in lost:
                self.remember(job.key, "lost")
            self.counters["lost"] += len(lost)
            self.counters["restarts"] += 1
            text = (f"{where} failed{what}: {how}; restarting it ({self.counters['restarts']}/{self.cfg['max_restarts']}), "
                    f"{len(lost)} job(s) lost, their samples fall back to real")
            log.warning(text)
            self.warnings.append(text)
            self.spawn(h)
        elif self.error is None:
            if self.cfg["on_error"] == "restart" and not starting:
                message += f"\n(max_restarts={self.cfg['max_restarts']} exhausted)"
            for job in lost:
                self.remember(job.key, "lost")
            self.counters["lost"] += len(lost)
            self.error = ProducerError(message, h.producer, h.device, h.pid, keys, indices)
        self.cv.notify_all()

    # -- scheduling ---------------------------------------------------------------------------------

    def consumed(self, n: int = 1) -> None:
        """Count jobs the consumer took or passed; refresh the consumption-rate estimate twice a second."""
        self._consumed += n
        now = time.monotonic()
        dt = now - self._t_rate
        if dt >= 0.5:
            rate = self._consumed / dt
            self.consume_rate = rate if self.consume_rate == 0.0 else 0.7 * self.consume_rate + 0.3 * rate
            self._consumed, self._t_rate = 0, now

    def _ahead(self, keys) -> int:
        """How many of ``keys`` the consumer has still to reach."""
        return sum(1 for k in keys if k not in self.behind) if self.behind else len(keys)

    def _due_order(self) -> list[int]:
        """Pending keys in the order to dispatch them: NOTE [Deadlines]."""
        keys = [k for k in self.pending if k not in self.behind] if self.behind else list(self.pending)
        # Jobs in flight or ready stand between the consumer and the first pending key, unless it went past
        # them already; a margin over the latency estimate, because it is a median, not a worst case.
        reach = int(_DEADLINE_MARGIN * self.consume_rate * self.latency_s)
        late = reach - self._ahead(self.owner) - self._ahead(self.ready)
        # Never while a take() waits: the job it waits for needs a ring slot, and far-ahead results would
        # hold them all. (Cancels do not count as consumption: a loader cancels a whole epoch's leftovers
        # at once, which is no measure of its pace.)
        if late > 0 and not self.urgent and self.cfg["deadlines"]:
            # The first `late` pending jobs would come out after the consumer has passed them: make the
            # ones after first (the consumer falls back for those it passes), unless a take() waits on them.
            keys = keys[late:] + keys[:late]
        if self.behind:
            keys += [k for k in self.pending if k in self.behind]
        urgent = [k for k in keys if k in self.urgent]
        return urgent + [k for k in keys if k not in self.urgent] if urgent else keys

    def dispatch(self) -> None:
        """Hand pending jobs (in due order) to the least-loaded ready producers; top up slot credits."""
        ready = [h for h in self.handles if h.state == "ready"]
        if not ready or self.ring is None:
            return
        budget = 2 * self.cfg["capacity"]
        batches = {h.producer: [] for h in ready}
        now = time.monotonic()
        # Load: the jobs a producer holds that the consumer still wants (passed ones wait behind them, NOTE
        # [Deadlines]); the cap on all it holds bounds its backlog. Ordering the pending jobs costs O(pending):
        # only when some producer has room (called after every take, it mostly has none).
        load = {h.producer: self._ahead(h.assigned) for h in ready}
        room = [h for h in ready if load[h.producer] < budget and len(h.assigned) < 2 * budget]
        for key in self._due_order() if self.pending and room else ():
            h = min(ready, key=lambda h: load[h.producer])
            if load[h.producer] >= budget or len(h.assigned) >= 2 * budget:
                break
            if key not in self.behind:
                load[h.producer] += 1
            if not h.assigned:
                h.t_heard = now  # the hang clock starts with work: an idle producer has nothing to say
            job = self.pending.pop(key)
            self.urgent.discard(key)
            h.assigned[key] = job
            self.owner[key] = h.producer
            if key not in self.behind:  # a job sent already late waits on purpose: its delay is no latency
                self.t_dispatched[key] = now
            batches[h.producer].append(job)
        # Enough credits to keep each sampler full; the rest of the ring holds results awaiting take().
        target = max(1, min(self.cfg["capacity"], self.ring.capacity // max(1, len(self.handles))))
        for h in ready:
            if batches[h.producer]:
                h.send("jobs", batches[h.producer])
                late = [job.key for job in batches[h.producer] if job.key in self.behind]
                if late:  # made only when nothing the consumer still wants waits there
                    h.send("passed", late)
            grant = []
            if not h.credits and self.free:
                h.t_heard = now  # its silence so far was back-pressure
            while self.free and len(h.credits) < target:
                slot = self.free.popleft()
                self.ring.assign(slot, h.producer)
                h.credits.add(slot)
                grant.append(slot)
            if grant:
                h.send("credit", grant)

    # -- shutdown -----------------------------------------------------------------------------------

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.cv.notify_all()
        self.thread_stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=1.0)
        if self.stop_event is not None:
            self.stop_event.set()
        # pid is None for a process whose start() failed: nothing to stop or join, only channels to close.
        unstarted = [h for h in self.handles if h.process is not None and h.process.pid is None]
        procs = [h for h in self.handles if h.process is not None and h.process.pid is not None]
        for h in unstarted:
            _close_channels(h)
        for h in procs:
            try:
                h.send("stop")
            except Exception:
                pass
        deadline = time.monotonic() + _JOIN_S
        for h in procs:
            h.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for signal_them in ("terminate", "kill"):
            alive = [h for h in procs if h.process.is_alive()]
            for h in alive:
                getattr(h.process, signal_them)()
            for h in alive:
                h.process.join(timeout=0.5)
        for h in procs:
            _close_channels(h)
        if self.ring is not None:
            self.ring.unlink()


class ProducerPool:
    """Spare devices making synthetic variants of dataset images into a shared-memory ring.

    ``synthesizer``: a fusionloader ``Synthesizer`` (pickles as its load spec) or a checkpoint path.
    ``source``: picklable, ``source.raw(index) -> (image float [0,1] (3,H,W), label)``.
    ``devices``: one producer process per entry ("cpu", "cuda:1", ...). ``capacity``: each sampler's
    continuous batch. ``slots``: ring slots (default ``4 * capacity * len(devices)``: a sampler's worth in
    flight per producer, the rest for finished images waiting for the trainer, absorbing its jitter).
    ``image_size``: slot resolution R (default: the model's); outputs of another size are resized into it.
    ``on_error``: "raise" or "restart" (see NOTE [Producer protocol] in this file). ``timeout``: seconds a
    producer may take to load + warm up, and may stay silent while holding jobs, before it counts as
    failed. ``ring_device``: "cpu" (pinned host slots when CUDA is available) or the trainer's CUDA
    device (slots in device memory shared through CUDA IPC). ``threads``: torch threads per producer.

    Use as a context manager, or call ``close()``; garbage collection and interpreter exit also close it.
    """

    def __init__(self, synthesizer, source, devices=("cpu",), slots: int | None = None, image_size: int | None = None,
                 on_error: str = "raise", max_restarts: int = 3, latent_cache_path: str | None = None,
                 capacity: int = 8, timeout: float = 120.0, *, ring_device="cpu", threads: int | None = None,
                 warmup: bool = True, wait_ready: bool = True, deadlines: bool = True):
        if on_error not in ("raise", "restart"):
            raise ValueError(f"on_error must be 'raise' or 'restart', got {on_error!r}")
        devices = [devices] if isinstance(devices, (str, torch.device)) else list(devices)
        if not devices:
            raise ValueError("ProducerPool needs at least one device")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        slots = 4 * capacity * len(devices) if slots is None else int(slots)
        if slots < len(devices):
            raise ValueError(f"slots ({slots}) must be at least the number of producers ({len(devices)})")
        if threads is None and all(torch.device(d).type == "cpu" for d in devices):
            threads = max(1, (os.cpu_count() or 2) // (len(devices) + 1))
        self._core = _Core(dict(
            synthesizer=synthesizer, source=source, devices=[str(torch.device(d)) for d in devices], slots=slots,
            image_size=image_size, on_error=on_error, max_restarts=int(max_restarts),
            latent_cache_path=None if latent_cache_path is None else os.fspath(latent_cache_path),
            capacity=int(capacity), timeout=float(timeout), ring_device=str(torch.device(ring_device)),
            threads=threads, warmup=bool(warmup), wait_ready=bool(wait_ready), deadlines=bool(deadlines),
        ))
        self._finalizer = weakref.finalize(self, self._core.close)

    # -- lifetime -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn one producer per device; return when each has loaded its model and warmed up (or raise).

        With ``wait_ready=False`` return at once: jobs queue until producers are ready, ``take`` returns None
        meanwhile, and a start-up failure re-raises at the next ``check``/``take``/``submit``/``stats``."""
        try:
            self._core.start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every producer and unlink the ring (idempotent; done within a few seconds)."""
        self._finalizer()

    def __enter__(self) -> "ProducerPool":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the consumer's calls -----------------------------------------------------------------------

    def _live(self) -> _Core:
        core = self._core
        if core.warnings:
            with core.lock:
                texts, core.warnings = core.warnings, []
            for text in texts:
                warnings.warn(text, RuntimeWarning, stacklevel=3)
        if core.error is not None:
            raise core.error.fresh()
        if core.closed:
            raise RuntimeError("ProducerPool is closed")
        if not core.started:
            raise RuntimeError("ProducerPool.start() has not been called")
        return core

    def check(self) -> None:
        """Re-raise a producer failure here (``ProducerError``) and emit pending restart warnings."""
        self._live()

    def submit(self, jobs) -> None:
        """Queue jobs in consumption order (what is submitted first is made first). Keys must be unique."""
        core = self._live()
        jobs = list(jobs)
        with core.lock:
            seen = set()
            for job in jobs:  # all or nothing
                if job.key in seen or job.key in core.pending or job.key in core.owner or job.key in core.ready:
                    raise ValueError(f"job key {job.key} is already queued")
                seen.add(job.key)
            for job in jobs:
                core.outcomes.pop(job.key, None)
                core.pending[job.key] = job
            core.counters["submitted"] += len(jobs)
            core.dispatch()

    def take(self, key: int, timeout: float = 0.0) -> torch.Tensor | None:
        """The finished image for ``key`` (3,R,R) float [0,1], copied out of its slot, or None.

        None when it is not ready within ``timeout`` seconds (the job stays queued: take it later or
        ``cancel`` it), and None at once when the job was lost, dropped (NaN/inf) or never submitted.
        """
        core = self._live()
        deadline = time.monotonic() + max(0.0, timeout)
        with core.lock:
            while True:
                if core.error is not None:
                    raise core.error.fresh()
                if core.closed:
                    return None
                slot = core.ready.pop(key, None)
                if slot is not None:
                    break
                if core.outcomes.pop(key, None) is not None or (key not in core.pending and key not in core.owner):
                    core.behind.discard(key)
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if key in core.pending and key not in core.urgent:
                    core.urgent.add(key)  # somebody waits for it: no deadline skipping
                    core.dispatch()
                core.cv.wait(remaining)
        image = core.ring.read(slot, key)  # outside the lock: the slot is in no list, nobody else touches it
        with core.lock:
            core.free.append(slot)
            core.counters["taken"] += 1
            if key in core.behind:  # a late job collected for the store: counted when it was passed
                core.behind.discard(key)
            else:
                core.consumed()
            core.dispatch()
        return image

    def cancel(self, keys) -> None:
        """Forget jobs: drop them if not started, discard their results if made; frees their slots."""
        core = self._core
        if core.closed or not core.started:
            return
        with core.lock:
            per_producer = collections.defaultdict(list)
            for key in keys:
                core.outcomes.pop(key, None)
                core.urgent.discard(key)
                core.behind.discard(key)
                core.t_dispatched.pop(key, None)
                if core.pending.pop(key, None) is not None:
                    pass
                elif key in core.owner:
                    h = core.handles[core.owner.pop(key)]
                    h.assigned.pop(key, None)
                    per_producer[h.producer].append(key)
                elif key in core.ready:
                    slot = core.ready.pop(key)
                    core.ring.release(slot)
                    core.free.append(slot)
                else:
                    continue
                core.counters["cancelled"] += 1
            for producer, ks in per_producer.items():
                core.handles[producer].send("cancel", ks)
            core.dispatch()

    def ready_keys(self) -> set[int]:
        """Keys whose images are finished and waiting for ``take``."""
        core = self._live()
        with core.lock:
            return set(core.ready)

    def passed(self, keys) -> None:
        """The consumer went past these jobs without them (it fell back): keep them, but make them only
        when no job that can still arrive in time is waiting (their images can still fill the variant
        store). Counts towards the consumption rate (NOTE [Deadlines])."""
        core = self._live()
        with core.lock:
            keys = [k for k in keys if (k in core.pending or k in core.owner) and k not in core.behind]
            core.behind.update(keys)
            core.counters["passed"] += len(keys)
            core.counters["passed_unstarted"] += sum(1 for k in keys if k in core.pending)
            core.consumed(len(keys))
            per_producer = collections.defaultdict(list)
            for k in keys:
                if k in core.owner:
                    per_producer[core.owner[k]].append(k)
            for producer, ks in per_producer.items():  # what waits in its backlog goes behind the rest
                core.handles[producer].send("passed", ks)
            core.dispatch()

    def state(self, key: int) -> str:
        """Where a job is: "pending", "ready", "lost", "dropped" or "unknown" (taken, cancelled, never seen)."""
        core = self._core
        with core.lock:
            if key in core.ready:
                return "ready"
            if key in core.pending or key in core.owner:
                return "pending"
            return core.outcomes.get(key, "unknown")

    def stats(self) -> dict:
        """Throughput per producer and in total, ring occupancy, restarts, lost and NaN/inf-dropped jobs."""
        core = self._live()
        now = time.monotonic()
        with core.lock:
            producers = []
            for h in core.handles:
                wall = now - h.t_ready if h.t_ready is not None else 0.0
                producers.append({
                    "producer": h.producer, "device": h.device, "pid": h.pid, "state": h.state,
                    "images": h.images, "images_per_s": h.images / wall if wall > 0 else 0.0,
                    "busy_images_per_s": h.images / h.busy_s if h.busy_s > 0 else 0.0,
                    "jobs_assigned": len(h.assigned),
                })
            ring = core.ring.counts() if core.ring is not None else {}
            slots = core.ring.capacity if core.ring is not None else core.cfg["slots"]
            return {
                "producers": producers,
                "images": sum(p["images"] for p in producers),
                "images_per_s": sum(p["images_per_s"] for p in producers),
                "latency_s": core.latency_s,
                "consume_rate": core.consume_rate,
                "ring": {"slots": slots, **ring, "occupancy": len(core.ready) / slots},
                "jobs_pending": len(core.pending) + len(core.owner),
                "jobs_ready": len(core.ready),
                "restarts": core.counters["restarts"],
                "lost": core.counters["lost"],
                "nonfinite_dropped": core.counters["nonfinite_dropped"],
                "cancelled": core.counters["cancelled"],
                # jobs the consumer went past unfinished, and of those the ones no producer had started
                "passed": core.counters["passed"],
                "passed_unstarted": core.counters["passed_unstarted"],
                "submitted": core.counters["submitted"],
                "taken": core.counters["taken"],
            }

    # -- for tests and tools ------------------------------------------------------------------------

    @property
    def latency_s(self) -> float:
        """Running estimate of one job's latency, dispatch to done (0.0 before the first result)."""
        return self._core.latency_s

    @property
    def pids(self) -> list[int]:
        """PIDs of the current producer processes (replaced ones excluded)."""
        return [h.pid for h in self._core.handles if h.pid is not None]

    @property
    def shm_names(self) -> list[str]:
        """Names of the shared-memory segments this pool created (under /dev/shm on Linux)."""
        ring = self._core.ring
        return [ring.name] if ring is not None else []

    @property
    def closed(self) -> bool:
        return self._core.closed
