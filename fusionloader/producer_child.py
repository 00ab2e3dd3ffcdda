"""One producer process: bind its device, load its engine, then serve jobs into ring slots.

Runs in the spawned child (NOTE [Producer protocol] in producer.py). Order at start-up matters:
``prepare_process`` binds the device before anything touches CUDA (devices.bind_process), then the child
reports each start-up phase (``download`` when the checkpoint is a hub id, ``load``, ``warmup``) so the
pool can give each its own budget (protocol.StartupBudget), then ``ready`` with its memory estimate.
Its ``logging`` records (WARNING and up, and fusionloader's own INFO) and ``warnings`` go to the trainer
over the result pipe (``("log", level, name, text)``), where they are re-logged under "fusionloader".

NOTE [Producer latents] (issue 14). An img2img job needs its image's VAE posterior. The child binds the latent
cache at ``cfg.latent_cache_path`` (the pool passes the node-shared ``default_cache_dir()`` unless told otherwise,
so every producer of every rank on the node, and every later run, shares one set of entries, keyed by data and
model) to its source once, and then makes two calls: ``prefetch`` of the img2img indices of every ``("jobs", ...)``
message as it arrives -- the cache's background thread encodes the misses in batches while the sampler steps --
and one ``get`` per admission round for all the img2img jobs admitted in it (a hit is a read; one host-to-device
copy for the round). So no miss is encoded at batch 1 on the sampler's critical path, except one whose prefetch
is still running when its job is admitted (``get`` then waits for that batch). The cache holds no temporary
files: the child closes it when it leaves its loop; a child killed without a chance to (SIGKILL, SIGTERM, its
watchdog's ``os._exit``) leaves only complete entries behind (latent_store's write order) and its ``flock``
goes with its file descriptors.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import signal
import threading
import time
import traceback

import torch

from . import protocol as P
from .devices import bind_process
from .memory import format_bytes, memory_estimate
from .protocol import ChildConfig, ErrorInfo, Job, ReadyInfo
from .ring import SlotRing

__all__ = ["Producer", "producer_main"]

log = logging.getLogger("fusionloader.producer")

CHILD_POLL_S = 0.1  # request-queue get timeout while idle
WATCHDOG_S = 0.5  # parent-alive check period
HEARTBEAT_S = 1.0  # longest silence while sampling (the pool's hang check needs a pulse)
CPU_NICE = 10  # niceness added to CPU producers (see prepare_process)


class ResultChannel:
    """The result pipe with a lock: the main loop, a forwarded log record from a library's thread and the
    warnings hook may all send, and ``Connection.send`` is not thread-safe."""

    def __init__(self, conn):
        self.conn, self.lock = conn, threading.Lock()
        self.t_sent = time.monotonic()

    def send(self, *msg) -> None:
        with self.lock:
            self.conn.send(msg)
            self.t_sent = time.monotonic()


class _ForwardHandler(logging.Handler):
    """Sends log records to the trainer; what cannot be sent (pipe gone) is dropped, never raised."""

    def __init__(self, channel: ResultChannel):
        super().__init__(logging.INFO)
        self.channel = channel
        self.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.startswith("fusionloader"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.channel.send(P.LOG, record.levelno, record.name, self.format(record))
        except Exception:
            pass


def forward_logs(channel: ResultChannel) -> None:
    """Route this process's logging and warnings to the trainer (issue 10: producer warnings were lost)."""
    root = logging.getLogger()
    root.addHandler(_ForwardHandler(channel))
    logging.getLogger("fusionloader").setLevel(logging.INFO)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings" (WARNING) -> the handler above


def _watch_parent(parent_pid: int) -> None:
    # Daemon thread: if the trainer dies without shutting us down (SIGKILL), our parent pid changes.
    while True:
        time.sleep(WATCHDOG_S)
        if os.getppid() != parent_pid:
            os._exit(0)


def prepare_process(cfg: ChildConfig) -> None:
    """Process set-up before any model code: device bound first (no context on GPU 0), threads bounded."""
    bind_process(cfg.device, cfg.threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle (NOTE [Shutdown])
    threading.Thread(target=_watch_parent, args=(cfg.parent_pid,), daemon=True, name="fl-watchdog").start()
    if torch.device(cfg.device).type == "cpu":
        # A CPU producer stands in for a spare device and shares the cores with the trainer it feeds: at a
        # lower priority it gets what the trainer leaves, and never slows a training step down.
        try:
            os.nice(CPU_NICE)
        except OSError:  # not permitted here: run at the trainer's priority
            pass


def load_phase(synthesizer) -> str:
    """``download`` when the checkpoint is named by hub id (fetching or checking the cache), else ``load``."""
    path = synthesizer.get("path_or_id") if isinstance(synthesizer, dict) else synthesizer
    return P.LOAD if path is None or os.path.exists(os.fspath(path)) else P.DOWNLOAD


def load_engine(synthesizer, device: str):
    """The producer's own engine on its own device, from a checkpoint path or a Synthesizer load spec."""
    from .engine import Synthesizer

    if isinstance(synthesizer, dict):  # ProducerPool sends a Synthesizer as its load spec
        return Synthesizer.from_pretrained(**{**synthesizer, "device": device})
    return Synthesizer.from_pretrained(os.fspath(synthesizer), device=device)


class Producer:
    """State of one producer process; ``serve`` is its main loop (see NOTE [Producer protocol]).

    A job is admitted into the sampler only with a slot credit in hand, and the slot stays reserved
    for it until it finishes: when the ring lives where the producer computes (a CPU producer and a
    host ring) the sampler's fused post-process writes the image straight into that slot (``out_row``);
    otherwise the finished image is copied in (resized first if the ring's resolution differs).
    Jobs the trainer went past (``passed``) wait behind every job it still wants, and take at most half
    the sampler.

    NOTE [Producer methods] (issue 8). With ``cfg.adapters`` (per-class ESD deltas, engine/adapters.py) every
    delta is loaded onto this producer's UNet once at start, from the files the pool sent (never a pickled
    model), and each request carries its job's class label (``Job.label``, else ``source.label(index)``): the
    sampler admits one class per UNet batch, oldest class first, so a swap (``set_adapter``) happens only when
    a batch of one class drains (``adapter_swaps`` in the pool's stats). With ``cfg.clip_filter`` every finished
    batch is scored right after decode, on this device, with one read-back of the verdicts; a rejected image is
    made again in the slot it holds from the same request with seed ``job.seed + n`` (n = 1, 2, ...: the same
    images whatever the batching), at most ``max_tries`` generations, then dropped (the trainer falls back to
    the real image, ``("dropped", key, "clip")``) or kept (``on_exhausted``). Counters travel as ``("counts",
    {name: increment})`` after a step that changed them.
    """

    def __init__(self, cfg: ChildConfig, requests, results: ResultChannel, stop_event):
        self.cfg, self.requests, self.results, self.stop_event = cfg, requests, results, stop_event
        self.ring: SlotRing | None = None
        self.direct = False
        self.wanted: collections.deque[Job] = collections.deque()
        self.passed: collections.deque[Job] = collections.deque()
        self.inflight: dict[int, tuple[Job, int]] = {}  # key -> (job, reserved slot)
        self.credits: collections.deque[int] = collections.deque()
        self.cancelled: set[int] = set()
        self.current: list[Job] = []  # the job(s) being worked on, for error messages
        self.busy_s = 0.0
        # Job latency as NOTE [Deadlines] needs it: receipt to done, less the time this producer could not
        # admit for want of a free slot (back-pressure from a consumer that is behind, not slowness).
        self.received: dict[int, tuple[float, float]] = {}  # key -> (when, starved_s then; at admission: of it)
        self.starved_s, self.starved_since = 0.0, None
        self._latents = None  # the latent cache bound to cfg.source (SourceLatents), made at first img2img need
        # NOTE [Producer methods]: per-class UNet deltas and the CLIP filter (see the class docstring).
        self.adapters = None  # cfg.adapters attached to this producer's UNet (engine/adapters.ClassAdapters)
        self.clip = cfg.clip_filter  # engine/clip_filter.ClipFilter or None
        self.made: dict[int, object] = {}  # key -> the Request in the sampler (kept only with a CLIP filter)
        self.tries: dict[int, int] = {}  # key -> generations made so far, for jobs the CLIP filter rejected
        self.counts: collections.Counter = collections.Counter()  # increments not yet sent (P.COUNTS)
        self._swaps_sent = 0
        self.arrived: dict[int, int] = {}  # key -> self.steps_run when it arrived (with adapters only)
        self.steps_run = 0
        self._labels: dict[int, object] = {}

    # -- start-up -------------------------------------------------------------------------------------

    def load(self) -> None:
        from .engine import Request

        self.Request = Request
        self.send(P.PHASE, load_phase(self.cfg.synthesizer))
        self.engine = load_engine(self.cfg.synthesizer, self.cfg.device)
        self.resolution = tuple(self.engine.resolution)
        self.sampler = self.engine.sampler(capacity=self.cfg.capacity)
        if self.cfg.adapters is not None:
            self.attach_adapters(self.cfg.adapters)
        if self.cfg.warmup:  # the first call pays for lazy init, allocator growth, kernel compilation
            self.send(P.PHASE, P.WARMUP)
            self.sampler.submit(self._request(Job(-1, -1, "", None, 2.0, 2, 0)))
            while not self.sampler.step():
                pass

    def memory(self) -> dict:
        # Host memory of the ring slots this producer holds credits for at once (a sampler's worth).
        slot_bytes = 3 * self.resolution[0] * self.resolution[1] * self.cfg.slot_dtype.itemsize
        parts = memory_estimate(self.engine, self.cfg.capacity, slot_bytes * self.cfg.capacity)
        log.info("producer %d on %s: memory estimate %s (%s; activations not included)", self.cfg.producer,
                 self.cfg.device, format_bytes(parts["total"]),
                 ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if k != "total"))
        return parts

    def attach(self, handle) -> None:
        pin = torch.cuda.current_device() if torch.device(self.cfg.device).type == "cuda" else None
        self.use_ring(SlotRing.attach(handle, pin=pin))

    def use_ring(self, ring) -> None:
        """Serve into ``ring``: a SlotRing, or any object with its producer-side calls (``shape``, ``dtype``,
        ``device``, ``data``, ``fill``, ``publish``, ``close``) -- the Ray backend's object-store slots."""
        self.ring = ring
        fits = tuple(self.ring.shape) == (3, *self.resolution)
        fits = fits and (self.ring.dtype.is_floating_point or self.ring.dtype == torch.uint8)
        self.direct = fits and torch.device(self.ring.device) == torch.device(self.cfg.device)
        if self.direct:  # the fused post-process writes uint8 or float straight into the slot
            self.sampler = self.engine.sampler(capacity=self.cfg.capacity, out=self.ring.data)
            self.sampler.adapters = self.adapters

    def attach_adapters(self, adapters) -> None:
        """Load every class's delta onto this producer's UNet once (a copy made from the delta files, as a
        spawned producer receives it: the caller's object stays unattached) and let the sampler switch them."""
        import pickle

        self.adapters = pickle.loads(pickle.dumps(adapters)).attach(self.engine.components.unet)
        self.sampler.adapters = self.adapters

    def label_of(self, job: Job):
        """The job's class label: carried by the job, else read from the source once per index."""
        if job.label is not None or job.index < 0:
            return job.label
        if job.index not in self._labels:
            source = self.cfg.source
            label = source.label(job.index) if hasattr(source, "label") else source.raw(job.index)[1]
            self._labels[job.index] = label.item() if isinstance(label, torch.Tensor) and label.numel() == 1 else label
        return self._labels[job.index]

    @property
    def latents(self):
        """The latent cache at ``cfg.latent_cache_path``, at the generation resolution, bound to the source."""
        if self._latents is None:
            self._latents = self.engine.latent_cache(path=self.cfg.latent_cache_path).bind(self.cfg.source)
        return self._latents

    def close(self) -> None:
        """Leave cleanly: stop the cache's prefetch thread (after at most the batch it is encoding), unmap the
        cache files and the ring. Called when the loop ends; a killed child needs none of it (NOTE above)."""
        latents, self._latents = self._latents, None
        if latents is not None:
            latents.cache.close()
        if self.ring is not None:
            self.ring.close()

    def _request(self, job: Job, slot: int | None = None, mean=None, std=None):
        extra = {} if self.adapters is None else {"adapter": self.label_of(job)}  # its class's UNet delta
        return self.Request(job.key, job.prompt, job.strength, job.guidance_scale, job.num_inference_steps,
                            seed=job.seed, latent_mean=mean, latent_std=std, out_row=slot if self.direct else None,
                            deepcache_interval=job.deepcache_interval, decoder=job.decoder, **extra)  # fmt: skip

    # -- messages -------------------------------------------------------------------------------------

    def send(self, *msg) -> None:
        self.results.send(*msg)

    def handle(self, msg) -> bool:
        kind = msg[0]
        if kind == P.JOBS:
            self.wanted.extend(msg[1])
            if self.adapters is not None:  # for pick()'s fairness bound
                self.arrived.update((job.key, self.steps_run) for job in msg[1])
            now = time.perf_counter()
            self.received.update((job.key, (now, self.starved(now))) for job in msg[1])
            img2img = [job for job in msg[1] if job.strength is not None]
            if img2img:  # misses are encoded in batches on the cache's thread while the sampler steps
                self.current = img2img  # (an error binding the cache names these jobs)
                self.latents.prefetch([job.index for job in img2img])
                self.current = []
        elif kind == P.CREDIT:
            self.credits.extend(msg[1])
        elif kind == P.CANCEL:
            keys = set(msg[1])
            self.wanted = collections.deque(j for j in self.wanted if j.key not in keys)
            self.passed = collections.deque(j for j in self.passed if j.key not in keys)
            self.cancelled |= keys & self.inflight.keys()
            for key in keys - self.inflight.keys():
                self.received.pop(key, None)
                self.arrived.pop(key, None)
        elif kind == P.PASSED:
            # The trainer went past these: what still waits here goes behind every job it can still use.
            keys = set(msg[1])
            for key in keys - self.inflight.keys():  # made last on purpose: their wait says nothing of latency
                self.received.pop(key, None)
            self.passed.extend(j for j in self.wanted if j.key in keys)
            self.wanted = collections.deque(j for j in self.wanted if j.key not in keys)
        elif kind == P.RING:
            self.attach(msg[1])
        elif kind == P.STOP:
            return False
        return True

    def starved(self, now: float) -> float:
        """Seconds so far that jobs waited here with room in the sampler but no slot credit."""
        return self.starved_s + (now - self.starved_since if self.starved_since is not None else 0.0)

    # -- the loop -------------------------------------------------------------------------------------

    def serve(self) -> None:
        while not self.stop_event.is_set():
            now = time.perf_counter()
            waiting = bool(self.wanted or self.passed) and not self.credits and len(self.inflight) < self.cfg.capacity
            if waiting and self.starved_since is None:
                self.starved_since = now
            elif not waiting and self.starved_since is not None:
                self.starved_s, self.starved_since = self.starved(now), None
            idle = not self.inflight and not ((self.wanted or self.passed) and self.credits)
            msgs = []
            try:
                msgs.append(self.requests.get(timeout=CHILD_POLL_S) if idle else self.requests.get_nowait())
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
        # All of a round's (job, slot) pairs are taken first, so its img2img latents come from one cache get.
        admitted: list[tuple[Job, int]] = []
        while self.credits and (busy := len(self.inflight) + len(admitted)) < self.cfg.capacity and (
                self.wanted or (self.passed and 2 * busy < self.cfg.capacity)):  # fmt: skip
            job = self.pick(self.wanted or self.passed, admitted)
            admitted.append((job, self.credits.popleft()))
            if job.key in self.received:  # its wait for a slot ends here
                when, starved = self.received[job.key]
                self.received[job.key] = (when, self.starved(time.perf_counter()) - starved)
        if not admitted:
            return
        t0 = time.perf_counter()
        submitted = 0
        try:
            latents = self.round_latents([job for job, _ in admitted])
            for (job, slot), (mean, std) in zip(admitted, latents):
                self.current = [job]
                request = self._request(job, slot, mean, std)
                self.sampler.submit(request)
                if self.clip is not None:  # a rejected image is made again from the same request, next seed
                    self.made[job.key] = request
                self.inflight[job.key] = (job, slot)
                submitted += 1
        except BaseException:
            self.credits.extendleft(slot for _, slot in reversed(admitted[submitted:]))  # not reserved after all
            raise
        self.busy_s += time.perf_counter() - t0
        self.current = []

    def pick(self, queue: collections.deque, admitted: list) -> Job:
        """The next job to admit from ``queue``: the oldest, except with per-class deltas, where a job of the class
        already in the sampler goes first (one class per UNet batch: a job of another class admitted now would
        only wait in the sampler's queue, holding a slot, and split the batch) -- until the oldest job has waited
        ``adapters.patience`` sampler steps since it arrived (fairness, as engine/adapters.py's NOTE)."""
        if self.adapters is None or len(queue) < 2:
            return queue.popleft()
        resolve = self.adapters.resolve
        running = admitted[0][0] if admitted else next(iter(self.inflight.values()))[0] if self.inflight else None
        head = queue[0]
        if running is None or resolve(self.label_of(head)) == (cls := resolve(self.label_of(running))):
            return queue.popleft()
        if self.steps_run - self.arrived.get(head.key, self.steps_run) >= self.adapters.patience:
            return queue.popleft()
        for i, job in enumerate(queue):
            if resolve(self.label_of(job)) == cls:
                del queue[i]
                return job
        return queue.popleft()

    def round_latents(self, jobs: list[Job]) -> list[tuple]:
        """(mean, std) per job of an admission round, (None, None) for text-only ones: one cache ``get`` for all
        the img2img jobs (hits are a read, prefetched misses are waited for). If it fails, each job's latents are
        fetched alone, so the error names the job whose image it is (NOTE [Producer protocol], Faults)."""
        out: list[tuple] = [(None, None)] * len(jobs)
        rows = [k for k, job in enumerate(jobs) if job.strength is not None]
        if not rows:
            return out
        self.current = [jobs[k] for k in rows]
        try:
            mean, std = self.latents.get([jobs[k].index for k in rows])
        except Exception:
            for k in rows:
                self.current = [jobs[k]]
                self.latents.get([jobs[k].index])  # raises for the job whose image is bad
            self.current = [jobs[k] for k in rows]
            raise  # each one alone succeeded: the round's error stands, naming all its jobs
        for n, k in enumerate(rows):
            out[k] = (mean[n], None if std is None else std[n])
        return out

    def step(self) -> None:
        self.current = [job for job, _ in self.inflight.values()]
        t0 = time.perf_counter()
        finished = self.sampler.step()
        self.steps_run += 1
        done = []  # (key, slot, latency)
        good = []  # (finished, job, slot, received)
        for f in finished:
            job, slot = self.inflight.pop(f.key)
            self.current = [job]
            received = self.received.pop(f.key, None)
            self.arrived.pop(f.key, None)
            if f.key in self.cancelled:
                self.cancelled.discard(f.key)
                self.forget(f.key)
                self.credits.appendleft(slot)  # still WRITING and ours: reuse the credit
                continue
            if not f.finite:  # the sampler's flag, read once per finished batch (no per-image sync here)
                self.forget(f.key)
                self.credits.appendleft(slot)
                self.send(P.DROPPED, f.key, "nonfinite")
                continue
            good.append((f, job, slot, received))
        if self.clip is not None and good:
            good = self.clip_filter(good)
        for f, job, slot, received in good:
            self.current = [job]
            if not self.direct:
                image = f.image
                if tuple(image.shape[-2:]) != tuple(self.ring.shape[-2:]):
                    image = torch.nn.functional.interpolate(image[None].float(), size=tuple(self.ring.shape[-2:]),
                                                            mode="bilinear", antialias=True)[0].clamp_(0, 1)
                self.ring.fill(slot, image, self.cfg.producer)
            done.append((f.key, slot, received))
        if done:
            self.ring.publish([d[1] for d in done], [d[0] for d in done], self.cfg.producer)  # one sync
            now = time.perf_counter()
            for key, slot, received in done:
                latency = now - received[0] - received[1] if received else None
                self.send(P.DONE, key, slot, self.busy_s + now - t0, latency)
        self.busy_s += time.perf_counter() - t0
        self.current = []
        self.send_counts()
        if time.monotonic() - self.results.t_sent > HEARTBEAT_S:  # long samples: show we are alive, not hung
            self.send(P.BEAT, self.busy_s)

    def forget(self, key: int) -> None:
        self.made.pop(key, None)
        self.tries.pop(key, None)

    def clip_filter(self, good: list) -> list:
        """Score a finished batch on its device (one read-back of the verdicts); regenerate rejects with the
        next seed into the slot they hold, up to ``max_tries`` generations; then drop or keep (``on_exhausted``)."""
        self.current = [job for _, job, _, _ in good]
        images = torch.stack([f.image for f, _, _, _ in good])
        verdicts = self.clip.accept(images, [self.label_of(job) for _, job, _, _ in good]).tolist()
        kept = []
        for (f, job, slot, received), ok in zip(good, verdicts):
            made = self.tries.get(f.key, 1)
            if ok:
                self.forget(f.key)
                kept.append((f, job, slot, received))
                continue
            self.counts["clip_rejected"] += 1
            if made < self.clip.max_tries:  # again, seed + made: deterministic from the job whatever the batch
                request = dataclasses.replace(self.made[f.key], seed=job.seed + made)
                self.current = [job]
                self.sampler.submit(request)
                self.made[f.key], self.tries[f.key] = request, made + 1
                self.inflight[f.key] = (job, slot)
                if received is not None:
                    self.received[f.key] = received  # its latency runs on: the trainer waits for this one image
                continue
            self.forget(f.key)
            if self.clip.on_exhausted == "keep":
                self.counts["clip_kept_below"] += 1
                kept.append((f, job, slot, received))
            else:  # "real": the position falls back to the real image
                self.credits.appendleft(slot)
                self.send(P.DROPPED, f.key, "clip")
        return kept

    def send_counts(self) -> None:
        """Report counter increments (CLIP rejects, adapter swaps) to the pool, which sums them in ``stats()``."""
        if self.adapters is not None and self.adapters.swaps != self._swaps_sent:
            self.counts["adapter_swaps"] += self.adapters.swaps - self._swaps_sent
            self._swaps_sent = self.adapters.swaps
        if self.counts:
            self.send(P.COUNTS, dict(self.counts))
            self.counts.clear()


def producer_main(cfg: ChildConfig, requests, results, stop_event) -> None:
    """Entry point of a producer process."""
    prepare_process(cfg)
    channel = ResultChannel(results)
    forward_logs(channel)
    producer = Producer(cfg, requests, channel, stop_event)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            producer.load()
            memory = producer.memory()
            producer.send(P.READY, ReadyInfo(os.getpid(), time.perf_counter() - t0, producer.resolution, memory))
            producer.serve()
    except BaseException as e:  # noqa: BLE001 - everything goes back to the trainer
        info = ErrorInfo(os.getpid(), f"{type(e).__name__}: {e}", tuple(j.key for j in producer.current),
                         tuple(j.index for j in producer.current), traceback.format_exc())
        try:
            producer.send(P.ERROR, info)
        except Exception:
            pass
        os._exit(1)  # skip interpreter teardown: nothing here needs it, and it can hang on CUDA state
    finally:
        producer.close()
