"""A dependency-free ImageFolder: ``root/<class>/<image>`` -> (PIL image, class index).

It has the attributes torchvision's ``ImageFolder`` has (``classes``, ``class_to_idx``, ``samples``,
``targets``, ``loader``, ``transform``), so everything that accepts an ImageFolder-style dataset accepts
it, and the loader can read the raw image and name its path in errors.
"""

from __future__ import annotations

import os
from typing import Callable

from PIL import Image

__all__ = ["IMG_EXTENSIONS", "ImageFolder", "pil_loader"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def pil_loader(path: str) -> Image.Image:
    """Open ``path`` as an RGB PIL image, with an error that names the file."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except Exception as exc:  # PIL raises several unrelated types for corrupt files
        raise OSError(f"cannot read image {path!r}: {exc}") from exc


class ImageFolder:
    """Images arranged as ``root/<class name>/<file>``; classes are the sorted sub-folder names."""

    def __init__(self, root: str, transform: Callable | None = None, loader: Callable[[str], object] = pil_loader):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.root = root
        self.transform = transform
        self.loader = loader
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"image folder {root!r} has no class sub-folders (expected root/<class>/<image>)")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for name in self.classes:
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
                for file in sorted(files):
                    if file.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, file), self.class_to_idx[name]))
        if not self.samples:
            raise FileNotFoundError(f"image folder {root!r} has no images with extensions {IMG_EXTENSIONS}")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = self.loader(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label
