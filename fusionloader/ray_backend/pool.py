"""RayProducerPool: the loader's pool protocol on a producer pool shared by every rank of a training job.

NOTE [Ray backend]
~~~~~~~~~~~~~~~~~~

Pieces. ``producer_devices`` (N, or a list of Ray resource dicts: specs.py) become N producer *actors*
(actor.py), each running the producer process's own engine-side code (``producer_child.Producer``: Synthesizer
load, latent cache, continuous-batching sampler, admission by slot credit) in a thread. One *coordinator* actor
(coordinator.py) per training job holds the process pool's ``_PoolCore`` -- the JobBook, deadline dispatch, slot
credits, the supervisor's restart and timeout rules (supervisor.py) -- and serves every rank: it is named
(specs.pool_name: torchrun's run id and rendezvous address), lives in the ``fusionloader`` namespace, is created
by the first rank that asks (``get_if_exists``) and attached to by the others, which must ask for the same
settings. It is detached (a rank that finishes first must not take it down with it) and ends when the last
rank detaches (``close``), or by itself when no rank has called it for ``LEASE_S`` (every rank died). Each
rank's ``RayProducerPool`` is a thin client: its calls map onto the coordinator's.

Runtime. ``ray.init`` follows Ray's conventions: an initialised runtime is used as is; else ``RAY_ADDRESS``
names the cluster; else, in a torch.distributed job, rank 0 starts a local runtime and broadcasts its address
(the ranks then share it; it lives as long as rank 0); else a local runtime. A runtime this pool starts has
object spilling off (``automatic_object_spilling_enabled=False``): nothing synthetic is written to disk. On a
cluster you started, start it so (README "Past one machine"); either way the pool holds at most ``slots``
images in the object store (below).

Results. A producer puts each finished image into the object store (``ray.put`` of a numpy array: read
zero-copy by any process on the same node, one transfer to another node) and its reference reaches the
coordinator with the ``done`` message; the coordinator hands it to its rank at the rank's next ``sync``; ``take``
copies the image out (the ring's ``read`` copies too). The slot accounting is the process pool's (NOTE [Slot
protocol] in ring.py; slots.py): an image holds its slot until its rank acknowledges the take, so the object
store holds at most ``slots`` images of the pool (default ``4 * capacity * actors * world_size``).

Faults. The coordinator polls each actor (one call in flight each, answered within 0.2 s); an actor whose
process dies fails that call at once, one that does not answer for ``liveness_s`` (default 10 s: a lost node)
is declared dead; either way the supervisor's rules apply (``on_error``: raise, or restart a new actor up to
``max_restarts``, its jobs counted lost; a start killed by a lost node is retried ``start_retries`` times).
Every call of a rank has a timeout (``call_timeout``); a heartbeat thread calls the coordinator every second,
and a coordinator or cluster that fails or stops answering for ``call_timeout`` seconds makes the rank's next
call raise ``ProducerError`` -- never a hang. ``close`` (idempotent; ``with``, garbage collection, interpreter
exit) drops the rank's references; the last rank's stops every actor and the coordinator: no actor and no
object is left behind.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import warnings
import weakref

import torch

from ..producer import make_config
from ..protocol import ProducerError
from .slots import from_numpy
from .specs import check_producer_devices, pool_name, resolve_specs

__all__ = ["RayProducerPool"]

NAMESPACE = "fusionloader"
HEARTBEAT_S = 1.0
MIN_SYNC_S = 0.005  # a zero-timeout take syncs at most this often (the loader's harvest takes many at once)
_SERIAL = itertools.count()


def connect_ray(rank: int, world: int) -> bool:
    """Initialise Ray per NOTE [Ray backend]; True if this call started a local runtime."""
    import ray

    if ray.is_initialized():
        return False
    no_spill = {"automatic_object_spilling_enabled": False}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace=NAMESPACE, log_to_driver=False)
        return False
    dist = torch.distributed
    if world > 1 and dist.is_available() and dist.is_initialized():
        box = [None, None]
        if rank == 0:
            ray.init(namespace=NAMESPACE, _system_config=no_spill, log_to_driver=False)
            # the address, and whether the new runtime wants Ray's auth token (~/.ray/auth_token, never sent)
            box = [ray.get_runtime_context().gcs_address, os.environ.get("RAY_AUTH_MODE")]
        dist.broadcast_object_list(box, src=0)
        if rank != 0:
            if box[1] == "token" and "RAY_AUTH_MODE" not in os.environ:
                _enable_token_auth()
            ray.init(address=box[0], namespace=NAMESPACE, log_to_driver=False)
        return rank == 0
    ray.init(namespace=NAMESPACE, _system_config=no_spill, log_to_driver=False)
    return True


def _enable_token_auth() -> None:
    """Connect with the token auth a runtime started by ``ray.init`` uses by default since Ray 2.5x (its token
    is in ``~/.ray/auth_token``, shared by the ranks of one node). Ray reads the mode into its C++ config, so
    setting ``RAY_AUTH_MODE`` alone after import is not enough."""
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth as enable
    except ImportError:  # a Ray without token auth
        return
    enable()


class _Client:
    """What a rank holds; apart from the pool so a finalizer can close it."""

    def __init__(self):
        self.coord = None
        self.lock = threading.Lock()
        self.arrived: dict[int, object] = {}  # key -> ObjectRef of its image
        self.ended: dict[int, str] = {}  # key -> "lost" | "dropped"
        self.live: set[int] = set()  # submitted, neither taken nor cancelled nor ended
        self.acks: list[int] = []
        self.lost_made = 0  # images this rank could not fetch: their producer died after making them
        self.error: ProducerError | None = None
        self.notices: list[str] = []
        self.stalled: list[int] = []
        self.t_sync = 0.0
        self.t_ok = time.monotonic()
        self.stop = threading.Event()
        self.thread = None
        self.closed = False
        self.rank = 0
        self.started_ray = False
        self.unreachable_s = 30.0

    def status(self, status) -> None:
        error, notices, stalled = status
        with self.lock:
            if error is not None and self.error is None:
                self.error = ProducerError(*error)
            self.notices.extend(notices)
            self.stalled = list(stalled)
            self.t_ok = time.monotonic()

    def failed(self, what: str, e: BaseException) -> None:
        import ray

        gone = isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.RaySystemError)) or not ray.is_initialized()
        if gone or time.monotonic() - self.t_ok > self.unreachable_s:
            with self.lock:
                if self.error is None:
                    self.error = ProducerError(f"the job's Ray producer pool is unreachable ({what}: "
                                               f"{type(e).__name__}: {e}); is the Ray cluster still up?")

    def beat(self) -> None:
        import ray

        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.status(ray.get(self.coord.heartbeat.remote(self.rank), timeout=self.unreachable_s))
            except Exception as e:  # noqa: BLE001 - a lost cluster shows as many different errors
                self.failed("heartbeat", e)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=2.0)
        self.arrived.clear()
        coord, self.coord = self.coord, None
        if coord is None:
            return
        try:
            import ray

            if not ray.is_initialized():
                return
            left = ray.get(coord.detach.remote(self.rank), timeout=10.0)
            if left == 0:
                ray.kill(coord, no_restart=True)
        except Exception:  # a lost cluster has nothing left to stop
            pass
        if self.started_ray:
            try:
                import ray

                ray.shutdown()
            except Exception:
                pass


class RayProducerPool:
    """The pool protocol (``start``/``submit``/``take``/``cancel``/``passed``/``ready_keys``/``state``/``check``/
    ``stalled``/``stats``/``close``) on the job's shared Ray producer pool (NOTE [Ray backend] above).

    Takes ``ProducerPool``'s arguments (``devices`` is ``producer_devices``: N actors or a list of Ray resource
    dicts; ``ring_device`` and ``threads`` do not apply) and: ``name`` (the pool's actor name; default
    job-scoped, specs.pool_name), ``rank``/``world_size`` (default torch.distributed's), ``liveness_s``
    (seconds without an answer before an actor counts as dead), ``call_timeout`` (seconds a rank waits for
    the coordinator before the pool counts as lost), ``shutdown_ray`` (shut down a local runtime this pool
    started, at close; default True on a single process)."""

    def __init__(self, synthesizer, source, devices=1, slots: int | None = None, image_size: int | None = None,
                 on_error: str = "raise", max_restarts: int = 3, latent_cache_path: str | None = None,
                 capacity: int = 8, timeout: float = 120.0, *, ring_device="cpu", threads: int | None = None,
                 warmup: bool = True, wait_ready: bool = True, deadlines: bool = False,
                 slot_dtype: torch.dtype = torch.float32, startup=None, start_retries: int = 2,
                 name: str | None = None, rank: int | None = None, world_size: int | None = None,
                 liveness_s: float = 10.0, call_timeout: float = 30.0, adapters=None, clip_filter=None):
        from ..distributed import dist_info

        self._devices = check_producer_devices(devices)
        n = self._devices if isinstance(self._devices, int) else len(self._devices)
        r, w = dist_info()
        self.rank = r if rank is None else int(rank)
        self.world_size = w if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank!r}")
        for arg, value in (("liveness_s", liveness_s), ("call_timeout", call_timeout)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{arg} must be a number of seconds > 0, got {value!r}")
        if slots is None:
            slots = 4 * capacity * n * self.world_size if isinstance(capacity, int) else None
        # the process pool's validation, with n CPU placeholders (an actor's device is known once placed)
        self._cfg = make_config(synthesizer, source, ("cpu",) * n, slots, image_size, on_error, max_restarts,
                                latent_cache_path, capacity, timeout, ring_device="cpu", threads=threads,
                                warmup=warmup, wait_ready=wait_ready, deadlines=deadlines, slot_dtype=slot_dtype,
                                startup=startup, start_retries=start_retries, adapters=adapters,
                                clip_filter=clip_filter)
        self.name = pool_name(name, next(_SERIAL))
        self.liveness_s = float(liveness_s)
        self._client = _Client()
        self._client.rank, self._client.unreachable_s = self.rank, float(call_timeout)
        self._finalizer = weakref.finalize(self, self._client.close)

    # -- lifetime -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Join (or create) the job's pool and wait until its producers are ready (or raise)."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        import dataclasses

        import ray

        from .coordinator import Coordinator

        c = self._client
        c.started_ray = connect_ray(self.rank, self.world_size) and self.world_size == 1
        specs = resolve_specs(self._devices, ray.cluster_resources().get("GPU", 0))
        cfg = dataclasses.replace(self._cfg, devices=tuple(s["device"] for s in specs))
        load_spec = getattr(cfg.synthesizer, "load_spec", None)
        if load_spec is not None:  # the recipe travels, not the weights
            cfg = dataclasses.replace(cfg, synthesizer=load_spec())
        fingerprint = repr((cfg.devices, cfg.image_size, cfg.capacity, cfg.slots, str(cfg.slot_dtype), self.world_size,
                            cfg.synthesizer if isinstance(cfg.synthesizer, (str, dict)) else type(cfg.synthesizer)))
        remote = ray.remote(Coordinator).options(name=self.name, namespace=NAMESPACE, get_if_exists=True,
                                                 lifetime="detached", num_cpus=0, max_concurrency=64,
                                                 max_restarts=0)
        c.coord = remote.remote(cfg, specs, self.world_size, fingerprint, self.liveness_s)
        problem = ray.get(c.coord.attach.remote(self.rank, fingerprint), timeout=120.0)
        if problem:
            c.coord = None  # not ours to stop
            raise ValueError(problem)
        budget = sum(cfg.startup.limit(p) for p in ("boot", "load", "warmup")) + 60.0
        error = ray.get(c.coord.start.remote(self.rank), timeout=budget)
        if error is not None:
            raise ProducerError(*error)
        c.thread = threading.Thread(target=c.beat, name="fl-ray-heartbeat", daemon=True)
        c.thread.start()

    def close(self) -> None:
        """Leave the pool; the last rank to leave stops every actor (idempotent)."""
        self._finalizer()

    def __enter__(self) -> "RayProducerPool":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the consumer's calls ---------------------------------------------------------------------------

    def _live(self) -> _Client:
        c = self._client
        with c.lock:
            texts, c.notices = c.notices, []
        for text in texts:
            warnings.warn(text, RuntimeWarning, stacklevel=3)
        if c.error is not None:
            raise ProducerError(str(c.error), c.error.producer, c.error.device, c.error.pid, c.error.keys,
                                c.error.indices)
        if c.closed:
            raise RuntimeError("RayProducerPool is closed")
        if c.coord is None:
            raise RuntimeError("RayProducerPool.start() has not been called")
        return c

    def _call(self, c: _Client, what: str, ref, timeout: float | None = None):
        import ray

        try:
            return ray.get(ref, timeout=c.unreachable_s if timeout is None else timeout)
        except ray.exceptions.RayTaskError as e:  # the coordinator raised: the caller's error (a bad key, ...)
            raise e.as_instanceof_cause() from None
        except Exception as e:  # noqa: BLE001
            c.failed(what, e)
            if c.error is not None:
                raise ProducerError(str(c.error)) from e
            raise

    def check(self) -> None:
        """Re-raise a pool failure here (``ProducerError``) and emit pending warnings."""
        self._live()

    def submit(self, jobs) -> None:
        c = self._live()
        jobs = list(jobs)
        acks, c.acks = c.acks, []
        if acks:
            self._sync(c, acks, None, 0.0)
        c.status(self._call(c, "submit", c.coord.submit.remote(self.rank, jobs)))
        c.live.update(j.key for j in jobs)
        self._live()

    def _sync(self, c: _Client, acks, want, wait_s: float) -> bool:
        out, ended, blocked, status = self._call(c, "sync", c.coord.sync.remote(self.rank, acks, want, wait_s),
                                                 c.unreachable_s + wait_s)
        c.status(status)
        c.t_sync = time.monotonic()
        for key, ref in out:
            c.arrived[key] = ref
        for key, how in ended:
            c.ended[key] = how
        return blocked

    def take(self, key: int, timeout: float = 0.0) -> torch.Tensor | None:
        """The finished image for ``key`` (copied out of the object store), or None (see ProducerPool.take)."""
        import ray

        c = self._live()
        deadline = time.monotonic() + max(0.0, timeout)
        synced = False
        while True:
            ref = c.arrived.pop(key, None)
            if ref is not None:
                c.live.discard(key)
                c.acks.append(key)
                try:
                    array = ray.get(ref, timeout=c.unreachable_s)
                except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError):
                    c.lost_made += 1  # its producer died after making it (it owned the object): lost
                    return None
                return from_numpy(array, self._cfg.slot_dtype)
            if key in c.ended or key not in c.live:
                c.ended.pop(key, None)
                c.live.discard(key)
                return None
            remaining = deadline - time.monotonic()
            if synced and remaining <= 0:
                return None
            if remaining <= 0 and time.monotonic() - c.t_sync < MIN_SYNC_S:
                return None
            acks, c.acks = c.acks, []
            if self._sync(c, acks, key, min(max(remaining, 0.0), 0.25)):
                return None  # the producer that would make it is stalled
            synced = remaining <= 0.25
            self._live()

    def cancel(self, keys) -> None:
        c = self._client
        if c.closed or c.coord is None:
            return
        keys = list(keys)
        for key in keys:
            c.arrived.pop(key, None)
            c.ended.pop(key, None)
            c.live.discard(key)
        self._call(c, "cancel", c.coord.cancel.remote(self.rank, keys))

    def passed(self, keys) -> None:
        c = self._live()
        self._call(c, "passed", c.coord.passed.remote(self.rank, [k for k in keys if k in c.live]))

    def ready_keys(self) -> set[int]:
        c = self._live()
        if time.monotonic() - c.t_sync >= MIN_SYNC_S:
            acks, c.acks = c.acks, []
            self._sync(c, acks, None, 0.0)
        return set(c.arrived)

    def state(self, key: int) -> str:
        c = self._client
        if key in c.arrived:
            return "ready"
        if key in c.ended:
            return c.ended[key]
        return "pending" if key in c.live else "unknown"

    def stalled(self) -> list[int]:
        return list(self._client.stalled)

    def stats(self) -> dict:
        """The job's pool, all ranks together (ProducerPool.stats's keys), plus ``ranks`` attached, ``delivered``
        (results handed to ranks, not yet taken), ``backend``, ``pool`` (its name) and this ``rank``."""
        c = self._live()
        if c.acks:  # the counts include what this rank took
            acks, c.acks = c.acks, []
            self._sync(c, acks, None, 0.0)
        out = self._call(c, "stats", c.coord.stats.remote())
        out["lost"] += c.lost_made  # (this rank's; other ranks count theirs)
        out["backend"], out["pool"], out["rank"] = "ray", self.name, self.rank
        return out

    # -- for tests and tools --------------------------------------------------------------------------

    @property
    def latency_s(self) -> float:
        c = self._client
        if c.coord is None or c.closed:
            return 0.0
        return self._call(c, "latency", c.coord.latency_s.remote())

    @property
    def coordinator(self):
        """The coordinator actor's handle (tests, tools)."""
        return self._client.coord

    @property
    def config(self):
        return self._cfg

    @property
    def closed(self) -> bool:
        return self._client.closed
