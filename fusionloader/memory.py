"""A producer's memory estimate, logged when it starts (issue 14: device memory must be known up front).

``Synthesizer.memory_estimate(capacity=...)`` is used when the engine has it (the engine knows its own
buffers best); otherwise :func:`estimate_memory` counts what can be counted exactly from the model:
parameter and buffer bytes of every module, the sampler's latent state for ``capacity`` samples (with the
classifier-free-guidance doubling) and one decoded batch, plus this producer's pinned share of the ring.
UNet/VAE activations are not modelled here (they depend on the attention backend and resolution); the
log line says so, and benchmarks/gpu_check.py compares the estimate with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

__all__ = ["estimate_memory", "format_bytes", "memory_estimate"]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _module_bytes(module) -> int:
    if module is None:
        return 0
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_memory(engine, capacity: int, ring_bytes: int = 0) -> dict:
    """Bytes by part for an engine's sampler of ``capacity`` samples: ``weights``, ``latents``, ``decode``,
    ``ring`` and ``total`` (activations excluded; see the module docstring)."""
    c = engine.components
    modules = {id(m): m for m in (c.unet, c.vae, c.decoder, c.text_encoder) if m is not None}  # decoder may be vae
    weights = sum(_module_bytes(m) for m in modules.values())
    channels, h, w = engine.latent_shape
    item = c.dtype.itemsize if hasattr(c.dtype, "itemsize") else 4
    # x_t, x0 and the previous x0 per sample, the UNet input doubled for CFG, and the fp32 model output.
    latents = capacity * channels * h * w * (3 * item + 2 * item + 2 * 4)
    height, width = engine.resolution
    vae_item = c.vae_dtype.itemsize if hasattr(c.vae_dtype, "itemsize") else 4
    decode = capacity * 3 * height * width * (vae_item + 4)  # decoder output and its fp32 post-process
    parts = {"weights": weights, "latents": latents, "decode": decode, "ring": int(ring_bytes)}
    parts["total"] = sum(parts.values())
    return parts


def memory_estimate(engine, capacity: int, ring_bytes: int = 0) -> dict:
    """The engine's own estimate when it has one (``Synthesizer.memory_estimate``), else :func:`estimate_memory`."""
    own = getattr(engine, "memory_estimate", None)
    if callable(own):
        result = own(capacity=capacity)
        if not isinstance(result, dict):
            result = {"engine": int(result), "total": int(result)}
        # Flat byte counts for the log and stats (the engine also breaks weights down per module and dtype).
        byte_keys = ("engine", "unet_activations", "decode_activations", "sampler_buffers", "prompt_cache")
        parts = {k: int(result[k]) for k in byte_keys if isinstance(result.get(k), (int, float))}
        weights = result.get("weights")
        if isinstance(weights, dict):
            parts["weights"] = int(sum(weights.values()))
        parts["ring"] = int(ring_bytes)
        parts["total"] = int(result.get("total", sum(parts.values()) - parts["ring"])) + parts["ring"]
        return parts
    return estimate_memory(engine, capacity, ring_bytes)
