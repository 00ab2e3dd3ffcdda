"""Augmentation methods built on the engine and the loader: textual inversion (DA-Fusion's class tokens) and
per-epoch synthesis schedules (DA-Fusion's intensities, DisCL's diverse-to-specific curriculum)."""

from .curriculum import Constant, Curriculum, DiverseToSpecific, RandomizedIntensity, apply
from .inversion import invert_main, learn_tokens, load_learned_tokens, save_learned_tokens, token_for_class

__all__ = [
    "Constant",
    "Curriculum",
    "DiverseToSpecific",
    "RandomizedIntensity",
    "apply",
    "invert_main",
    "learn_tokens",
    "load_learned_tokens",
    "save_learned_tokens",
    "token_for_class",
]
