"""Producer devices: names resolved against ``CUDA_VISIBLE_DEVICES``, and a process bound to its device.

Name rule (documented in docs/CONTRACTS.md). ``"cpu"`` stays ``"cpu"``. ``"cuda:N"`` is first read as torch
reads it, a *visible* ordinal: kept when N < the number of devices this process can see. Otherwise, when
``CUDA_VISIBLE_DEVICES`` lists N (a launcher narrowed visibility, e.g. ``CUDA_VISIBLE_DEVICES=6,7`` and
``producer_devices=["cuda:6", "cuda:7"]``), N is read as that *physical* index and mapped to its visible
position (``cuda:6 -> cuda:0``). Anything else is a ``ValueError`` naming the device, what is visible and
the variable. ``"cuda"`` alone means ``cuda:0``. The count is read without creating a CUDA context
(torch counts through NVML where it can), so resolving in the trainer costs no device memory.

Binding (issue 14): a producer calls :func:`bind_process` before anything touches CUDA, so the current
device of its main thread -- where Triton launches and torch's current stream live -- is its own, and no
context is ever created on GPU 0 by a producer that runs on GPU 6.
"""

from __future__ import annotations

import os

import torch

__all__ = ["bind_process", "resolve_device", "visible_cuda_devices"]

GPU_PRODUCER_THREADS = 2  # intra-op threads of a GPU producer: it only launches kernels and copies


def visible_cuda_devices(environ=None) -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (physical ids or UUIDs), or None when it is not set."""
    value = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def resolve_device(device, environ=None, device_count=None) -> str:
    """The name a producer should use for ``device`` in this environment (see the module's rule)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"producer device {device!r} is not a device name ({e})") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise ValueError(f"producer device {device!r}: only 'cpu' and 'cuda:N' producers are supported")
    if not torch.backends.cuda.is_built():
        raise ValueError(f"producer device {device!r} needs CUDA, but this torch build has none "
                         f"(torch {torch.__version__}); use 'cpu' or install a CUDA build of torch")
    index = 0 if dev.index is None else dev.index
    visible = visible_cuda_devices(environ)
    count = torch.cuda.device_count() if device_count is None else device_count
    if index < count:
        return f"cuda:{index}"
    if visible is not None and str(index) in visible[:count]:
        return f"cuda:{visible.index(str(index))}"
    seen = f"CUDA_VISIBLE_DEVICES={','.join(visible)!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
    raise ValueError(f"producer device {device!r} is not visible to this process: {count} CUDA device(s) visible "
                     f"({seen}); name a visible ordinal (cuda:0..cuda:{max(count - 1, 0)}) or a physical id "
                     f"listed in CUDA_VISIBLE_DEVICES")


def bind_process(device: str, threads: int | None) -> None:
    """Make ``device`` this process's (and so this thread's) current device before any other CUDA call, and
    bound torch's intra-op threads: ``threads`` if given, else GPU_PRODUCER_THREADS for a GPU producer
    (its full thread pool would only compete with the trainer's data workers)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        if threads is None:
            threads = GPU_PRODUCER_THREADS
    if threads is not None:
        torch.set_num_threads(int(threads))
