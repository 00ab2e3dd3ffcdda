"""The continuous-batching SDEdit sampler.

A fixed number of UNet slots (``capacity``). Every slot holds one sample at its own step of its own schedule
(strength, steps, eta), with its own prompt, guidance and noise source. Each :meth:`Sampler.step`:

1. admits queued requests into free slots (VAE latent sample, SDEdit start noise via ``add_noise``);
2. runs ONE UNet call on ``[x_0 .. x_{B-1}; x_i for slots with guidance > 1]`` (cond rows, then uncond rows
   only where CFG is on), every row at its own timestep;
3. runs ONE fused ``cfg_step`` (CFG combine + scheduler step + noise) for all slots -- or, for schedulers
   without a fused kernel, groups slots that started together with the same (strength, steps, guidance, eta)
   and calls a deep-copied diffusers scheduler's ``step`` per group;
4. decodes the samples that finished, post-processes them to float [0, 1] (or into a caller's buffer) and
   flags non-finite ones; their slots free up for the next step.

NOTE [host syncs]: inside the denoising loop nothing reads device values back and nothing copies host data
from pageable memory (which waits for the stream on a GPU). Slot bookkeeping is host ints; every per-step
host value (table rows, uncond rows, guidance, seeds, index lists) goes to the device through one pinned
staging copy with ``non_blocking=True`` (``_h2d``), and so do the schedule tables the first time a schedule
is seen; nothing indexes a device tensor with a Python list or a boolean mask. Noise comes from the slot's
Philox seed inside the kernel. The one read-back is the finiteness flags of the samples that finished in a
step: one ``tolist`` per finished batch, after decoding. ``fusionloader.engine.syncs.SyncDetector`` checks
this on CPU (tests/test_syncs.py); ``benchmarks/gpu_check.py`` counts syncs on a GPU with
``torch.cuda.set_sync_debug_mode``. The fused path is sync-free; the unfused path (schedulers without a
fused kernel) calls diffusers' ``scheduler.step``, whose own internals are not under this contract.

NOTE [device]: a sampler on ``cuda:N`` runs ``submit``/``step`` under ``torch.cuda.device(N)``, so Triton
launches, pinned staging and everything else that uses "the current device" use N, never device 0.

Memory: finished samples are decoded ``decode_chunk`` at a time (peak decoder activations bounded by the chunk,
not by how many samples finish together); each chunk is post-processed straight into its rows.

NOTE [speed options]: off by default and then the plain engine bit for bit (docs/CONTRACTS.md "Engine speed
options"). Few-step schedulers (LCM, SD-Turbo's Euler ancestral) are rows of the same fused step
(schedules.py); a UNet with ``time_cond_proj_dim`` takes each slot's guidance as an embedding instead of CFG rows,
and Turbo runs without CFG. ``Request.deepcache_interval`` splits a step's UNet rows into full and shallow ones by
each slot's own phase (deepcache.py); ``Request.decoder`` picks the decoder per finished sample (decoders.py);
``compile`` and ``cuda_graphs`` change how the step runs, not what it computes (compile.py).

NOTE [RNG, diffusers parity]: a request draws its randomness in the pipeline's order -- VAE latent sample,
start noise, then each step's noise (fused schedulers that draw per step: DDIM with eta > 0, Euler ancestral
(Turbo), and LCM on every step but its last).

- ``seed=int``: Philox streams 0, 1, 2 + i (docs/CONTRACTS.md); batch-invariant by construction.
- ``generator=torch.Generator``: diffusers' ``randn_tensor`` on that generator, one sample's shape per draw,
  as the pipeline does with a list of generators (``generator[i]`` per image).
- a *cohort* (internal, built by ``Synthesizer.augment`` for one generator shared by a batch): the members are
  admitted together and each draw is one batch-shaped ``randn_tensor`` as the pipeline does with a single
  generator.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .models import device_scope
from .syncs import host_only, staged

__all__ = ["DEFAULT_DECODE_CHUNK", "Finished", "Request", "Sampler", "fused_step"]

# Finished samples decoded per VAE call: an SD-1.x decode at 512 px holds ~1 GB of fp32 activations per image.
DEFAULT_DECODE_CHUNK = 4


@dataclass(eq=False)
class Request:
    """One sample to generate.

    ``strength`` in (0, 1] is SDEdit img2img from ``latent_mean`` / ``latent_std`` (the unscaled VAE posterior of
    the real image, as :class:`~fusionloader.engine.latents.LatentCache` stores it; ``latent_std=None`` uses the
    mean, deterministically) or from ``latents`` (already scaled, diffusers' 4-channel ``image``);
    ``strength=None`` is text-only generation from pure noise. ``seed`` (Philox) or ``generator`` (torch) fix
    the randomness; with neither a seed is drawn from torch's global RNG. ``out_row`` writes the image into
    the sampler's ``out`` buffer at that row. Speed options (off by default, bit-identical to the plain engine
    when off): ``deepcache_interval`` (engine/deepcache.py), ``decoder="tiny"`` (engine/decoders.py).
    """

    key: Any
    prompt: str
    strength: float | None = 0.5
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    seed: int | None = None
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None
    generator: torch.Generator | None = None
    latents: torch.Tensor | None = None
    eta: float = 0.0
    negative_prompt: str = ""
    out_row: int | None = None
    cohort: _Cohort | None = field(default=None, repr=False)
    adapter: Any = None  # class key of its UNet delta (engine/adapters.py); None: the base UNet
    deepcache_interval: int | None = None  # engine/deepcache.py: a full UNet call every N of its steps; None: off
    decoder: str = "vae"  # engine/decoders.py: "vae" (the checkpoint's decoder) or "tiny" (AutoencoderTiny)


@dataclass
class Finished:
    """A finished sample: ``image`` (3, H, W) float [0, 1] (a view of ``out`` when written there)."""

    key: Any
    image: torch.Tensor
    finite: bool
    latents: torch.Tensor | None = None


def _h2d(values, dtype, device) -> torch.Tensor:
    """Host list -> device tensor without a host sync: on CUDA a pinned staging copy, ``non_blocking``.

    (A plain ``torch.tensor(list, device="cuda")`` copies from pageable memory and waits for the stream.)
    """
    t = torch.tensor(values, dtype=dtype)
    return _stage(t, device)


def _stage(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor -> ``device`` without a sync (pinned staging, ``non_blocking``); declared to SyncDetector."""
    device = torch.device(device)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    elif t.device != device:
        t = t.to(device)
    return staged(t)


def _as_device_row(values, device) -> torch.Tensor:
    """Per-channel values (a list or a tensor anywhere) as a float32 1-D tensor on ``device``, staged once."""
    if isinstance(values, torch.Tensor) and values.device == torch.device(device):
        return values.to(torch.float32).reshape(-1)
    host = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    return _stage(host.cpu().contiguous(), device)


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype).float()


class _Cohort:
    """Members sharing one torch.Generator: every draw is batch-shaped, in the pipeline's order."""

    def __init__(self, generator: torch.Generator, size: int):
        self.generator, self.size = generator, size
        self._step_noise: dict[int, torch.Tensor] = {}

    def draw(self, shape, device, dtype) -> torch.Tensor:
        return _randn((self.size, *shape), self.generator, device, dtype)

    def step_noise(self, i: int, shape, device, dtype) -> torch.Tensor:
        # Drawn when the first member asks; members are in lockstep, so step i's draw comes after step i-1's.
        if i not in self._step_noise:
            self._step_noise = {i: self.draw(shape, device, dtype)}
        return self._step_noise[i]


@dataclass(eq=False)
class _Slot:
    req: Request
    n: int  # denoising steps of this sample
    base: int = 0  # first row of its schedule in the device tables (fused path)
    i: int = 0  # steps done
    seed: int = 0
    draws: bool = False  # its scheduler draws noise every step (DDIM eta > 0, Euler ancestral, LCM)
    quiet_last: bool = False  # ... but not on its last step (LCM: no noise after the final timestep)
    member: int = 0  # index inside its cohort
    group: Any = None  # _Group (unfused path)
    start: tuple = (1.0, 0.0)  # (coef_x, coef_noise) of the SDEdit start


@dataclass(eq=False)
class _Group:
    scheduler: Any
    timesteps: torch.Tensor
    generator: Any  # torch.Generator (cohort) or list of them
    slots: list = field(default_factory=list)
    step_kwargs: dict = field(default_factory=dict)
    accepts_generator: bool = False


def fused_step(unet, x, cond, uncond, rows, cfg_rows, uncond_index, guidance, t_table, c_in_table, coef_table,
               prev_x0=None, noise=None, seeds=None, streams=None, out=None, x0_out=None, dtype=None,
               timestep_cond=None, call=None):  # fmt: skip
    """One fused denoising step for B slots: pure tensor code, no host reads (capturable as one graph).

    ``x`` (B, C, h, w) fp32 latents; ``cond`` (B, L, D) their prompt embeddings; ``uncond`` (>= B, L, D) the
    negative ones; ``rows`` (B,) each slot's row in the schedule tables (``t_table``, ``c_in_table``,
    ``coef_table``); ``cfg_rows`` (K,) the slots with guidance > 1 (or None), whose unconditional predictions
    are UNet rows B..B+K-1 (``uncond_index``); ``dtype`` the UNet's (default: read from it, which walks
    every parameter -- callers in a loop pass it); ``timestep_cond`` (B, D) the UNet's guidance embedding (LCM's
    w-embedding) or None; ``call(xin, t, emb, timestep_cond)`` replaces the plain ``unet(...)`` call (compile,
    DeepCache). Returns ``(x_next, x0)`` from ``cfg_step``.
    """
    from fusionloader.kernels import cfg_step

    t = t_table[rows]
    xin = (x * c_in_table[rows].view(-1, *[1] * (x.dim() - 1))).to(dtype or unet.dtype)
    emb = cond
    if cfg_rows is not None:
        xin = torch.cat([xin, xin[cfg_rows]])
        t = torch.cat([t, t[cfg_rows]])
        emb = torch.cat([cond, uncond[cfg_rows]])
        if timestep_cond is not None:
            timestep_cond = torch.cat([timestep_cond, timestep_cond[cfg_rows]])
    if call is None and timestep_cond is None:
        model_out = unet(xin, t, encoder_hidden_states=emb, return_dict=False)[0]
    elif call is None:
        model_out = unet(xin, t, encoder_hidden_states=emb, timestep_cond=timestep_cond, return_dict=False)[0]
    else:
        model_out = call(xin, t, emb, timestep_cond)
    return cfg_step(
        model_out, x, guidance, uncond_index, coef_table[rows], prev_x0=prev_x0, noise=noise, seeds=seeds,
        streams=streams, out=out, x0_out=x0_out,
    )  # fmt: skip


class Sampler:
    """Continuous-batching SDEdit sampler over one model (see the module docstring).

    Built by :meth:`fusionloader.Synthesizer.sampler`. ``submit`` queues, ``step`` advances every slot by one
    denoising step and returns the samples that finished, ``drain`` steps until nothing is left.
    """

    def __init__(self, components, prompt_cache, capacity: int = 8, resolution=None, out=None, mean=None, std=None,
                 return_latents: bool = False, decode_chunk: int = DEFAULT_DECODE_CHUNK,
                 adapters=None, compile: bool = False, cuda_graphs: bool = False, decoders=None):  # fmt: skip
        from .compile import GraphedStep, unet_call
        from .decoders import Decoders
        from .schedules import fused_kind, guidance_free, lcm_span

        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not isinstance(decode_chunk, int) or decode_chunk < 1:
            raise ValueError(f"decode_chunk must be a positive int, got {decode_chunk!r}")
        self.decode_chunk = decode_chunk
        self.c, self.prompts, self.capacity = components, prompt_cache, int(capacity)
        self.device = components.device
        self.resolution = tuple(resolution or components.resolution)
        f = components.vae_scale_factor
        self.latent_shape = (components.latent_channels, self.resolution[0] // f, self.resolution[1] // f)
        self.numel = math.prod(self.latent_shape)
        self.kind = fused_kind(components.scheduler)
        # "lcm_span": img2img runs all k steps at any strength (LatentConsistencyModelImg2ImgPipeline's rule).
        self.spans_strength = self.kind == "lcm" and lcm_span(components.scheduler)
        # Speed options (docs/CONTRACTS.md "Engine speed options"); all off = the plain engine, bit for bit.
        self.guidance_free = guidance_free(components.scheduler)  # SD-Turbo: no CFG rows whatever the guidance
        self.compile = bool(compile)
        self._call = unet_call(components.unet, compile=self.compile) if self.compile else None
        self.decoders = decoders if decoders is not None else Decoders(components.decoder)
        self._deep = None  # engine/deepcache.DeepCache, made when the first request asks for it
        self._graphs = None
        if cuda_graphs:
            if self.kind is None:
                name = type(components.scheduler).__name__
                raise ValueError(f"cuda_graphs=True needs a fused scheduler; {name} has none")
            self._graphs = GraphedStep(components.device)  # raises off CUDA, naming the device
        # LCM-distilled UNets take the guidance scale as an embedding (time_cond_proj_dim) instead of CFG rows,
        # as StableDiffusionPipeline / LatentConsistencyModelPipeline do: w = guidance - 1, sinusoidal.
        self._w_dim = getattr(components.unet.config, "time_cond_proj_dim", None)
        self._w_freq = None
        if self._w_dim is not None:  # StableDiffusionPipeline.get_guidance_scale_embedding's table, on the host once
            half = self._w_dim // 2
            step = torch.log(torch.tensor(10000.0)) / (half - 1)
            self._w_freq = _stage(torch.exp(torch.arange(half, dtype=torch.float32) * -step), self.device)
        self.out = out
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        # As device tensors once: lists would be copied from pageable memory at every finished batch.
        if mean is not None:
            where = out.device if out is not None else self.device
            mean, std = (_as_device_row(v, where) for v in (mean, std))
        self.out_mean, self.out_std = mean, std
        self.return_latents = return_latents
        self.adapters = adapters  # engine/adapters.ClassAdapters (attached): one class per UNet batch
        self._queue: deque[Request] = deque()
        self._slots: list[_Slot] = []
        shape = (self.capacity, *self.latent_shape)
        # Ping-pong latent and previous-x0 buffers (fp32 whatever the UNet dtype): cfg_step reads one, writes the other.
        self._x = [torch.zeros(shape, device=self.device) for _ in range(2)]
        self._prev = [torch.zeros(shape, device=self.device) for _ in range(2)] if self.kind == "dpmpp_2m" else None
        self._cur = 0
        emb = prompt_cache[""]
        self._cond = torch.zeros((self.capacity, *emb.shape), dtype=emb.dtype, device=self.device)
        self._uncond = torch.zeros_like(self._cond)
        # Fused schedule tables: rows of every (steps, strength, eta) schedule seen so far, concatenated.
        self._sched_rows: dict[tuple, tuple[int, Any]] = {}
        self._t = torch.zeros(0, device=self.device)
        self._c_in = torch.zeros(0, device=self.device)
        self._coefs = torch.zeros(0, 7, device=self.device)
        self.steps_run = 0  # UNet calls so far
        self.trace: list | None = None  # set to a list to record ("unet", rows) / ("decode", n) (benchmarks)
        self.unet_rows = 0  # UNet rows evaluated so far (CFG rows included)
        self.shallow_rows = 0  # ... of which through DeepCache's shallow branch

    # -- queue ------------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests queued or in a slot."""
        return len(self._queue) + len(self._slots)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._slots

    @property
    def active(self) -> int:
        return len(self._slots)

    def submit(self, request: Request) -> None:
        """Validate and queue a request (it joins at the next step with a free slot)."""
        with device_scope(self.device):
            self._submit(request)

    def _submit(self, request: Request) -> None:
        r = request
        if not isinstance(r.prompt, str):
            raise TypeError(f"request {r.key!r}: prompt must be a string, got {type(r.prompt).__name__}")
        if r.num_inference_steps < 1:
            raise ValueError(f"request {r.key!r}: num_inference_steps must be >= 1, got {r.num_inference_steps}")
        if r.strength is not None:
            if not 0.0 < float(r.strength) <= 1.0:
                raise ValueError(f"request {r.key!r}: strength must be in (0, 1], got {r.strength}")
            if self.spans_strength:
                from .schedules import make_schedule

                try:
                    with host_only():  # cached: the step's own lookup finds it
                        make_schedule(self.c.scheduler, int(r.num_inference_steps), float(r.strength))
                except ValueError as e:
                    raise ValueError(f"request {r.key!r}: {e}") from None
            elif int(r.num_inference_steps * r.strength) < 1:
                raise ValueError(
                    f"request {r.key!r}: strength {r.strength} x {r.num_inference_steps} steps leaves no denoising "
                    "step (diffusers denoises int(steps * strength) steps); raise strength or steps"
                )
            lat = r.latents if r.latents is not None else r.latent_mean
            if lat is None:
                raise ValueError(f"request {r.key!r}: img2img (strength {r.strength}) needs latent_mean or latents")
            if tuple(lat.shape) != self.latent_shape:
                raise ValueError(f"request {r.key!r}: latents of shape {tuple(lat.shape)}, expected {self.latent_shape}")
            if r.latent_std is not None and r.latent_std.shape != lat.shape:
                raise ValueError(f"request {r.key!r}: latent_std shape {tuple(r.latent_std.shape)} != {tuple(lat.shape)}")
        if r.guidance_scale < 0:
            raise ValueError(f"request {r.key!r}: guidance_scale must be >= 0, got {r.guidance_scale}")
        self._check_speed_options(r)
        if r.cohort is not None and r.cohort.size > self.capacity:
            raise ValueError(f"a generator shared by {r.cohort.size} samples needs capacity >= {r.cohort.size}")
        if r.out_row is not None and self.out is None:
            raise ValueError("request has out_row but the sampler has no out buffer")
        if r.seed is None and r.generator is None and r.cohort is None:
            r.seed = int(torch.randint(0, 2**62, (1,)).item())  # host RNG, not a device sync
        self.prompts.add([r.prompt, r.negative_prompt])
        self._queue.append(r)

    def _check_speed_options(self, r: Request) -> None:
        from .deepcache import DeepCache, check_interval

        self.decoders.check(r.decoder, r.key)
        if check_interval(r.deepcache_interval, r.key) is not None:
            if self._graphs is not None:
                raise ValueError(f"request {r.key!r}: deepcache_interval is not supported with cuda_graphs=True")
            if self._deep is None:
                self._deep = DeepCache(self.c.unet, self.capacity)  # raises for UNets it cannot split
        if self._graphs is not None and (r.generator is not None or r.cohort is not None):
            raise ValueError(f"request {r.key!r}: cuda_graphs=True needs seeds (in-kernel Philox), not generators")

    def drain(self):
        """Step until every submitted request finished; yields :class:`Finished` in completion order."""
        while not self.idle:
            yield from self.step()

    # -- schedules --------------------------------------------------------------------------------------

    def _schedule(self, r: Request):
        """(first table row, Schedule) of the request's schedule, added to the device tables on first use."""
        from .schedules import make_schedule

        eta = float(r.eta) if self.kind == "ddim" else 0.0
        key = (int(r.num_inference_steps), None if r.strength is None else float(r.strength), eta)
        if key not in self._sched_rows:
            with host_only():  # CPU schedule math, whatever the engine's device
                s = make_schedule(self.c.scheduler, key[0], key[1], eta=eta)
            base = self._t.shape[0]
            # One pinned staging copy for the three tables (a pageable .to(device) would wait for the stream).
            n = s.num_steps
            host = torch.cat([s.timesteps.to(torch.float32).reshape(-1), s.c_in.reshape(-1), s.coefs.reshape(-1)])
            table = _stage(host, self.device)
            self._t = torch.cat([self._t, table[:n]])
            self._c_in = torch.cat([self._c_in, table[n : 2 * n]])
            self._coefs = torch.cat([self._coefs, table[2 * n :].view(n, 7)])
            self._sched_rows[key] = (base, s)
            if self._graphs is not None:
                self._graphs.reset()  # the captured graphs read the old tables' addresses
        return self._sched_rows[key]

    # -- admission --------------------------------------------------------------------------------------

    def _pop_admissible(self) -> list[Request]:
        free = self.capacity - len(self._slots)
        if self.adapters is not None:  # it picks one class's requests and switches the UNet's delta
            return self.adapters.admit(self._queue, free, busy=bool(self._slots))
        joins: list[Request] = []
        while self._queue:
            r = self._queue[0]
            need = r.cohort.size if r.cohort is not None else 1
            if need > free - len(joins):
                break  # keep order: a cohort waits until it fits whole
            for _ in range(need):
                joins.append(self._queue.popleft())
        return joins

    def _initial_latents(self, joins: list[Request]) -> torch.Tensor:
        """x0 = scaling_factor * (mean + std * z) per join (z: Philox stream 0 / the generator's first draw)."""
        dev, shape, sf = self.device, self.latent_shape, self.c.scaling_factor
        x0 = torch.zeros((len(joins), *shape), device=dev)
        sampled = [k for k, r in enumerate(joins) if r.strength is not None and r.latents is None
                   and r.latent_std is not None]  # fmt: skip
        philox = [k for k in sampled if joins[k].cohort is None and joins[k].generator is None]
        z = torch.empty((len(joins), *shape), device=dev)
        if philox:
            from fusionloader.kernels import philox_randn

            seeds, where = _h2d([[joins[k].seed for k in philox], philox], torch.int64, dev)
            z.index_copy_(0, where, philox_randn(seeds, 0, self.numel).view(-1, *shape))
        cohort_z: dict[int, torch.Tensor] = {}
        for k in sampled:
            r = joins[k]
            if r.cohort is not None:  # one batch-shaped draw per cohort, as vae.encode(batch).latent_dist.sample(g)
                if id(r.cohort) not in cohort_z:
                    cohort_z[id(r.cohort)] = r.cohort.draw(shape, dev, self.c.vae_dtype)
                z[k] = cohort_z[id(r.cohort)][self._member[id(r)]]
            elif r.generator is not None:
                z[k] = _randn((1, *shape), r.generator, dev, self.c.vae_dtype)[0]
        for k, r in enumerate(joins):
            if r.strength is None:
                continue  # text-only: x0 unused (coef_x = 0)
            if r.latents is not None:
                x0[k] = r.latents.to(dev, torch.float32)
            elif r.latent_std is None:
                x0[k] = sf * r.latent_mean.to(dev, torch.float32)
            else:
                x0[k] = sf * (r.latent_mean.to(dev, torch.float32) + r.latent_std.to(dev, torch.float32) * z[k])
        return x0

    def _admit(self) -> None:
        from fusionloader.kernels import add_noise

        joins = self._pop_admissible()
        if not joins:
            return
        dev, shape = self.device, self.latent_shape
        # Cohort member indices, in queue order.
        self._member = {}
        counters: dict[int, int] = {}
        for r in joins:
            if r.cohort is not None:
                self._member[id(r)] = counters.get(id(r.cohort), 0)
                counters[id(r.cohort)] = self._member[id(r)] + 1
        x0 = self._initial_latents(joins)
        slots = [self._new_slot(r) for r in joins]
        # Start: x_T = coef_x * x0 + coef_noise * z (stream 1 / the generator's next draw).
        coef_x, coef_n = _h2d([[s.start[0] for s in slots], [s.start[1] for s in slots]], torch.float32, dev)
        b0 = len(self._slots)
        out = self._x[self._cur][b0 : b0 + len(joins)]
        if all(r.cohort is None and r.generator is None for r in joins):
            seeds = _h2d([s.seed for s in slots], torch.int64, dev)
            add_noise(x0, coef_x, coef_n, seeds=seeds, streams=1, out=out)
        else:
            z = torch.empty((len(joins), *shape), device=dev)
            cohort_z: dict[int, torch.Tensor] = {}
            unet_dtype = self.c.dtype
            philox = [k for k, r in enumerate(joins) if r.cohort is None and r.generator is None]
            if philox:
                from fusionloader.kernels import philox_randn

                seeds, where = _h2d([[slots[k].seed for k in philox], philox], torch.int64, dev)
                z.index_copy_(0, where, philox_randn(seeds, 1, self.numel).view(-1, *shape))
            for k, r in enumerate(joins):
                if r.cohort is not None:
                    if id(r.cohort) not in cohort_z:
                        cohort_z[id(r.cohort)] = r.cohort.draw(shape, dev, unet_dtype)
                    z[k] = cohort_z[id(r.cohort)][self._member[id(r)]]
                elif r.generator is not None:
                    z[k] = _randn((1, *shape), r.generator, dev, unet_dtype)[0]
            add_noise(x0, coef_x, coef_n, noise=z, out=out)
        embeds = self.prompts.get([r.prompt for r in joins])
        self._cond[b0 : b0 + len(joins)] = embeds
        cfg = [r.guidance_scale > 1 for r in joins]
        if any(cfg):
            self._uncond[b0 : b0 + len(joins)] = self.prompts.get([r.negative_prompt for r in joins])
        if self._prev is not None:
            self._prev[self._cur][b0 : b0 + len(joins)] = 0
        for s, r in zip(slots, joins):
            s.member = self._member.get(id(r), 0)
        if self.kind is None:
            self._form_groups(slots)
        self._slots.extend(slots)

    def _new_slot(self, r: Request) -> _Slot:
        seed = int(r.seed) if r.seed is not None else 0
        if self.kind is not None:
            base, s = self._schedule(r)
            slot = _Slot(r, n=len(s.timesteps), base=base, seed=seed, draws=bool(s.stochastic),
                         quiet_last=self.kind == "lcm")  # fmt: skip
            slot.start = (float(s.start[0]), float(s.start[1]))
            return slot
        # Unfused: the start coefficients come from the diffusers scheduler itself (see _form_groups).
        slot = _Slot(r, n=0, seed=seed)
        slot.start = self._unfused_start(r)
        return slot

    # -- unfused path -----------------------------------------------------------------------------------

    def _unfused_timesteps(self, r: Request):
        sched = copy.deepcopy(self.c.scheduler)
        n = int(r.num_inference_steps)
        sched.set_timesteps(n, device=self.device)
        order = getattr(sched, "order", 1)
        if r.strength is None:
            t_start = 0
        else:
            t_start = max(n - min(int(n * float(r.strength)), n), 0)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * order)
        return sched, sched.timesteps[t_start * order :]

    def _unfused_start(self, r: Request) -> tuple[float, float]:
        sched, timesteps = self._unfused_timesteps(r)
        if r.strength is None:
            return (0.0, float(sched.init_noise_sigma))
        # add_noise is linear in (x0, noise): probe it once per request for its two coefficients.
        one = torch.ones(1, device=self.device)
        zero = torch.zeros(1, device=self.device)
        t = timesteps[:1]
        cx = sched.add_noise(one, zero, t)
        cn = sched.add_noise(zero, one, t)
        return (float(cx), float(cn))

    def _form_groups(self, slots: list[_Slot]) -> None:
        groups: dict[tuple, _Group] = {}
        for s in slots:
            r = s.req
            key = (int(r.num_inference_steps), r.strength, float(r.guidance_scale), float(r.eta), id(r.cohort))
            if key not in groups:
                sched, timesteps = self._unfused_timesteps(r)
                params = set(inspect.signature(sched.step).parameters)
                kwargs = {"eta": float(r.eta)} if "eta" in params else {}
                g = _Group(sched, timesteps, r.cohort.generator if r.cohort is not None else [], step_kwargs=kwargs)
                g.accepts_generator = "generator" in params
                groups[key] = g
            g = groups[key]
            if r.cohort is None:
                gen = r.generator
                if gen is None:  # Philox has no diffusers twin: seed a torch generator per sample instead
                    gen = torch.Generator(device=self.device).manual_seed(s.seed)
                g.generator.append(gen)
            s.group, s.n = g, len(g.timesteps)
            g.slots.append(s)

    def _unfused_inputs(self, x: torch.Tensor):
        B = len(self._slots)
        xin = torch.empty((B, *self.latent_shape), dtype=self.c.dtype, device=self.device)
        t = torch.empty((B,), dtype=torch.float32, device=self.device)
        for g in {id(s.group): s.group for s in self._slots}.values():
            rows = [self._slots.index(s) for s in g.slots]
            ti = g.timesteps[g.slots[0].i]
            idx = _h2d(rows, torch.int64, self.device)
            xin.index_copy_(0, idx, g.scheduler.scale_model_input(x.index_select(0, idx), ti).to(self.c.dtype))
            t.index_fill_(0, idx, ti.float())
        return xin, t

    def _unfused_update(self, x: torch.Tensor, model_out: torch.Tensor, uncond_index: list[int]) -> None:
        for g in {id(s.group): s.group for s in self._slots}.values():
            rows = [self._slots.index(s) for s in g.slots]
            cfg = uncond_index[rows[0]] >= 0
            # Rows and uncond rows in one pinned staging copy (a Python list index is a pageable copy).
            ints = _h2d(rows + ([uncond_index[b] for b in rows] if cfg else []), torch.int64, self.device)
            idx = ints[: len(rows)]
            c = model_out.index_select(0, idx).float()
            if cfg:
                u = model_out.index_select(0, ints[len(rows) :]).float()
                m = u + g.slots[0].req.guidance_scale * (c - u)
            else:
                m = c
            ti = g.timesteps[g.slots[0].i]
            kwargs = dict(g.step_kwargs)
            if g.accepts_generator:
                kwargs["generator"] = g.generator
            x_g = x.index_select(0, idx).to(self.c.dtype)
            x.index_copy_(0, idx, g.scheduler.step(m.to(self.c.dtype), ti, x_g, return_dict=False, **kwargs)[0].float())

    # -- the step ---------------------------------------------------------------------------------------

    def _step_noise(self, B: int):
        """(noise, seeds, streams) for cfg_step: in-kernel Philox when every slot is seeded."""
        slots, dev = self._slots, self.device
        if not any(s.draws for s in slots):
            return None, None, None
        if all(s.req.cohort is None and s.req.generator is None for s in slots):
            seeds, streams = _h2d([[s.seed for s in slots], [2 + s.i for s in slots]], torch.int64, dev)
            return None, seeds, streams
        from fusionloader.kernels import philox_randn

        noise = torch.zeros((B, *self.latent_shape), device=dev)
        philox = [b for b, s in enumerate(slots) if s.draws and s.req.cohort is None and s.req.generator is None]
        if philox:
            seeds, streams, where = _h2d(
                [[slots[b].seed for b in philox], [2 + slots[b].i for b in philox], philox], torch.int64, dev
            )
            noise.index_copy_(0, where, philox_randn(seeds, streams, self.numel).view(-1, *self.latent_shape))
        for b, s in enumerate(slots):
            if not s.draws or (s.quiet_last and s.i == s.n - 1):  # (its coefficient is 0 there: nothing to add)
                continue
            if s.req.cohort is not None:
                noise[b] = s.req.cohort.step_noise(s.i, self.latent_shape, dev, self.c.dtype)[s.member]
            elif s.req.generator is not None:
                noise[b] = _randn((1, *self.latent_shape), s.req.generator, dev, self.c.dtype)[0]
        return noise, None, None

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """Admit, run one denoising step for every slot, return the samples that finished."""
        with device_scope(self.device):
            return self._step()

    def _guided(self, s: _Slot) -> bool:
        """CFG rows for this slot: guidance > 1, unless the UNet embeds guidance (LCM) or the scheduler is Turbo."""
        return s.req.guidance_scale > 1 and self._w_dim is None and not self.guidance_free

    def _timestep_cond(self, guidance: torch.Tensor) -> torch.Tensor | None:
        """LCM's w-embedding of each slot's guidance (None for UNets without ``time_cond_proj_dim``)."""
        if self._w_dim is None:
            return None
        emb = ((guidance - 1.0) * 1000.0)[:, None] * self._w_freq[None, :]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
        if self._w_dim % 2 == 1:
            emb = torch.nn.functional.pad(emb, (0, 1))
        return emb.to(self.c.dtype)

    def _model_call(self, B: int, cfg: list[int]):
        """The UNet call of this step: None (the plain call), the compiled one, or DeepCache's split."""
        slots = self._slots
        if self._deep is None or not any(s.req.deepcache_interval for s in slots):
            return self._call
        full, full_c, shallow, shallow_c = [], [], [], []
        for r in range(B + len(cfg)):
            b = r if r < B else cfg[r - B]
            n = slots[b].req.deepcache_interval
            is_full = n is None or slots[b].i % n == 0  # its own phase (NOTE in engine/deepcache.py)
            (full if is_full else shallow).append(r)
            (full_c if is_full else shallow_c).append(b if r < B else self.capacity + b)
        self.shallow_rows += len(shallow)
        ints = _h2d(full + full_c + shallow + shallow_c, torch.int64, self.device)
        nf, ns = len(full), len(shallow)
        f, fc = (ints[:nf], ints[nf : 2 * nf]) if nf else (None, None)
        sh, shc = (ints[2 * nf : 2 * nf + ns], ints[2 * nf + ns :]) if ns else (None, None)
        base = self._call or self._plain_call
        return lambda xin, t, emb, tc: self._deep.run(base, xin, t, emb, tc, f, fc, sh, shc)

    def _plain_call(self, xin, t, emb, tc):
        if tc is None:
            return self.c.unet(xin, t, encoder_hidden_states=emb, return_dict=False)[0]
        return self.c.unet(xin, t, encoder_hidden_states=emb, timestep_cond=tc, return_dict=False)[0]

    def _step(self) -> list[Finished]:
        self._admit()
        B = len(self._slots)
        if B == 0:
            return []
        dev, cur = self.device, self._cur
        x = self._x[cur][:B]
        cfg = [b for b, s in enumerate(self._slots) if self._guided(s)]
        uncond_index = [-1] * B
        for k, b in enumerate(cfg):
            uncond_index[b] = B + k
        if self._graphs is not None:
            self._graphed_step(B, cfg)
        elif self.kind is not None:
            # One staging copy for every per-slot integer of this step: [rows | uncond_index | cfg rows].
            ints = _h2d([s.base + s.i for s in self._slots] + uncond_index + cfg, torch.int64, dev)
            rows, uncond_idx, ci = ints[:B], ints[B : 2 * B], (ints[2 * B :] if cfg else None)
            guidance = _h2d([float(s.req.guidance_scale) for s in self._slots], torch.float32, dev)
            noise, seeds, streams = self._step_noise(B)
            nxt = 1 - cur
            fused_step(
                self.c.unet, x, self._cond[:B], self._uncond, rows, ci,
                uncond_idx, guidance, self._t, self._c_in, self._coefs,
                prev_x0=self._prev[cur][:B] if self._prev is not None else None,
                noise=noise, seeds=seeds, streams=streams,
                out=self._x[nxt][:B], x0_out=self._prev[nxt][:B] if self._prev is not None else None,
                dtype=self.c.dtype, timestep_cond=self._timestep_cond(guidance), call=self._model_call(B, cfg),
            )  # fmt: skip
            self._cur = nxt
            self.unet_rows += B + len(cfg)
        else:
            xin, t = self._unfused_inputs(x)
            emb = self._cond[:B]
            tc = None
            if self._w_dim is not None:
                tc = self._timestep_cond(_h2d([float(s.req.guidance_scale) for s in self._slots], torch.float32, dev))
            if cfg:
                ci = _h2d(cfg, torch.int64, dev)
                xin, t, emb = torch.cat([xin, xin[ci]]), torch.cat([t, t[ci]]), torch.cat([emb, self._uncond[ci]])
                tc = torch.cat([tc, tc[ci]]) if tc is not None else None
            model_out = (self._model_call(B, cfg) or self._plain_call)(xin, t, emb, tc)
            self.unet_rows += xin.shape[0]
            self._unfused_update(x, model_out, uncond_index)
        self.steps_run += 1
        if self.trace is not None:
            self.trace.append(("unet", B + len(cfg)))
        for s in self._slots:
            s.i += 1
        done = [b for b, s in enumerate(self._slots) if s.i >= s.n]
        return self._finish(done) if done else []

    def _graphed_step(self, B: int, cfg: list[int]) -> None:
        """The fused step over all ``capacity`` slots with a bucketed CFG batch (engine/compile.py), replayed as a
        CUDA graph per (CFG bucket, ping-pong parity, noise)."""
        from .compile import fixed_plan

        cap, slots, dev, cur = self.capacity, self._slots, self.device, self._cur
        rows, uncond_index, cfg_rows = fixed_plan([s.base + s.i for s in slots], cfg, cap)
        draws = any(s.draws for s in slots)
        seeds = [s.seed for s in slots] + [0] * (cap - B) if draws else []
        streams = [2 + s.i for s in slots] + [2] * (cap - B) if draws else []
        k = len(cfg_rows)
        ints = _h2d(rows + uncond_index + cfg_rows + seeds + streams, torch.int64, dev)
        inputs = dict(rows=ints[:cap], uncond_idx=ints[cap : 2 * cap],
                      guidance=_h2d([float(s.req.guidance_scale) for s in slots] + [1.0] * (cap - B),
                                    torch.float32, dev))  # fmt: skip
        if k:
            inputs["ci"] = ints[2 * cap : 2 * cap + k]
        if draws:
            inputs["seeds"], inputs["streams"] = ints[2 * cap + k : 3 * cap + k], ints[3 * cap + k :]
        nxt = 1 - cur
        prev = self._prev

        def step(rows, uncond_idx, guidance, ci=None, seeds=None, streams=None):
            return fused_step(
                self.c.unet, self._x[cur], self._cond, self._uncond, rows, ci, uncond_idx, guidance,
                self._t, self._c_in, self._coefs, prev_x0=prev[cur] if prev is not None else None,
                seeds=seeds, streams=streams, out=self._x[nxt], x0_out=prev[nxt] if prev is not None else None,
                dtype=self.c.dtype, timestep_cond=self._timestep_cond(guidance), call=self._call,
            )  # fmt: skip

        self._graphs.step(step, (k, cur, draws), inputs)
        self._cur = nxt
        self.unet_rows += cap + k

    def _finish(self, done: list[int]) -> list[Finished]:
        from fusionloader.kernels import postprocess

        dev, cur = self.device, self._cur
        reqs = [self._slots[b].req for b in done]
        out_rows = [r.out_row for r in reqs]
        direct = self.out is not None and all(o is not None for o in out_rows)
        # One staging copy: [slot rows | out rows].
        same = direct and self.out.device == torch.device(dev)
        ints = _h2d(done + (out_rows if same else []), torch.int64, dev)
        lat = self._x[cur].index_select(0, ints[: len(done)])
        rows = (ints[len(done) :] if same else _h2d(out_rows, torch.int64, self.out.device)) if direct else None
        buf = None if direct else torch.empty((len(done), 3, *self.resolution), dtype=torch.float32, device=dev)
        flags = []
        names = [r.decoder for r in reqs]
        if all(n == "vae" for n in names):
            for a in range(0, len(done), self.decode_chunk):  # bounded decoder activations (see the module doc)
                b = min(a + self.decode_chunk, len(done))
                images = self.decode(lat[a:b])
                if self.trace is not None:
                    self.trace.append(("decode", b - a))
                flags.append(torch.isfinite(images).flatten(1).all(1))
                if direct:
                    postprocess(images.to(self.out.device).contiguous(), self.out, rows=rows[a:b], mean=self.out_mean,
                                std=self.out_std)  # fmt: skip
                else:
                    postprocess(images.contiguous(), buf[a:b])
            finite = torch.cat(flags).tolist()  # the one read-back per finished batch, after decoding
        else:
            finite = self._decode_by_decoder(names, lat, out_rows if direct else None, buf)
        imgs = [self.out[o] for o in out_rows] if direct else list(buf)
        result = [
            Finished(r.key, img, bool(ok), lat[k] if self.return_latents else None)
            for k, (r, img, ok) in enumerate(zip(reqs, imgs, finite))
        ]
        self._remove(done)
        return result

    def _decode_by_decoder(self, names, lat, out_rows, buf) -> list[bool]:
        """Finished samples asking for different decoders: each decoder's samples in chunks; finiteness flags in
        the finished order (still one read-back)."""
        from fusionloader.kernels import postprocess

        dev, order, flags = self.device, [], []
        for name in sorted(set(names)):
            pos = [k for k, n in enumerate(names) if n == name]
            for a in range(0, len(pos), self.decode_chunk):
                chunk = pos[a : a + self.decode_chunk]
                sel = _h2d(chunk, torch.int64, dev)
                latents = lat.index_select(0, sel)
                images = self.decode(latents) if name == "vae" else self.decoders.decode(name, latents)
                if self.trace is not None:
                    self.trace.append(("decode", len(chunk)) if name == "vae" else ("decode_" + name, len(chunk)))
                flags.append(torch.isfinite(images).flatten(1).all(1))
                order += chunk
                if out_rows is not None:
                    rows = _h2d([out_rows[k] for k in chunk], torch.int64, self.out.device)
                    postprocess(images.to(self.out.device).contiguous(), self.out, rows=rows, mean=self.out_mean,
                                std=self.out_std)  # fmt: skip
                else:
                    tmp = torch.empty((len(chunk), 3, *self.resolution), dtype=torch.float32, device=dev)
                    postprocess(images.contiguous(), tmp)
                    buf.index_copy_(0, sel, tmp)
        finite = [False] * len(names)
        for k, ok in zip(order, torch.cat(flags).tolist()):  # the one read-back per finished batch
            finite[k] = ok
        return finite

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> decoder output in [-1, 1] (N, 3, H, W), one decoder call."""
        c = self.c
        return c.decoder.decode((latents / c.decoder_scaling_factor).to(c.vae_dtype), return_dict=False)[0]

    def _remove(self, done: list[int]) -> None:
        gone = set(done)
        keep = [b for b in range(len(self._slots)) if b not in gone]
        for s in (self._slots[b] for b in done):
            if s.group is not None:
                s.group.slots.remove(s)
        if keep and keep != list(range(len(keep))):  # compact: live slots stay in rows 0..B'-1
            idx = _h2d(keep, torch.int64, self.device)
            bufs = [self._x[self._cur], self._cond, self._uncond]
            if self._prev is not None:
                bufs.append(self._prev[self._cur])
            for buf in bufs:
                buf[: len(keep)] = buf[idx]
            if self._deep is not None:
                self._deep.compact(idx, len(keep))
        self._slots = [self._slots[b] for b in keep]
