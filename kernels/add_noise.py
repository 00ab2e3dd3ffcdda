"""SDEdit start: noise every sample of a batch to its own timestep in one pass.

    add_noise(x0: T[B, ...], coef_x: f32[B], coef_noise: f32[B],
              noise: T[B, ...] | None = None, seeds: i64[B] | None = None, streams: i64[B] | int | None = None,
              out: T[B, ...] | None = None) -> T[B, ...]

    x_t[b] = coef_x[b] * x0[b] + coef_noise[b] * z[b],   z = noise, or Philox(seeds[b], streams[b])

The coefficients come from ``fusionloader.engine.schedules.make_schedule(...).start``: (sqrt(abar), sqrt(1-abar))
for DDIM, (1, sigma) for Euler, (alpha_t, sigma_t) for DPM-Solver++, (0, init_noise_sigma) for text-only.
The grid is (sample, block) so each program reads its own sample's two scalars: one launch serves a batch
whose samples sit at different strengths.

Storage fp32/fp16/bf16; arithmetic in fp32. Tolerance against ``add_noise_reference``: fp32 1e-5 relative;
fp16 2e-3 and bf16 1.6e-2 relative to the output's scale (one rounding of the storage dtype, which can flip
when the fp32 results differ in the last bit). ``out`` may alias ``x0`` (each element is read before it is
written by the same program).
"""

from __future__ import annotations

import torch

from ._dispatch import block_size, launch_device, per_sample, resolve, triton_available
from .philox import philox_randn_reference

__all__ = ["add_noise", "add_noise_reference"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _add_noise_kernel(
        x0_ptr,  # [B, numel], any float storage
        coef_x_ptr,  # f32[B]
        coef_noise_ptr,  # f32[B]
        noise_ptr,  # [B, numel] (only read when HAS_NOISE)
        seeds_ptr,  # i64[B] (only read when not HAS_NOISE)
        streams_ptr,  # i64[B]
        out_ptr,  # [B, numel]
        numel,
        HAS_NOISE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        base = b.to(tl.int64) * numel
        x0 = tl.load(x0_ptr + base + offs, mask=mask).to(tl.float32)
        cx = tl.load(coef_x_ptr + b)
        cn = tl.load(coef_noise_ptr + b)
        if HAS_NOISE:
            z = tl.load(noise_ptr + base + offs, mask=mask).to(tl.float32)
        else:
            # Counter = stream * numel + j: the sample's own noise, whatever its slot (see philox.py).
            z = tl.randn(tl.load(seeds_ptr + b), tl.load(streams_ptr + b) * numel + offs.to(tl.int64))
        x_t = cx * x0 + cn * z
        tl.store(out_ptr + base + offs, x_t.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x0, coef_x, coef_noise, noise, seeds, streams, out):
    assert x0.dim() >= 1 and x0.shape[0] >= 1, "x0 must be (B, ...)"
    assert x0.dtype in _FLOATS, f"x0 must be fp32/fp16/bf16, got {x0.dtype}"
    batch = x0.shape[0]
    coef_x = per_sample(coef_x, batch, x0.device, "coef_x")
    coef_noise = per_sample(coef_noise, batch, x0.device, "coef_noise")
    if noise is not None:
        assert seeds is None, "give either noise or seeds, not both"
        assert noise.shape == x0.shape, f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}"
        assert noise.dtype in _FLOATS, f"noise must be fp32/fp16/bf16, got {noise.dtype}"
    else:
        assert seeds is not None, "add_noise needs noise or seeds"
        seeds = per_sample(seeds, batch, x0.device, "seeds", torch.int64)
        # Stream 1 is the SDEdit start noise (docs/CONTRACTS.md).
        streams = per_sample(1 if streams is None else streams, batch, x0.device, "streams", torch.int64)
    if out is None:
        out = torch.empty_like(x0, memory_format=torch.contiguous_format)
    assert out.shape == x0.shape, f"out shape {tuple(out.shape)} != x0 shape {tuple(x0.shape)}"
    assert out.dtype in _FLOATS, f"out must be fp32/fp16/bf16, got {out.dtype}"
    return coef_x, coef_noise, seeds, streams, out


def add_noise_reference(x0, coef_x, coef_noise, noise=None, seeds=None, streams=None, out=None):
    """Torch reference of :func:`add_noise` (same arguments, same result)."""
    coef_x, coef_noise, seeds, streams, out = _check(x0, coef_x, coef_noise, noise, seeds, streams, out)
    batch, numel = x0.shape[0], x0[0].numel()
    if noise is None:
        z = philox_randn_reference(seeds, streams, numel, x0.device)
    else:
        z = noise.reshape(batch, numel).float()
    x_t = coef_x[:, None] * x0.reshape(batch, numel).float() + coef_noise[:, None] * z
    out.copy_(x_t.view(x0.shape))
    return out


def add_noise(x0, coef_x, coef_noise, noise=None, seeds=None, streams=None, out=None):
    """``x_t[b] = coef_x[b] * x0[b] + coef_noise[b] * z[b]``; z = ``noise`` or Philox(``seeds``, ``streams``)."""
    if resolve(x0) == "torch":
        return add_noise_reference(x0, coef_x, coef_noise, noise, seeds, streams, out)
    coef_x, coef_noise, seeds, streams, out = _check(x0, coef_x, coef_noise, noise, seeds, streams, out)
    assert x0.is_contiguous() and out.is_contiguous(), "x0 and out must be contiguous"
    assert noise is None or noise.is_contiguous(), "noise must be contiguous"
    batch, numel = x0.shape[0], x0[0].numel()
    has_noise = noise is not None
    dummy = coef_x  # never dereferenced: the branch using it is compiled out by the constexpr
    block = block_size()
    with launch_device(x0):  # Triton launches on the current device and its current stream
        _add_noise_kernel[(batch, triton.cdiv(numel, block))](
            x0, coef_x, coef_noise,
            noise if has_noise else dummy,
            dummy if has_noise else seeds,
            dummy if has_noise else streams,
            out, numel,
            HAS_NOISE=has_noise, BLOCK=block,
        )  # fmt: skip
    return out
