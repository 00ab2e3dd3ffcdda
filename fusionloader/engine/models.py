"""Load the diffusers components the engine runs: UNet, VAE (or a tiny decoder), text encoder, tokenizer, scheduler.

Two entry points: :func:`load_components` (a local checkpoint folder or a hub id; ``local_files_only`` follows
``HF_HUB_OFFLINE`` unless given) and :func:`components_from_pipe` (an already-built diffusers pipeline).
Precision: the UNet and text encoder run in ``dtype``; the VAE in ``vae_dtype`` (default ``dtype``) because
the SD-1.x VAE overflows in fp16 -- pass ``vae_dtype=torch.float32`` with a half UNet.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

from .errors import MissingComponentError

__all__ = ["ATTENTION_BACKENDS", "Components", "components_from_pipe", "load_components", "set_attention"]

ATTENTION_BACKENDS = ("sdpa", "xformers")
# Components the engine needs, in the order they are checked (and named in errors).
_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Components:
    """The modules of one Stable-Diffusion-shaped model, on one device.

    ``vae`` encodes (always an ``AutoencoderKL``, or None when only a tiny decoder was given); ``decoder`` decodes
    (the VAE itself or an ``AutoencoderTiny``). Latents live in the UNet's scaled space:
    ``x0 = vae.config.scaling_factor * posterior_sample`` and the decoder receives
    ``latents / decoder.config.scaling_factor`` (TAESD's factor is 1.0: it decodes scaled latents directly).
    """

    unet: torch.nn.Module
    vae: torch.nn.Module | None
    decoder: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        vae = self.vae if self.vae is not None else self.decoder
        channels = getattr(vae.config, "block_out_channels", None)
        if channels is not None:
            return 2 ** (len(channels) - 1)
        return 2 ** int(getattr(vae.config, "upsampling_scaling_factor", 2) + 1)  # TAESD: 8

    @property
    def resolution(self) -> tuple[int, int]:
        """Default generation resolution (H, W) in pixels: the UNet's sample size times the VAE factor."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (size[0] * self.vae_scale_factor, size[1] * self.vae_scale_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def scaling_factor(self) -> float:
        """Factor between the encoder's posterior and the UNet's latent space."""
        vae = self.vae if self.vae is not None else self.decoder
        return float(vae.config.scaling_factor)

    @property
    def decoder_scaling_factor(self) -> float:
        return float(self.decoder.config.scaling_factor)


def _default_local_only(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return bool(local_files_only)
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - old hub versions
        return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def _component_classes(path_or_id: str, local_only: bool, revision: str | None) -> dict[str, tuple[str, str]]:
    """Read ``model_index.json``: component name -> (library, class name)."""
    if os.path.isdir(path_or_id):
        index = os.path.join(path_or_id, "model_index.json")
        if not os.path.isfile(index):
            raise MissingComponentError(path_or_id, "model_index.json", "not a diffusers pipeline folder")
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(path_or_id, local_files_only=local_only, revision=revision)
    except (OSError, ValueError) as e:
        raise MissingComponentError(str(path_or_id), "model_index.json", str(e)) from e
    classes = {}
    for name in _REQUIRED:
        entry = config.get(name)
        if not entry or entry[0] is None or entry[1] is None:
            raise MissingComponentError(str(path_or_id), name, "listed as null or absent in model_index.json")
        classes[name] = (entry[0], entry[1])
    if os.path.isdir(path_or_id):
        for name in _REQUIRED:
            sub = os.path.join(path_or_id, name)
            if not os.path.isdir(sub):
                raise MissingComponentError(path_or_id, name, f"folder {sub!r} does not exist")
    return classes


def _load_one(location, name, library, class_name, local_only, revision, variant, **kwargs):
    module = importlib.import_module(library)
    cls = getattr(module, class_name)
    extra = dict(kwargs)
    if variant is not None:
        extra["variant"] = variant
    try:
        return cls.from_pretrained(
            location, subfolder=name, local_files_only=local_only, revision=revision, **extra
        )
    except (OSError, EnvironmentError, ValueError) as e:
        raise MissingComponentError(str(location), name, str(e).splitlines()[0] if str(e) else repr(e)) from e


def set_attention(unet: torch.nn.Module, attention: str | None, device: torch.device) -> None:
    """Install the attention backend: torch SDPA (default) or xformers (CUDA only, when installed)."""
    attention = attention or "sdpa"
    if attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    elif attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise RuntimeError("attention='xformers' requested but xformers is not installed (pip install xformers)")
        if torch.device(device).type != "cuda":
            raise RuntimeError(f"attention='xformers' needs a CUDA device, got {device}; use attention='sdpa'")
        unet.enable_xformers_memory_efficient_attention()
    else:
        raise ValueError(f"unknown attention backend {attention!r}; expected one of {ATTENTION_BACKENDS}")


def _resolve_scheduler(base_scheduler, scheduler):
    """The checkpoint's scheduler, or one named / given, configured from the checkpoint's config."""
    if scheduler is None:
        return copy.deepcopy(base_scheduler)
    from .schedules import get_scheduler

    return get_scheduler(scheduler, base_scheduler.config)


def _load_tiny(tiny_vae, local_only, device, dtype):
    if tiny_vae is None:
        return None
    if isinstance(tiny_vae, torch.nn.Module):
        return _place(tiny_vae, torch.device(device), dtype)
    from diffusers import AutoencoderTiny

    try:
        tiny = AutoencoderTiny.from_pretrained(tiny_vae, torch_dtype=dtype, local_files_only=local_only)
        return _place(tiny, torch.device(device), dtype)
    except (OSError, ValueError) as e:
        raise MissingComponentError(str(tiny_vae), "tiny_vae", str(e).splitlines()[0]) from e


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # Cast only when needed: diffusers warns on a no-op .to(dtype) and it would copy nothing anyway.
    p = next(module.parameters(), None)
    if p is not None and p.dtype != dtype:
        module = module.to(dtype=dtype)
    if p is not None and p.device != device:
        module = module.to(device=device)
    return module.eval().requires_grad_(False)


def _finish(unet, vae, text_encoder, tokenizer, scheduler, device, dtype, vae_dtype, tiny, attention):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    vae_dtype = vae_dtype or dtype
    unet = _place(unet, device, dtype)
    text_encoder = _place(text_encoder, device, dtype)
    if vae is not None:
        vae = _place(vae, device, vae_dtype)
    set_attention(unet, attention, device)
    decoder = tiny if tiny is not None else vae
    return Components(unet, vae, decoder, text_encoder, tokenizer, scheduler, device, dtype, vae_dtype)


def load_components(
    path_or_id: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    scheduler=None,
    tiny_vae=None,
    attention: str | None = "sdpa",
    variant: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> Components:
    """Load the components of a Stable-Diffusion checkpoint folder or hub id.

    ``scheduler``: None keeps the checkpoint's; a name (``"ddim"``, ``"euler"``, ``"dpmpp_2m"``, a diffusers class
    name) or a scheduler object goes through :func:`fusionloader.engine.schedules.get_scheduler`.
    ``tiny_vae``: a path/id or an ``AutoencoderTiny`` used as the decoder (the KL VAE still encodes).
    A missing component raises :class:`MissingComponentError` naming the folder and the component.
    """
    path_or_id = os.fspath(path_or_id)
    local_only = _default_local_only(local_files_only)
    classes = _component_classes(path_or_id, local_only, revision)
    common = dict(local_only=local_only, revision=revision, variant=variant)
    unet = _load_one(path_or_id, "unet", *classes["unet"], **common, torch_dtype=dtype)
    vae = _load_one(path_or_id, "vae", *classes["vae"], **common, torch_dtype=vae_dtype or dtype)
    text_encoder = _load_one(path_or_id, "text_encoder", *classes["text_encoder"], **common, torch_dtype=dtype)
    plain = dict(local_only=local_only, revision=revision, variant=None)
    tokenizer = _load_one(path_or_id, "tokenizer", *classes["tokenizer"], **plain)
    base_scheduler = _load_one(path_or_id, "scheduler", *classes["scheduler"], **plain)
    tiny = _load_tiny(tiny_vae, local_only, device, vae_dtype or dtype)
    return _finish(
        unet, vae, text_encoder, tokenizer, _resolve_scheduler(base_scheduler, scheduler),
        device, dtype, vae_dtype, tiny, attention,
    )


def components_from_pipe(
    pipe,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
    scheduler=None,
    tiny_vae=None,
    attention: str | None = "sdpa",
) -> Components:
    """Take the components of an existing diffusers pipeline (shared, not copied; moved if device/dtype given)."""
    for name in _REQUIRED:
        if getattr(pipe, name, None) is None:
            raise MissingComponentError(type(pipe).__name__, name, "the pipeline object has none")
    device = torch.device(device) if device is not None else pipe.unet.device
    dtype = dtype or pipe.unet.dtype
    vae = pipe.vae
    tiny = None
    if type(vae).__name__ == "AutoencoderTiny":  # a pipeline that already swapped in TAESD: decode-only VAE
        tiny, vae = vae, None
    tiny = _load_tiny(tiny_vae, _default_local_only(None), device, vae_dtype or dtype) if tiny_vae is not None else tiny
    if tiny is not None:
        tiny = _place(tiny, device, vae_dtype or dtype)
    vae_dtype = vae_dtype or (vae.dtype if vae is not None else dtype)
    return _finish(
        pipe.unet, vae, pipe.text_encoder, pipe.tokenizer, _resolve_scheduler(pipe.scheduler, scheduler),
        device, dtype, vae_dtype, tiny, attention,
    )
