"""Planning at scale: time and peak memory to the first batch of a 10 M-index epoch, DataLoader vs FusionLoader.

Each measurement runs in a fresh subprocess (so peak RSS is that run's alone): build the loader over a
10 M-item dataset whose items cost nothing (so the figure is the order and the plan, not image decoding),
call ``next(iter(loader))``, report the seconds from ``iter()`` to the first batch and the process's peak
RSS (``ru_maxrss``) minus its RSS after imports. FusionLoader runs at ``alpha=0.5`` with an in-process pool
that never delivers (``late_policy="real"``): no producer is needed before the first synthetic take, so
the figure is the loader's own work -- planning, the first look-ahead window of job requests, mixing.

Cases: ``shuffle=True`` without a seed (the default RandomSampler, which DataLoader and FusionLoader iterate
alike: ``randperm(10 M).tolist()``), and FusionLoader's ``seed=`` order (reproduced as a numpy array).

    python -m benchmarks.bench_plan_scale --out benchmarks/results/plan_scale.json [--n 10000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from fusionloader import FusionLoader

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

class Cheap(Dataset):
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i): return torch.zeros(3, 4, 4), i % 10

class NullPool:  # never delivers: the loader falls back to real at once (late_policy="real")
    def __init__(self, *a, **k): self.submitted = 0
    def start(self): pass
    def submit(self, jobs): self.submitted += len(jobs)
    def take(self, key, timeout=0.0): return None
    def cancel(self, keys): pass
    def check(self): pass
    def state(self, key): return "unknown"
    def stats(self): return {}
    def close(self): pass

which, n, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
ds = Cheap(n)
base = rss_mb()
if which == "dataloader":
    loader = DataLoader(ds, batch_size=bs, shuffle=True)
elif which == "fusion":
    loader = FusionLoader(ds, batch_size=bs, shuffle=True, alpha=0.5, late_policy="real", synthesizer="null",
                          pool_factory=NullPool, prompts="a photo")
else:  # fusion-seeded
    loader = FusionLoader(ds, batch_size=bs, shuffle=True, alpha=0.5, late_policy="real", synthesizer="null",
                          pool_factory=NullPool, prompts="a photo", seed=0)
t0 = time.perf_counter()
batch = next(iter(loader))
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"first_batch_s": dt, "peak_rss_mb": peak, "rss_after_imports_mb": base,
                  "peak_over_imports_mb": peak - base}))
"""


def _run(which: str, n: int, bs: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _CHILD, which, str(n), str(bs)], capture_output=True, text=True, env=env,
                         check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/plan_scale.json")
    args = ap.parse_args(argv)
    cases = {}
    for which in ("dataloader", "fusion", "fusion-seeded"):
        runs = [_run(which, args.n, args.batch_size) for _ in range(args.repeats)]
        cases[which] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        cases[which]["runs"] = runs
    ref = cases["dataloader"]
    result = {
        "n": args.n, "batch_size": args.batch_size, "repeats": args.repeats, "alpha": 0.5,
        "cases": cases,
        "ratios": {w: {"first_batch_s": cases[w]["first_batch_s"] / ref["first_batch_s"],
                       "peak_rss_mb": cases[w]["peak_rss_mb"] / ref["peak_rss_mb"],
                       "peak_over_imports_mb": cases[w]["peak_over_imports_mb"] / max(ref["peak_over_imports_mb"], 1e-9)}
                   for w in ("fusion", "fusion-seeded")},
    }  # fmt: skip
    from benchmarks.common import write_json

    write_json(args.out, result)
    print(json.dumps(result["ratios"], indent=2))
    return result


if __name__ == "__main__":
    main()
