"""A training job launched for real by tests/test_launch.py: 2 CPU processes, gloo, one client.

    torchrun --nproc-per-node 2 tests/launch/worker.py --client plain|accelerate|lightning --path CKPT --out DIR

Every rank trains one epoch with ``FusionLoader(..., late_policy="wait", return_meta=True)`` twice: with a
synthesizer built in memory (``Synthesizer(pipe)`` from fusionloader.testing's tiny pipeline; rank 1's producer
used to die on it, issue 13) and with one from the checkpoint folder ``--path``. Each rank writes what it saw
to ``DIR/<source>-rank<r>.pt``: the meta of every batch, whether each synthetic image differs from the real
one, losses, its pid and its producers' pids (the test checks they are gone afterwards).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os

import torch
from torch import nn
from torch.utils.data import Dataset

N, SIZE, CLASSES = 16, 32, 3


class Images(Dataset):
    """N fixed random images in [0, 1] at the tiny model's resolution, 3 classes."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(N, 3, SIZE, SIZE, generator=g)
        self.labels = torch.arange(N) % CLASSES
        self.classes = ["cat", "dog", "bird"]

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def make_loader(dataset, synthesizer):
    from fusionloader import FusionLoader

    return FusionLoader(dataset, batch_size=4, shuffle=True, seed=0, synthesizer=synthesizer, alpha=0.5,
                        late_policy="wait", return_meta=True, num_inference_steps=2, guidance_scale=1.0,
                        strengths=0.5, producer_capacity=4, producer_timeout=300.0, wait_timeout=300.0)


def synthesizer_for(source: str, path: str):
    from fusionloader import Synthesizer

    if source == "memory":
        from fusionloader.testing import build_tiny_pipeline

        return Synthesizer(build_tiny_pipeline(sample_size=SIZE))
    return path


def classifier():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, CLASSES))


class Record:
    """What one rank saw: per batch the meta, which synthetic images differ from the real image, the loss."""

    def __init__(self, dataset):
        self.dataset, self.batches, self.producers = dataset, [], set()

    def add(self, x, meta, loss):
        differs = [not torch.equal(x[p], self.dataset.images[int(i)]) for p, i in enumerate(meta["index"])]
        self.batches.append(dict(index=meta["index"].clone(), synthetic=meta["synthetic"].clone(),
                                 fresh=meta["fresh"].clone(), differs=torch.tensor(differs), loss=float(loss)))
        # Producers are this rank's multiprocessing children (spawned when the first epoch starts).
        self.producers.update(p.pid for p in multiprocessing.active_children())

    def save(self, out, source, rank):
        data = dict(batches=self.batches, pid=os.getpid(), producers=sorted(self.producers), rank=rank)
        torch.save(data, os.path.join(out, f"{source}-rank{rank}.pt"))


def run_plain(loader, record):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(classifier())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader.set_epoch(0)
    for (x, y), meta in loader:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        record.add(x, meta, loss.item())
    dist.barrier()


def run_accelerate(loader, record):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    for (x, y), meta in loader:
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        loss = nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        record.add(x, meta, loss.item())
    accelerator.wait_for_everyone()


def run_lightning(loader, record):
    import lightning.pytorch as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = classifier()

        def training_step(self, batch, batch_idx):
            (x, y), meta = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            record.add(x, meta, loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(), train_dataloaders=loader)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", choices=("plain", "accelerate", "lightning"), required=True)
    ap.add_argument("--path", required=True, help="a saved tiny checkpoint folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sources", default="memory,path")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import torch.distributed as dist

    if args.client == "plain" and not dist.is_initialized():
        dist.init_process_group("gloo")
    dataset = Images()
    for source in args.sources.split(","):
        record = Record(dataset)
        with make_loader(dataset, synthesizer_for(source, args.path)) as loader:
            {"plain": run_plain, "accelerate": run_accelerate, "lightning": run_lightning}[args.client](loader, record)
        record.save(args.out, source, int(os.environ["RANK"]))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
