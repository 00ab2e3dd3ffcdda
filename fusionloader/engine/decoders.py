"""Decoders a request can pick (``Request.decoder``): ``"vae"`` (the checkpoint's decoder) or ``"tiny"`` (TAESD).

TAESD (madebyollin/taesd; diffusers' ``AutoencoderTiny``) decodes the UNet's scaled latents directly (its
``scaling_factor`` is 1.0) in a small fraction of the KL decoder's time. Where the tiny decoder comes from
(:func:`load_tiny_decoder`):

- an ``AutoencoderTiny`` module;
- a folder in diffusers' format (``config.json`` + ``diffusion_pytorch_model.safetensors``), as the hub's
  ``madebyollin/taesd`` ships it and as ``AutoencoderTiny.save_pretrained`` writes it;
- a folder with only TAESD's original decoder weights (``taesd_decoder.pth`` or ``taesd_decoder.safetensors``,
  github.com/madebyollin/taesd): loaded into ``AutoencoderTiny``'s default (TAESD) config, keys renamed
  ``k.* -> decoder.layers.{k-1}.*`` (the original's leading Clamp is DecoderTiny's ``tanh`` in forward);
- ``None`` with a checkpoint folder: its ``vae_tiny/`` subfolder when there is one (:data:`TINY_SUBFOLDER`).

:class:`Decoders` holds the decoders of one model and loads the tiny one on first use.
"""

from __future__ import annotations

import os

import torch

__all__ = ["DECODERS", "Decoders", "TINY_SUBFOLDER", "load_tiny_decoder"]

DECODERS = ("vae", "tiny")
TINY_SUBFOLDER = "vae_tiny"
_ORIGINAL = ("taesd_decoder.safetensors", "taesd_decoder.pth")


def _original_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if not head.isdigit() or int(head) < 1:
            raise ValueError(f"{path}: unexpected key {key!r} for a TAESD decoder (expected '<layer>.<param>')")
        renamed[f"decoder.layers.{int(head) - 1}.{rest}"] = value
    return renamed


def load_tiny_decoder(source, device, dtype, local_files_only: bool = True) -> torch.nn.Module:
    """An ``AutoencoderTiny`` on ``device`` in ``dtype``, eval mode, from ``source`` (see the module doc)."""
    from diffusers import AutoencoderTiny

    from .errors import MissingComponentError

    if isinstance(source, torch.nn.Module):
        module = source
    else:
        path = os.fspath(source)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            found = [f for f in _ORIGINAL if os.path.isfile(os.path.join(path, f))]
            if not found:
                why = "no config.json and no taesd_decoder.pth/.safetensors"
                raise MissingComponentError(path, "tiny decoder", why)
            module = AutoencoderTiny()
            state = _original_state(os.path.join(path, found[0]))
            missing, unexpected = module.load_state_dict(state, strict=False)
            missing = [k for k in missing if k.startswith("decoder.")]
            if missing or unexpected:
                raise ValueError(f"{path}/{found[0]}: does not fit a TAESD decoder (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")  # fmt: skip
        else:
            try:
                module = AutoencoderTiny.from_pretrained(path, local_files_only=local_files_only)
            except (OSError, ValueError) as e:
                raise MissingComponentError(path, "tiny decoder", str(e).splitlines()[0] if str(e) else repr(e)) from e
    if type(module).__name__ != "AutoencoderTiny":
        raise TypeError(f"the tiny decoder must be a diffusers AutoencoderTiny, got {type(module).__name__}")
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


class Decoders:
    """The decoders of one model: ``"vae"`` always, ``"tiny"`` from ``tiny`` (module, path, or None).

    ``tiny=None`` means no tiny decoder; :meth:`check` then rejects ``decoder="tiny"`` naming where one would
    come from. The tiny decoder is loaded on first use (once), in ``dtype`` on ``device``.
    """

    def __init__(self, vae_decoder, tiny=None, device="cpu", dtype=torch.float32, local_files_only: bool = True):
        self.vae_decoder, self._tiny_source = vae_decoder, tiny
        self.device, self.dtype, self.local_files_only = torch.device(device), dtype, local_files_only
        self._tiny: torch.nn.Module | None = None

    @property
    def has_tiny(self) -> bool:
        return self._tiny_source is not None

    def check(self, name, key) -> None:
        if name not in DECODERS:
            raise ValueError(f"request {key!r}: decoder must be one of {DECODERS}, got {name!r}")
        if name == "tiny" and not self.has_tiny:
            raise ValueError(
                f"request {key!r}: decoder='tiny' but this synthesizer has no tiny decoder: pass "
                f"tiny_decoder=<AutoencoderTiny or folder> or put one in the checkpoint's {TINY_SUBFOLDER}/ folder"
            )

    def get(self, name: str) -> torch.nn.Module:
        if name == "vae":
            return self.vae_decoder
        if self._tiny is None:
            self._tiny = load_tiny_decoder(self._tiny_source, self.device, self.dtype, self.local_files_only)
        return self._tiny

    def decode(self, name: str, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images in [-1, 1] (N, 3, H, W), one call of decoder ``name``."""
        dec = self.get(name)
        scale = float(dec.config.scaling_factor)
        return dec.decode((latents / scale).to(next(dec.parameters()).dtype), return_dict=False)[0]
