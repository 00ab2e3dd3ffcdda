"""Device-memory estimate of a sampler: weights, activation peaks, buffers, prompt-cache bound.

Activations are not guessed from a formula: the UNet (at the sampler's batch) and the decoder (at one decode
chunk) are rebuilt from their configs on the ``meta`` device and run once under a dispatch mode that adds up
the bytes of every live non-view tensor they create; the peak of that sum is the estimate (what the caching
allocator must hold at once, before fragmentation). On CUDA the attention is SDPA's fused kernel (no L x L
score matrix), so the trace stands in for it with its output alone; on CPU the math path's scores count.
Not included: the CUDA context (~0.3-0.5 GB per process) and allocator fragmentation.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["estimate", "peak_activation_bytes"]


class _LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _release(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new memory
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                self.live += n
                weakref.finalize(t, self._release, n)
        self.peak = max(self.peak, self.live)
        return out


def _fused_sdpa(query, key, value, *args, **kwargs):
    # Flash / memory-efficient attention: only the output (and a per-row logsumexp) is allocated.
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def peak_activation_bytes(module: torch.nn.Module, call, fused_attention: bool) -> int:
    """Peak live bytes of ``call(meta_copy)`` for a meta-device copy of ``module`` (built from its config)."""
    import torch.nn.functional as F

    with torch.device("meta"):
        meta = type(module).from_config(module.config)
    dtype = next(module.parameters()).dtype
    meta = torch.nn.Module.to(meta, dtype).eval()  # (ModelMixin.to warns about fp32-kept modules)
    processors = getattr(module, "attn_processors", None)
    if processors:
        meta.set_attn_processor({k: type(v)() for k, v in processors.items()})
    patch = contextlib.nullcontext()
    if fused_attention:
        patch = _patched(F, "scaled_dot_product_attention", _fused_sdpa)
    tracker = _LiveBytes()
    with torch.inference_mode(), patch, tracker:
        call(meta)
    return int(tracker.peak)


@contextlib.contextmanager
def _patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def _module_bytes(module: torch.nn.Module) -> dict[torch.dtype, int]:
    sizes: dict[torch.dtype, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel() * t.element_size()
    return sizes


def estimate(components, prompt_cache, resolution, capacity: int, decode_chunk: int, guided: bool = True) -> dict:
    """See :meth:`fusionloader.Synthesizer.memory_estimate`."""
    if capacity < 1 or decode_chunk < 1:
        raise ValueError(f"capacity and decode_chunk must be >= 1, got {capacity} and {decode_chunk}")
    c = components
    modules = {"unet": c.unet, "text_encoder": c.text_encoder}
    if c.vae is not None:
        modules["vae"] = c.vae
    if c.decoder is not c.vae:
        modules["decoder"] = c.decoder
    weights, by_dtype = {}, {}
    for name, module in modules.items():
        sizes = _module_bytes(module)
        weights[name] = sum(sizes.values())
        for dtype, n in sizes.items():
            key = str(dtype).replace("torch.", "")
            by_dtype[key] = by_dtype.get(key, 0) + n
    f = c.vae_scale_factor
    h, w = resolution[0] // f, resolution[1] // f
    channels = c.latent_channels
    rows = capacity * (2 if guided else 1)
    seq = int(c.tokenizer.model_max_length)
    hidden = int(c.text_encoder.config.hidden_size)
    fused = c.device.type == "cuda"

    def unet_call(unet):
        x = torch.empty((rows, channels, h, w), dtype=c.dtype, device="meta")
        t = torch.empty((rows,), dtype=torch.float32, device="meta")
        emb = torch.empty((rows, seq, hidden), dtype=c.dtype, device="meta")
        unet(x, t, encoder_hidden_states=emb, return_dict=False)

    def decode_call(decoder):
        decoder.decode(torch.empty((decode_chunk, channels, h, w), dtype=c.vae_dtype, device="meta"), return_dict=False)

    unet_act = peak_activation_bytes(c.unet, unet_call, fused)
    decode_act = peak_activation_bytes(c.decoder, decode_call, fused)
    latent = channels * h * w * 4
    emb_bytes = seq * hidden * torch.finfo(c.dtype).bits // 8
    # Ping-pong latents and previous x0 (fp32), cond/uncond embeddings, the post-process buffer of a finished batch.
    buffers = 4 * capacity * latent + 2 * capacity * emb_bytes + capacity * 3 * resolution[0] * resolution[1] * 4
    bound = prompt_cache.max_size
    cache = None if bound is None else bound * prompt_cache.entry_bytes()
    total = sum(weights.values()) + max(unet_act, decode_act) + buffers + (cache or 0)
    return {
        "device": str(c.device),
        "capacity": capacity,
        "decode_chunk": decode_chunk,
        "unet_rows": rows,
        "weights": weights,
        "weights_by_dtype": by_dtype,
        "unet_activations": unet_act,
        "decode_activations": decode_act,
        "sampler_buffers": buffers,
        "prompt_cache": cache,
        "prompt_cache_size": bound,
        "total": total,
    }
