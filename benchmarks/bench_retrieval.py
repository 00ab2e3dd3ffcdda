"""Retrieval over a pool larger than the search process's memory: peak RSS while searching a memory-mapped pool.

    python benchmarks/bench_retrieval.py --rows 1000000 --dim 512 --json out.json

1. Writes a pool of ``rows`` x ``dim`` float16 vectors in the LAION / clip-retrieval embedding-folder layout
   (``img_emb/img_emb_{i}.npy`` + ``metadata/metadata_{i}.parquet``) into a temporary folder, block by block
   (seeded). Query ``j`` is pool row ``planted[j]`` plus small noise, so its exact top-1 is known.
2. Searches it in a *fresh* child process (so ``ru_maxrss`` covers only opening + searching):
   ``RetrievalPool.from_embedding_folder`` (memory-mapped, streamed exact ``IndexFlatIP`` search chunk by chunk),
   ``search(queries, k)`` repeated ``--repeats`` times (median wall time), and ``retrieve`` with dedup and a
   held-out set (what a recipe runs).
3. Reports JSON: pool size on disk, the child's RSS after imports and its peak RSS (VmHWM; ``ru_maxrss`` too),
   peak RSS over the pool's bytes, search times, and whether every planted neighbour came back first.

Baseline in the same run: the float32 bytes an in-memory ``IndexFlatIP`` over the same pool would hold
(``rows * dim * 4``), which is what loading the pool whole costs before any search.

Measured (defaults: 1,000,000 x 512 float16 in 4 shards, chunk 65,536 rows, 16 queries, k 100; shared 2-core CPU
under load from other jobs): pool 977 MiB on disk (1,953 MiB as an in-memory float32 index); search process
peak RSS 471 MiB (VmHWM), of which 239 MiB is the interpreter with torch + faiss imported before the pool is
opened, so 232 MiB for searching (~one chunk in fp16 + fp32); every planted neighbour found first; exact
search 14.4 s median for the 16 queries (11.4 / 14.4 / 35.6 s), retrieve with dedup + held-out filter 18.8 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    """Peak RSS of this process image: /proc's VmHWM (per address space, so it starts afresh at exec).
    ``ru_maxrss`` is reported too, but on Linux a child inherits its parent's high-water mark through fork,
    so in the child it can show the parent's peak (the pool writer's) rather than its own."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_pool(path: str, rows: int, dim: int, shard_rows: int, seed: int, block: int = 1 << 15) -> np.ndarray:
    from fusionloader.methods.retrieval import write_embedding_folder

    rng = np.random.default_rng(seed)

    def blocks():
        for start in range(0, rows, block):
            yield rng.standard_normal((min(block, rows - start), dim), dtype=np.float32)

    write_embedding_folder(path, blocks(), metadata={"key": [f"{i:09d}" for i in range(rows)]}, shard_rows=shard_rows, dtype=np.float16)
    return np.sort(np.random.default_rng(seed + 1).choice(rows, size=16, replace=False))


def search_child(args) -> dict:
    """Runs in the child: open the pool memory-mapped, search, report RSS."""
    rss_start = _rss_mb()
    import faiss  # noqa: F401  (imported before the baseline so its libraries count in it)

    from fusionloader.methods.retrieval import RetrievalPool

    rss_imports = _rss_mb()
    planted = np.array(json.loads(args.planted))
    t = time.perf_counter()
    pool = RetrievalPool.from_embedding_folder(args.pool, chunk_rows=args.chunk_rows, gpu=False)
    open_s = time.perf_counter() - t
    phases = {"open": (_rss_mb(), _peak_mb())}
    rng = np.random.default_rng(args.seed + 2)
    q = pool.vectors(planted) + 0.05 * rng.standard_normal((len(planted), pool.dim)).astype(np.float32) / np.sqrt(pool.dim)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        scores, ids = pool.search(q, args.k)
        times.append(time.perf_counter() - t)
        phases.setdefault("search", (_rss_mb(), _peak_mb()))
    t = time.perf_counter()
    r = pool.retrieve(q, k=args.k, dedup=0.95, exclude=q[:2], exclude_threshold=0.99)
    retrieve_s = time.perf_counter() - t
    phases["retrieve"] = (_rss_mb(), _peak_mb())
    meta = pool.metadata(ids[:, 0])
    phases["metadata"] = (_rss_mb(), _peak_mb())
    return {
        "rss_start_mb": rss_start,
        "rss_after_imports_mb": rss_imports,
        "peak_rss_mb": _peak_mb(),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_and_peak_mb_after": phases,
        "open_s": open_s,
        "search_s_median": statistics.median(times),
        "search_s_all": times,
        "retrieve_s": retrieve_s,
        "retrieved": int(len(r)),
        "retrieve_removed": r.removed,
        "planted_top1": bool((ids[:, 0] == planted).all()),
        "planted_metadata_ok": [m["key"] for m in meta] == [f"{i:09d}" for i in planted],
        "top1_score_min": float(scores[:, 0].min()),
        "pool": repr(pool),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shard-rows", type=int, default=250_000)
    ap.add_argument("--chunk-rows", type=int, default=1 << 16)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the result here (also printed)")
    ap.add_argument("--dir", default=None, help="parent folder for the temporary pool (default: the system temp)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    ap.add_argument("--planted", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(search_child(args)))
        return 0

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="fl_bench_retrieval_") as tmp:
        t = time.perf_counter()
        planted = write_pool(tmp, args.rows, args.dim, args.shard_rows, args.seed)
        write_s = time.perf_counter() - t
        pool_bytes = sum(os.path.getsize(os.path.join(tmp, "img_emb", f)) for f in os.listdir(os.path.join(tmp, "img_emb")))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--pool", tmp, "--planted", json.dumps(planted.tolist()),
               "--chunk-rows", str(args.chunk_rows), "--k", str(args.k), "--repeats", str(args.repeats), "--seed", str(args.seed)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        child = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {
        "benchmark": "retrieval_memory_mapped_search",
        "rows": args.rows,
        "dim": args.dim,
        "dtype": "float16",
        "shards": -(-args.rows // args.shard_rows),
        "chunk_rows": args.chunk_rows,
        "queries": len(planted),
        "k": args.k,
        "pool_bytes_on_disk": pool_bytes,
        "pool_mb_on_disk": pool_bytes / 2**20,
        "baseline_in_memory_flat_index_mb": args.rows * args.dim * 4 / 2**20,
        "write_s": write_s,
        **child,
        "peak_rss_over_pool_bytes": child["peak_rss_mb"] / (pool_bytes / 2**20),
        "peak_rss_minus_imports_mb": child["peak_rss_mb"] - child["rss_after_imports_mb"],
        "command": "python benchmarks/bench_retrieval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
