"""The synthesis engine: diffusers-exact img2img/txt2img from cached latents, continuously batched.

Knows nothing of loaders; uses ``fusionloader.kernels`` for the fused schedule arithmetic.
"""

from .errors import MissingComponentError, NonFiniteOutputError
from .latents import LatentCache
from .models import Components, load_components
from .prompts import CLIP_IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_SMALL, PromptCache, PromptPolicy
from .sampler import Finished, Request, Sampler
from .synthesizer import Synthesizer

__all__ = [
    "CLIP_IMAGENET_TEMPLATES",
    "Components",
    "Finished",
    "IMAGENET_TEMPLATES_SMALL",
    "LatentCache",
    "MissingComponentError",
    "NonFiniteOutputError",
    "PromptCache",
    "PromptPolicy",
    "Request",
    "Sampler",
    "Synthesizer",
    "load_components",
]
