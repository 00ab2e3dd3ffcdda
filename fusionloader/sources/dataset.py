"""How a map-style dataset hands raw images to the loader and to producers.

A dataset is used two ways:

- the **real path** runs ``dataset[index]`` unchanged (in DataLoader workers), so real samples are
  exactly what a ``DataLoader`` would give;
- the **synthetic path** needs the *untransformed* image of ``index`` (producers encode it) and, when
  the synthetic image comes back, a way to put it in the same form the dataset's train transform
  expects (a PIL image of the original size, a uint8 array, a tensor ...).

:class:`ImageSource` does the second. It understands three kinds of datasets:

1. ImageFolder-style (``.samples`` = [(path, label)], ``.loader``, ``.transform``, ``.target_transform``):
   the raw image is ``loader(path)``; the train transform is ``dataset.transform``.
2. Datasets with a ``.transform`` attribute (torchvision ``VisionDataset`` such as CIFAR): the raw image
   is ``dataset[index][0]`` of a shallow copy whose ``transform`` is ``None``; the train transform is
   ``dataset.transform``.
3. Any other dataset returning ``(image, label, ...)`` tuples or dicts with an ``"image"`` key: the
   image it returns is the raw image; the train transform is ``FusionLoader(transform=...)`` (applied to
   real images in workers and to synthetic ones in the main process) or nothing.

Images may be PIL images, numpy arrays (HWC or HW) or tensors (CHW or HW), uint8 or float in [0, 1].
Labels used for prompts come from ``.targets`` / ``.samples`` when present (no image load).

Errors reading an image raise :class:`DatasetError` naming the index and, when known, the path.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DatasetError", "ImageSource", "RawInfo", "describe", "from_float", "get_image", "replace_image", "to_float"]


class DatasetError(RuntimeError):
    """A dataset item could not be read; the message names the index (and path when known)."""

    def __init__(self, index: int, path: str | None, cause: BaseException):
        where = f"dataset index {index}" + (f" (path {path!r})" if path else "")
        super().__init__(f"could not read {where}: {type(cause).__name__}: {cause}")
        self.index = index
        self.path = path


class RawInfo(NamedTuple):
    """What a raw image looks like, so a synthetic image can be handed to the transform in the same form."""

    kind: str  # "pil" | "numpy" | "tensor"
    height: int
    width: int
    channels: int  # 1 (grey, no channel axis for HW arrays/tensors when ``squeeze``) or 3
    dtype: str  # PIL mode for "pil"; numpy/torch dtype name otherwise
    squeeze: bool = False  # HW without channel axis


# --- sample structure --------------------------------------------------------------------------


def get_image(sample: Any) -> Any:
    """The image of a dataset item: element 0 of a tuple/list, ``"image"``/``"img"`` of a dict."""
    if isinstance(sample, (tuple, list)):
        return sample[0]
    if isinstance(sample, dict):
        for key in ("image", "img"):
            if key in sample:
                return sample[key]
        raise KeyError("dict samples need an 'image' or 'img' key")
    return sample


def replace_image(sample: Any, image: Any) -> Any:
    """``sample`` with its image replaced (same container type)."""
    if isinstance(sample, tuple):
        return (image,) + tuple(sample[1:]) if type(sample) is tuple else type(sample)(image, *sample[1:])
    if isinstance(sample, list):
        return [image] + list(sample[1:])
    if isinstance(sample, dict):
        out = dict(sample)
        out["image" if "image" in sample else "img"] = image
        return out
    return image


def _label_of(sample: Any) -> Any:
    if isinstance(sample, (tuple, list)) and len(sample) > 1:
        return sample[1]
    if isinstance(sample, dict):
        for key in ("label", "target", "y"):
            if key in sample:
                return sample[key]
    return None


# --- image conversions -------------------------------------------------------------------------


def describe(image: Any) -> RawInfo:
    """The :class:`RawInfo` of a PIL image, numpy array or tensor."""
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            w, h = image.size
            return RawInfo("pil", h, w, 1 if image.mode in ("L", "1", "I", "F") else 3, image.mode)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            return RawInfo("numpy", image.shape[0], image.shape[1], 1, str(image.dtype), True)
        return RawInfo("numpy", image.shape[0], image.shape[1], image.shape[2], str(image.dtype))
    if isinstance(image, torch.Tensor):
        if image.ndim == 2:
            return RawInfo("tensor", image.shape[0], image.shape[1], 1, str(image.dtype).replace("torch.", ""), True)
        return RawInfo("tensor", image.shape[1], image.shape[2], image.shape[0], str(image.dtype).replace("torch.", ""))
    raise TypeError(f"unsupported image type {type(image).__name__}; use PIL images, numpy arrays or tensors")


def to_float(image: Any) -> torch.Tensor:
    """Any supported raw image -> float32 tensor (3, H, W) in [0, 1] (grey is repeated to 3 channels)."""
    info = describe(image)
    if info.kind == "pil":
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(image))
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    else:
        t = image[None] if image.ndim == 2 else image
    t = t.float() / 255.0 if not t.is_floating_point() else t.float()
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]
    return t.clamp(0, 1).contiguous()


def from_float(x: torch.Tensor, info: RawInfo) -> Any:
    """A synthetic image (3, R, R), float in [0, 1] or uint8 -> the form and size described by ``info``.

    DA-Fusion resizes generated images back to the real image's size before the train transform.
    """
    x = x.detach().cpu()
    x = (x.float() / 255 if x.dtype == torch.uint8 else x.float()).clamp(0, 1)  # uint8 ring slots / store
    if info.kind == "pil":
        from PIL import Image

        arr = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        img = Image.fromarray(arr, "RGB")
        if img.size != (info.width, info.height):
            img = img.resize((info.width, info.height), Image.BICUBIC)
        return img if info.dtype == "RGB" else img.convert(info.dtype)
    if tuple(x.shape[1:]) != (info.height, info.width):
        x = F.interpolate(x[None], size=(info.height, info.width), mode="bilinear", antialias=True, align_corners=False)[0]
        x = x.clamp(0, 1)
    if info.channels == 1:
        x = x.mean(0, keepdim=True)
    integer = "int" in info.dtype
    if integer:
        x = (x * 255).round()
    if info.kind == "numpy":
        arr = x.permute(1, 2, 0).numpy().astype(info.dtype)
        return arr[..., 0] if info.squeeze else arr
    t = x.to(getattr(torch, info.dtype))
    return t[0] if info.squeeze else t


# --- the source --------------------------------------------------------------------------------


class ImageSource:
    """Raw (untransformed) images and labels of a map-style dataset, by index.

    Picklable when the dataset is; producers receive it and call :meth:`raw`.
    """

    def __init__(self, dataset, transform=None):
        self.dataset = dataset
        samples = getattr(dataset, "samples", None)
        self._folder = samples is not None and callable(getattr(dataset, "loader", None))
        self._raw_view = None
        if not self._folder and getattr(dataset, "transform", None) is not None:
            # VisionDataset-style: read through a shallow copy with the image transform switched off.
            view = copy.copy(dataset)
            view.transform = None
            if getattr(view, "transforms", None) is not None:
                view.transforms = _ImageTransformOff(getattr(dataset, "target_transform", None))
            self._raw_view = view
        #: the train transform applied to synthetic images (real ones get it from the dataset or workers)
        self.transform = transform if transform is not None else getattr(dataset, "transform", None)
        self._labels: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def reads_raw(self) -> bool:
        """Whether raw images are read apart from ``dataset[index]`` (ImageFolder-style or a transform-off view)."""
        return self._folder or self._raw_view is not None

    def untransformed(self, index: int):
        """``dataset[index]`` with the image transform switched off (VisionDataset-style datasets), else None:
        a position that gets a synthetic image need not pay for transforming the real one."""
        return self._raw_view[index] if self._raw_view is not None else None

    def path(self, index: int) -> str | None:
        for attr in ("samples", "imgs"):
            seq = getattr(self.dataset, attr, None)
            if seq is not None:
                try:
                    entry = seq[index]
                    return str(entry[0] if isinstance(entry, (tuple, list)) else entry)
                except Exception:
                    return None
        return None

    def raw_sample(self, index: int) -> tuple[Any, Any]:
        """(untransformed image, label) of ``index``; :class:`DatasetError` on failure."""
        try:
            if self._folder:
                path, label = self.dataset.samples[index][:2]
                return self.dataset.loader(path), label
            sample = (self._raw_view if self._raw_view is not None else self.dataset)[index]
            return get_image(sample), _label_of(sample)
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(index, self.path(index), e) from e

    def raw(self, index: int) -> tuple[torch.Tensor, Any]:
        """(image float32 (3, H, W) in [0, 1], label) — what producers encode."""
        image, label = self.raw_sample(index)
        try:
            return to_float(image), label
        except Exception as e:
            raise DatasetError(index, self.path(index), e) from e

    def label(self, index: int) -> Any:
        """The raw class label of ``index`` (no image load when the dataset has ``targets``/``samples``)."""
        targets = getattr(self.dataset, "targets", None)
        if targets is not None:
            t = targets[index]
            return t.item() if isinstance(t, torch.Tensor) else t
        if self._folder:
            return self.dataset.samples[index][1]
        if index not in self._labels:
            self._labels[index] = self.raw_sample(index)[1]
        lab = self._labels[index]
        return lab.item() if isinstance(lab, torch.Tensor) and lab.numel() == 1 else lab

    def label_set(self):
        """Every class label of the dataset when known without reading images (``classes``, ``targets``,
        ``samples``), else None."""
        classes = getattr(self.dataset, "classes", None)
        if classes is not None:
            return range(len(classes))
        targets = getattr(self.dataset, "targets", None)
        if targets is None and self._folder:
            targets = [s[1] for s in self.dataset.samples]
        if targets is None:
            return None
        arr = np.asarray(targets.tolist() if isinstance(targets, torch.Tensor) else targets)
        return [v.item() for v in np.unique(arr)] if arr.ndim == 1 else None

    def info(self, index: int, image: Any = None) -> RawInfo:
        """:class:`RawInfo` of the raw image of ``index`` (from ``image`` when the caller has it)."""
        try:
            if image is not None:
                return describe(image)
            if self._folder:
                from PIL import Image

                path = self.dataset.samples[index][0]
                loader = self.dataset.loader
                if getattr(loader, "__name__", "") in ("default_loader", "pil_loader"):
                    with Image.open(path) as im:  # header only: size without decoding
                        return RawInfo("pil", im.size[1], im.size[0], 3, "RGB")
            return describe(self.raw_sample(index)[0])
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(index, self.path(index), e) from e


class _ImageTransformOff:
    """A ``transforms`` callable that leaves the image alone and keeps the target transform."""

    def __init__(self, target_transform):
        self.target_transform = target_transform

    def __call__(self, image, target):
        return image, (self.target_transform(target) if self.target_transform is not None else target)
