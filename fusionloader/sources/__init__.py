"""Real-image sources: how datasets hand raw (untransformed) images to the loader and to producers.

``ImageSource`` wraps a map-style torch Dataset (ImageFolder-style, VisionDataset-style or any dataset
returning ``(image, label)``); ``ImageFolder`` is a dependency-free ImageFolder; ``fusionloader.sources.dali``
has an optional DALI-decoding ImageFolder (imported lazily, needs nvidia-dali).
"""

from .dataset import DatasetError, ImageSource, RawInfo, describe, from_float, get_image, replace_image, to_float
from .folder import ImageFolder

__all__ = [
    "DatasetError",
    "ImageFolder",
    "ImageSource",
    "RawInfo",
    "describe",
    "from_float",
    "get_image",
    "replace_image",
    "to_float",
]
