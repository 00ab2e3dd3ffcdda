"""The latent cache: each real image VAE-encoded once at the generation resolution, persisted, shared by processes.

For every item the cache stores the VAE posterior's mean and std (diffusers' ``DiagonalGaussianDistribution``:
``std = exp(0.5 * clamp(logvar, -30, 20))``), unscaled. Then

- ``sample`` mode: ``mean + std * randn_tensor(shape, generator)`` is exactly ``latent_dist.sample(generator)``,
  the draw the img2img pipeline makes (the sampler does it, with the request's generator or Philox stream 0);
- ``mean`` mode: ``mean`` (deterministic, the posterior mode).

Keys: the model (the fingerprint: VAE config, checksums of a few VAE weights, its dtype, the resolution and the
preprocessing) chooses a sub-folder ``<path>/<fingerprint>/``, so runs with different models share a path without
touching each other's files; the data (a digest per index: file path + size + mtime, or the raw bytes) is stored
beside each record and checked on every read, so another dataset at the same path is re-encoded, never served
the first one's latents. Files, locking and validation: :mod:`fusionloader.engine.latent_store`.

``path=None`` is the node's shared cache for this user (:func:`default_cache_dir`): every producer of the node
shares one folder per fingerprint. ``temporary=True`` is a private folder removed on close, on garbage
collection, at interpreter exit, and -- for owners killed without a chance to clean up -- by the next private
folder created on the host.

NOTE [Latent misses off the critical path]: ``get`` encodes what it misses, in batches, before returning; a
producer keeps misses out of its sampler's admission by calling ``prefetch(indices, ...)`` as jobs arrive: a
background thread encodes them in batches of ``batch_size`` while the sampler steps, and ``get`` on an index
being prefetched waits for that batch instead of encoding it alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .latent_store import LatentStore, content_digest, default_cache_dir, file_digest, private_dir

__all__ = [
    "LatentCache",
    "SourceLatents",
    "content_digest",
    "default_cache_dir",
    "encode_posterior",
    "file_digest",
    "preprocess_images",
    "source_digest",
    "vae_fingerprint",
]

logger = logging.getLogger(__name__)

FORMAT = "fusionloader-latents-v2"
RESIZE_MODES = ("bilinear", "bicubic", "nearest")


def preprocess_images(images: torch.Tensor, resolution: tuple[int, int], resize: str = "bilinear") -> torch.Tensor:
    """Float [0, 1] images (N, 3, H, W) -> the VAE's input: resized to ``resolution``, scaled to [-1, 1].

    At the generation resolution this is exactly what diffusers' ``VaeImageProcessor.preprocess`` does to a
    [0, 1] tensor (``2x - 1``). Other sizes are resized (antialiased unless ``nearest``); the mode is part of
    the cache fingerprint.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected float images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
    if tuple(images.shape[-2:]) != tuple(resolution):
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; expected one of {RESIZE_MODES}")
        kw = {} if resize == "nearest" else {"antialias": True, "align_corners": False}
        images = F.interpolate(images, size=tuple(resolution), mode=resize, **kw)
    return 2.0 * images - 1.0


@torch.no_grad()
def encode_posterior(vae, images: torch.Tensor, resolution, resize: str = "bilinear", batch_size: int = 16, device=None):
    """Float [0, 1] images (N, 3, H, W) -> the VAE posterior's (mean, std), float32 (N, C, h, w)."""
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    x = preprocess_images(images.to(device, torch.float32), resolution, resize)
    means, stds = [], []
    for i in range(0, len(x), batch_size):
        dist = vae.encode(x[i : i + batch_size].to(vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def vae_fingerprint(vae: torch.nn.Module, resolution, resize: str) -> str:
    """Hash of the VAE config, checksums of a few weights, its dtype, resolution and preprocessing."""
    h = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    names = [n for n, _ in vae.named_parameters()]
    # First, last and quant-conv weights: cheap, and any fine-tune or different checkpoint changes them.
    picks = {names[0], names[-1]} | {n for n in names if n.startswith(("quant_conv", "encoder.conv_out"))}
    for name, p in vae.named_parameters():
        if name in picks:
            w = p.detach().to(device="cpu", dtype=torch.float64)
            h.update(name.encode())
            h.update(np.asarray([w.sum().item(), w.abs().sum().item(), (w * w).sum().item()]).tobytes())
    dtype = str(next(vae.parameters()).dtype)  # an fp16 encoder's latents differ from an fp32 one's
    pre = {"resolution": list(resolution), "resize": resize, "input": "[0,1]->[-1,1]", "format": FORMAT,
           "dtype": dtype}
    h.update(json.dumps(pre).encode())
    return h.hexdigest()[:32]



def source_digest(source) -> Callable[[int], bytes]:
    """``digest(i)`` for a producer's source (``.path(i)``, ``.raw_sample(i)`` or ``.raw(i) -> (image, label)``):
    the file's stat when item ``i`` is a file (no read), else the content digest of its undecoded image
    (``raw_sample``: a PIL image or uint8 array hashes 4x fewer bytes than the float tensor ``raw`` returns)."""
    path_of = getattr(source, "path", None)
    raw = getattr(source, "raw_sample", None) or source.raw

    def digest(index: int) -> bytes:
        path = path_of(index) if callable(path_of) else None
        if path is not None:
            try:
                return file_digest(path)
            except OSError:  # not a plain file after all (an archive member, a URL): hash the content
                pass
        return content_digest(raw(index)[0])

    return digest


def _as_digest(value, index: int) -> bytes:
    if isinstance(value, (bytes, bytearray)) and len(value) == 16 and any(value):
        return bytes(value)
    if isinstance(value, (bytes, bytearray, str)) and len(value):
        raw = value.encode() if isinstance(value, str) else bytes(value)
        return content_digest(raw)
    raise TypeError(f"digest({index}) must return non-empty bytes or str, got {type(value).__name__} {value!r:.60}")


# Host staging, module functions so a test can watch the CUDA path on a CPU build: one pinned buffer per call
# (torch's caching host allocator reuses it only once the copy that reads it has completed) and one
# non-blocking copy to the device, instead of a pageable ``.to(device)`` that blocks the host per job.
def _host_buffer(shape: tuple[int, ...], pinned: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, pin_memory=pinned)


def _to_device(host: torch.Tensor, device: torch.device, pinned: bool) -> torch.Tensor:
    return host if device.type == "cpu" else host.to(device, non_blocking=pinned)


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class LatentCache:
    """VAE posterior (mean, std) per dataset index, encoded once, persisted in ``<path>/<fingerprint>/``.

    ``get(indices, load, digest=None)`` returns ``(mean, std)`` float32 tensors (N, C, h, w) on ``device``;
    ``load(i)`` returns item ``i`` as a float [0, 1] (or uint8) image (3, H, W); ``digest(i)`` identifies the data
    of item ``i`` (:func:`source_digest`, :func:`file_digest`); without it the digest is taken from the bytes
    ``load(i)`` returns, which loads every item on every call (safe, slower for decoded files).

    ``path=None``: the node's shared folder (:func:`default_cache_dir`). ``temporary=True``: a private folder
    removed on :meth:`close` / exit of a ``with`` block / garbage collection / interpreter exit.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        path: str | os.PathLike | None = None,
        resolution: tuple[int, int] | int = 512,
        device: torch.device | str | None = None,
        resize: str = "bilinear",
        batch_size: int = 16,
        *,
        temporary: bool = False,
        lock_timeout: float = 120.0,
    ):
        if getattr(vae, "encode", None) is None or type(vae).__name__ == "AutoencoderTiny":
            raise ValueError("the latent cache needs an AutoencoderKL encoder (a posterior with mean and std)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if temporary and path is not None:
            raise ValueError(f"temporary=True makes a private folder; pass path=None, not {os.fspath(path)!r}")
        self.vae = vae
        self.resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.device = torch.device(device) if device is not None else next(vae.parameters()).device
        self.resize = resize
        self.batch_size = batch_size
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if self.resolution[0] % factor or self.resolution[1] % factor:
            raise ValueError(f"resolution {self.resolution} must be a multiple of the VAE factor {factor}")
        self.latent_shape = (int(vae.config.latent_channels), self.resolution[0] // factor, self.resolution[1] // factor)
        self.record = 2 * int(np.prod(self.latent_shape))
        self.fingerprint = vae_fingerprint(vae, self.resolution, resize)
        self.temporary = bool(temporary)
        self._finalizer = None
        if temporary:
            path = private_dir()
            self._finalizer = weakref.finalize(self, _remove_tree, path)
        elif path is None:
            path = default_cache_dir()
        self.path = os.path.abspath(os.fspath(path))  # the root the caller named; files are in ``folder``
        self.folder = os.path.join(self.path, self.fingerprint)
        meta = {"fingerprint": self.fingerprint, "latent_shape": list(self.latent_shape), "resize": resize,
                "resolution": list(self.resolution)}  # fmt: skip
        self._store = LatentStore(self.folder, self.record, meta, lock_timeout)
        self.encoded = 0  # items this object encoded (misses, prefetches, build)
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._prefetching: dict[int, concurrent.futures.Future] = {}
        self._closed = False

    @property
    def rebuilt(self) -> bool:
        """True when the folder was found damaged (a truncated file) or foreign and was rebuilt empty."""
        return self._store.rebuilt

    # -- lifetime -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop prefetching, unmap the files, and remove the folder if the cache is temporary. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        self._store.close()
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> LatentCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"latent cache {self.folder} is closed")

    # -- queries ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of indices with an entry (for whatever data; by any process)."""
        self._check_open()
        return self._store.count()

    def __contains__(self, index: int) -> bool:
        """Whether ``index`` has an entry (``get`` still checks that it is for the caller's data)."""
        self._check_open()
        return self._store.has(int(index))

    def encode(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Float [0, 1] images (N, 3, H, W), or a list of (3, H, W) any sizes -> posterior (mean, std), float32."""
        if isinstance(images, (list, tuple)):
            images = self._stack(list(images))
        return encode_posterior(self.vae, images, self.resolution, self.resize, self.batch_size, self.device)

    def _stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        if all(im.shape == images[0].shape for im in images):
            return torch.stack(images)
        # Mixed sizes (an ImageFolder): resize each as preprocess_images would have, then batch.
        kw = {} if self.resize == "nearest" else {"antialias": True, "align_corners": False}
        return torch.cat([im[None] if tuple(im.shape[-2:]) == self.resolution
                          else F.interpolate(im[None], size=self.resolution, mode=self.resize, **kw)
                          for im in images])  # fmt: skip

    @staticmethod
    def _indices(indices) -> list[int]:
        out = [int(i) for i in indices]
        bad = [i for i in out if i < 0]
        if bad:
            raise ValueError(f"negative index {bad[0]} in indices")
        return out

    def _check_item(self, image, index: int) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"load({index}) must return a float [0, 1] tensor of shape (3, H, W), got {shape}")
        return image.float() if image.is_floating_point() else image.float() / 255.0

    # -- the work -----------------------------------------------------------------------------------------

    def _resolve(self, indices: list[int], load, digest, batch_size: int, out: np.ndarray | None) -> int:
        """Serve the hits of distinct ``indices`` into ``out`` rows and encode the misses in batches; -> encoded."""
        encoded = 0
        todo: list[tuple[int, int, bytes, torch.Tensor | None]] = []  # (row, index, digest, image if loaded)

        def flush(batch):
            nonlocal encoded
            images = [im if im is not None else self._check_item(load(i), i) for _, i, _, im in batch]
            mean, std = self.encode(images)
            rec = torch.cat([mean.flatten(1), std.flatten(1)], 1).cpu().numpy()
            self._store.write([i for _, i, _, _ in batch], [d for _, _, d, _ in batch], rec)
            if out is not None:
                out[[row for row, _, _, _ in batch]] = rec
            encoded += len(batch)

        for start in range(0, len(indices), batch_size):
            if self._closed:  # close() during a long prefetch: stop between batches, not after all of them
                raise RuntimeError(f"latent cache {self.folder} was closed")
            chunk = indices[start : start + batch_size]
            if digest is None:  # the bytes as loaded are the identity; keep them for the misses
                raw = [load(i) for i in chunk]
                digests = [content_digest(im) for im in raw]
                images = [self._check_item(im, i) for im, i in zip(raw, chunk)]
            else:
                digests, images = [_as_digest(digest(i), i) for i in chunk], [None] * len(chunk)
            rows = None if out is None else out[start : start + len(chunk)]
            hit = self._store.lookup(chunk, digests, rows)
            todo += [(start + k, chunk[k], digests[k], images[k]) for k in np.flatnonzero(~hit)]
            while len(todo) >= batch_size:
                flush(todo[:batch_size])
                todo = todo[batch_size:]
        if todo:
            flush(todo)
        with self._lock:
            self.encoded += encoded
        return encoded

    def ensure(self, indices: Sequence[int], load: Callable[[int], torch.Tensor],
               digest: Callable[[int], bytes] | None = None, batch_size: int | None = None) -> int:  # fmt: skip
        """Encode, in batches of ``batch_size``, every index of ``indices`` without an entry for its data.

        Returns the number encoded. Nothing is copied to the device; ``get`` afterwards is a read.
        """
        self._check_open()
        bs = self.batch_size if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}")
        return self._resolve(list(dict.fromkeys(self._indices(indices))), load, digest, bs, None)

    def prefetch(self, indices: Sequence[int], load: Callable[[int], torch.Tensor],
                 digest: Callable[[int], bytes] | None = None,
                 batch_size: int | None = None) -> concurrent.futures.Future:  # fmt: skip
        """``ensure(indices, ...)`` on this cache's background thread; returns its future.

        A producer calls it when jobs arrive, so misses are encoded in batches while its sampler steps; ``get`` of
        an index being prefetched waits for that batch. An error (a bad image) is left in the future; the ``get``
        of that index meets it again and raises it for the job it belongs to.
        """
        self._check_open()
        todo = list(dict.fromkeys(self._indices(indices)))
        with self._lock:
            if self._closed:
                raise RuntimeError(f"latent cache {self.folder} is closed")
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fusionloader-latents")
            fut = self._executor.submit(self._prefetch_job, todo, load, digest, batch_size)
            for i in todo:
                self._prefetching[i] = fut
        fut.add_done_callback(lambda f: self._forget(todo, f))
        return fut

    def _prefetch_job(self, indices, load, digest, batch_size) -> int:
        # CUDA's current device is per thread: bind this one to the cache's device, so the encoder's work (and
        # any context creation) happens there, not on device 0.
        guard = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return self.ensure(indices, load, digest, batch_size)

    def _forget(self, indices: list[int], fut) -> None:
        with self._lock:
            for i in indices:
                if self._prefetching.get(i) is fut:
                    del self._prefetching[i]
        if not fut.cancelled() and fut.exception() is not None:
            logger.debug("latent prefetch of %d items failed: %s", len(indices), fut.exception())

    def _await_prefetch(self, indices: list[int]) -> None:
        with self._lock:
            futures = {self._prefetching[i] for i in indices if i in self._prefetching}
        if futures:
            concurrent.futures.wait(futures)  # errors are not ours to raise: get re-encodes and raises per item

    def get(self, indices: Sequence[int], load: Callable[[int], torch.Tensor],
            digest: Callable[[int], bytes] | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(mean, std) of ``indices`` on ``device``: entries for this data served, misses encoded first (batched).

        The records are gathered into one (pinned, when the device is CUDA) host buffer and copied to the device
        in one non-blocking transfer: call it once per admission round with every index, not once per job.
        """
        self._check_open()
        indices = self._indices(indices)
        if not indices:
            empty = torch.zeros((0, *self.latent_shape), device=self.device)
            return empty, empty.clone()
        self._await_prefetch(indices)
        distinct = list(dict.fromkeys(indices))
        pinned = self.device.type == "cuda"
        if len(distinct) == len(indices):
            host = _host_buffer((len(indices), self.record), pinned)
            self._resolve(indices, load, digest, self.batch_size, host.numpy())
        else:
            rows = np.empty((len(distinct), self.record), np.float32)
            self._resolve(distinct, load, digest, self.batch_size, rows)
            where = {i: k for k, i in enumerate(distinct)}
            host = _host_buffer((len(indices), self.record), pinned)
            np.take(rows, [where[i] for i in indices], axis=0, out=host.numpy())
        rec = _to_device(host, self.device, pinned).view(len(indices), 2, *self.latent_shape)
        return rec[:, 0], rec[:, 1]

    def build(self, num_items: int, load: Callable[[int], torch.Tensor], batch_size: int | None = None,
              progress: bool = True, digest: Callable[[int], bytes] | None = None) -> None:  # fmt: skip
        """Encode every item in ``range(num_items)`` without an entry for its data, with a progress bar."""
        from tqdm.auto import tqdm

        bs = batch_size or self.batch_size
        with tqdm(total=num_items, desc="encoding latents", unit="img", disable=not progress) as bar:
            for start in range(0, num_items, 64 * bs):  # chunks, so the bar moves
                chunk = range(start, min(num_items, start + 64 * bs))
                self.ensure(chunk, load, digest, bs)
                bar.update(len(chunk))

    @staticmethod
    def sample(mean: torch.Tensor, std: torch.Tensor, generator=None, mode: str = "sample") -> torch.Tensor:
        """Unscaled latents: ``mean`` (mode "mean") or ``mean + std * randn_tensor(shape, generator)``."""
        if mode == "mean":
            return mean
        if mode != "sample":
            raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
        from diffusers.utils.torch_utils import randn_tensor

        return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    def bind(self, source) -> SourceLatents:
        """This cache seen through a producer's ``source`` (``raw(i) -> (image, label)``, optionally ``path(i)``,
        ``raw_sample(i)``): ``prefetch(indices)`` / ``ensure(indices)`` / ``get(indices)`` with the source's loader
        and :func:`source_digest` filled in. The producer's two calls: ``prefetch`` as jobs arrive, one ``get``
        per admission round."""
        return SourceLatents(self, source)

    def __repr__(self) -> str:
        return f"LatentCache({self.folder!r}, resolution={self.resolution}, fingerprint={self.fingerprint})"


class SourceLatents:
    """A :class:`LatentCache` bound to one source (see :meth:`LatentCache.bind`)."""

    def __init__(self, cache: LatentCache, source):
        if not callable(getattr(source, "raw", None)):
            raise TypeError(f"source must have raw(index) -> (image, label), got {type(source).__name__}")
        self.cache, self.source = cache, source
        self.digest = source_digest(source)

    def load(self, index: int) -> torch.Tensor:
        return self.source.raw(index)[0]

    def prefetch(self, indices: Sequence[int], batch_size: int | None = None) -> concurrent.futures.Future:
        return self.cache.prefetch(indices, self.load, self.digest, batch_size)

    def ensure(self, indices: Sequence[int], batch_size: int | None = None) -> int:
        return self.cache.ensure(indices, self.load, self.digest, batch_size)

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.get(indices, self.load, self.digest)
