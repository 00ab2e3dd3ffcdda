"""The DALI pipeline of the DALI loader: real images from a file reader, synthetic ones from ``external_source``.

NOTE [DALI pipeline]
~~~~~~~~~~~~~~~~~~~~

One graph per epoch and rank (the reader's file list is fixed when a pipeline is built):

* Real path. ``fn.readers.file(files=, labels=, shard_id=, num_shards=, random_shuffle=False,
  pad_last_batch=True, name="Reader")`` reads the encoded files. The list it is given is the concatenation
  of every rank's epoch order (DistributedSampler's, equal lengths), so DALI's contiguous shard ``shard_id``
  of it is exactly this rank's order: DALI shards, and the shard is the loader's DDP split (DALI's reader
  shuffle is off: its order must be the plan's, so that the coins and seeds of FusionLoader's positions land
  on the same indices). Decoding is ``fn.decoders.image`` on ``"cpu"`` (``device_id=None``) or nvJPEG
  ``"mixed"`` (GPU ``device_id``).
* Synthetic path. One batch ``fn.external_source`` callback (:class:`FeedFn`, called in the iterating
  thread, ``prefetch_queue_depth`` iterations ahead; not ``parallel=True``, whose callbacks run in worker
  processes that cannot reach the producer pool) gives per sample: the coin resolved for the position
  (``synthetic``), the synthetic image (HWC uint8; a 1x1 placeholder for real positions), the dataset
  index, the transform draws, the kind and strength. A DALI conditional (``enable_conditionals``) splits
  the batch on ``synthetic``: real samples are decoded, synthetic ones are resized to the real file's size
  (``fn.peek_image_shape``: header only, DA-Fusion's resize-back). Both then meet the same
  :class:`~fusionloader.sources.dali_transform.DaliTrainTransform` with their position's draws.
* Output. ``data`` (CHW float32), ``label`` (the reader's), and with ``meta`` ``index``, ``kind``
  (0 real, 1 fresh, 2 reused, 3 fallback), ``strength``; DALI's PyTorch plugin turns them into tensors.
* Devices. ``device_id=None`` runs every operator on CPU threads (what CI runs); an int runs decode, resize
  and normalise on that GPU (the synthetic images are copied there with ``.gpu()``); only the device
  differs between the two graphs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["KINDS", "READER", "FeedFn", "build_pipeline", "output_map", "placeholder"]

KINDS = ("real", "fresh", "reused", "fallback")  # the ``kind`` output's codes
READER = "Reader"


class FeedFn:
    """The ``external_source`` batch callback: ``batch_fn(iteration)`` returns the per-sample lists
    ``(synthetic, image, crop, mirror, index, kind, strength)``; without ``meta`` the last three are dropped
    (DALI warns about computed outputs nobody uses)."""

    def __init__(self, batch_fn: Callable[[int], tuple], meta: bool = True):
        self.batch_fn, self.meta = batch_fn, meta

    def __call__(self, info):
        out = self.batch_fn(int(info.iteration))
        return out if self.meta else out[:4]


def build_pipeline(files: Sequence[str], labels: Sequence[int], feed: Callable[[int], tuple], transform, *, batch_size: int,
                   shard_id: int, num_shards: int, device_id: int | None = None, num_threads: int = 2,
                   prefetch_queue_depth: int = 2, meta: bool = True, seed: int = 0, build: bool = True):  # fmt: skip
    """A built DALI pipeline (NOTE [DALI pipeline]); outputs ``data, label`` (+ ``index, kind, strength``).
    ``feed(iteration)``: the external source's per-sample lists for that batch (see :class:`FeedFn`).
    ``build=False`` returns the traced graph unbuilt (building a GPU graph needs the GPU; tracing does not)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    files, labels = [str(f) for f in files], [int(x) for x in labels]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch_queue_depth, exec_dynamic=True, enable_conditionals=True)  # fmt: skip
    def fusion():
        encoded, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                         random_shuffle=False, pad_last_batch=True, name=READER)  # fmt: skip
        n = 7 if meta else 4
        fed = fn.external_source(
            source=FeedFn(feed, meta), num_outputs=n, batch=True, batch_info=True, parallel=False,
            dtype=[types.BOOL, types.UINT8, types.FLOAT, types.INT32, types.INT64, types.INT32, types.FLOAT][:n],
            layout=["", "HWC", "", "", "", "", ""][:n],
        )
        synthetic, image, crop, mirror = fed[:4]
        shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)
        height, width = shape[0], shape[1]
        if synthetic:
            img = fn.resize(image.gpu() if gpu else image, size=fn.stack(height, width), antialias=True,
                            dtype=types.UINT8)  # fmt: skip
        else:
            img = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        data = transform.apply(img, height, width, crop, mirror)
        if meta:
            return (data, label) + tuple(fed[4:])
        return data, label

    pipe = fusion()
    if build:
        pipe.build()
    return pipe


def output_map(meta: bool) -> list[str]:
    return ["data", "label", "index", "kind", "strength"] if meta else ["data", "label"]


def placeholder() -> np.ndarray:
    """What a real position feeds as its synthetic image (never used: the conditional drops it)."""
    return np.zeros((1, 1, 3), dtype=np.uint8)
