"""Which implementation a kernel call runs: the Triton kernel or its torch reference.

Rule (docs/CONTRACTS.md): Triton when the tensors are on CUDA, or when ``TRITON_INTERPRET=1`` (Triton's
interpreter then runs the kernel on CPU tensors, which is how CI tests the kernels); the torch reference
otherwise. Two overrides, the context manager winning over the environment:

- env ``FUSIONLOADER_KERNELS=auto|torch|triton`` (default ``auto``);
- ``with fusionloader.kernels.backend("torch"): ...``.

Triton is imported guarded (``triton_available``): without it, or with a broken install, the package still
imports and every call runs the torch reference. Nothing here has side effects at import.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

__all__ = ["BACKENDS", "backend", "block_size", "per_sample", "resolve", "triton_available"]

BACKENDS = ("auto", "torch", "triton")

# Set by backend(). A plain module global rather than a ContextVar: torch.compile (dynamo) traces
# reads of module globals (and guards on them), while ContextVar.get() is a graph break. It is
# process-wide; producers are processes, and the override is meant for tests and benchmarks.
_forced: str | None = None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works here."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing libcuda on a CPU box, ...)
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_size() -> int:
    """Elements per program for the elementwise kernels."""
    # The interpreter pays per program, not per element: bigger blocks make the CPU tests fast.
    return 8192 if _interpreting() else 1024


def _mode() -> str:
    if _forced is not None:
        return _forced
    mode = os.environ.get("FUSIONLOADER_KERNELS", "auto").strip().lower() or "auto"
    if mode not in BACKENDS:
        raise ValueError(f"FUSIONLOADER_KERNELS={mode!r}; expected one of {', '.join(BACKENDS)}")
    return mode


@contextlib.contextmanager
def backend(name: str):
    """Force every kernel call inside the block onto ``"triton"``, ``"torch"`` or ``"auto"`` dispatch."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def resolve(tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the implementation a kernel call on ``tensor`` runs."""
    mode = _mode()
    if mode == "torch":
        return "torch"
    if torch.compiler.is_compiling():
        # The interpreter cannot be traced; CUDA Triton kernels can (dynamo supports user kernels).
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    runnable = tensor.is_cuda or _interpreting()
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("FUSIONLOADER_KERNELS/backend asks for triton, but triton cannot be imported")
        if not runnable:
            raise RuntimeError(
                f"triton kernels need CUDA tensors or TRITON_INTERPRET=1 (set before importing triton); "
                f"got a tensor on {tensor.device}"
            )
        return "triton"
    return "triton" if runnable and triton_available() else "torch"


def per_sample(values, batch: int, device, name: str, dtype=torch.float32) -> torch.Tensor:
    """``values`` (a tensor, a sequence, or one number for every sample) as a contiguous (batch,) tensor.

    No host sync: a tensor already on ``device`` is only cast, never read back.
    """
    if isinstance(values, (int, float)):
        return torch.full((batch,), values, dtype=dtype, device=device)
    t = torch.as_tensor(values, device=device)
    assert t.shape == (batch,), f"{name} must have shape ({batch},) (one per sample), got {tuple(t.shape)}"
    return t.to(dtype).contiguous()
