"""Handing an in-memory model to producer processes: a temporary checkpoint no library can skip writing.

NOTE [rank-independent handoff]: a ``Synthesizer`` built from a pipeline object reaches its producers (spawned
processes that load their own copy onto their own device) as a checkpoint folder. That folder is written here,
not with ``pipeline.save_pretrained``: transformers' ``PreTrainedModel.save_pretrained`` silently writes no
config and no weights on ranks other than 0 once a ``torch.distributed`` process group is initialised
(``should_save_on_this_rank``), so rank 1's producers found an empty ``text_encoder`` folder (issue 13).
Each model is written as its own config (``to_json_string``) plus a safetensors file of its state dict; the
tokenizer (no rank check in any version) with its ``save_pretrained``; then every file a loader needs is
checked to exist, so a library that starts skipping writes fails here, naming the file, not in a producer.

Every rank (every call) writes its own folder: ``mkdtemp`` (mode 0700) named with the rank and pid, so ranks
never race on one path. The folder lives as long as the :class:`LoadSpec` naming it: the producer pool holds
that spec until it closes, and a finaliser removes the folder when the spec is collected or, at the latest,
when the creating process exits. The spec pickles as a plain ``dict`` (the producers get only the path).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref

import torch

__all__ = ["LoadSpec", "write_checkpoint", "write_temp_checkpoint"]

_PIPELINE_CLASS = "StableDiffusionImg2ImgPipeline"


class LoadSpec(dict):
    """``Synthesizer.from_pretrained`` keyword arguments that may own a temporary checkpoint folder.

    The folder is removed when this object is garbage-collected (or the process that made it exits). Pickled,
    it becomes a plain ``dict``: only the process that wrote the folder removes it.
    """

    def __reduce__(self):
        return (dict, (dict(self),))

    def own(self, folder: str) -> None:
        """Remove ``folder`` with this spec (or at interpreter exit), only in the creating process."""
        self._finalizer = weakref.finalize(self, _remove, folder, os.getpid())

    @property
    def folder_alive(self) -> bool:
        """True while this spec still owns a folder that has not been removed."""
        f = getattr(self, "_finalizer", None)
        return f is not None and f.alive

    def release(self) -> None:
        """Remove the owned folder now (idempotent). Producers that still need to load from it will fail."""
        f = getattr(self, "_finalizer", None)
        if f is not None:
            f()


def _remove(folder: str, creator: int) -> None:
    # A forked child (DataLoader worker) inherits the finaliser registry; the folder is not its to remove.
    if os.getpid() == creator:
        shutil.rmtree(folder, ignore_errors=True)


def _rank() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors takes it: contiguous, and no two entries sharing memory (tied weights
    are written twice, which every loader accepts)."""
    out, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach()
        ptr = (value.untyped_storage().data_ptr(), value.device) if value.numel() else None
        if ptr is not None and ptr in seen:
            value = value.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = value.contiguous()
    return out


def _write_model(model, folder: str) -> None:
    """A diffusers ``ModelMixin`` or a transformers ``PreTrainedModel`` as config.json + safetensors weights."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    if hasattr(model, "save_config") and hasattr(model, "config") and isinstance(model.config, dict):
        config = json.loads(model.to_json_string()) if hasattr(model, "to_json_string") else dict(model.config)
        weights = "diffusion_pytorch_model.safetensors"  # diffusers' name
    else:
        config = json.loads(model.config.to_json_string(use_diff=False))
        config["architectures"] = [type(model).__name__]
        weights = "model.safetensors"  # transformers' name
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(_state_dict(model), os.path.join(folder, weights), metadata={"format": "pt"})


def _library(obj) -> str:
    return type(obj).__module__.split(".")[0]


def write_checkpoint(components, folder: str) -> str | None:
    """Write ``components`` (``fusionloader.engine.models.Components``) as a diffusers img2img pipeline folder
    that :func:`~fusionloader.engine.models.load_components` reads, on any rank. Returns the tiny decoder's
    subfolder when the decoder is not the KL VAE, else None."""
    import diffusers

    c = components
    if c.vae is None:
        raise TypeError("cannot hand over a Synthesizer whose pipeline has no AutoencoderKL (tiny decoder only)")
    parts = dict(unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, scheduler=c.scheduler)
    index = {"_class_name": _PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
             "requires_safety_checker": False, "safety_checker": [None, None], "feature_extractor": [None, None]}
    for name, obj in parts.items():
        index[name] = [_library(obj), type(obj).__name__]
        sub = os.path.join(folder, name)
        if name == "tokenizer":
            obj.save_pretrained(sub)
        elif name == "scheduler":
            os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, "scheduler_config.json"), "w", encoding="utf-8") as f:
                f.write(obj.to_json_string() if hasattr(obj, "to_json_string") else json.dumps(dict(obj.config)))
        else:
            _write_model(obj, sub)
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    tiny = None
    if c.decoder is not c.vae:
        tiny = os.path.join(folder, "tiny_vae")
        _write_model(c.decoder, tiny)
    _check_written(folder, tiny)
    return tiny


def _check_written(folder: str, tiny: str | None) -> None:
    need = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json", "text_encoder/model.safetensors"]  # fmt: skip
    if tiny is not None:
        need += ["tiny_vae/config.json", "tiny_vae/diffusion_pytorch_model.safetensors"]
    missing = [p for p in need if not os.path.isfile(os.path.join(folder, p))]
    if not os.listdir(os.path.join(folder, "tokenizer")):
        missing.append("tokenizer/*")
    if missing:
        raise OSError(f"the temporary checkpoint {folder!r} (rank {_rank()}) lacks {missing}: "
                      "a library skipped writing")


def write_temp_checkpoint(components) -> tuple[str, str | None]:
    """:func:`write_checkpoint` into a fresh 0700 folder named by rank and pid; returns (folder, tiny decoder).

    The caller owns the folder (see :meth:`LoadSpec.own`); it is removed here if writing fails."""
    folder = tempfile.mkdtemp(prefix=f"fusionloader-synth-rank{_rank()}-pid{os.getpid()}-")
    try:
        return folder, write_checkpoint(components, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
