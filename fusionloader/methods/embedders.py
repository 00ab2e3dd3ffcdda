"""Image/text embedders for retrieval: a user-given CLIP model behind one small interface.

An embedder has ``dim``, ``encode_images(images) -> (N, dim) float32`` and ``encode_text(prompts) -> (N, dim)
float32``, both L2-normalised rows (numpy). ``images`` are float tensors in [0, 1], (N, 3, H, W) (or a list of
(3, H, W) tensors of any size); the embedder resizes and normalises them as its model expects.

- :class:`ClipEmbedder` wraps a transformers ``CLIPModel`` (``get_image_features`` / ``get_text_features``).
- :class:`OpenClipEmbedder` wraps an open_clip model (``encode_image`` / ``encode_text``); open_clip is optional
  and only imported by :meth:`OpenClipEmbedder.from_pretrained`.

Both are picklable when their model is (producers and loader workers may receive one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ClipEmbedder", "OpenClipEmbedder", "prompt_embeddings"]

# CLIP's published preprocessing constants (openai/CLIP clip.py, transformers' OPENAI_CLIP_MEAN/STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_batch(images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images: expected (N, 3, H, W) float in [0, 1], got shape {tuple(images.shape)}")
        return list(images)
    out = []
    for i, im in enumerate(images):
        im = torch.as_tensor(im)
        if im.dim() != 3 or im.shape[0] not in (1, 3):
            raise ValueError(f"images[{i}]: expected (3, H, W) float in [0, 1], got shape {tuple(im.shape)}")
        out.append(im)
    return out


def _normalise_rows(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)


class _Embedder:
    """Shared image preprocessing (resize to ``image_size``, grey -> 3 channels, mean/std) and batching."""

    def __init__(self, image_size: int, mean, std, device, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.device = torch.device(device)
        self.batch_size = batch_size

    def preprocess(self, images) -> torch.Tensor:
        """float [0, 1] images -> the model's pixel input (bicubic resize as CLIP's processor, then mean/std)."""
        rows = []
        for im in _as_batch(images):
            im = im.float()
            if im.shape[0] == 1:
                im = im.expand(3, -1, -1)
            if im.shape[-2:] != (self.image_size, self.image_size):
                im = F.interpolate(im[None], size=(self.image_size,) * 2, mode="bicubic", align_corners=False)[0]
            rows.append(im.clamp(0, 1))
        x = torch.stack(rows)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, images) -> np.ndarray:
        batch = _as_batch(images)
        if not batch:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for i in range(0, len(batch), self.batch_size):
            x = self.preprocess(batch[i : i + self.batch_size]).to(self.device, self._dtype())
            out.append(_normalise_rows(self._image_features(x)))
        return np.concatenate(out)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
        if not prompts:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            out.append(_normalise_rows(self._text_features(prompts[i : i + self.batch_size])))
        return np.concatenate(out)


class ClipEmbedder(_Embedder):
    """A transformers ``CLIPModel`` (or any model with ``get_image_features``/``get_text_features``) and its
    tokenizer. ``image_mean``/``image_std``/``image_size`` default to the model folder's
    ``preprocessor_config.json`` when loaded with :meth:`from_pretrained`, else CLIP's constants and the vision
    config's ``image_size``."""

    def __init__(self, model, tokenizer, *, image_size=None, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                 device="cpu", batch_size: int = 256):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        if image_size is None:
            image_size = model.config.vision_config.image_size
        super().__init__(image_size, image_mean, image_std, device, batch_size)
        self.dim = int(model.config.projection_dim)

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", batch_size: int = 256, **kwargs) -> ClipEmbedder:
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        cfg_path = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
            size = cfg.get("crop_size") or cfg.get("size") or {}
            size = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
            kwargs.setdefault("image_mean", tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)))
            kwargs.setdefault("image_std", tuple(cfg.get("image_std", OPENAI_CLIP_STD)))
            if size:
                kwargs.setdefault("image_size", int(size))
        return cls(model, tokenizer, device=device, batch_size=batch_size, **kwargs)

    def _dtype(self):
        return next(self.model.parameters()).dtype

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers >= 5 returns a BaseModelOutputWithPooling whose pooler_output is the projection; 4.x a tensor.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._features(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        return self._features(
            self.model.get_text_features(input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device))
        )


class OpenClipEmbedder(_Embedder):
    """An open_clip model (``encode_image``/``encode_text``) with its tokenizer (callable: list[str] -> ids)."""

    def __init__(self, model, tokenizer, *, image_size: int, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                 device="cpu", batch_size: int = 256):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        super().__init__(image_size, image_mean, image_std, device, batch_size)
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1])

    @classmethod
    def from_pretrained(cls, model_name: str, pretrained: str, device="cpu", batch_size: int = 256) -> OpenClipEmbedder:
        """``open_clip.create_model_and_transforms(model_name, pretrained=...)`` (a local checkpoint path works
        offline); open_clip is imported here only."""
        try:
            import open_clip
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("OpenClipEmbedder needs open_clip: pip install open_clip_torch") from e
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD
        return cls(model, open_clip.get_tokenizer(model_name), image_size=size, image_mean=mean, image_std=std,
                   device=device, batch_size=batch_size)

    def _dtype(self):
        return next(self.model.parameters()).dtype

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.device))


def prompt_embeddings(embedder, class_names: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",)) -> np.ndarray:
    """One query per class, as CLIP's zero-shot classifier builds it: encode every template filled with the
    class name, L2-normalise each, average over templates, L2-normalise the mean. Returns (C, dim) float32."""
    class_names, templates = list(class_names), [templates] if isinstance(templates, str) else list(templates)
    if not class_names:
        raise ValueError("class_names is empty")
    if not templates:
        raise ValueError("templates is empty")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"templates: {t!r} has no '{{}}' for the class name")
    prompts = [t.format(c) for c in class_names for t in templates]
    e = embedder.encode_text(prompts).reshape(len(class_names), len(templates), -1)
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    m = e.mean(1)
    return (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)
