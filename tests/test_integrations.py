"""FusionLoader works unchanged in a plain loop, under Lightning (incl. 2-process DDP on CPU with gloo)
and in an accelerate loop (``prepare`` passes it through). These run in-process with a stand-in pool; the
real launches (torchrun / accelerate / Lightning ddp, real producers, every rank's fresh variants) are in
tests/test_launch.py, and the README's examples run in tests/test_readme.py."""

import os

import pytest
import torch
from torch import nn

from test_loader import InlinePool, TensorImages, engine_ready, real_fusion, real_synth  # noqa: F401  (fixture)
from fusionloader.loader import FusionLoader


class InlineFactory:
    """A picklable pool factory (Lightning's ddp_spawn pickles the loader into each rank)."""

    def __call__(self, synthesizer, source, devices=("cpu",), **kwargs):
        return InlinePool(synthesizer, source, devices, **kwargs)


def make_loader(n=32, **kw):
    kw.setdefault("alpha", 0.5)
    kw.setdefault("late_policy", "wait")
    return FusionLoader(TensorImages(n=n), batch_size=4, shuffle=True, seed=0, synthesizer="stand-in",
                        pool_factory=InlineFactory(), **kw)


def classifier():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))


def test_plain_training_loop():
    torch.manual_seed(0)
    model, loader = classifier(), make_loader()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert len(losses) == 2 * len(loader) and all(map(lambda v: v == v, losses))
    s = loader.stats()
    assert s["cumulative"]["samples"] == 64 and 0 < s["cumulative"]["achieved_alpha"] < 1
    loader.close()


# -- Lightning ---------------------------------------------------------------------------------------

L = pytest.importorskip("lightning.pytorch", reason="lightning not installed")


class Module(L.LightningModule):
    def __init__(self, out_dir=None):
        super().__init__()
        self.net, self.out_dir, self.seen = classifier(), out_dir, []

    def training_step(self, batch, batch_idx):
        (x, y), meta = batch
        self.seen.append((self.current_epoch, meta["index"].clone(), meta["synthetic"].clone()))
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self):
        if self.out_dir is not None:
            torch.save(self.seen, os.path.join(self.out_dir, f"rank{self.global_rank}.pt"))


def trainer(**kw):
    return L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_lightning_trainer_single_process():
    loader = make_loader(return_meta=True)
    module = Module()
    trainer(devices=1).fit(module, train_dataloaders=loader)
    assert len(module.seen) == 2 * len(loader)
    epoch0 = torch.cat([i for e, i, _ in module.seen if e == 0])
    epoch1 = torch.cat([i for e, i, _ in module.seen if e == 1])
    assert sorted(epoch0.tolist()) == list(range(32)) and not torch.equal(epoch0, epoch1)
    assert torch.cat([s for *_, s in module.seen]).any()
    loader.close()


def test_lightning_ddp_spawn_two_processes(tmp_path):
    loader = make_loader(n=30, return_meta=True)
    trainer(devices=2, strategy="ddp_spawn").fit(Module(str(tmp_path)), train_dataloaders=loader)
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for epoch in range(2):
        shards = [torch.cat([i for e, i, _ in s if e == epoch]).tolist() for s in seen]
        # DistributedSampler's rules: 15 per rank, disjoint, covering the dataset
        assert [len(s) for s in shards] == [15, 15]
        assert sorted(shards[0] + shards[1]) == list(range(30))
        from torch.utils.data import DistributedSampler

        for rank in range(2):
            ref = DistributedSampler(range(30), num_replicas=2, rank=rank, shuffle=True, seed=0)
            ref.set_epoch(epoch)
            assert shards[rank] == list(ref)
    for s in seen:  # each rank mixed synthetic samples in
        assert torch.cat([syn for *_, syn in s]).any()
    # coins are drawn per rank
    syn = [torch.cat([x for e, _, x in s if e == 0]) for s in seen]
    assert not torch.equal(syn[0], syn[1])


# -- accelerate --------------------------------------------------------------------------------------


def test_accelerate_prepare_passes_it_through():
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    model, loader = classifier(), make_loader()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, prepared = acc.prepare(model, opt, loader)
    assert prepared is loader
    steps = 0
    for x, y in prepared:
        loss = nn.functional.cross_entropy(model(x), y)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        steps += 1
    assert steps == len(loader) == 8
    loader.close()


def test_real_pool_plain_loop(real_synth):  # noqa: F811
    ds = TensorImages(n=16, size=32 if engine_ready() else 16)
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    with real_fusion(ds, real_synth, batch_size=4, shuffle=True, alpha=0.5, late_policy="reuse") as loader:
        opt = None
        for epoch in range(2):
            for x, y in loader:
                loss = nn.functional.cross_entropy(model(x), y)
                opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()
        s = loader.stats()["cumulative"]
        assert s["samples"] == 32 and s["fresh"] + s["reused"] + s["fallback"] > 0
