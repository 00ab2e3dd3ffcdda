"""Swap-in with PyTorch Lightning: return the FusionLoader from ``train_dataloader``. It is not a DataLoader
subclass, so Lightning does not rebuild it and the mixing survives; under DDP each rank plans its own shard.

    python examples/lightning_ddp.py --data /data/train --accelerator gpu --devices 4 \
        --producers cuda:4 cuda:5 cuda:6 cuda:7
"""

import argparse

import lightning.pytorch as L
import numpy as np
import torch
from torch import nn

from fusionloader import FusionLoader, ImageFolder


def to_tensor(image, size=64):
    return torch.from_numpy(np.asarray(image.convert("RGB").resize((size, size)))).permute(2, 0, 1).float() / 255


class Data(L.LightningDataModule):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.train_set = ImageFolder(args.data, transform=to_tensor)

    def train_dataloader(self):
        return FusionLoader(self.train_set, batch_size=64, shuffle=True, synthesizer=self.args.model, alpha=0.5,
                            num_inference_steps=self.args.steps, producer_devices=self.args.producers, seed=0)


class Classifier(L.LightningModule):
    def __init__(self, classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, classes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="runwayml/stable-diffusion-v1-5")
    ap.add_argument("--producers", nargs="+", default=["cuda:4", "cuda:5", "cuda:6", "cuda:7"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--accelerator", default="gpu")
    ap.add_argument("--devices", type=int, default=4)
    args = ap.parse_args()

    data = Data(args)
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy="ddp", max_epochs=args.epochs,
                        use_distributed_sampler=False, logger=False, enable_checkpointing=False)
    trainer.fit(Classifier(len(data.train_set.classes)), datamodule=data)


if __name__ == "__main__":
    main()
