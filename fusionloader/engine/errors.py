"""Errors the engine raises on purpose, so callers (and the loader) can tell them from bugs."""

from __future__ import annotations

__all__ = ["MissingComponentError", "NonFiniteOutputError"]


class MissingComponentError(FileNotFoundError):
    """A checkpoint lacks a component the engine needs (UNet, VAE, text encoder, tokenizer, scheduler)."""

    def __init__(self, location: str, component: str, detail: str = ""):
        self.location, self.component = location, component
        msg = f"checkpoint {location!r} has no usable {component!r} component"
        super().__init__(msg + (f": {detail}" if detail else ""))


class NonFiniteOutputError(RuntimeError):
    """Some generated samples contain NaN or inf (typically an fp16 VAE overflow); ``indices`` names them."""

    def __init__(self, indices: list[int], hint: str = ""):
        self.indices = list(indices)
        msg = f"non-finite (NaN/inf) output for sample(s) {self.indices}"
        super().__init__(msg + (f"; {hint}" if hint else ""))
