"""Swap-in, plain training loop: DataLoader -> FusionLoader, nothing else changes.

    python examples/plain_loop.py --data /data/train --model runwayml/stable-diffusion-v1-5 --producers cuda:1
"""

import argparse

import numpy as np
import torch
from torch import nn

from fusionloader import FusionLoader, ImageFolder


def to_tensor(image, size=64):  # your usual train transform (torchvision's works the same)
    return torch.from_numpy(np.asarray(image.convert("RGB").resize((size, size)))).permute(2, 0, 1).float() / 255


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="root/<class>/<image>")
    ap.add_argument("--model", default="runwayml/stable-diffusion-v1-5", help="a checkpoint folder or hub id")
    ap.add_argument("--producers", nargs="+", default=["cuda:1"], help="spare devices that generate")
    ap.add_argument("--steps", type=int, default=50, help="diffusion steps per variant")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()

    dataset = ImageFolder(args.data, transform=to_tensor)
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(len(dataset.classes)))
    # before: loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=8)
    loader = FusionLoader(dataset, batch_size=64, shuffle=True, num_workers=2,
                          synthesizer=args.model, alpha=0.5, strengths="randomized", prompts="a photo of a {}",
                          num_inference_steps=args.steps, producer_devices=args.producers, seed=0)
    with loader:
        for epoch in range(args.epochs):
            for x, y in loader:  # same batches as before; about half the samples are fresh variants
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                # optimizer step, logging, ... as before
        print(loader.stats()["cumulative"])  # real / fresh / reused / fallback, achieved alpha, stall


if __name__ == "__main__":  # producers are spawned processes, as DataLoader workers under spawn
    main()
