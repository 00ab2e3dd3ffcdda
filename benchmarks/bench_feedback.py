"""Trainer feedback cost: ``FusionLoader.report`` per step, and planning a hard-weighted epoch, at 1 M indices.

``report``: a batch of ``--batch`` torch indices and probabilities (what a trainer passes: ``meta["index"]``
and a softmax column) against a dataset of ``--n`` items; baseline in the same run: the bare numpy
assignment ``prob[idx] = p`` of the same arrays (the floor any tracker pays). ``plan``: ``iter()`` of a
``mixing="hard"`` loader (hard mask over the dataset, binding the policy, the first window) against the
same loader with ``mixing="replace"``. Medians of ``--repeats`` runs, JSON out.

    python -m benchmarks.bench_feedback --out benchmarks/results/feedback.json [--n 1000000] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch.utils.data import Dataset


class _Cheap(Dataset):
    def __init__(self, n):
        self.n = n
        self.targets = np.arange(n) % 1000

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(3, 4, 4), int(self.targets[i])


class _NullPool:  # never delivers: the figure is the loader's own work
    def __init__(self, *a, **k):
        pass

    start = close = check = lambda self, *a: None
    submit = cancel = lambda self, *a: None
    take = lambda self, key, timeout=0.0: None  # noqa: E731
    state = lambda self, key: "unknown"  # noqa: E731
    stats = lambda self: {}  # noqa: E731


def _median_us(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main(argv=None):
    from fusionloader import FusionLoader

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ds = _Cheap(args.n)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, args.n, (args.batch,), generator=g)
    p = torch.rand(args.batch, generator=g)

    def loader(mixing):
        return FusionLoader(ds, batch_size=args.batch, shuffle=True, seed=0, alpha=0.5, late_policy="real",
                            mixing=mixing, synthesizer="none", pool_factory=_NullPool)  # fmt: skip

    hard = loader("hard")
    floor = np.full(args.n, np.nan, np.float32)
    res = {"n": args.n, "batch": args.batch, "repeats": args.repeats}
    res["report_us"] = _median_us(lambda: hard.report(idx, p), args.repeats)
    res["baseline_numpy_assign_us"] = _median_us(lambda: floor.__setitem__(idx.numpy(), p.numpy()), args.repeats)
    hard.report(torch.arange(args.n // 10), torch.full((args.n // 10,), 0.1))  # 10 % hard
    plan_repeats = max(3, args.repeats // 40)
    res["iter_hard_ms"] = _median_us(lambda: next(iter(hard)), plan_repeats) / 1e3
    replace = loader("replace")
    res["iter_replace_ms"] = _median_us(lambda: next(iter(replace)), plan_repeats) / 1e3
    hard.close(), replace.close()
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
