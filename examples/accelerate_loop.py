"""Swap-in with accelerate: ``prepare`` passes a FusionLoader through unchanged; move batches yourself.

    accelerate launch examples/accelerate_loop.py --data /data/train --producers cuda:7
"""

import argparse

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from fusionloader import FusionLoader, ImageFolder


def to_tensor(image, size=64):
    return torch.from_numpy(np.asarray(image.convert("RGB").resize((size, size)))).permute(2, 0, 1).float() / 255


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="runwayml/stable-diffusion-v1-5")
    ap.add_argument("--producers", nargs="+", default=["cuda:7"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()

    accelerator = Accelerator()
    dataset = ImageFolder(args.data, transform=to_tensor)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, len(dataset.classes)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = FusionLoader(dataset, batch_size=64, shuffle=True, synthesizer=args.model, alpha=0.5,
                          num_inference_steps=args.steps, producer_devices=args.producers, seed=0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # the loader comes back as is
    with loader:
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            for x, y in loader:
                x, y = x.to(accelerator.device), y.to(accelerator.device)
                loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        accelerator.print(loader.stats()["cumulative"])


if __name__ == "__main__":
    main()
