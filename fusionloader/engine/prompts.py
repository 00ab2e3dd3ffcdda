"""Prompt templates, the class-id -> prompt policy, and the prompt-embedding cache.

Every prompt a run can use is known up front (classes x templates, learned tokens, the negative prompt), so
each is encoded once, exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` does, and the text
encoder never runs per sample.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "CLIP_IMAGENET_TEMPLATES",
    "DEFAULT_PROMPT_CACHE_SIZE",
    "IMAGENET_TEMPLATES_SMALL",
    "PromptCache",
    "PromptPolicy",
]

# Embeddings kept on the device: SD-1.x's (77, 768) in fp16 is 118 KB, so 1024 prompts are ~121 MB (80,000
# prompts, Bansal & Grover's 1000 classes x 80 templates, would be ~9.4 GB unbounded).
DEFAULT_PROMPT_CACHE_SIZE = 1024

# Textual-inversion training prompts (diffusers' textual_inversion.py; DA-Fusion trains with these).
IMAGENET_TEMPLATES_SMALL = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)

# The 80 prompt templates of CLIP's ImageNet zero-shot evaluation (Radford et al. 2021, the CLIP notebook);
# Bansal & Grover draw one per generated image ("diversity").
CLIP_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
assert len(IMAGENET_TEMPLATES_SMALL) == 27 and len(CLIP_IMAGENET_TEMPLATES) == 80


class PromptPolicy:
    """Map a class id (and a per-sample draw) to a prompt string.

    ``names[c]`` fills the ``{}`` of a template: a class name ("Real Guidance"), a learned token such as
    ``"<dining_table>"`` (DA-Fusion), or ``""`` with a template like ``"a photo"`` (class-agnostic control).
    With several templates, sample ``draw`` (e.g. its plan seed) picks ``templates[draw % len(templates)]``,
    so the choice is deterministic and resumable. Default: DA-Fusion's ``"a photo of a {}"``.
    """

    def __init__(self, names: Sequence[str], templates: Sequence[str] | str = ("a photo of a {}",)):
        self.names = list(names)
        self.templates = (templates,) if isinstance(templates, str) else tuple(templates)
        if not self.names or not self.templates:
            raise ValueError("PromptPolicy needs at least one class name and one template")

    @classmethod
    def clip_templates(cls, names: Sequence[str]) -> PromptPolicy:
        """Bansal & Grover's "diversity" setting: one of the 80 CLIP ImageNet templates per image."""
        return cls(names, CLIP_IMAGENET_TEMPLATES)

    def __call__(self, class_id: int, draw: int = 0) -> str:
        if not 0 <= int(class_id) < len(self.names):
            raise ValueError(f"class id {class_id} outside [0, {len(self.names)})")
        template = self.templates[int(draw) % len(self.templates)]
        return template.format(self.names[int(class_id)]) if "{}" in template else template

    def prompts(self) -> list[str]:
        """Every prompt this policy can produce (for prefilling a :class:`PromptCache`)."""
        seen = dict.fromkeys(self(c, k) for c in range(len(self.names)) for k in range(len(self.templates)))
        return list(seen)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"PromptPolicy({len(self.names)} classes, {len(self.templates)} templates)"


def _convert_multivector(prompt: str, tokenizer) -> str:
    # diffusers' TextualInversionLoaderMixin._maybe_convert_prompt: a token "<t>" learned with k vectors is
    # stored as "<t>", "<t>_1", ..., "<t>_{k-1}"; expand the prompt so every vector is used.
    tokens = tokenizer.tokenize(prompt)
    added = getattr(tokenizer, "added_tokens_encoder", {})
    for token in dict.fromkeys(tokens):
        if token in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt


class PromptCache:
    """Encodes prompts (as diffusers' ``encode_prompt``) and keeps the ``max_size`` most recently used on device.

    ``get(prompts)`` returns the stacked ``(N, L, D)`` embeddings in the text encoder's dtype, encoding misses
    lazily in one batch. ``add(prompts)`` prefills (beyond ``max_size`` only the last ones stay). The cache is
    LRU-bounded (default :data:`DEFAULT_PROMPT_CACHE_SIZE`; ``max_size=None``: unbounded), so device memory stays
    flat however many prompts a run draws; an evicted prompt is encoded again when next used. Call ``clear()``
    after changing tokenizer or encoder (e.g. loading a textual inversion).
    """

    def __init__(self, tokenizer, text_encoder, device: torch.device | str | None = None, batch_size: int = 64,
                 max_size: int | None = DEFAULT_PROMPT_CACHE_SIZE):  # fmt: skip
        if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
            raise ValueError(f"prompt cache max_size must be a positive int or None, got {max_size!r}")
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.device = torch.device(device) if device is not None else next(text_encoder.parameters()).device
        self.batch_size = batch_size
        self.max_size = max_size
        self._embeds: OrderedDict[str, torch.Tensor] = OrderedDict()  # least recently used first
        self.encoder_calls = 0  # number of text-encoder forward passes so far (tests check it stays flat)

    def __len__(self) -> int:
        return len(self._embeds)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._embeds

    def clear(self) -> None:
        self._embeds.clear()

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        from .models import device_scope

        with device_scope(self.device):
            return self._encode_here(prompts)

    def _encode_here(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        text = [_convert_multivector(p, tok) for p in prompts]
        inputs = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(self.device)
        self.encoder_calls += 1
        out = self.text_encoder(inputs.input_ids.to(self.device), attention_mask=mask)[0]
        return out.to(dtype=self.text_encoder.dtype, device=self.device)

    def entry_bytes(self) -> int:
        """Device bytes of one cached embedding: ``model_max_length x hidden x dtype size``."""
        hidden = int(self.text_encoder.config.hidden_size)
        return int(self.tokenizer.model_max_length) * hidden * torch.finfo(self.text_encoder.dtype).bits // 8

    def _lookup(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Embeddings of ``prompts`` (hits touched as recent, misses encoded in batches), then evict to the bound."""
        found: dict[str, torch.Tensor] = {}
        missing = []
        for p in dict.fromkeys(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
            if p in self._embeds:
                self._embeds.move_to_end(p)
                found[p] = self._embeds[p]
            else:
                missing.append(p)
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i : i + self.batch_size]
            for p, e in zip(chunk, self._encode(chunk)):
                self._embeds[p] = found[p] = e
        while self.max_size is not None and len(self._embeds) > self.max_size:
            self._embeds.popitem(last=False)
        return found

    def add(self, prompts: Iterable[str]) -> None:
        self._lookup(list(prompts))

    def get(self, prompts: Sequence[str]) -> torch.Tensor:
        found = self._lookup(list(prompts))  # holds this call's embeddings even if the bound evicted some
        return torch.stack([found[p] for p in prompts])

    def __getitem__(self, prompt: str) -> torch.Tensor:
        return self._lookup([prompt])[prompt]
