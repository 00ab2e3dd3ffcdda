"""Swap-in under torchrun: each rank gets its shard (DistributedSampler's rules) and its own producers.

    # 8 GPUs: ranks on cuda:0-3, producers on cuda:4-7 (one per rank; fewer: examples/ray_torchrun.py)
    torchrun --nproc-per-node 4 examples/torchrun_ddp.py --data /data/train --producers cuda:4 cuda:5 cuda:6 cuda:7
"""

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fusionloader import FusionLoader, ImageFolder


def to_tensor(image, size=64):
    return torch.from_numpy(np.asarray(image.convert("RGB").resize((size, size)))).permute(2, 0, 1).float() / 255


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="runwayml/stable-diffusion-v1-5")
    ap.add_argument("--producers", nargs="+", default=["cuda:4", "cuda:5", "cuda:6", "cuda:7"],
                    help="split among the local ranks (at least one each)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dataset = ImageFolder(args.data, transform=to_tensor)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, len(dataset.classes))).to(device)
    model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with FusionLoader(dataset, batch_size=64, shuffle=True, synthesizer=args.model, alpha=0.5,
                      num_inference_steps=args.steps, producer_devices=args.producers, seed=0) as loader:
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)  # as you would on the DistributedSampler
            for x, y in loader:
                loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
        print(f"rank {dist.get_rank()}:", loader.stats()["cumulative"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
