"""Decoder output -> training layout in one pass, written straight into a caller's buffer.

    postprocess(decoded: T[N, C, H, W], out: u8|f32|f16|bf16[M, C, H, W], rows: i64[N] | None = None,
                mean: f32[C] | None = None, std: f32[C] | None = None) -> out

    y = clamp(decoded / 2 + 0.5, 0, 1)                       (diffusers' VaeImageProcessor.denormalize)
    out[rows[n]] = round(y * 255)          if out is uint8   (round half to even, as numpy/PIL output does)
    out[rows[n]] = (y - mean[c]) / std[c]  if out is float   (plain y without mean/std)

``rows`` (default ``arange(N)``) lets a producer write a decoded batch directly into free ring-buffer slots;
rows are not bounds-checked on the device (that would need a host sync), so they must be valid. Grid is
(image, channel, block) so each program reads one channel's mean/std.

Tolerance against ``postprocess_reference``: uint8 exact; fp32 1e-6 relative; fp16/bf16 one unit in the
last place of the storage dtype (fp16 1e-3, bf16 8e-3 relative).
"""

from __future__ import annotations

import torch

from ._dispatch import block_size, launch_device, resolve, triton_available

__all__ = ["postprocess", "postprocess_reference"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# 2**23: adding it to a float in [0, 2**23) leaves no fraction bits, so the fp32 add rounds half to even,
# exactly torch.round/np.round. (Triton's libdevice rint is not available in the interpreter.)
_RNE_MAGIC = 8388608.0


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _postprocess_kernel(
        decoded_ptr,  # [N, C, HW], any float storage
        out_ptr,  # [M, C, HW], uint8 or float
        rows_ptr,  # i64[N] (HAS_ROWS)
        mean_ptr,  # f32[C] (NORMALIZE)
        std_ptr,  # f32[C] (NORMALIZE)
        C,
        HW,
        HAS_ROWS: tl.constexpr,
        NORMALIZE: tl.constexpr,
        TO_UINT8: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        n = tl.program_id(0)
        ch = tl.program_id(1)
        offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < HW
        x = tl.load(decoded_ptr + (n.to(tl.int64) * C + ch) * HW + offs, mask=mask).to(tl.float32)
        y = tl.minimum(tl.maximum(x * 0.5 + 0.5, 0.0), 1.0)
        if TO_UINT8:
            v = y * 255.0
            v = (v + 8388608.0) - 8388608.0  # round half to even (see _RNE_MAGIC)
            y = v
        if NORMALIZE:
            y = (y - tl.load(mean_ptr + ch)) / tl.load(std_ptr + ch)
        if HAS_ROWS:
            row = tl.load(rows_ptr + n)
        else:
            row = n.to(tl.int64)
        tl.store(out_ptr + (row * C + ch) * HW + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(decoded, out, rows, mean, std):
    assert decoded.dim() == 4, f"decoded must be (N, C, H, W), got shape {tuple(decoded.shape)}"
    assert decoded.dtype in _FLOATS, f"decoded must be fp32/fp16/bf16, got {decoded.dtype}"
    assert out.dim() == 4 and out.shape[1:] == decoded.shape[1:], (
        f"out {tuple(out.shape)} must be (M, C, H, W) with decoded's per-image shape {tuple(decoded.shape[1:])}"
    )
    assert out.dtype == torch.uint8 or out.dtype in _FLOATS, f"out must be uint8 or float, got {out.dtype}"
    n, c = decoded.shape[:2]
    if rows is None:
        assert out.shape[0] >= n, f"out has {out.shape[0]} rows, decoded has {n} images"
    else:
        rows = torch.as_tensor(rows, device=out.device)
        assert rows.shape == (n,) and rows.dtype in (torch.int32, torch.int64), "rows must be int[N]"
        rows = rows.to(torch.int64).contiguous()
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        if out.dtype == torch.uint8:
            raise ValueError("mean/std normalisation needs a float out buffer, got uint8")
        mean = torch.as_tensor(mean, dtype=torch.float32, device=out.device).reshape(-1).contiguous()
        std = torch.as_tensor(std, dtype=torch.float32, device=out.device).reshape(-1).contiguous()
        assert mean.shape == (c,) and std.shape == (c,), f"mean and std need one value per channel ({c})"
    return rows, mean, std


def postprocess_reference(decoded, out, rows=None, mean=None, std=None):
    """Torch reference of :func:`postprocess` (same arguments, same result)."""
    rows, mean, std = _check(decoded, out, rows, mean, std)
    y = (decoded.float() / 2 + 0.5).clamp(0, 1)
    if out.dtype == torch.uint8:
        y = (y * 255).round()
    elif mean is not None:
        y = (y - mean[:, None, None]) / std[:, None, None]
    y = y.to(out.dtype)
    if rows is None:
        out[: decoded.shape[0]].copy_(y)
    else:
        out.index_copy_(0, rows, y)
    return out


def postprocess(decoded, out, rows=None, mean=None, std=None):
    """Clamp/scale decoder output into ``out`` (uint8 0..255, or float optionally normalised), at ``rows``."""
    if resolve(decoded) == "torch":
        return postprocess_reference(decoded, out, rows, mean, std)
    rows, mean, std = _check(decoded, out, rows, mean, std)
    assert decoded.is_contiguous() and out.is_contiguous(), "decoded and out must be contiguous"
    n, c, h, w = decoded.shape
    dummy = decoded  # stands in for absent inputs; never dereferenced (constexpr branches)
    block = block_size()
    with launch_device(decoded):  # Triton launches on the current device and its current stream
        _postprocess_kernel[(n, c, triton.cdiv(h * w, block))](
            decoded, out,
            rows if rows is not None else dummy,
            mean if mean is not None else dummy,
            std if std is not None else dummy,
            c, h * w,
            HAS_ROWS=rows is not None, NORMALIZE=mean is not None, TO_UINT8=out.dtype == torch.uint8, BLOCK=block,
            # No mul+add -> fma contraction: y * 255 must round on its own, or round-half-even could differ
            # from the reference on exact ties.
            enable_fp_fusion=False,
        )  # fmt: skip
    return out
