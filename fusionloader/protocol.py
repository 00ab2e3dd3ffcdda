"""What the trainer's pool and its producer processes say to each other, and how a pool is configured.

The message tuples and their order are NOTE [Producer protocol] in producer.py; this module only names
them, so the pool, its supervisor and the child process read and write one vocabulary. Everything here is
picklable (it crosses the spawn boundary) and imports nothing heavier than torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "BOOT",
    "COUNTS",
    "ChildConfig",
    "DOWNLOAD",
    "ErrorInfo",
    "Job",
    "LOAD",
    "PHASES",
    "PoolConfig",
    "ProducerError",
    "ReadyInfo",
    "StartupBudget",
    "WARMUP",
]

# Request queue (pool -> producer) message kinds.
RING, JOBS, CREDIT, CANCEL, PASSED, STOP = "ring", "jobs", "credit", "cancel", "passed", "stop"
# Result pipe (producer -> pool) message kinds.
PHASE, READY, DONE, DROPPED, BEAT, LOG, ERROR = "phase", "ready", "done", "dropped", "beat", "log", "error"
# ("counts", {name: increment}): the producer's method counters since its last report (CLIP-filter rejects,
# adapter swaps), summed by the pool into ``stats()`` (increments, so a restarted producer adds to them).
COUNTS = "counts"

# Start-up phases a producer reports, in order (BOOT: spawned, not heard from yet -- interpreter, imports).
BOOT, DOWNLOAD, LOAD, WARMUP = "boot", "download", "load", "warmup"
PHASES = (BOOT, DOWNLOAD, LOAD, WARMUP)


@dataclass(frozen=True)
class Job:
    """One synthetic sample to make: an SDEdit variant of dataset item ``index`` (text-only if ``strength`` is None)."""

    key: int  # unique among a pool's live jobs, increasing in consumption order (NOTE [Deadlines])
    index: int  # dataset index whose image is the SDEdit source
    prompt: str
    strength: float | None  # None = text-only (txt2img from pure noise)
    guidance_scale: float
    num_inference_steps: int
    seed: int
    # The dataset item's class label: selects the producer's per-class UNet delta (ProducerPool(adapters=)) and
    # the CLIP filter's "a photo of a {class}" (ProducerPool(clip_filter=)). None: the producer reads it from
    # its source (``source.label(index)``) when it needs it.
    label: object = None
    # Engine speed options (docs/CONTRACTS.md "Engine speed options"); the defaults are the plain engine.
    deepcache_interval: int | None = None
    decoder: str = "vae"


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


@dataclass(frozen=True)
class StartupBudget:
    """Seconds each start-up phase may take before the producer counts as failed (issue 14: a flat 120 s
    cannot cover a cold download, a load and a Triton JIT in several processes at once).

    The clock restarts at each phase the producer reports: ``boot`` (spawn, interpreter, torch/diffusers
    imports), ``download`` (the checkpoint is a hub id: fetching or checking the cache), ``load`` (weights
    onto the device), ``warmup`` (first sampler steps: lazy init, allocator growth, kernel compilation).
    """

    boot_s: float = 300.0
    download_s: float = 3600.0
    load_s: float = 600.0
    warmup_s: float = 900.0

    def __post_init__(self):
        for name in ("boot_s", "download_s", "load_s", "warmup_s"):
            value = getattr(self, name)
            if not value > 0:  # also refuses NaN
                raise ValueError(f"StartupBudget.{name} must be > 0 seconds, got {value!r}")

    def limit(self, phase: str) -> float:
        return getattr(self, f"{phase}_s")


@dataclass(frozen=True)
class PoolConfig:
    """A ``ProducerPool``'s settings after validation (see ProducerPool for each argument's meaning)."""

    synthesizer: object  # a Synthesizer load spec (dict) once started, or a checkpoint path
    source: object
    devices: tuple[str, ...]  # resolved against CUDA_VISIBLE_DEVICES (fusionloader.devices.resolve_device)
    slots: int
    image_size: tuple[int, int] | None
    slot_dtype: torch.dtype
    on_error: str  # "raise" | "restart"
    max_restarts: int
    start_retries: int
    latent_cache_path: str | None
    capacity: int
    timeout: float  # longest silence of a producer holding jobs and slot credits
    startup: StartupBudget = field(default_factory=StartupBudget)
    ring_device: str = "cpu"
    threads: int | None = None
    warmup: bool = True
    wait_ready: bool = True
    deadlines: bool = False
    adapters: object = None  # engine.adapters.ClassAdapters (pickles as its delta files) or None
    clip_filter: object = None  # engine.clip_filter.ClipFilter (pickles as its settings, not its model) or None


@dataclass(frozen=True)
class ChildConfig:
    """What one producer process is started with."""

    producer: int
    device: str
    synthesizer: object  # a Synthesizer load spec (dict) or a checkpoint path
    source: object  # .raw(index) -> (image float [0,1] (3,H,W), label)
    capacity: int
    latent_cache_path: str | None
    parent_pid: int
    threads: int | None
    warmup: bool
    slot_dtype: torch.dtype = torch.float32  # for the memory estimate (the ring share of this producer)
    adapters: object = None  # ClassAdapters to attach to this producer's UNet (PoolConfig.adapters)
    clip_filter: object = None  # ClipFilter to score this producer's decoded batches with (PoolConfig.clip_filter)


@dataclass(frozen=True)
class ReadyInfo:
    """A producer's ``("ready", info)``: it has loaded and warmed up."""

    pid: int
    load_s: float
    resolution: tuple[int, int]
    memory: dict | None = None  # fusionloader.memory.estimate_memory's result, bytes by part


@dataclass(frozen=True)
class ErrorInfo:
    """Why a producer failed, with the job(s) it was working on."""

    pid: int | None
    error: str
    keys: tuple[int, ...] = ()
    indices: tuple[int, ...] = ()
    traceback: str = ""
