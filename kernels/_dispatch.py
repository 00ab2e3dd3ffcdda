"""Which implementation a kernel call runs: the Triton kernel or its torch reference.

Rule (docs/CONTRACTS.md): Triton when the tensors are on CUDA, or when ``TRITON_INTERPRET=1`` (Triton's
interpreter then runs the kernel on CPU tensors, which is how CI tests the kernels); the torch reference
otherwise. Two overrides, the context manager winning over the environment:

- env ``FUSIONLOADER_KERNELS=auto|torch|triton`` (default ``auto``);
- ``with fusionloader.kernels.backend("torch"): ...``.

Triton is imported guarded (``triton_available``): without it, or with a broken install, the package still
imports and every call runs the torch reference. Importing is not launching: where Triton cannot build its
launcher (no C compiler in a slim CUDA image, no driver), ``triton_launchable`` finds out once per device
by launching a one-element probe kernel, warns, and auto dispatch then runs the torch references
(``fallback_reason()`` says why). Nothing here has side effects at import.

Launches happen under the tensors' device (``launch_device``): Triton launches on the *current* CUDA device
and that device's current stream, so a call on ``cuda:6`` tensors from a process whose current device is 0
would otherwise run on GPU 0 with pointers into GPU 6.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

__all__ = [
    "BACKENDS",
    "backend",
    "block_size",
    "fallback_reason",
    "launch_device",
    "per_sample",
    "resolve",
    "triton_available",
    "triton_launchable",
]

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


# Probe results per device key ("interpreter", "cuda:0", ...): None = launchable, else why not.
_probes: dict[str, str | None] = {}


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return "interpreter"


def _probe_launch(device: torch.device) -> None:
    """Launch a one-element kernel on ``device`` (raises whatever Triton raises when it cannot)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)

    x = torch.zeros(1, device=device)
    with launch_device(x):
        _probe_kernel[(1,)](x, 1, BLOCK=16)
    if float(x[0]) != 1.0:  # once per process and device, at the first kernel call: not in a loop
        raise RuntimeError(f"the probe kernel ran but wrote {float(x[0])} instead of 1.0")


def triton_launchable(device: torch.device | str) -> bool:
    """True when a Triton kernel can actually be compiled and launched for ``device`` (probed once, cached).

    A failure (e.g. "Failed to find C compiler", a missing driver) warns once and makes auto dispatch run
    the torch references for that device from then on.
    """
    if not triton_available():
        return False
    device = torch.device(device)
    key = _device_key(device)
    if key not in _probes:
        try:
            _probe_launch(device if device.type == "cuda" else torch.device("cpu"))
            _probes[key] = None
        except Exception as e:  # noqa: BLE001 - any failure to build or launch means: use the references
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            _probes[key] = reason
            warnings.warn(
                f"fusionloader.kernels: Triton cannot launch on {key} ({reason}); using the torch references "
                "(same results, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
    return _probes[key] is None


def fallback_reason(device: torch.device | str | None = None) -> str | None:
    """Why kernel calls fall back to the torch references (None: Triton launches, or was never probed).

    ``device=None`` reports the first failed probe of any device.
    """
    if not triton_available():
        return "triton cannot be imported"
    if device is None:
        return next((r for r in _probes.values() if r is not None), None)
    return _probes.get(_device_key(torch.device(device)))


def launch_device(tensor: torch.Tensor):
    """Context under which a Triton kernel on ``tensor`` must launch: its CUDA device (and so that device's
    current stream); a no-op for CPU tensors (the interpreter) and inside torch.compile (Inductor guards the
    device of the kernels it calls itself)."""
    if tensor.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


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
        if not triton_launchable(tensor.device):
            raise RuntimeError(
                f"FUSIONLOADER_KERNELS/backend asks for triton, but it cannot launch on {tensor.device}: "
                f"{fallback_reason(tensor.device)}"
            )
        return "triton"
    return "triton" if runnable and triton_available() and triton_launchable(tensor.device) else "torch"


def per_sample(values, batch: int, device, name: str, dtype=torch.float32) -> torch.Tensor:
    """``values`` (a tensor, a sequence, or one number for every sample) as a contiguous (batch,) tensor.

    No host sync: a tensor already on ``device`` is only cast, never read back.
    """
    if isinstance(values, (int, float)):
        return torch.full((batch,), values, dtype=dtype, device=device)
    t = torch.as_tensor(values, device=device)
    assert t.shape == (batch,), f"{name} must have shape ({batch},) (one per sample), got {tuple(t.shape)}"
    return t.to(dtype).contiguous()
