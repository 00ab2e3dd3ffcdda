"""Per-sample counter-based Gaussian noise: Triton's ``tl.randn`` and a torch twin giving the same numbers.

Element ``j`` of sample ``b`` in stream ``k`` is ``tl.randn(seeds[b], k * numel + j)`` (docs/CONTRACTS.md).
Streams: 0 = VAE latent sample, 1 = SDEdit start noise, 2 + i = noise of the sample's own step i. Because
the counter depends only on (seed, stream, j), a sample's noise never depends on its batch-mates, its slot
or the launch grid: that is what makes continuous batching batch-invariant.

``tl.randn`` is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) on
the counter (offset_lo, offset_hi, 0, 0) with key (seed_lo, seed_hi), then Box-Muller on the first two
output words (triton/language/random.py). ``philox_randn_reference`` redoes that arithmetic with int64
torch ops masked to 32 bits, so the torch fallback and the CUDA graph path draw identical noise (to the
last bits of log/cos, ~1e-6).

    philox_randn(seeds: int64[B], streams: int64[B] | int, numel: int, device=None) -> float32[B, numel]
"""

from __future__ import annotations

import torch

from ._dispatch import block_size, launch_device, resolve, triton_available

__all__ = ["philox_randn", "philox_randn_reference"]

_M32 = 0xFFFFFFFF
# Philox4x32 constants (random.py, uint32 branch).
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_N_ROUNDS = 10
# uint_to_uniform_float's scale for 32-bit words, and Box-Muller's 2*pi, as random.py has them.
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586


def _as_index_tensor(values, batch: int | None, device, name: str) -> torch.Tensor:
    if isinstance(values, int):
        assert batch is not None, f"{name} given as an int needs the batch size"
        return torch.full((batch,), values, dtype=torch.int64, device=device)
    t = torch.as_tensor(values, device=device)
    assert t.dtype in (torch.int32, torch.int64), f"{name} must be an integer tensor, got {t.dtype}"
    assert t.dim() == 1, f"{name} must be 1-D (one per sample), got shape {tuple(t.shape)}"
    return t.to(torch.int64)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (hi, lo) 32-bit words of the 64-bit product a*b of two uint32s, without overflowing int64:
    # split the constant into 16-bit halves so every partial product stays below 2**48.
    p_hi = b * (a >> 16)
    p_lo = b * (a & 0xFFFF)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def _uniform(word: torch.Tensor) -> torch.Tensor:
    # uint_to_uniform_float: bitcast to int32, fold negatives with ~x, scale into [0, 1).
    signed = torch.where(word >= 2**31, word - 2**32, word)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=word.device)


def philox_randn_reference(seeds, streams, numel: int, device=None) -> torch.Tensor:
    """Torch twin of ``tl.randn(seeds[b], streams[b] * numel + j)``: float32 (B, numel)."""
    if device is None:
        device = seeds.device if isinstance(seeds, torch.Tensor) else torch.device("cpu")
    seeds = _as_index_tensor(seeds, None, device, "seeds")
    streams = _as_index_tensor(streams, seeds.shape[0], device, "streams")
    assert streams.shape == seeds.shape, "seeds and streams need one entry per sample"
    offset = streams[:, None] * numel + torch.arange(numel, dtype=torch.int64, device=device)[None, :]
    # randint4x: counter = (offset_lo, offset_hi, 0, 0); philox: key = (seed_lo, seed_hi).
    c0 = offset & _M32
    c1 = (offset >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = (seeds & _M32)[:, None]
    k1 = ((seeds >> 32) & _M32)[:, None]
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    # randn: Box-Muller on the first two words, float32 throughout like the kernel.
    u1 = torch.clamp_min(_uniform(c0), 1.0e-7)
    u2 = _uniform(c1)
    th = torch.tensor(_TWO_PI, dtype=torch.float32, device=device) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _philox_randn_kernel(
        seeds_ptr,  # int64[B]
        streams_ptr,  # int64[B]
        out_ptr,  # float32[B, numel]
        numel,
        BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        seed = tl.load(seeds_ptr + b)
        stream = tl.load(streams_ptr + b)
        # int64 counter: stream * numel can pass 2**31 for image-sized samples.
        z = tl.randn(seed, stream * numel + offs.to(tl.int64))
        tl.store(out_ptr + b.to(tl.int64) * numel + offs, z, mask=mask)


def philox_randn(seeds, streams, numel: int, device=None) -> torch.Tensor:
    """Per-sample Philox Gaussian noise, float32 (B, numel); the same numbers on every backend."""
    if device is None:
        device = seeds.device if isinstance(seeds, torch.Tensor) else torch.device("cpu")
    seeds = _as_index_tensor(seeds, None, device, "seeds").contiguous()
    streams = _as_index_tensor(streams, seeds.shape[0], device, "streams").contiguous()
    assert streams.shape == seeds.shape, "seeds and streams need one entry per sample"
    assert numel >= 1, "numel must be positive"
    if resolve(seeds) == "torch":
        return philox_randn_reference(seeds, streams, numel, device)
    out = torch.empty(seeds.shape[0], numel, dtype=torch.float32, device=device)
    block = block_size()
    with launch_device(seeds):  # Triton launches on the current device and its current stream
        _philox_randn_kernel[(seeds.shape[0], triton.cdiv(numel, block))](seeds, streams, out, numel, BLOCK=block)
    return out
