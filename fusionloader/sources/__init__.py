"""Real-image sources: how datasets hand raw (untransformed) images to the loader and to producers.

``ImageSource`` wraps a map-style torch Dataset (ImageFolder-style, VisionDataset-style or any dataset
returning ``(image, label)``); ``fusionloader.sources.dali`` has an optional DALI-backed reader.
"""

from .dataset import DatasetError, ImageSource, RawInfo, describe, from_float, get_image, replace_image, to_float

__all__ = ["DatasetError", "ImageSource", "RawInfo", "describe", "from_float", "get_image", "replace_image", "to_float"]
