"""A 2-rank training job whose ranks share one Ray producer pool (tests/test_ray_launch.py).

    torchrun --nproc-per-node 2 tests/launch/ray_worker.py --path CKPT --out DIR

No ``RAY_ADDRESS``: rank 0 starts a local Ray runtime and the ranks share it (NOTE [Ray backend]). Each rank
trains one epoch with ``FusionLoader(..., producer_backend="ray", producer_devices=1, late_policy="wait",
return_meta=True)`` and writes ``DIR/rank<r>.pt``: the meta of every batch, its synthetic images, whether they
differ from the real ones, and the pool's stats after both ranks finished.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Ray's workers import the dataset's class by name (as they would a training package installed on every node):
# it lives in a module next to this script, on the PYTHONPATH the Ray runtime started by rank 0 inherits.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)
from ray_images import CLASSES, SIZE, Images  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from fusionloader import FusionLoader

    dataset = Images()
    loader = FusionLoader(dataset, batch_size=4, shuffle=True, seed=0, synthesizer=args.path, alpha=0.5,
                          late_policy="wait", return_meta=True, num_inference_steps=2, guidance_scale=1.0,
                          strengths=0.5, producer_capacity=4, producer_timeout=300.0, wait_timeout=300.0,
                          producer_backend="ray", producer_devices=1)
    model = DistributedDataParallel(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, CLASSES)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = []
    loader.set_epoch(0)
    for (x, y), meta in loader:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        differs = [not torch.equal(x[p], dataset.images[int(i)]) for p, i in enumerate(meta["index"])]
        batches.append(dict(index=meta["index"].clone(), synthetic=meta["synthetic"].clone(),
                            fresh=meta["fresh"].clone(), differs=torch.tensor(differs), images=x.clone(),
                            loss=float(loss)))
    loader.stats()  # acknowledges this rank's last takes
    dist.barrier()
    stats = loader.stats()["producer"]
    torch.save(dict(batches=batches, stats=stats, rank=rank), os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()  # rank 0 hosts the Ray runtime: nobody leaves while another rank still uses the pool
    loader.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
