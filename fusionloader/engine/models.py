"""Load the diffusers components the engine runs: UNet, VAE (or a tiny decoder), text encoder, tokenizer, scheduler.

Two entry points: :func:`load_components` (a local checkpoint folder or a hub id; ``local_files_only`` follows
``HF_HUB_OFFLINE`` unless given) and :func:`components_from_pipe` (an already-built diffusers pipeline).
Precision: the UNet and text encoder run in ``dtype``; the VAE in ``vae_dtype`` because the SD-1.x VAE overflows
in fp16. Defaults (:func:`default_precision`): on CUDA fp16 UNet and text encoder with an fp32 VAE; on CPU fp32
everywhere (``vae_dtype`` defaults to ``dtype``). Pass ``dtype=torch.bfloat16`` (or ``"bf16"``) for bf16.

Scheduler: on CUDA a checkpoint scheduler without a fused kernel (SD-1.5's PNDM) is replaced by
:data:`DEFAULT_FUSED_SCHEDULER` built from the checkpoint's scheduler config (:func:`fused_substitute`, logged);
``scheduler="checkpoint"`` keeps the checkpoint's, any other ``scheduler`` is used as given. CPU keeps the
checkpoint's scheduler unless told otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import os
from dataclasses import dataclass

import logging

import torch

from .errors import MissingComponentError

logger = logging.getLogger(__name__)

# What replaces a checkpoint scheduler without a fused kernel on CUDA (built from the checkpoint's config).
DEFAULT_FUSED_SCHEDULER = "ddim"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}  # fmt: skip
__all__ = [
    "ATTENTION_BACKENDS",
    "Components",
    "DEFAULT_FUSED_SCHEDULER",
    "components_from_pipe",
    "default_precision",
    "device_scope",
    "fused_substitute",
    "load_components",
    "load_tokenizer",
    "set_attention",
]

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


def device_scope(device):
    """``torch.cuda.device(device)`` for a CUDA device, else a no-op context.

    Everything that uses "the current device" (Triton launches and their stream, ``pin_memory``, new streams and
    generators without an index) then uses the engine's device, not device 0: a Synthesizer on ``cuda:1`` never
    creates a context on GPU 0.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _as_dtype(value, name: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ValueError(f"{name}={value!r}: expected a torch dtype or one of {', '.join(_DTYPES)}")


def default_precision(device, dtype=None, vae_dtype=None) -> tuple[torch.dtype, torch.dtype]:
    """``(dtype, vae_dtype)`` for ``device``: what is given, else fp16 + fp32 VAE on CUDA, fp32 (VAE = dtype) on CPU."""
    cuda = torch.device(device).type == "cuda"
    dtype = _as_dtype(dtype, "dtype") or (torch.float16 if cuda else torch.float32)
    vae_dtype = _as_dtype(vae_dtype, "vae_dtype") or (torch.float32 if cuda else dtype)
    return dtype, vae_dtype


def fused_substitute(scheduler, device, requested=None):
    """The scheduler to run: on CUDA, with nothing requested, a fused one in place of one without a kernel.

    ``requested`` None: on CUDA, a ``scheduler`` whose ``fused_kind`` is None (PNDM, ...) is replaced by
    :data:`DEFAULT_FUSED_SCHEDULER` built ``from_config`` of its config (said in the log); otherwise it is kept.
    ``"checkpoint"`` keeps it; anything else goes through ``get_scheduler`` (the user's choice wins).
    """
    from .schedules import fused_kind, get_scheduler

    if isinstance(requested, str) and requested.lower() == "checkpoint":
        return copy.deepcopy(scheduler)
    if requested is not None:
        return get_scheduler(requested, scheduler.config)
    if torch.device(device).type != "cuda" or fused_kind(scheduler) is not None:
        return copy.deepcopy(scheduler)
    # clip_sample/thresholding are DDIM options PNDM's config may lack (DDIM's default clips): the fused
    # DDIM row is the unclipped one, which is what SD checkpoints run.
    # ("_use_default_values" would make from_config restore DDIM's own default for a key PNDM lacked.)
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    substitute = get_scheduler(DEFAULT_FUSED_SCHEDULER, dict(config, clip_sample=False, thresholding=False))
    assert fused_kind(substitute) is not None, substitute.config
    logger.warning(
        "fusionloader: %s has no fused kernel; on %s using %s built from the checkpoint's scheduler config "
        "(scheduler='checkpoint' keeps %s, scheduler=... picks another)",
        type(scheduler).__name__, device, type(substitute).__name__, type(scheduler).__name__,
    )  # fmt: skip
    return substitute


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


def load_tokenizer(path_or_id, local_files_only: bool | None = None, revision: str | None = None):
    """A checkpoint's tokenizer alone, loaded as :func:`load_components` loads it (the leakage guard's)."""
    path_or_id = os.fspath(path_or_id)
    local_only = _default_local_only(local_files_only)
    classes = _component_classes(path_or_id, local_only, revision)
    return _load_one(path_or_id, "tokenizer", *classes["tokenizer"], local_only=local_only, revision=revision,
                     variant=None)


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
    if scheduler is None or (isinstance(scheduler, str) and scheduler.lower() == "checkpoint"):
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
    dtype: torch.dtype | str | None = None,
    vae_dtype: torch.dtype | str | None = None,
    scheduler=None,
    tiny_vae=None,
    attention: str | None = "sdpa",
    variant: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> Components:
    """Load the components of a Stable-Diffusion checkpoint folder or hub id.

    ``dtype`` / ``vae_dtype``: see :func:`default_precision` (None: fp16 + fp32 VAE on CUDA, fp32 on CPU).
    ``scheduler``: see :func:`fused_substitute` (None: the checkpoint's, replaced by a fused one on CUDA when it
    has no kernel; ``"checkpoint"``; a name ``"ddim"``, ``"euler"``, ``"dpmpp_2m"``, a diffusers class or instance).
    ``tiny_vae``: a path/id or an ``AutoencoderTiny`` used as the decoder (the KL VAE still encodes).
    A missing component raises :class:`MissingComponentError` naming the folder and the component.
    """
    path_or_id = os.fspath(path_or_id)
    dtype, vae_dtype = default_precision(device, dtype, vae_dtype)
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
        unet, vae, text_encoder, tokenizer, fused_substitute(base_scheduler, device, scheduler),
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
