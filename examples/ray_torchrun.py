"""Under torchrun, every rank fed by ONE pool of Ray producer actors (producer_backend="ray"; README "Past one machine").

    # one node, 8 GPUs: Ray gets GPUs 6 and 7, torchrun trains on 0-5
    CUDA_VISIBLE_DEVICES=6,7 ray start --head --port 6379 --num-gpus 2 --system-config '{"automatic_object_spilling_enabled": false}'
    RAY_ADDRESS=127.0.0.1:6379 torchrun --nproc-per-node 6 examples/ray_torchrun.py --data /data/train --producers 2
"""

import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fusionloader import FusionLoader, ImageFolder


def to_tensor(image, size=64):
    return torch.from_numpy(np.asarray(image.convert("RGB").resize((size, size)))).permute(2, 0, 1).float() / 255


def producers(text: str):
    """``2`` (two actors, one GPU each where the cluster has GPUs) or a JSON list of Ray resource dicts."""
    return int(text) if text.isdigit() else json.loads(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="runwayml/stable-diffusion-v1-5")
    ap.add_argument("--producers", type=producers, default=2, help='N actors, or e.g. \'[{"num_gpus": 0.5}]\'')
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
    loader = FusionLoader(dataset, batch_size=64, shuffle=True, synthesizer=args.model, alpha=0.5, seed=0,
                          num_inference_steps=args.steps, producer_backend="ray", producer_devices=args.producers)
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)  # as you would on the DistributedSampler
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"rank {dist.get_rank()}:", loader.stats()["cumulative"])
    dist.barrier()  # without RAY_ADDRESS, rank 0 hosts the Ray runtime: leave together
    loader.close()  # the last rank to leave stops the actors
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
