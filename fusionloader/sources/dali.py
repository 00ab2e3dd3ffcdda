"""A DALI-backed image folder: ImageFolder's contract, decoding through an NVIDIA DALI pipeline.

``DaliImageFolder(root)`` scans ``root/<class>/<image>`` like torchvision's ImageFolder and exposes the
same attributes (``samples``, ``targets``, ``classes``, ``class_to_idx``, ``loader``, ``transform``,
``target_transform``), so :class:`~fusionloader.sources.ImageSource` and FusionLoader treat it as any
ImageFolder: producers read raw images through ``loader``, real samples go through ``transform``.

What DALI adds: ``__getitems__`` decodes a whole batch in one pipeline run (DataLoader's fetcher and
FusionLoader's workers call it), on CPU threads (``device_id=None``, the default; works without a GPU)
or with nvJPEG on GPU ``device_id`` (``decoder="mixed"``). Pipelines are not picklable, so each process
(DataLoader worker, producer) builds its own on first use.

Requires ``nvidia-dali-cuda120`` (optional dependency ``fusionloader[dali]``); imported lazily.

The whole real path in DALI -- file reader, decode, the train transform for real and synthetic images alike,
DALI's PyTorch iterator -- is :class:`~fusionloader.sources.dali_loader.DaliFusionLoader` (NOTE [DALI loader]),
re-exported here with its :class:`~fusionloader.sources.dali_transform.DaliTrainTransform`.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from .dali_loader import DaliFusionLoader
from .dali_transform import DaliTrainTransform
from .dataset import DatasetError
from .folder import IMG_EXTENSIONS

__all__ = ["DaliFusionLoader", "DaliImageFolder", "DaliTrainTransform", "dali_available"]

_DALI_PID: int | None = None  # the process whose DALI runtime is live (see DaliImageFolder._pipeline)



def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401

        return True
    except ImportError:
        return False


class _Feed:
    """``external_source`` callback: the encoded bytes of the batch being decoded."""

    def __init__(self):
        self.batch: list[np.ndarray] = []

    def __call__(self):
        return self.batch


class DaliImageFolder(Dataset):
    """``root/<class>/<image>`` (or explicit ``files``/``labels``), decoded by DALI.

    ``output``: ``"pil"`` (RGB PIL images, what torchvision-style transforms expect) or ``"numpy"``
    (HWC uint8). ``device_id``: None decodes on CPU; an int decodes on that GPU and copies back.
    """

    def __init__(self, root: str | None = None, transform: Callable | None = None, target_transform: Callable | None = None,
                 *, files: Sequence[str] | None = None, labels: Sequence[int] | None = None, output: str = "pil",
                 device_id: int | None = None, num_threads: int = 2, max_batch: int = 256):
        if output not in ("pil", "numpy"):
            raise ValueError("output must be 'pil' or 'numpy'")
        if root is not None:
            self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
            self.samples = [
                (os.path.join(root, c, f), self.class_to_idx[c])
                for c in self.classes for f in sorted(os.listdir(os.path.join(root, c)))
                if f.lower().endswith(IMG_EXTENSIONS)
            ]
        elif files is not None:
            labels = list(labels) if labels is not None else [0] * len(files)
            if len(labels) != len(files):
                raise ValueError("files and labels differ in length")
            self.samples = list(zip(map(str, files), labels))
            self.classes = sorted(set(labels))
            self.class_to_idx = {c: c for c in self.classes}
        else:
            raise ValueError("give root or files")
        self.targets = [t for _, t in self.samples]
        self.imgs = self.samples
        self.transform, self.target_transform = transform, target_transform
        self.output, self.device_id, self.num_threads, self.max_batch = output, device_id, num_threads, max_batch
        self._pipe = self._feed = self._pipe_pid = None

    # -- DALI -------------------------------------------------------------------------------------

    def _pipeline(self):
        """This process's pipeline, or None in a fork of a process that already ran DALI (DALI's
        threads do not survive fork: such workers decode with PIL; use multiprocessing_context="spawn"
        or "forkserver" to decode with DALI in DataLoader workers)."""
        global _DALI_PID
        if _DALI_PID is not None and _DALI_PID != os.getpid():
            if not getattr(self, "_warned", False):
                warnings.warn("DALI was initialised before this process forked; decoding with PIL here "
                              "(use multiprocessing_context='spawn' to decode with DALI in workers)", RuntimeWarning)
                self._warned = True
            return None
        if self._pipe is None or self._pipe_pid != os.getpid():
            from nvidia.dali import fn, pipeline_def, types

            feed = _Feed()
            decoder = "cpu" if self.device_id is None else "mixed"

            @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id,
                          exec_dynamic=True, prefetch_queue_depth=1)
            def decode():
                encoded = fn.external_source(source=feed, dtype=types.UINT8, batch=True, no_copy=False)
                return fn.decoders.image(encoded, device=decoder, output_type=types.RGB)

            _DALI_PID = os.getpid()
            pipe = decode()
            pipe.build()
            self._pipe, self._feed, self._pipe_pid = pipe, feed, os.getpid()
        return self._pipe

    def decode(self, paths: Sequence[str]) -> list[np.ndarray]:
        """HWC uint8 RGB arrays of ``paths``, decoded in one pipeline run per ``max_batch`` files."""
        pipe, out = self._pipeline(), []
        if pipe is None:
            from PIL import Image

            for p in paths:
                with Image.open(p) as im:
                    out.append(np.array(im.convert("RGB")))
            return out
        for s in range(0, len(paths), self.max_batch):
            chunk = paths[s : s + self.max_batch]
            self._feed.batch = [np.fromfile(p, dtype=np.uint8) for p in chunk]
            (images,) = pipe.run()
            if hasattr(images, "as_cpu"):
                images = images.as_cpu()
            out.extend(np.array(images.at(k)) for k in range(len(chunk)))
        return out

    def _as_output(self, array: np.ndarray):
        if self.output == "numpy":
            return array
        from PIL import Image

        return Image.fromarray(array, "RGB")

    # -- ImageFolder's contract -------------------------------------------------------------------

    def loader(self, path: str):
        """Decode one file (ImageFolder's ``loader``): what producers read raw images with."""
        try:
            return self._as_output(self.decode([path])[0])
        except Exception as e:
            raise DatasetError(self._index_of(path), path, e) from e

    def _index_of(self, path: str) -> int:
        for i, (p, _) in enumerate(self.samples):
            if p == path:
                return i
        return -1

    def __len__(self) -> int:
        return len(self.samples)

    def _finish(self, image, target):
        image = self._as_output(image)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]):
        paths = [self.samples[i][0] for i in indices]
        try:
            arrays = self.decode(paths)
        except Exception:
            # find the file that broke the batch, so the error names it
            for i, p in zip(indices, paths):
                try:
                    self.decode([p])
                except Exception as e:
                    raise DatasetError(i, p, e) from e
            raise
        return [self._finish(a, self.samples[i][1]) for a, i in zip(arrays, indices)]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pipe"] = state["_feed"] = None  # DALI pipelines are per process
        return state
