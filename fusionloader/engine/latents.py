"""The latent cache: each real image VAE-encoded once at the generation resolution, persisted, shared by processes.

For every item the cache stores the VAE posterior's mean and std (diffusers' ``DiagonalGaussianDistribution``:
``std = exp(0.5 * clamp(logvar, -30, 20))``), unscaled. Then

- ``sample`` mode: ``mean + std * randn_tensor(shape, generator)`` is exactly ``latent_dist.sample(generator)``,
  the draw the img2img pipeline makes (the sampler does it, with the request's generator or Philox stream 0);
- ``mean`` mode: ``mean`` (deterministic, the posterior mode).

On disk (a folder, no pickle):

- ``index.safetensors``: the latent shape as a tensor; format, fingerprint and record dtype as metadata;
- ``data.f32``: an ``np.memmap`` of records ``[mean | std]`` (float32, ``2 * C * h * w`` values) per item;
- ``present.u8``: one byte per item, set after its record is written;
- ``lock``: ``flock`` guard for creation, growth and rebuilds.

The files are mapped shared, so a dataset larger than RAM works and a producer process that opens the same
folder sees (and adds) the same entries. The fingerprint hashes the VAE config, checksums of a few VAE
weights, the resolution and the preprocessing; a folder with another fingerprint is rebuilt, never reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LatentCache", "encode_posterior", "preprocess_images", "vae_fingerprint"]

logger = logging.getLogger(__name__)

FORMAT = "fusionloader-latents-v1"
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
    """Hash of the VAE config, checksums of a few weights, resolution and preprocessing."""
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
    pre = {"resolution": list(resolution), "resize": resize, "input": "[0,1]->[-1,1]", "format": FORMAT}
    h.update(json.dumps(pre).encode())
    return h.hexdigest()[:32]


class LatentCache:
    """VAE posterior (mean, std) per dataset index, encoded once, persisted in ``path`` (a folder).

    ``path=None`` keeps the files in a private temporary folder removed when the cache is garbage collected.
    ``get(indices, load)`` returns ``(mean, std)`` float32 tensors (N, C, h, w) on ``device``; ``load(i)``
    returns item ``i`` as a float [0, 1] image (3, H, W) and is called only for misses.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        path: str | os.PathLike | None = None,
        resolution: tuple[int, int] | int = 512,
        device: torch.device | str | None = None,
        resize: str = "bilinear",
        batch_size: int = 16,
    ):
        if getattr(vae, "encode", None) is None or type(vae).__name__ == "AutoencoderTiny":
            raise ValueError("the latent cache needs an AutoencoderKL encoder (a posterior with mean and std)")
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
        if path is None:
            path = tempfile.mkdtemp(prefix="fusionloader-latents-")
            self._finalizer = weakref.finalize(self, shutil.rmtree, path, True)
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        self._data = self._present = None
        self.rebuilt = False  # True when an existing folder had another fingerprint and was cleared
        self.encoded = 0  # items this object encoded (misses + build)
        with self._locked():
            self._open_or_create()
        self._remap()

    # -- files ------------------------------------------------------------------------------------------

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @contextlib.contextmanager
    def _locked(self):
        with open(self._file("lock"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_index(self) -> dict | None:
        from safetensors import safe_open

        try:
            with safe_open(self._file("index.safetensors"), framework="pt") as f:
                meta = dict(f.metadata() or {})
                meta["latent_shape"] = tuple(f.get_tensor("latent_shape").tolist())
            return meta
        except Exception:  # absent or unreadable: treat as a fresh cache
            return None

    def _open_or_create(self) -> None:
        from safetensors.torch import save_file

        meta = self._read_index()
        ok = (
            meta is not None
            and meta.get("format") == FORMAT
            and meta.get("fingerprint") == self.fingerprint
            and meta.get("latent_shape") == self.latent_shape
            and os.path.exists(self._file("data.f32"))
            and os.path.exists(self._file("present.u8"))
        )
        if ok:
            return
        if meta is not None:
            logger.warning(
                "latent cache %s was built for fingerprint %s, not %s: rebuilding",
                self.path, meta.get("fingerprint"), self.fingerprint,
            )
            self.rebuilt = True
        for name in ("data.f32", "present.u8", "index.safetensors"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._file(name))
        open(self._file("data.f32"), "wb").close()
        open(self._file("present.u8"), "wb").close()
        save_file(
            {"latent_shape": torch.tensor(self.latent_shape, dtype=torch.int64)},
            self._file("index.safetensors"),
            metadata={"format": FORMAT, "fingerprint": self.fingerprint, "dtype": "float32"},
        )

    def _capacity_on_disk(self) -> int:
        return os.path.getsize(self._file("present.u8"))

    def _remap(self) -> None:
        n = self._capacity_on_disk()
        if n == 0:
            self._data = np.zeros((0, self.record), np.float32)
            self._present = np.zeros((0,), np.uint8)
            return
        self._data = np.memmap(self._file("data.f32"), np.float32, mode="r+", shape=(n, self.record))
        self._present = np.memmap(self._file("present.u8"), np.uint8, mode="r+", shape=(n,))

    def _ensure_capacity(self, n: int) -> None:
        if n <= len(self._present):
            return
        if n > self._capacity_on_disk():  # grow (sparse files, so over-allocating is cheap), under the lock
            with self._locked():
                have = self._capacity_on_disk()
                if n > have:
                    new = max(n, 2 * have, 1024)
                    with open(self._file("data.f32"), "r+b") as f:
                        f.truncate(new * self.record * 4)
                    with open(self._file("present.u8"), "r+b") as f:
                        f.truncate(new)
        self._remap()

    # -- public -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of items encoded so far (by any process)."""
        self._remap()
        return int(np.count_nonzero(self._present))

    def __contains__(self, index: int) -> bool:
        i = int(index)
        if i >= len(self._present):
            self._remap()  # another process may have grown the files
        return 0 <= i < len(self._present) and bool(self._present[i])

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float [0, 1] images (N, 3, H, W) -> posterior (mean, std), float32, on ``device``."""
        return encode_posterior(self.vae, images, self.resolution, self.resize, self.batch_size, self.device)

    def _write(self, indices: Sequence[int], mean: torch.Tensor, std: torch.Tensor) -> None:
        rec = torch.cat([mean.flatten(1), std.flatten(1)], 1).cpu().numpy()
        idx = np.asarray(indices, dtype=np.int64)
        self._data[idx] = rec
        self._present[idx] = 1  # after the data: another process never sees a flag before its record

    def get(self, indices: Sequence[int], load: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of ``indices``; misses are loaded with ``load(i)`` and encoded (in batches) first."""
        indices = [int(i) for i in indices]
        if any(i < 0 for i in indices):
            raise ValueError(f"negative index in {indices}")
        if not indices:
            empty = torch.zeros((0, *self.latent_shape), device=self.device)
            return empty, empty.clone()
        self._ensure_capacity(max(indices) + 1)
        missing = list(dict.fromkeys(i for i in indices if not self._present[i]))
        for k in range(0, len(missing), self.batch_size):
            chunk = missing[k : k + self.batch_size]
            images = torch.stack([self._check_item(load(i), i) for i in chunk])
            self._write(chunk, *self.encode(images))
            self.encoded += len(chunk)
        rec = torch.from_numpy(np.array(self._data[np.asarray(indices)]))
        rec = rec.view(len(indices), 2, *self.latent_shape).to(self.device)
        return rec[:, 0], rec[:, 1]

    def _check_item(self, image, index: int) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"load({index}) must return a float [0, 1] tensor of shape (3, H, W), got {shape}")
        return image.float() if image.is_floating_point() else image.float() / 255.0

    def build(self, num_items: int, load: Callable[[int], torch.Tensor], batch_size: int | None = None,
              progress: bool = True) -> None:  # fmt: skip
        """Encode every item in ``range(num_items)`` not yet cached, with a progress bar."""
        from tqdm.auto import tqdm

        self._ensure_capacity(num_items)
        todo = [i for i in range(num_items) if not self._present[i]]
        bs = batch_size or self.batch_size
        with tqdm(total=len(todo), desc="encoding latents", unit="img", disable=not progress) as bar:
            for k in range(0, len(todo), bs):
                chunk = todo[k : k + bs]
                self.get(chunk, load)
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

    def __repr__(self) -> str:
        return f"LatentCache({self.path!r}, resolution={self.resolution}, fingerprint={self.fingerprint})"
