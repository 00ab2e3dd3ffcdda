"""The embedded CLIP-style image/text encoder pair (``fusionloader/assets/digits-clip``).

A tiny transformers ``CLIPModel`` (ViT image tower on 32x32 digits, 4x4 patches; text tower sharing the
embedded diffusion model's tokenizer), trained contrastively by ``python -m fusionloader.pretrained.train_clip``
on the embedded model's *generator* split only, i.e. on exactly the images the diffusion model was trained on
(Burg & Wenzel's retrieval pool). It loads with ``CLIPModel.from_pretrained`` like any CLIP checkpoint, so the
offline default goes through the same code path (:class:`fusionloader.methods.embedders.ClipEmbedder`) as a
user's CLIP model. ``eval.json`` beside it records its zero-shot accuracy on the held-out test digits.
"""

from __future__ import annotations

import os

from fusionloader.pretrained import TRAIN_TEMPLATES

__all__ = ["ZERO_SHOT_TEMPLATES", "build_clip_model", "default_clip_path", "load_default_embedder"]

#: Templates averaged into each class's zero-shot query: the embedded diffusion model's training templates.
ZERO_SHOT_TEMPLATES = TRAIN_TEMPLATES


def default_clip_path() -> str:
    """Path of the shipped encoder folder (``fusionloader/assets/digits-clip``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits-clip")


def build_clip_model(tokenizer, seed: int = 0, width: int = 64, layers: int = 2, projection_dim: int = 64,
                     image_size: int = 32, patch_size: int = 4, max_text_len: int = 32):
    """A fresh (untrained) ``CLIPModel`` of the shipped shape, sized for ``tokenizer``."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=max_text_len, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers, num_attention_heads=4, num_channels=3,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))


def load_default_embedder(device="cpu", batch_size: int = 256):
    """The shipped encoder as a :class:`~fusionloader.methods.embedders.ClipEmbedder` (offline, float32)."""
    from fusionloader.methods.embedders import ClipEmbedder

    path = default_clip_path()
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path}: the embedded CLIP encoder is missing; run python -m fusionloader.pretrained.train_clip")
    return ClipEmbedder.from_pretrained(path, device=device, batch_size=batch_size)
