"""The embedding-folder layout of LAION's published embeddings and clip-retrieval, read without loading it.

``path/img_emb/img_emb_{i}.npy`` (row-aligned with) ``path/metadata/metadata_{i}.parquet``; shards are opened
with ``np.load(mmap_mode="r")`` for their shape, dtype and file offset, and their rows are then read with plain
file reads (:func:`read_rows`, :func:`take_rows`): touched pages of a memory map (and the kernel's fault-around
neighbours) count towards the process's RSS until unmapped, read pages do not, so searching a pool larger than
memory costs one chunk, not the pool.
"""

from __future__ import annotations

import glob
import mmap
import os
import re

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "as_2d", "load_image", "metadata_rows", "open_shards", "read_rows", "shard_files",
           "take_rows", "write_embedding_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_SHARD_RE = re.compile(r"(\d+)\.(npy|parquet)$")



def as_2d(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x) if not isinstance(x, np.memmap) else x
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (rows, dim), got shape {tuple(x.shape)}")
    if not (np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{name}: expected floating-point embeddings, got dtype {x.dtype}")
    return x


def shard_files(folder: str, ext: str) -> list[str]:
    files = [f for f in glob.glob(os.path.join(folder, f"*.{ext}")) if _SHARD_RE.search(os.path.basename(f))]
    return sorted(files, key=lambda f: int(_SHARD_RE.search(os.path.basename(f)).group(1)))


def open_shards(folder: str) -> list[np.ndarray]:
    """The ``img_emb_<i>.npy`` shards of ``folder`` (numeric order), memory-mapped read-only."""
    shards = []
    for f in shard_files(folder, "npy"):
        try:
            shards.append(np.load(f, mmap_mode="r"))
        except (ValueError, OSError) as e:
            raise ValueError(f"{f}: not a readable .npy array: {e}") from e
    return shards


def file_backed(shard: np.ndarray) -> bool:
    return isinstance(shard, np.memmap) and isinstance(shard.base, mmap.mmap) and shard.flags.c_contiguous and bool(shard.filename)


def read_rows(shard: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a shard. For a whole-file memory map (``np.load(mmap_mode="r")``) they are read
    with plain file reads instead of through the mapping: touched mapped pages (and the kernel's fault-around
    neighbours) count towards the process's RSS until unmapped, read pages do not, so a streamed search over a
    pool larger than memory stays at one chunk's worth."""
    if file_backed(shard):
        row_bytes = shard.dtype.itemsize * shard.shape[1]
        with open(shard.filename, "rb") as f:
            f.seek(int(shard.offset) + start * row_bytes)
            out = np.fromfile(f, dtype=shard.dtype, count=(stop - start) * shard.shape[1])
        return out.reshape(stop - start, shard.shape[1])
    return shard[start:stop]


def take_rows(shard: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Scattered rows of a shard (``rows`` sorted); file reads for a whole-file memory map, as :func:`read_rows`."""
    if not file_backed(shard):
        return shard[rows]
    row_bytes = shard.dtype.itemsize * shard.shape[1]
    out = np.empty((len(rows), shard.shape[1]), shard.dtype)
    fd = os.open(shard.filename, os.O_RDONLY)
    try:
        base = int(shard.offset)
        for j, r in enumerate(rows.tolist()):
            out[j] = np.frombuffer(os.pread(fd, row_bytes, base + r * row_bytes), shard.dtype)
    finally:
        os.close(fd)
    return out


def metadata_rows(path: str, rows: np.ndarray) -> list[dict]:
    """Rows ``rows`` of one parquet file as dicts, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    rows = np.asarray(rows, dtype=np.int64)
    out: list[dict | None] = [None] * len(rows)
    pf = pq.ParquetFile(path, memory_map=True)
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    group = np.searchsorted(starts, rows, side="right") - 1
    for g in np.unique(group):
        sel = np.flatnonzero(group == g)
        table = pf.read_row_group(int(g)).take(rows[sel] - starts[g])
        for p, r in zip(sel.tolist(), table.to_pylist()):
            out[p] = r
    return out  # type: ignore[return-value]


def load_image(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def write_embedding_folder(path: str, embeddings, metadata: dict | None = None, *, shard_rows: int = 1_000_000,
                           dtype=np.float16) -> list[str]:
    """Write ``embeddings`` (an (N, D) array, or an iterable of (n_i, D) blocks) in the LAION / clip-retrieval
    layout: ``path/img_emb/img_emb_{i}.npy`` (``shard_rows`` rows each, ``dtype``) and, when ``metadata``
    (column -> list of N values) is given, ``path/metadata/metadata_{i}.parquet`` row-aligned. Blocks are
    written through ``np.lib.format.open_memmap`` so nothing larger than one block is held. Returns the
    shard paths."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    blocks = [embeddings] if isinstance(embeddings, (np.ndarray, torch.Tensor)) else embeddings
    emb_dir = os.path.join(path, "img_emb")
    os.makedirs(emb_dir, exist_ok=True)
    files: list[str] = []
    cur, filled, total = None, 0, 0

    def _close(rows):
        nonlocal cur
        if cur is not None:
            cur.flush()
            name = files[-1]
            del cur
            cur = None
            if rows < shard_rows:  # the last shard: rewrite with its true length (header holds the shape)
                a = np.load(name, mmap_mode="r")[:rows]
                tmp = name + ".tmp.npy"
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=a.dtype, shape=a.shape)
                for s in range(0, rows, 1 << 16):
                    out[s : s + (1 << 16)] = a[s : s + (1 << 16)]
                out.flush()
                del out, a
                os.replace(tmp, name)

    dim = None
    for b in blocks:
        b = as_2d(b, "embeddings")
        if dim is None:
            dim = b.shape[1]
        elif b.shape[1] != dim:
            raise ValueError(f"embeddings: block of width {b.shape[1]} after blocks of width {dim}")
        pos = 0
        while pos < len(b):
            if cur is None:
                files.append(os.path.join(emb_dir, f"img_emb_{len(files)}.npy"))
                cur = np.lib.format.open_memmap(files[-1], mode="w+", dtype=dtype, shape=(shard_rows, dim))
                filled = 0
            n = min(len(b) - pos, shard_rows - filled)
            cur[filled : filled + n] = b[pos : pos + n]
            filled, pos, total = filled + n, pos + n, total + n
            if filled == shard_rows:
                _close(filled)
    _close(filled)
    if not files:
        raise ValueError("embeddings: nothing to write (no rows)")
    if metadata is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta_dir = os.path.join(path, "metadata")
        os.makedirs(meta_dir, exist_ok=True)
        for col, values in metadata.items():
            if len(values) != total:
                raise ValueError(f"metadata[{col!r}]: {len(values)} values for {total} embeddings")
        for i in range(len(files)):
            lo, hi = i * shard_rows, min(total, (i + 1) * shard_rows)
            pq.write_table(pa.table({c: list(v[lo:hi]) for c, v in metadata.items()}), os.path.join(meta_dir, f"metadata_{i}.parquet"),
                           row_group_size=1 << 16)  # row groups: a lookup reads only the groups it needs
    return files
