"""Triton kernels of fusionloader, installed as ``fusionloader.kernels``.

One kernel per file, each with its torch reference beside it (``<name>_reference``). Calls dispatch to
Triton for CUDA tensors or under ``TRITON_INTERPRET=1`` and to the torch reference otherwise; override with
env ``FUSIONLOADER_KERNELS=auto|torch|triton`` or ``with backend("torch"): ...`` (see ``_dispatch.py``).
The kernels know nothing of diffusers: schedule math arrives as per-sample coefficient rows built by
``fusionloader.engine.schedules``. Launches run under the tensors' CUDA device and its current stream; where
Triton imports but cannot launch (no C compiler, ...) calls fall back to the references with a warning
(``triton_launchable``, ``fallback_reason``).
"""

_HANDED_OVER = False
if __name__ == "kernels":
    # This folder is installed as ``fusionloader.kernels``. It is imported as a top-level ``kernels`` only when a
    # checkout's root is on sys.path (``python -m ...`` run there), where it shadows the Hugging Face ``kernels``
    # package that transformers (>= 5.25) imports: hand the import over to that package when it is installed
    # (without it, this folder loads under the bare name as it always did, which transformers' probe accepts).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # what the import statement returns once this file has run
        _spec.loader.exec_module(_module)
        _HANDED_OVER = True
if not _HANDED_OVER:
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
