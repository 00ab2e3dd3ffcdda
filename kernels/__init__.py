"""Triton kernels of fusionloader, installed as ``fusionloader.kernels``.

One kernel per file, each with its torch reference beside it (``<name>_reference``). Calls dispatch to
Triton for CUDA tensors or under ``TRITON_INTERPRET=1`` and to the torch reference otherwise; override with
env ``FUSIONLOADER_KERNELS=auto|torch|triton`` or ``with backend("torch"): ...`` (see ``_dispatch.py``).
The kernels know nothing of diffusers: schedule math arrives as per-sample coefficient rows built by
``fusionloader.engine.schedules``. Launches run under the tensors' CUDA device and its current stream; where
Triton imports but cannot launch (no C compiler, ...) calls fall back to the references with a warning
(``triton_launchable``, ``fallback_reason``).
"""

from ._dispatch import backend, fallback_reason, triton_launchable
from .add_noise import add_noise, add_noise_reference
from .cfg_step import cfg_step, cfg_step_reference
from .philox import philox_randn, philox_randn_reference
from .postprocess import postprocess, postprocess_reference

__all__ = [
    "add_noise",
    "add_noise_reference",
    "backend",
    "cfg_step",
    "cfg_step_reference",
    "fallback_reason",
    "philox_randn",
    "philox_randn_reference",
    "postprocess",
    "postprocess_reference",
    "triton_launchable",
]
