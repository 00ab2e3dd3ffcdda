"""ProducerPool: spare devices making synthetic variants into a shared-memory ring, for the loader.

The pool's parts, one concern each: ``protocol`` (Job, messages, configs, ProducerError), ``jobs`` (the
JobBook: where each job is, the deadline order, the latency and rate estimates), ``supervisor`` (the
processes: spawn, start-up phases, liveness, restarts, shutdown), ``producer_child`` (the child process),
``ring`` (the slots), ``devices`` (device names and binding). This file is the public face and the glue:
what a message means for jobs and slots, dispatch, and the consumer's calls.

NOTE [Producer protocol]
~~~~~~~~~~~~~~~~~~~~~~~~

Processes and channels. ``ProducerPool.start`` spawns (never forks: CUDA and torch threads do not survive
fork) one daemon process per device. Producer ``i`` has

* a request queue (consumer -> producer, ``multiprocessing.Queue``; the consumer is its only writer, so the
  queue's write lock can never be held by a dead process). Messages: ``("ring", handle)``,
  ``("jobs", [Job])``, ``("credit", [slot])``, ``("cancel", [key])``, ``("passed", [key])``, ``("stop",)``.
* a result pipe (producer -> consumer, one ``Pipe`` per producer, so a SIGKILLed producer can corrupt
  or block nobody else). Messages: ``("phase", name)`` (start-up progress), ``("ready", ReadyInfo)``,
  ``("done", key, slot, busy_s, latency_s)``, ``("dropped", key, reason)`` (reason ``"nonfinite"``, or ``"clip"``:
  every generation rejected by the CLIP filter), ``("beat", busy_s)`` (after a sampler step when nothing was
  sent for a second), ``("counts", {name: increment})`` (CLIP-filter rejects, adapter swaps: NOTE [Producer
  methods] in producer_child.py), ``("log", level, logger, text)`` (the child's logging and warnings, re-logged
  under "fusionloader"), ``("error", ErrorInfo)``.

A collector thread in the consumer (the training process) waits on every result pipe *and* every
process sentinel with ``multiprocessing.connection.wait`` (50 ms timeout), so results are taken in, jobs
dispatched and slots credited while the training step runs, and a death (exception, SIGKILL, OOM
kill) is seen at once, not at the next ``take``.

Device binding (issue 14). Device names are resolved in the trainer against ``CUDA_VISIBLE_DEVICES``
(devices.resolve_device); each child binds its device (``torch.cuda.set_device``) and bounds its threads
before anything touches CUDA, so its kernels, streams and pinned ring mapping are all on its own GPU.
The trainer pins a host ring only under a device it already uses (NOTE [Slot protocol] in ring.py).

Scheduling. The JobBook (jobs.py) keeps every submitted job in consumption order, each pending, owned by
one producer, or ready in a slot -- never two. The pool hands each ready producer at most ``2 * capacity``
outstanding jobs the consumer still wants (least-loaded first); a producer serves them FIFO, jobs the
consumer has passed after them (at most half its sampler), and keeps its continuous-batching sampler
full (up to ``capacity`` in flight), so what is due next is made first. The consumer alone allocates
ring slots: it credits each producer up to ``capacity`` free slots (NOTE [Slot protocol] in ring.py). A
producer admits a job into its sampler only with a credit in hand, and that slot stays reserved for the
job: the sampler's fused post-process writes the image straight into it when the ring lives on the
producer's device (a CPU producer and a host ring), otherwise the finished image is copied in. No
credit, no admission: when the trainer does not take results, the producers stop (back-pressure). A key
taken or cancelled frees its slot for new credits.

NOTE [Latent cache] (issue 14). An img2img job starts from its image's VAE posterior, encoded once and kept in
the latent cache (engine/latents.py). ``latent_cache_path=None`` resolves, at ``start``, to the node's shared
cache ``default_cache_dir()`` (``$FUSIONLOADER_LATENT_CACHE``, else ``<tmp>/fusionloader-<uid>/latents``): one
folder per model fingerprint, shared by every producer of this pool, of the other ranks' pools on the node and
of later runs -- entries are keyed by the data (file path + size + mtime, or the image bytes) and the model, so
sharing is safe and a second epoch, rank or run encodes nothing. Each child prefetches the img2img jobs' latents
as they arrive and makes one ``get`` per admission round (NOTE [Producer latents] in producer_child.py), so
misses are encoded in batches off the sampler's critical path. Nothing of it is temporary: no exit path (close,
``with``, garbage collection, atexit, a producer fault, a SIGKILLed trainer or producer) leaves a folder to
remove, and a writer killed mid-write leaves no entry rather than a wrong one. The price is disk: the mean and
std of every image encoded, float32 -- ``2 * 4 * (H/8) * (W/8) * 4`` bytes, 128 KiB per image at 512 px (SD's
4x64x64 latents), 288 KiB at 768 px -- e.g. 160 GiB for ImageNet-1k's 1.28 M images at 512 px. Pick another
place with ``latent_cache_path=`` (per pool) or ``FUSIONLOADER_LATENT_CACHE`` (per environment; also for a
``/tmp`` that is RAM-backed or too small); ``fusionloader cache`` fills it ahead of training.

NOTE [Deadlines]. Serving strictly in order is wrong when producers are slower than the trainer: the
job due next would be finished after the trainer has passed it, and so would every job after it, so
no fresh image would ever arrive in time. The pool therefore estimates the consumption rate R (jobs
taken or passed per second; a passed job collected later for the store is not counted twice) and the job
latency L (receipt to done, measured by the producer less the time it waited for a free slot: that wait
is back-pressure from a trainer that is behind, not slowness, and counting it would feed on itself), and
dispatches first the pending jobs at least 1.25 R L jobs ahead of the trainer (passed jobs do not count
as ahead); the nearer ones are made only if a producer has nothing else to do, and a ``take`` waiting on
a job makes it urgent (dispatched first). Keys must therefore increase in consumption order (the
loader's do, across epochs). When producers keep up, R L is smaller than what is already in flight and
the order is plain FIFO. Passed jobs (``passed``) stay queued for the variant store but go behind every
job the trainer still wants, in the pool and in the producer, and take at most half a sampler.

Outcomes. A finished image the sampler flags non-finite is dropped and reported (``nonfinite_dropped``
in ``stats()``; ``take`` returns None at once so the consumer falls back to real); when most of a window
of 32 outputs is non-finite, a ``RuntimeWarning`` says so and why. A job whose every generation the CLIP
filter rejected is dropped the same way (``clip_dropped``; no warning: it is the filter working).

Faults. A producer that raises sends ``("error", info)`` naming its id, device, pid and the job(s) it
was working on (key and dataset index), with the traceback, then exits. A producer that dies silently
(SIGKILL) is noticed through its sentinel. A producer holding jobs and slot credits that sends nothing
(not even a heartbeat, which follows any sampler step after a second of silence) for ``timeout``
seconds is hung: ``stalled()`` names it at once (so a waiting trainer stops waiting), it is killed and
treated as dead. Start-up phases have their own budgets (``StartupBudget``); a producer killed by a
signal while starting is started again, at most ``start_retries`` times. Then:

* ``on_error="raise"``: the failure is stored and re-raised as ``ProducerError`` in the training
  process by the next ``check``/``take``/``submit``/``stats``, and by every one after (like torch's
  DataLoader: a failed pool stays failed).
* ``on_error="restart"`` (up to ``max_restarts`` restarts in all): every job the producer held is
  reported *lost* (``take`` returns None at once, ``stats()["lost"]`` counts them, ``state(key)`` says
  ``"lost"``), slots credited to it are reclaimed, a warning is logged at once and raised through
  ``warnings`` in the training thread at its next call, and a fresh producer is spawned on the same
  device. Failures with an error during start always raise (they are almost always deterministic).

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
import dataclasses
import logging
import math
import os
import threading
import time
import warnings
import weakref

import torch

from . import protocol as P
from .devices import resolve_device
from .jobs import JobBook, NonFiniteWindow
from .protocol import Job, PoolConfig, ProducerError, StartupBudget
from .ring import SlotRing, check_shm_space
from .supervisor import READY, Supervisor

__all__ = ["Job", "ProducerError", "ProducerPool", "StartupBudget"]

log = logging.getLogger("fusionloader")

SLOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


def _size_pair(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    pair = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return pair


def make_config(synthesizer, source, devices, slots, image_size, on_error, max_restarts, latent_cache_path, capacity,
                timeout, *, ring_device, threads, warmup, wait_ready, deadlines, slot_dtype, startup,
                start_retries, adapters=None, clip_filter=None) -> PoolConfig:
    """Validate ProducerPool's arguments (each error names the argument and its value) into a PoolConfig."""
    if on_error not in ("raise", "restart"):
        raise ValueError(f"on_error must be 'raise' or 'restart', got {on_error!r}")
    devices = [devices] if isinstance(devices, (str, torch.device)) else list(devices)
    if not devices:
        raise ValueError("ProducerPool needs at least one device (devices=[])")
    devices = tuple(resolve_device(d) for d in devices)
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    slots = 4 * capacity * len(devices) if slots is None else slots
    if not isinstance(slots, int) or slots < len(devices):
        raise ValueError(f"slots must be an int >= the number of producers ({len(devices)}), got {slots!r}")
    if not isinstance(timeout, (int, float)) or not timeout > 0 or math.isinf(timeout):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    for name, value in (("max_restarts", max_restarts), ("start_retries", start_retries)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if slot_dtype not in SLOT_DTYPES:
        raise ValueError(f"slot_dtype must be one of {[str(d) for d in SLOT_DTYPES]}, got {slot_dtype!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    if startup is None:
        startup = StartupBudget()
    elif not isinstance(startup, StartupBudget):
        raise TypeError(f"startup must be a StartupBudget, got {type(startup).__name__}")
    if threads is None and all(d == "cpu" for d in devices):
        threads = max(1, (os.cpu_count() or 2) // (len(devices) + 1))  # GPU producers: devices.bind_process
    size = _size_pair(image_size)
    ring_device = str(torch.device(ring_device))
    if size is not None:  # fail at construction, not with a SIGBUS at the first write
        check_shm_space(slots, (3, *size), slot_dtype, ring_device)
    from .producer_methods import method_options

    adapters, clip_filter = method_options(adapters, clip_filter, source)
    return PoolConfig(
        synthesizer=synthesizer, source=source, devices=devices, slots=slots, image_size=size, slot_dtype=slot_dtype,
        on_error=on_error, max_restarts=max_restarts, start_retries=start_retries,
        latent_cache_path=None if latent_cache_path is None else os.fspath(latent_cache_path), capacity=capacity,
        timeout=float(timeout), startup=startup, ring_device=ring_device, threads=threads, warmup=bool(warmup),
        wait_ready=bool(wait_ready), deadlines=bool(deadlines), adapters=adapters, clip_filter=clip_filter,
    )


def pin_device_for(ring_device: str) -> int | None:
    """The CUDA device the trainer may pin a host ring under: the current device of this (the trainer's)
    thread, only if the trainer has initialised CUDA already -- pinning under any other device would open a
    context on GPU 0 (NOTE [Slot protocol] in ring.py). None: do not pin."""
    if ring_device != "cpu" or not torch.cuda.is_initialized():
        return None
    return torch.cuda.current_device()


class _PoolCore:
    """Everything a pool owns; apart from ProducerPool so a finalizer can close it after the pool is gone.
    It is the supervisor's listener: what messages and deaths mean for jobs and slots, and dispatch."""

    def __init__(self, cfg: PoolConfig, supervisor_factory=Supervisor, ring_factory=SlotRing):
        # The factories let the Ray backend (ray_backend/) keep this scheduling with actors and object-store slots.
        self.cfg = cfg
        self.lock = threading.RLock()
        self.cv = threading.Condition(self.lock)
        self.book = JobBook()
        self.nonfinite = NonFiniteWindow()
        self.supervisor = supervisor_factory(cfg, self.lock, self.cv, self)
        self.ring_factory = ring_factory
        self.ring: SlotRing | None = None
        self.free: collections.deque[int] = collections.deque()
        self.closed = self.started = False
        self.resolution = cfg.image_size
        self.pin_device = None
        self.notices: list[str] = []  # warnings for the trainer's thread, besides the supervisor's

    # -- lifetime -------------------------------------------------------------------------------------

    def start(self) -> None:
        with self.lock:
            if self.closed:
                raise RuntimeError("ProducerPool is closed")
            if self.started:
                return
            self.started = True
            changes = {}
            load_spec = getattr(self.cfg.synthesizer, "load_spec", None)
            if load_spec is not None:  # send the recipe, not the object: each child loads onto its own device
                changes["synthesizer"] = load_spec()
            if self.cfg.latent_cache_path is None:  # NOTE [Latent cache]: the node's, shared by every producer
                from .engine.latent_store import default_cache_dir

                changes["latent_cache_path"] = default_cache_dir()
            if changes:
                self.cfg = self.supervisor.cfg = dataclasses.replace(self.cfg, **changes)
            self.pin_device = pin_device_for(self.cfg.ring_device)
            if self.resolution is not None:
                self.make_ring()
            self.supervisor.start()
            if not self.cfg.wait_ready:
                return  # the collector makes the ring and dispatches as producers report ready
            while not self.supervisor.all_ready():  # each start-up phase has its own budget (supervisor)
                if self.supervisor.error is not None:
                    raise self.supervisor.error.fresh()
                self.cv.wait(0.5)
            self.dispatch()

    def make_ring(self) -> None:
        self.ring = self.ring_factory(self.cfg.slots, (3, *self.resolution), self.cfg.slot_dtype, device=self.cfg.ring_device,
                             pin=self.pin_device)
        self.free = collections.deque(range(self.ring.capacity))
        self.supervisor.share_ring(self.ring.handle)

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.cv.notify_all()
        self.supervisor.close()
        if self.ring is not None:
            self.ring.unlink()

    @property
    def error(self) -> ProducerError | None:
        return self.supervisor.error

    # -- the supervisor's listener (called with the lock held) ------------------------------------------

    def on_message(self, p, msg) -> None:
        kind = msg[0]
        if kind == P.DONE:
            _, key, slot, busy_s, latency = msg
            p.credits.discard(slot)
            p.busy_s = busy_s
            if self.book.finish(key, p.producer, slot, latency):
                p.images += 1
            else:  # cancelled while being made
                self.ring.release(slot)
                self.free.append(slot)
            self._nonfinite(True)
        elif kind == P.DROPPED:
            self.book.drop(msg[1], p.producer, msg[2])
            if msg[2] == "nonfinite":
                self._nonfinite(False)
        elif kind == P.COUNTS:  # increments: a restarted producer adds to its predecessor's
            self.book.counters.update(msg[1])
        elif kind == P.BEAT:
            p.busy_s = msg[1]
        elif kind == P.READY:
            if self.resolution is None:
                self.resolution = tuple(msg[1].resolution)
            if self.ring is None:
                self.make_ring()  # start() did not wait: the first ready producer tells the resolution

    def _nonfinite(self, finite: bool) -> None:
        text = self.nonfinite.record(finite)
        if text is not None:
            log.warning(text)
            self.notices.append(text)

    def on_death(self, p) -> list[Job]:
        for slot in p.credits:  # reclaim: a half-written slot is never READY (NOTE [Slot protocol])
            self.ring.release(slot)
            self.free.append(slot)
        p.credits = set()
        return self.book.lose(p.producer)

    def busy(self, p) -> bool:
        return bool(self.book.owned.get(p.producer)) and bool(p.credits)

    def tick(self) -> None:
        if self.ring is not None and self.started and not self.closed:
            self.dispatch()

    def stats(self) -> dict:
        """Throughput per producer and in total, ring occupancy, restarts, lost and NaN/inf-dropped jobs."""
        now = time.monotonic()
        with self.lock:
            book, producers = self.book, []
            for p in self.supervisor.procs:
                wall = now - p.t_ready if p.t_ready is not None else 0.0
                producers.append({
                    "producer": p.producer, "device": p.device, "pid": p.pid, "state": p.state,
                    "phase": p.phase if p.state != READY else None, "images": p.images,
                    "images_per_s": p.images / wall if wall > 0 else 0.0,
                    "busy_images_per_s": p.images / p.busy_s if p.busy_s > 0 else 0.0,
                    "jobs_assigned": len(book.owned.get(p.producer, ())), "memory": p.memory,
                })
            ring = self.ring.counts() if self.ring is not None else {}
            slots = self.ring.capacity if self.ring is not None else self.cfg.slots
            c = book.counters
            return {
                "producers": producers,
                "images": sum(p["images"] for p in producers),
                "images_per_s": sum(p["images_per_s"] for p in producers),
                "latency_s": book.latency_s,
                "consume_rate": book.consume_rate,
                "ring": {"slots": slots, **ring, "occupancy": len(book.ready) / slots},
                "jobs_pending": len(book.pending) + len(book.owner),
                "jobs_ready": len(book.ready),
                "restarts": self.supervisor.restarts,
                "start_retries": self.supervisor.start_retries,
                "lost": c["lost"],
                "nonfinite_dropped": c["nonfinite_dropped"],
                # NOTE [Producer methods] in producer_child.py: CLIP-filter rejects (each regenerated or, after
                # max_tries, dropped to real: clip_dropped, or kept: clip_kept_below); per-class delta swaps
                "clip_rejected": c["clip_rejected"],
                "clip_dropped": c["clip_dropped"],
                "clip_kept_below": c["clip_kept_below"],
                "adapter_swaps": c["adapter_swaps"],
                "cancelled": c["cancelled"],
                # jobs the consumer went past unfinished, and of those the ones no producer had started
                "passed": c["passed"],
                "passed_unstarted": c["passed_unstarted"],
                "submitted": c["submitted"],
                "taken": c["taken"],
            }

    # -- scheduling -------------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand pending jobs (in due order) to the least-loaded ready producers; top up slot credits."""
        ready = self.supervisor.ready()
        if not ready or self.ring is None:
            return
        book, budget = self.book, 2 * self.cfg.capacity
        batches = {p.producer: [] for p in ready}
        now = time.monotonic()
        # Load: the jobs a producer holds that the consumer still wants (passed ones wait behind them); the
        # cap on all it holds bounds its backlog. Ordering the pending jobs costs O(pending): only when some
        # producer has room (called after every take, it mostly has none).
        load = {p.producer: book.load(p.producer) for p in ready}
        held = {p.producer: len(book.owned.get(p.producer, ())) for p in ready}
        room = [p for p in ready if load[p.producer] < budget and held[p.producer] < 2 * budget]
        for key in book.due_order(self.cfg.deadlines) if book.pending and room else ():
            p = min(ready, key=lambda p: load[p.producer])
            if load[p.producer] >= budget or held[p.producer] >= 2 * budget:
                break
            if not held[p.producer]:
                p.t_heard = now  # the hang clock starts with work: an idle producer has nothing to say
            if key not in book.passed:
                load[p.producer] += 1
            held[p.producer] += 1
            batches[p.producer].append(book.assign(key, p.producer))
        # Enough credits to keep each sampler full; the rest of the ring holds results awaiting take().
        target = max(1, min(self.cfg.capacity, self.ring.capacity // max(1, len(self.supervisor.procs))))
        for p in ready:
            if batches[p.producer]:
                p.send(P.JOBS, batches[p.producer])
                passed = [job.key for job in batches[p.producer] if job.key in book.passed]
                if passed:  # made only when nothing the consumer still wants waits there
                    p.send(P.PASSED, passed)
            grant = []
            if not p.credits and self.free:
                p.t_heard = now  # its silence so far was back-pressure
            while self.free and len(p.credits) < target:
                slot = self.free.popleft()
                self.ring.assign(slot, p.producer)
                p.credits.add(slot)
                grant.append(slot)
            if grant:
                p.send(P.CREDIT, grant)

    def blocked(self, key: int) -> bool:
        """True when no producer can make ``key`` now: its owner, or every producer, is stalled."""
        stalled = set(self.supervisor.stalled())
        if not stalled:
            return False
        owner = self.book.owner.get(key)
        if owner is not None:
            return owner in stalled
        return all(p.producer in stalled for p in self.supervisor.procs)


class ProducerPool:
    """Spare devices making synthetic variants of dataset images into a shared-memory ring.

    ``synthesizer``: a fusionloader ``Synthesizer`` (pickles as its load spec) or a checkpoint path.
    ``source``: picklable, ``source.raw(index) -> (image float [0,1] (3,H,W), label)``.
    ``devices``: one producer process per entry ("cpu", "cuda:1", ...), resolved against
    ``CUDA_VISIBLE_DEVICES`` (``fusionloader.devices.resolve_device``). ``capacity``: each sampler's
    continuous batch. ``slots``: ring slots (default ``4 * capacity * len(devices)``: a sampler's worth in
    flight per producer, the rest for finished images waiting for the trainer, absorbing its jitter).
    ``image_size``: slot resolution R (default: the model's); outputs of another size are resized into it.
    ``on_error``: "raise" or "restart" (see NOTE [Producer protocol] in this file). ``timeout``: seconds a
    producer holding jobs and slot credits may stay silent before it counts as hung. ``startup``: a
    ``StartupBudget`` (seconds per start-up phase: boot, download, load, warmup). ``start_retries``: starts
    again of producers killed by a signal while starting. ``ring_device``: "cpu" (host slots, pinned when
    the trainer already uses CUDA) or the trainer's CUDA device (slots in device memory shared through CUDA
    IPC). ``slot_dtype``: float32 (default), float16/bfloat16, or uint8 (4x smaller; ``take`` then returns
    uint8 0..255, as the engine's post-process rounds). ``threads``: torch threads per producer (default:
    the cores shared among CPU producers; 2 for a GPU producer). ``deadlines``: out-of-order dispatch when
    producers fall behind (NOTE [Deadlines]) -- for a consumer that never blocks in ``take`` (the loader under
    "reuse"/"fallback"); a consumer that waits for each job in turn must leave it off, or results made ahead
    can hold every ring slot while the job it waits for needs one.
    ``adapters``: per-class ESD UNet deltas -- a ``fusionloader.engine.adapters.ClassAdapters`` or a folder written
    by ``fusionloader erase`` (one ``<class name>.safetensors`` per class, names from ``dataset.classes``); each
    producer loads them once and switches per class (NOTE [Producer methods] in producer_child.py).
    ``clip_filter``: a ``fusionloader.engine.clip_filter.ClipFilter``: DisCL's CLIP-score filter, run by each
    producer on the batch it just decoded; rejects are regenerated with the next seed.

    Use as a context manager, or call ``close()``; garbage collection and interpreter exit also close it.
    """

    def __init__(self, synthesizer, source, devices=("cpu",), slots: int | None = None, image_size: int | None = None,
                 on_error: str = "raise", max_restarts: int = 3, latent_cache_path: str | None = None,
                 capacity: int = 8, timeout: float = 120.0, *, ring_device="cpu", threads: int | None = None,
                 warmup: bool = True, wait_ready: bool = True, deadlines: bool = False,
                 slot_dtype: torch.dtype = torch.float32, startup: StartupBudget | None = None,
                 start_retries: int = 2, adapters=None, clip_filter=None):
        cfg = make_config(synthesizer, source, devices, slots, image_size, on_error, max_restarts, latent_cache_path,
                          capacity, timeout, ring_device=ring_device, threads=threads, warmup=warmup,
                          wait_ready=wait_ready, deadlines=deadlines, slot_dtype=slot_dtype, startup=startup,
                          start_retries=start_retries, adapters=adapters, clip_filter=clip_filter)
        self._core = _PoolCore(cfg)
        self._finalizer = weakref.finalize(self, self._core.close)

    # -- lifetime -------------------------------------------------------------------------------------

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

    # -- the consumer's calls ---------------------------------------------------------------------------

    def _live(self) -> _PoolCore:
        core = self._core
        with core.lock:
            texts = core.supervisor.notices + core.notices
            core.supervisor.notices, core.notices = [], []
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
        """Re-raise a producer failure here (``ProducerError``) and emit pending warnings (restarts,
        mostly non-finite outputs)."""
        self._live()

    def submit(self, jobs) -> None:
        """Queue jobs in consumption order (what is submitted first is made first). Keys must be unique."""
        core = self._live()
        with core.lock:
            core.book.submit(jobs)
            core.dispatch()

    def take(self, key: int, timeout: float = 0.0) -> torch.Tensor | None:
        """The finished image for ``key`` (3,R,R) in the slot dtype (float32 [0,1] by default), copied out of
        its slot, or None.

        None when it is not ready within ``timeout`` seconds (the job stays queued: take it later or
        ``cancel`` it), and None at once when the job was lost, dropped (NaN/inf) or never submitted, or
        when the producer that would make it is known to be stalled (``stalled()``).
        """
        core = self._live()
        deadline = time.monotonic() + max(0.0, timeout)
        with core.lock:
            while True:
                if core.error is not None:
                    raise core.error.fresh()
                if core.closed:
                    return None
                slot = core.book.take(key)
                if slot is not None:
                    break
                if core.book.settle(key):
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0 or core.blocked(key):
                    return None
                if core.book.wait_for(key):  # somebody waits for it: no deadline skipping
                    core.dispatch()
                core.cv.wait(min(remaining, 0.25))  # wakes on every message; re-checks stalls at least 4x/s
        image = core.ring.read(slot, key)  # outside the lock: the slot is in no list, nobody else touches it
        with core.lock:
            core.free.append(slot)
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
                where = core.book.cancel(key)
                if where is None:
                    continue
                place, at = where
                if place == "owned":
                    per_producer[at].append(key)
                elif place == "ready":
                    core.ring.release(at)
                    core.free.append(at)
            for producer, ks in per_producer.items():
                core.supervisor.procs[producer].send(P.CANCEL, ks)
            core.dispatch()

    def ready_keys(self) -> set[int]:
        """Keys whose images are finished and waiting for ``take``."""
        core = self._live()
        with core.lock:
            return set(core.book.ready)

    def reader(self):
        """The ring's ``RingHandle`` when it lives in host shared memory (the loader's workers ``peek`` finished
        images in it, NOTE [Worker side] in worker.py), else None (a device ring, or none made yet)."""
        core = self._core
        ring = core.ring
        if not core.started or core.closed or ring is None or str(ring.device) != "cpu":
            return None
        return ring.handle

    def passed(self, keys) -> None:
        """The consumer went past these jobs without them (it fell back): keep them, but make them only
        when no job that can still arrive in time is waiting (their images can still fill the variant
        store). Counts towards the consumption rate (NOTE [Deadlines])."""
        core = self._live()
        with core.lock:
            for producer, ks in core.book.mark_passed(keys).items():  # what waits in its backlog goes behind the rest
                core.supervisor.procs[producer].send(P.PASSED, ks)
            core.dispatch()

    def state(self, key: int) -> str:
        """Where a job is: "pending", "ready", "lost", "dropped" or "unknown" (taken, cancelled, never seen)."""
        core = self._core
        with core.lock:
            return core.book.state(key)

    def stalled(self) -> list[int]:
        """Producers known not to be making progress now (dead and not being restarted, silent for longer
        than ``timeout`` while holding work, or past a start-up phase's budget). Never raises: a trainer
        waiting for an image polls it to stop waiting at once."""
        core = self._core
        if not core.started or core.closed:
            return []
        with core.lock:
            return core.supervisor.stalled()

    def stats(self) -> dict:
        """Throughput per producer and in total, ring occupancy, restarts, lost and NaN/inf-dropped jobs."""
        core = self._live()
        return core.stats()

    # -- for tests and tools --------------------------------------------------------------------------

    @property
    def latency_s(self) -> float:
        """Running estimate of one job's latency, receipt to done less slot waits (0.0 before the first)."""
        return self._core.book.latency_s

    @property
    def pids(self) -> list[int]:
        """PIDs of the current producer processes (replaced ones excluded)."""
        return [p.pid for p in self._core.supervisor.procs if p.pid is not None]

    @property
    def shm_names(self) -> list[str]:
        """Names of the shared-memory segments this pool created (under /dev/shm on Linux)."""
        ring = self._core.ring
        return [ring.name] if ring is not None else []

    @property
    def config(self) -> PoolConfig:
        """The validated settings (a frozen dataclass)."""
        return self._core.cfg

    @property
    def closed(self) -> bool:
        return self._core.closed
