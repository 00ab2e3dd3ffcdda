"""Fused classifier-free guidance + scheduler step, every sample at its own timestep and guidance.

    cfg_step(model_out: T[R, ...], sample: T[B, ...], guidance: f32[B], uncond_index: int[B], coefs: f32[B, 7],
             prev_x0: T[B, ...] | None = None, noise: T[B, ...] | None = None,
             seeds: i64[B] | None = None, streams: i64[B] | int | None = None,
             out: T[B, ...] | None = None, x0_out: T[B, ...] | None = None) -> (x_next, x0)

    m      = u + g[b] * (c - u)   if uncond_index[b] >= 0 else c     (c = model_out[b], u = model_out[uncond_index[b]])
    x0     = c0*x + c1*m
    x_next = c2*x + c3*m + c4*x0 + c5*prev_x0 + c6*z                  (z = noise, or Philox(seeds[b], streams[b]))

The guidance combine keeps diffusers' operation order (``uncond + g * (text - uncond)``). Rows 0..B-1 of
``model_out`` are the conditional predictions; the unconditional ones sit anywhere after (only samples with
guidance > 1 need one, so the UNet batch is B + #guided, not 2B). ``coefs`` carries all scheduler-specific
math (DDIM with eta, Euler discrete, DPM-Solver++(2M), epsilon / v / sample prediction), built per step by
``fusionloader.engine.schedules.make_schedule``: the kernel only does per-element arithmetic, so one compiled
kernel serves every scheduler, and the loop needs no host sync (capturable as one CUDA graph).
``x0`` is returned because DPM-Solver++(2M) needs it as the next step's ``prev_x0``. Terms whose input is
absent (no ``prev_x0``; no noise and no seeds) are skipped: their coefficients must then be zero. A zero
``c5``/``c6`` ignores its input entirely, so a fresh slot's uninitialised ``prev_x0`` cannot leak NaN in.

Storage fp32/fp16/bf16 (mixable), arithmetic in fp32. Tolerance against ``cfg_step_reference``: fp32 1e-5
relative; fp16 2e-3, bf16 1.6e-2 relative to the output's scale (one rounding of the storage dtype).
In place is safe: ``out`` may alias ``sample`` and ``x0_out`` may alias ``prev_x0`` (each program reads all of
its elements before writing them).
"""

from __future__ import annotations

import torch

from ._dispatch import block_size, launch_device, per_sample, resolve, triton_available
from .philox import philox_randn_reference

__all__ = ["cfg_step", "cfg_step_reference"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _cfg_step_kernel(
        model_out_ptr,  # [R, numel]: conditional rows 0..B-1, unconditional rows anywhere
        sample_ptr,  # [B, numel]
        guidance_ptr,  # f32[B]
        uncond_index_ptr,  # i64[B], -1 = no CFG
        coefs_ptr,  # f32[B, 7]
        prev_x0_ptr,  # [B, numel] (HAS_PREV)
        noise_ptr,  # [B, numel] (NOISE == 1)
        seeds_ptr,  # i64[B] (NOISE == 2)
        streams_ptr,  # i64[B] (NOISE == 2)
        out_ptr,  # [B, numel], may alias sample_ptr
        x0_out_ptr,  # [B, numel], may alias prev_x0_ptr
        numel,
        HAS_PREV: tl.constexpr,
        NOISE: tl.constexpr,  # 0 none, 1 tensor, 2 Philox
        BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        base = b.to(tl.int64) * numel

        # All loads first, stores last: that ordering is what makes out=sample / x0_out=prev_x0 safe.
        g = tl.load(guidance_ptr + b)
        u_row = tl.load(uncond_index_ptr + b)
        has_u = u_row >= 0
        c = tl.load(model_out_ptr + base + offs, mask=mask).to(tl.float32)
        # Samples without CFG skip the second read (the broadcast keeps the mask a block, which the
        # interpreter needs).
        u_mask = mask & (tl.zeros([BLOCK], dtype=tl.int64) + u_row >= 0)
        u = tl.load(model_out_ptr + tl.maximum(u_row, 0) * numel + offs, mask=u_mask, other=0.0)
        u = u.to(tl.float32)
        x = tl.load(sample_ptr + base + offs, mask=mask).to(tl.float32)
        c0 = tl.load(coefs_ptr + b * 7 + 0)
        c1 = tl.load(coefs_ptr + b * 7 + 1)
        c2 = tl.load(coefs_ptr + b * 7 + 2)
        c3 = tl.load(coefs_ptr + b * 7 + 3)
        c4 = tl.load(coefs_ptr + b * 7 + 4)

        m = tl.where(has_u, u + g * (c - u), c)
        x0 = c0 * x + c1 * m
        x_next = c2 * x + c3 * m + c4 * x0
        # A zero coefficient drops its term outright (where, not 0 * p): a slot's prev_x0 before its first
        # DPM step, or an unused noise buffer, may hold stale inf/NaN, and 0 * NaN is NaN.
        if HAS_PREV:
            c5 = tl.load(coefs_ptr + b * 7 + 5)
            p = tl.load(prev_x0_ptr + base + offs, mask=mask).to(tl.float32)
            x_next += tl.where(c5 != 0.0, c5 * p, 0.0)
        if NOISE == 1:
            c6 = tl.load(coefs_ptr + b * 7 + 6)
            z = tl.load(noise_ptr + base + offs, mask=mask).to(tl.float32)
            x_next += tl.where(c6 != 0.0, c6 * z, 0.0)
        if NOISE == 2:
            c6 = tl.load(coefs_ptr + b * 7 + 6)
            z = tl.randn(tl.load(seeds_ptr + b), tl.load(streams_ptr + b) * numel + offs.to(tl.int64))
            x_next += c6 * z

        tl.store(x0_out_ptr + base + offs, x0.to(x0_out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + base + offs, x_next.to(out_ptr.dtype.element_ty), mask=mask)


def _check(model_out, sample, guidance, uncond_index, coefs, prev_x0, noise, seeds, streams, out, x0_out):
    assert sample.dim() >= 1 and sample.shape[0] >= 1, "sample must be (B, ...)"
    batch = sample.shape[0]
    assert sample.dtype in _FLOATS, f"sample must be fp32/fp16/bf16, got {sample.dtype}"
    assert model_out.dtype in _FLOATS, f"model_out must be fp32/fp16/bf16, got {model_out.dtype}"
    assert model_out.shape[1:] == sample.shape[1:] and model_out.shape[0] >= batch, (
        f"model_out {tuple(model_out.shape)} must be (R >= B, ...) with sample's per-sample shape "
        f"{tuple(sample.shape)}"
    )
    guidance = per_sample(guidance, batch, sample.device, "guidance")
    uncond_index = per_sample(uncond_index, batch, sample.device, "uncond_index", torch.int64)
    coefs = torch.as_tensor(coefs, device=sample.device)
    assert coefs.shape == (batch, 7), f"coefs must be ({batch}, 7), got {tuple(coefs.shape)}"
    coefs = coefs.to(torch.float32).contiguous()
    for name, t in (("prev_x0", prev_x0), ("noise", noise)):
        if t is not None:
            assert t.shape == sample.shape, f"{name} shape {tuple(t.shape)} != sample shape {tuple(sample.shape)}"
            assert t.dtype in _FLOATS, f"{name} must be fp32/fp16/bf16, got {t.dtype}"
    if noise is not None:
        assert seeds is None, "give either noise or seeds, not both"
    if seeds is not None:
        assert streams is not None, "Philox noise needs streams (2 + step index, docs/CONTRACTS.md)"
        seeds = per_sample(seeds, batch, sample.device, "seeds", torch.int64)
        streams = per_sample(streams, batch, sample.device, "streams", torch.int64)
    if out is None:
        out = torch.empty_like(sample, memory_format=torch.contiguous_format)
    if x0_out is None:
        x0_out = torch.empty_like(sample, memory_format=torch.contiguous_format)
    for name, t in (("out", out), ("x0_out", x0_out)):
        assert t.shape == sample.shape, f"{name} shape {tuple(t.shape)} != sample shape {tuple(sample.shape)}"
        assert t.dtype in _FLOATS, f"{name} must be fp32/fp16/bf16, got {t.dtype}"
    return guidance, uncond_index, coefs, seeds, streams, out, x0_out


def cfg_step_reference(
    model_out, sample, guidance, uncond_index, coefs, prev_x0=None, noise=None, seeds=None, streams=None,
    out=None, x0_out=None,
):  # fmt: skip
    """Torch reference of :func:`cfg_step` (same arguments, same result, no host sync)."""
    guidance, uncond_index, coefs, seeds, streams, out, x0_out = _check(
        model_out, sample, guidance, uncond_index, coefs, prev_x0, noise, seeds, streams, out, x0_out
    )
    batch, numel = sample.shape[0], sample[0].numel()
    flat = model_out.reshape(model_out.shape[0], numel)
    c = flat[:batch].float()
    # Gather with a clamped index and select with where, not boolean indexing: no data-dependent shapes.
    u = flat.index_select(0, uncond_index.clamp_min(0)).float()
    g = guidance[:, None]
    m = torch.where((uncond_index >= 0)[:, None], u + g * (c - u), c)
    x = sample.reshape(batch, numel).float()
    k = coefs.unbind(1)
    x0 = k[0][:, None] * x + k[1][:, None] * m
    x_next = k[2][:, None] * x + k[3][:, None] * m + k[4][:, None] * x0
    # A zero coefficient drops its term outright, even if its input holds stale inf/NaN (see the kernel).
    if prev_x0 is not None:
        c5 = k[5][:, None]
        x_next = x_next + torch.where(c5 != 0, c5 * prev_x0.reshape(batch, numel).float(), 0.0)
    if noise is not None:
        c6 = k[6][:, None]
        x_next = x_next + torch.where(c6 != 0, c6 * noise.reshape(batch, numel).float(), 0.0)
    elif seeds is not None:
        x_next = x_next + k[6][:, None] * philox_randn_reference(seeds, streams, numel, sample.device)
    # Everything is computed before anything is written, so in-place calls are safe here too.
    x0_out.copy_(x0.view(sample.shape))
    out.copy_(x_next.view(sample.shape))
    return out, x0_out


def cfg_step(
    model_out, sample, guidance, uncond_index, coefs, prev_x0=None, noise=None, seeds=None, streams=None,
    out=None, x0_out=None,
):  # fmt: skip
    """CFG combine + one scheduler step for every sample; returns ``(x_next, x0)``."""
    if resolve(sample) == "torch":
        return cfg_step_reference(
            model_out, sample, guidance, uncond_index, coefs, prev_x0, noise, seeds, streams, out, x0_out
        )
    guidance, uncond_index, coefs, seeds, streams, out, x0_out = _check(
        model_out, sample, guidance, uncond_index, coefs, prev_x0, noise, seeds, streams, out, x0_out
    )
    for name, t in (("model_out", model_out), ("sample", sample), ("prev_x0", prev_x0), ("noise", noise),
                    ("out", out), ("x0_out", x0_out)):  # fmt: skip
        assert t is None or t.is_contiguous(), f"{name} must be contiguous"
    batch, numel = sample.shape[0], sample[0].numel()
    noise_mode = 1 if noise is not None else 2 if seeds is not None else 0
    dummy = coefs  # stands in for absent inputs; never dereferenced (constexpr branches)
    block = block_size()
    with launch_device(sample):  # Triton launches on the current device and its current stream
        _cfg_step_kernel[(batch, triton.cdiv(numel, block))](
            model_out, sample, guidance, uncond_index, coefs,
            prev_x0 if prev_x0 is not None else dummy,
            noise if noise is not None else dummy,
            seeds if seeds is not None else dummy,
            streams if seeds is not None else dummy,
            out, x0_out, numel,
            HAS_PREV=prev_x0 is not None, NOISE=noise_mode, BLOCK=block,
        )  # fmt: skip
    return out, x0_out
