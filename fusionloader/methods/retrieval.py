"""Retrieval baseline (Burg & Wenzel 2023): nearest neighbours of each class from an unlabeled image pool.

NOTE [Retrieval]
~~~~~~~~~~~~~~~~

Instead of generating variants, retrieve pool images whose CLIP embedding is nearest to each class's query
(its prompt templates' text embedding averaged as CLIP's zero-shot classifier does, or the embeddings of the
class's real images), label them with the class that retrieved them and mix them in where synthetic images
would go. The pool is meant to be the generator's own pre-training data (for the embedded default: the digits
*generator* split, :func:`default_pool`).

* Pool. :class:`RetrievalPool` holds one or more 2-D embedding arrays ("shards"; global id = shard offset +
  row). Rows and queries are L2-normalised by the pool, so inner product = cosine. ``index="flat"`` (default)
  is exact inner product with faiss ``IndexFlatIP``: an in-memory pool builds one index; a memory-mapped pool
  (:meth:`RetrievalPool.from_embedding_folder`, LAION/clip-retrieval ``img_emb/*.npy`` + ``metadata/*.parquet``)
  is never loaded whole: it is searched ``chunk_rows`` rows at a time (each chunk normalised into a float32
  ``IndexFlatIP``) and the per-chunk top-k are merged, so peak memory is one chunk plus the results.
  ``index="ivf"`` / ``"hnsw"`` / any faiss factory string (e.g. ``"IVF4096,PQ64"``) build an approximate index
  chunk by chunk (trained on a seeded sample) for pools past a few million; the index itself then lives in
  memory (use a PQ factory string when the vectors do not fit). faiss is imported lazily (extra
  ``[retrieval]``); faiss-gpu is used when installed and a GPU is visible (``gpu=None``), or forced/refused
  with ``gpu=True/False``.
* Filters (:meth:`RetrievalPool.retrieve`), in this order: per query, its ``k`` best neighbours that are
  above ``min_score`` and not near a held-out (test) image (``exclude`` embeddings, cosine >=
  ``exclude_threshold``; the search is widened until ``k`` such neighbours are found or the pool is
  exhausted); then per class the union over its queries; an image retrieved by several classes goes to the
  one that scored it highest (``exclusive=True``); near-duplicates (cosine >= ``dedup`` between pool images)
  keep only the highest-scored one; at most ``per_class`` images per class (the best-scored). What each filter
  removed is counted in :attr:`Retrieved.removed`.
* Serving. :class:`RetrievedVariants` answers ``choose(index, label, seed)`` with one of the images retrieved
  for ``label``, chosen by a pure function of ``(seed, index, label)`` -- the loader calls it exactly where a
  synthetic image would enter (docs/CONTRACTS.md, Methods/retrieval). It is small and picklable: it holds only
  the retrieved ids and a loader for their images, not the pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .embedding_folder import (
    IMAGE_EXTENSIONS,
    as_2d,
    load_image,
    metadata_rows,
    open_shards,
    read_rows,
    shard_files,
    take_rows,
    write_embedding_folder,
)


__all__ = [
    "IMAGE_EXTENSIONS",
    "RetrievalPool",
    "Retrieved",
    "RetrievedVariants",
    "default_pool",
    "retrieved_variants",
    "write_embedding_folder",
]


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("retrieval needs faiss: pip install 'fusionloader[retrieval]' (faiss-cpu, or faiss-gpu)") from e
    return faiss



def _normalised(x: np.ndarray) -> np.ndarray:
    """float32 copy with L2-normalised rows (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, copy=True)
    n = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # no (rows, dim) temporary, unlike np.linalg.norm
    np.divide(x, np.maximum(n, 1e-12), out=x)
    return x



def _merge_topk(scores_a, ids_a, scores_b, ids_b, k):
    s = np.concatenate([scores_a, scores_b], 1)
    i = np.concatenate([ids_a, ids_b], 1)
    if s.shape[1] > k:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        s, i = np.take_along_axis(s, part, 1), np.take_along_axis(i, part, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)



class _TensorImages:
    """Picklable ``id -> image`` over a dict of (3, H, W) float [0, 1] tensors."""

    def __init__(self, images: dict):
        self.images = images

    def __call__(self, pool_id: int) -> torch.Tensor:
        return self.images[int(pool_id)]


class _PathImages:
    """Picklable ``id -> image`` over a dict of image file paths."""

    def __init__(self, paths: dict):
        self.paths = paths

    def __call__(self, pool_id: int) -> torch.Tensor:
        return load_image(self.paths[int(pool_id)])


@dataclass
class Retrieved:
    """What :meth:`RetrievalPool.retrieve` kept: parallel arrays sorted by (label, -score).

    ``ids`` pool ids, ``labels`` the class that retrieved each, ``scores`` its cosine to that class's best
    query, ``queries`` the index of that query; ``num_classes``; ``removed`` counts per filter
    (``below_min_score``, ``held_out``, ``other_class``, ``duplicates``, ``over_cap``)."""

    ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    queries: np.ndarray
    num_classes: int
    removed: dict = field(default_factory=dict)

    def for_class(self, label: int) -> np.ndarray:
        return self.ids[self.labels == int(label)]

    def counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def __len__(self) -> int:
        return len(self.ids)


class RetrievalPool:
    """Nearest-neighbour search over an unlabeled image pool's embeddings.

    ``embeddings``: one (N, D) float array (numpy, np.memmap or torch) or a sequence of them (shards, all of
    width D; global id = shard offset + row). ``images``: optional ``id -> (3, H, W) float [0, 1]`` callable,
    tensor (N, 3, H, W), or sequence of image paths, to serve retrieved images. ``metadata``: optional list of
    parquet files aligned with the shards (read row by row on demand). ``index``: ``"flat"`` (exact,
    default), ``"ivf"``, ``"hnsw"``, or a faiss factory string. ``stream``: search memory-mapped shards chunk by
    chunk without an index in memory (default: when a shard is an ``np.memmap``). ``gpu``: None = faiss-gpu when
    installed and a GPU is visible.
    """

    def __init__(self, embeddings, *, images=None, metadata: Sequence[str] | None = None, index: str = "flat",
                 stream: bool | None = None, chunk_rows: int = 1 << 16, nlist: int | None = None, nprobe: int = 16,
                 hnsw_m: int = 32, ef_search: int = 128, train_rows: int | None = None, seed: int = 0,
                 gpu: bool | None = None):
        if isinstance(embeddings, (np.ndarray, torch.Tensor)):
            shards = [as_2d(embeddings, "embeddings")]
        else:
            shards = [as_2d(s, f"embeddings[{i}]") for i, s in enumerate(embeddings)]
        if not shards or sum(len(s) for s in shards) == 0:
            raise ValueError("embeddings: the pool is empty (no rows)")
        self.dim = int(shards[0].shape[1])
        for i, s in enumerate(shards):
            if s.shape[1] != self.dim:
                raise ValueError(f"embeddings[{i}]: width {s.shape[1]} differs from shard 0's width {self.dim}")
        if self.dim < 1:
            raise ValueError("embeddings: width 0")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if not isinstance(index, str) or not index:
            raise ValueError(f"index must be 'flat', 'ivf', 'hnsw' or a faiss factory string, got {index!r}")
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.index_kind = index
        self.chunk_rows = int(chunk_rows)
        self.stream = any(isinstance(s, np.memmap) for s in shards) if stream is None else bool(stream)
        if index != "flat":
            self.stream = False  # an approximate index holds its own (possibly compressed) copy
        self.nprobe, self.ef_search = int(nprobe), int(ef_search)
        self._gpu = self._want_gpu(gpu)
        self._metadata_files = list(metadata) if metadata is not None else None
        if self._metadata_files is not None:
            self._check_metadata()
        self._image_column = None
        self._images = self._image_loader(images)
        self._index = None
        if not self.stream:
            self._index = self._build_index(index, nlist, hnsw_m, train_rows, seed)

    def __getstate__(self):
        # A faiss index does not pickle, and memory-mapped shards would pickle as whole arrays.
        raise TypeError("RetrievalPool is not picklable: send a RetrievedVariants (RetrievedVariants.from_pool) "
                        "to workers and producers instead")

    # -- construction ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        mode = "streamed flat" if self.stream else self.index_kind
        return f"RetrievalPool({len(self)} x {self.dim}, {len(self.shards)} shard(s), {mode}{', gpu' if self._gpu else ''})"

    @staticmethod
    def _want_gpu(gpu: bool | None) -> bool:
        if gpu is False:
            return False
        faiss = _faiss()
        available = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if gpu and not available:
            raise ValueError("gpu=True: this faiss has no GPU support or sees no GPU (install faiss-gpu)")
        return available

    def _to_device(self, index):
        if not self._gpu:
            return index
        faiss = _faiss()
        if not hasattr(self, "_gpu_res"):
            self._gpu_res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_res, 0, index)

    def _chunks(self):
        """(global offset, float32 normalised chunk) over all rows, ``chunk_rows`` at a time."""
        for s, off in zip(self.shards, self.offsets[:-1]):
            for start in range(0, len(s), self.chunk_rows):
                yield int(off + start), _normalised(read_rows(s, start, min(len(s), start + self.chunk_rows)))

    def _build_index(self, kind, nlist, hnsw_m, train_rows, seed):
        faiss = _faiss()
        n, d = len(self), self.dim
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef_search
        else:
            if kind == "ivf":
                nlist = int(nlist or max(1, min(65536, 4 * int(np.sqrt(n)))))
                kind_str = f"IVF{nlist},Flat"
            else:
                kind_str = kind
            try:
                index = faiss.index_factory(d, kind_str, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as e:
                raise ValueError(f"index: faiss cannot build {kind!r}: {e}") from e
        if not index.is_trained:
            rows = min(n, int(train_rows or max(10_000, 64 * getattr(index, "nlist", 256))))
            pick = np.sort(np.random.default_rng(seed).choice(n, size=rows, replace=False))
            sample = self.vectors(pick)
            if hasattr(index, "nlist") and len(sample) < index.nlist:
                raise ValueError(f"nlist={index.nlist} needs at least that many pool rows to train; the pool has {n}")
            index.train(sample)
        if hasattr(index, "nprobe"):
            index.nprobe = self.nprobe
        for _, chunk in self._chunks():
            index.add(chunk)
        return self._to_device(index) if kind in ("flat", "ivf") else index  # faiss-gpu has no HNSW

    def _check_metadata(self):
        import pyarrow.parquet as pq

        if len(self._metadata_files) != len(self.shards):
            raise ValueError(f"metadata: {len(self._metadata_files)} parquet file(s) for {len(self.shards)} embedding shard(s)")
        for f, s in zip(self._metadata_files, self.shards):
            rows = pq.ParquetFile(f).metadata.num_rows
            if rows != len(s):
                raise ValueError(f"metadata: {f} has {rows} rows but its embedding shard has {len(s)}")

    def _image_loader(self, images):
        """``images`` argument -> ``id -> image``; file paths are kept in ``self._paths`` (so
        :meth:`image_loader` hands on paths, not decoded images)."""
        self._paths = None
        if images is None or callable(images):
            return images
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or len(images) != len(self):
                raise ValueError(f"images: expected ({len(self)}, 3, H, W), got shape {tuple(images.shape)}")
            return images.__getitem__
        images = list(images)
        if len(images) != len(self):
            raise ValueError(f"images: {len(images)} entries for a pool of {len(self)} embeddings")
        if all(isinstance(p, (str, os.PathLike)) for p in images):
            self._paths = [os.fspath(p) for p in images]
            return lambda i: load_image(self._paths[int(i)])
        return lambda i: torch.as_tensor(images[int(i)])

    @classmethod
    def from_embedding_folder(cls, path: str, *, images=None, image_column: str | None = "image_path", **kwargs) -> RetrievalPool:
        """Open the LAION / clip-retrieval layout memory-mapped: ``path/img_emb/img_emb_{i}.npy`` (+ optional
        ``path/metadata/metadata_{i}.parquet``, row-aligned). Nothing is read whole. Images: ``images=`` as in
        the constructor, else the metadata's ``image_column`` (file paths, relative to ``path``) when present."""
        emb_dir = os.path.join(path, "img_emb")
        shards = open_shards(emb_dir)
        if not shards:
            raise FileNotFoundError(f"{emb_dir}: no img_emb_<i>.npy shards (LAION / clip-retrieval embedding-folder layout)")
        meta = shard_files(os.path.join(path, "metadata"), "parquet") or None
        pool = cls(shards, metadata=meta, **kwargs)
        if images is not None:
            pool._images = pool._image_loader(images)
        elif meta is not None and image_column:
            import pyarrow.parquet as pq

            if image_column in pq.ParquetFile(meta[0]).schema_arrow.names:
                pool._image_column, pool._root = image_column, path
                pool._images = pool._metadata_image
        return pool

    def _metadata_image(self, pool_id: int) -> torch.Tensor:
        p = self.metadata([pool_id])[0][self._image_column]
        return load_image(p if os.path.isabs(p) else os.path.join(self._root, p))

    @classmethod
    def from_folder(cls, folder: str, embedder, *, out: str | None = None, batch_size: int = 64,
                    shard_rows: int = 1_000_000, dtype=np.float16, **kwargs) -> RetrievalPool:
        """Embed every image under ``folder`` (recursively, sorted paths) with ``embedder``
        (:mod:`fusionloader.methods.embedders`). With ``out``, write the LAION layout there (embeddings as
        ``dtype``, metadata ``image_path`` relative to ``out`` when possible) and open it memory-mapped."""
        paths = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not paths:
            raise ValueError(f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
        emb = np.concatenate([embedder.encode_images([load_image(p) for p in paths[i : i + batch_size]])
                              for i in range(0, len(paths), batch_size)])
        if out is None:
            return cls(emb, images=paths, **kwargs)
        rel = [os.path.relpath(os.path.abspath(p), os.path.abspath(out)) for p in paths]
        write_embedding_folder(out, emb, metadata={"image_path": rel}, shard_rows=shard_rows, dtype=dtype)
        return cls.from_embedding_folder(out, **kwargs)

    # -- access ---------------------------------------------------------------------------------------------

    def _locate(self, ids: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise IndexError(f"pool id {bad} outside [0, {len(self)})")
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return ids, shard, ids - self.offsets[shard]

    def vectors(self, ids) -> np.ndarray:
        """The pool's L2-normalised float32 embeddings of ``ids`` (reads only those rows)."""
        ids, shard, row = self._locate(ids)
        out = np.empty((len(ids), self.dim), np.float32)
        for s in np.unique(shard):
            m = shard == s
            order = np.argsort(row[m])  # sorted reads on a memmap
            out[np.flatnonzero(m)[order]] = take_rows(self.shards[s], row[m][order])
        return _normalised(out)

    def metadata(self, ids) -> list[dict]:
        """Metadata rows (dicts) of ``ids`` from the parquet files; only the needed row groups are read."""
        if self._metadata_files is None:
            raise ValueError("this pool has no metadata (pass metadata= or use an embedding folder with metadata/)")
        ids, shard, row = self._locate(ids)
        out: list[dict | None] = [None] * len(ids)
        for s in np.unique(shard):
            pos = np.flatnonzero(shard == s)
            for p, r in zip(pos.tolist(), metadata_rows(self._metadata_files[s], row[pos])):
                out[p] = r
        return out  # type: ignore[return-value]

    def image(self, pool_id: int) -> torch.Tensor:
        """Pool image ``pool_id`` as float [0, 1] (3, H, W)."""
        if self._images is None:
            raise ValueError("this pool has no images (pass images=, or metadata with an image_path column)")
        self._locate([pool_id])
        return self._images(int(pool_id))

    def image_loader(self, ids) -> Callable[[int], torch.Tensor]:
        """A small picklable ``id -> image`` for ``ids`` only (what :class:`RetrievedVariants` carries): file
        paths for file-backed pools, else copies of those images (never a view of the whole pool)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        for i in ids:
            self._locate([i])
        if getattr(self, "_image_column", None):
            rows = self.metadata(ids)
            col = self._image_column
            return _PathImages({i: r[col] if os.path.isabs(r[col]) else os.path.join(self._root, r[col]) for i, r in zip(ids, rows)})
        if self._paths is not None:
            return _PathImages({i: self._paths[i] for i in ids})
        return _TensorImages({i: self.image(i).clone() for i in ids})

    # -- search ---------------------------------------------------------------------------------------------

    def _queries(self, queries, name="queries") -> np.ndarray:
        q = as_2d(queries, name)
        if q.shape[1] != self.dim:
            raise ValueError(f"{name}: width {q.shape[1]} but the pool's embeddings are {self.dim} wide "
                             "(an index of another embedding model?)")
        bad = ~np.isfinite(q).all(1)
        if bad.any():
            raise ValueError(f"{name}: row {int(np.flatnonzero(bad)[0])} is not finite (NaN/inf)")
        return _normalised(q)

    def _check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (the pool's size), got {k}")
        return int(k)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``k`` nearest pool rows per query by cosine (inner product of L2-normalised rows).

        Returns ``(scores, ids)``: float32 and int64 arrays of shape (Q, k), best first. Exact for ``"flat"``;
        an approximate index returns id -1 (faiss's convention) where it found fewer than ``k``."""
        k = self._check_k(k)
        q = self._queries(queries)
        return self._search(q, k)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not len(q):
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        if self._index is not None:
            scores, ids = self._index.search(q, k)
            return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)
        faiss = _faiss()
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_i = np.zeros((len(q), 0), np.int64)
        for off, chunk in self._chunks():
            kc = min(k, len(chunk))
            if self._gpu:
                index = self._to_device(faiss.IndexFlatIP(self.dim))
                index.add(chunk)
                s, i = index.search(q, kc)
                del index
            else:  # IndexFlatIP's exhaustive search on the chunk in place (no copy into an index)
                s, i = faiss.knn(q, chunk, kc, metric=faiss.METRIC_INNER_PRODUCT)
            best_s, best_i = _merge_topk(best_s, best_i, s, i.astype(np.int64) + off, k)
            del chunk
        return best_s, best_i

    def retrieve(self, queries, labels=None, k: int = 50, *, min_score: float | None = None, dedup: float | None = None,
                 per_class: int | None = None, exclude=None, exclude_threshold: float = 0.95, exclusive: bool = True,
                 num_classes: int | None = None) -> Retrieved:
        """Neighbours per class with the filters of NOTE [Retrieval].

        ``queries`` (Q, D): class-prompt embeddings (one per class: ``labels`` defaults to ``arange(Q)``) or real
        images' embeddings with their ``labels``. ``k`` neighbours per query; ``min_score`` cosine threshold;
        ``dedup`` cosine at or above which two pool images are near-duplicates; ``per_class`` cap; ``exclude``
        (E, D) held-out embeddings whose neighbours (cosine >= ``exclude_threshold``) are removed."""
        q = self._queries(queries)
        k = self._check_k(k)
        labels = np.arange(len(q)) if labels is None else np.asarray(labels).reshape(-1)
        if len(labels) != len(q):
            raise ValueError(f"labels: {len(labels)} labels for {len(q)} queries")
        if len(labels) and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
            raise ValueError("labels must be non-negative integers (class ids)")
        num_classes = int(num_classes if num_classes is not None else (labels.max() + 1 if len(labels) else 0))
        if len(labels) and labels.max() >= num_classes:
            raise ValueError(f"num_classes={num_classes} but labels go up to {labels.max()}")
        for name, v in (("min_score", min_score), ("dedup", dedup), ("exclude_threshold", exclude_threshold)):
            if v is not None and not -1.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} is a cosine in [-1, 1], got {v}")
        if per_class is not None and (isinstance(per_class, bool) or int(per_class) < 1):
            raise ValueError(f"per_class must be a positive integer or None, got {per_class!r}")
        held_out = None
        if exclude is not None:
            ex = as_2d(exclude, "exclude")
            if ex.shape[1] != self.dim:
                raise ValueError(f"exclude: width {ex.shape[1]} but the pool's embeddings are {self.dim} wide")
            if len(ex):
                held_out = _faiss().IndexFlatIP(self.dim)
                held_out.add(_normalised(ex))
        removed = dict.fromkeys(("below_min_score", "held_out", "other_class", "duplicates", "over_cap"), 0)

        # 1. per query: k best neighbours above min_score and away from the held-out set. All queries are
        #    searched in one pass (a streamed pool is read once per pass); only queries short of k survivors
        #    are searched again, wider.
        per_query: list = [None] * len(q)
        todo, fetch = np.arange(len(q)), min(len(self), 2 * k if (min_score is not None or held_out is not None) else k)
        while len(todo):
            S, I = self._search(q[todo], fetch)
            again = []
            for row, qi in enumerate(todo.tolist()):
                s, i = S[row], I[row]
                found = i >= 0  # an approximate index pads with id -1 when its probed lists run out
                below = s < min_score if min_score is not None else np.zeros(len(i), bool)
                near = np.zeros(len(i), bool)
                if held_out is not None and found.any():
                    near[found] = held_out.search(self.vectors(i[found]), 1)[0][:, 0] >= exclude_threshold
                ok = found & ~below & ~near
                if ok.sum() < k and fetch < len(self) and not below[-1]:
                    again.append(qi)
                    continue
                sel = np.flatnonzero(ok)[:k]
                looked = sel[-1] + 1 if len(sel) == k else len(i)  # the candidates a k-answer had to look at
                removed["below_min_score"] += int(below[:looked].sum())
                removed["held_out"] += int((near[:looked] & ~below[:looked]).sum())
                per_query[qi] = (s[sel], i[sel])
            todo, fetch = np.asarray(again, np.int64), min(len(self), 4 * fetch)

        # 2. union per class, and (exclusive) each image to the class that scored it highest.
        best: dict[tuple[int, int], tuple[float, int]] = {}
        for qi, (s, i) in enumerate(per_query):
            c = int(labels[qi])
            for sc, pid in zip(s.tolist(), i.tolist()):
                if (c, pid) not in best or sc > best[(c, pid)][0]:
                    best[(c, pid)] = (sc, qi)
        cand = np.array([(pid, c, sc, qi) for (c, pid), (sc, qi) in best.items()], dtype=np.float64).reshape(-1, 4)
        order = np.lexsort((cand[:, 1], cand[:, 0], -cand[:, 2]))  # by score desc, then id, class (deterministic)
        cand = cand[order]
        if exclusive and len(cand):
            _, first = np.unique(cand[:, 0], return_index=True)
            keep = np.zeros(len(cand), bool)
            keep[first] = True
            removed["other_class"] = int((~keep).sum())
            cand = cand[keep]  # still in score order

        # 3. near-duplicates: greedily in score order, drop any image too close to one already kept. The pairs
        #    come from blocked matrix products over the candidates (O(M^2 D) flops, no per-candidate calls).
        if dedup is not None and len(cand):
            ids_u, inv = np.unique(cand[:, 0].astype(np.int64), return_inverse=True)
            vec = self.vectors(ids_u)
            # All pairs with cosine >= dedup, by blocks of rows against all candidates (matrix products
            # bounded to ~128 MB per block).
            m = len(ids_u)
            near_pairs: list = [[] for _ in range(m)]
            step = max(1, (1 << 25) // m)
            for b in range(0, m, step):
                rows, cols = np.nonzero(vec[b : b + step] @ vec.T >= dedup)
                for r, c in zip((rows + b).tolist(), cols.tolist()):
                    if r != c:
                        near_pairs[r].append(c)
            near = [np.asarray(n, np.int64) for n in near_pairs]
            keep = np.zeros(len(cand), bool)
            kept = np.zeros(len(ids_u), bool)
            for j, u in enumerate(inv.tolist()):
                if kept[u]:  # the same image again, for another class (exclusive=False): not a duplicate
                    keep[j] = True
                elif not kept[near[u]].any():
                    keep[j] = kept[u] = True
            removed["duplicates"] = int((~keep).sum())
            cand = cand[keep]

        # 4. per-class cap (the best-scored).
        if per_class is not None and len(cand):
            rank = np.zeros(len(cand), np.int64)
            seen: dict[int, int] = {}
            for j, c in enumerate(cand[:, 1].astype(np.int64).tolist()):
                rank[j] = seen.get(c, 0)
                seen[c] = rank[j] + 1
            keep = rank < int(per_class)
            removed["over_cap"] = int((~keep).sum())
            cand = cand[keep]

        order = np.lexsort((cand[:, 0], -cand[:, 2], cand[:, 1]))
        cand = cand[order]
        return Retrieved(
            ids=cand[:, 0].astype(np.int64), labels=cand[:, 1].astype(np.int64), scores=cand[:, 2].astype(np.float32),
            queries=cand[:, 3].astype(np.int64), num_classes=num_classes, removed=removed,
        )


class RetrievedVariants:
    """Retrieved pool images served where synthetic variants would enter the loader.

    ``choose(index, label, seed) -> (image, pool_id) | None``: one of the images retrieved for class ``label``
    (float [0, 1] (3, H, W), the pool's own size), chosen uniformly by a pure function of ``(seed, index,
    label)``, so a resumed run or another worker gets the same one; ``None`` when nothing was retrieved for
    ``label`` (the caller falls back to the real sample). ``load``: ``pool_id -> image`` (default:
    ``pool.image_loader(retrieved.ids)``, which is picklable and holds only the retrieved images)."""

    def __init__(self, retrieved: Retrieved, load: Callable[[int], torch.Tensor]):
        if not callable(load):
            raise TypeError(f"load must be callable (pool_id -> image), got {type(load).__name__}")
        self.num_classes = int(retrieved.num_classes)
        self._by_class = [np.ascontiguousarray(retrieved.for_class(c)) for c in range(self.num_classes)]
        self._load = load

    @classmethod
    def from_pool(cls, pool: RetrievalPool, retrieved: Retrieved) -> RetrievedVariants:
        return cls(retrieved, pool.image_loader(retrieved.ids))

    def pool_ids(self, label: int) -> np.ndarray:
        """The pool ids retrieved for ``label`` (best-scored first)."""
        return self._by_class[self._check_label(label)]

    def counts(self) -> list[int]:
        return [len(x) for x in self._by_class]

    def _check_label(self, label) -> int:
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside [0, {self.num_classes})")
        return label

    def pick(self, index: int, label: int, seed: int) -> int | None:
        """The pool id ``choose`` would serve (no image load)."""
        ids = self._by_class[self._check_label(label)]
        if not len(ids):
            return None
        mask = (1 << 64) - 1
        rng = np.random.default_rng([int(seed) & mask, int(index) & mask, int(label)])
        return int(ids[rng.integers(len(ids))])

    def choose(self, index: int, label: int, seed: int) -> tuple[torch.Tensor, int] | None:
        pid = self.pick(index, label, seed)
        if pid is None:
            return None
        return self._load(pid), pid

    def __len__(self) -> int:
        return sum(self.counts())

    def __repr__(self) -> str:
        return f"RetrievedVariants({len(self)} images over {self.num_classes} classes)"



def default_pool(embedder=None, **kwargs) -> RetrievalPool:
    """The embedded default's pool: the digits *generator* split (the embedded diffusion model's own training
    images, i.e. Burg & Wenzel's setting), embedded with the shipped CLIP-style encoder (or ``embedder``),
    images attached. ``kwargs`` go to :class:`RetrievalPool`."""
    from fusionloader.pretrained import load_digits_splits

    if embedder is None:
        from fusionloader.pretrained.clip_model import load_default_embedder

        embedder = load_default_embedder()
    gen = load_digits_splits().generator
    return RetrievalPool(embedder.encode_images(gen.images), images=gen.images, **kwargs)


def retrieved_variants(pool: RetrievalPool, embedder, class_names: Sequence[str], *, templates: Sequence[str] = ("a photo of a {}.",),
                       k: int = 50, real_images=None, real_labels=None, held_out_images=None, **filters) -> RetrievedVariants:
    """The whole recipe in one call: queries -> :meth:`RetrievalPool.retrieve` -> :class:`RetrievedVariants`.

    Queries are the class prompts (``templates`` averaged, CLIP zero-shot style) or, when ``real_images`` and
    ``real_labels`` are given, the real images' embeddings (``k`` neighbours each). ``held_out_images`` (the test
    set) are embedded and their neighbours removed. ``filters``: ``min_score``, ``dedup``, ``per_class``,
    ``exclude_threshold``, ``exclusive``."""
    from .embedders import prompt_embeddings

    if (real_images is None) != (real_labels is None):
        raise ValueError("real_images and real_labels go together (image queries need their labels)")
    if real_images is None:
        queries, labels = prompt_embeddings(embedder, class_names, templates), None
    else:
        queries, labels = embedder.encode_images(real_images), np.asarray(real_labels).reshape(-1)
    exclude = embedder.encode_images(held_out_images) if held_out_images is not None else None
    got = pool.retrieve(queries, labels, k=k, exclude=exclude, num_classes=len(class_names), **filters)
    return RetrievedVariants.from_pool(pool, got)
