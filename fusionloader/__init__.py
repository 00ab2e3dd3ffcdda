"""fusionloader: on-the-fly diffusion augmentation for PyTorch.

``FusionLoader`` replaces ``torch.utils.data.DataLoader`` in one line; spare devices run a
``Synthesizer`` (diffusers-exact SDEdit/img2img from cached VAE latents, continuously batched, fused
Triton schedule kernels) and the loader mixes fresh variants of the images being trained on into the
batches at ratio ``alpha``. Nothing synthetic is written to disk.
"""

from .engine import (
    CLIP_IMAGENET_TEMPLATES,
    IMAGENET_TEMPLATES_SMALL,
    LatentCache,
    NonFiniteOutputError,
    PromptPolicy,
    Synthesizer,
)
from .config import LATE_POLICIES, FusionConfig, LatePolicy
from .loader import FusionLoader
from .producer import ProducerError
from .sources.folder import ImageFolder

__version__ = "0.1.0"

__all__ = [
    "CLIP_IMAGENET_TEMPLATES",
    "FusionConfig",
    "FusionLoader",
    "IMAGENET_TEMPLATES_SMALL",
    "ImageFolder",
    "LATE_POLICIES",
    "LatePolicy",
    "LatentCache",
    "NonFiniteOutputError",
    "ProducerError",
    "PromptPolicy",
    "Synthesizer",
]
