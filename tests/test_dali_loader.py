"""DaliFusionLoader on DALI's CPU pipeline (device_id=None): the plan's positions, DALI's real path, shards, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed (pip install 'fusionloader[dali]')")

from test_loader import expected_variant, inline  # noqa: E402

from fusionloader import FusionLoader  # noqa: E402
from fusionloader.order import distributed_order  # noqa: E402
from fusionloader.sources import ImageFolder, ImageSource  # noqa: E402
from fusionloader.sources.dali_loader import DaliFusionLoader  # noqa: E402
from fusionloader.sources.dali_pipeline import KINDS  # noqa: E402
from fusionloader.sources.dali_transform import DaliTrainTransform, crop_box  # noqa: E402

T = DaliTrainTransform(size=(12, 10), scale=(0.3, 1.0), flip=0.5, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "fox"):
        (tmp_path / c).mkdir()
        for k in range(3):  # sizes differ per image: the crop box depends on the real file's size
            Image.fromarray(rng.integers(0, 256, (18 + 2 * k, 22 + k, 3), dtype=np.uint8)).save(tmp_path / c / f"{k}.png")
    # a greyscale file: decoded to RGB by DALI as PIL's convert("RGB") does
    Image.fromarray(rng.integers(0, 256, (19, 21), dtype=np.uint8), "L").save(tmp_path / "fox" / "1.png")
    return tmp_path


def run(loader, epochs=1):
    out = []
    for _ in range(epochs):
        for (d,) in loader:
            out.append({k: v.clone() for k, v in d.items()})
    return out


def cat(batches, key):
    return torch.cat([b[key].reshape(len(b["data"]), *b[key].shape[1:]) for b in batches])


def reference(images, seeds):
    """DALI alone: the given HWC uint8 images (each resized to ``size`` first when given) through resize-with-ROI
    and crop_mirror_normalize, the ROI computed on the host from the transform's draws."""
    from nvidia.dali import fn, pipeline_def, types

    crop, mirror = T.draw(seeds)
    starts, ends = [], []
    for (img, (h, w)), c in zip(images, crop):
        y0, x0, y1, x1 = crop_box(h, w, c)
        starts.append(np.array([y0, x0], np.float32)), ends.append(np.array([y1, x1], np.float32))
    sizes = [np.array(hw, np.float32) for _, hw in images]

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        img, size, s, e, m = fn.external_source(source=lambda: ([i for i, _ in images], sizes, starts, ends,
                                                                [np.array(x, np.int32) for x in mirror]),
                                                num_outputs=5, batch=True, layout=["HWC", "", "", "", ""])  # fmt: skip
        img = fn.resize(img, size=size, antialias=True, dtype=types.UINT8)
        img = fn.resize(img, size=list(T.size), roi_start=s, roi_end=e, roi_relative=False, antialias=True, dtype=types.UINT8)
        return fn.crop_mirror_normalize(img, mirror=m, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255 * v for v in T.mean], std=[255 * v for v in T.std])  # fmt: skip

    p = pipe()
    p.build()
    (out,) = p.run()
    return torch.stack([torch.from_numpy(np.array(out.at(k))) for k in range(len(images))])


def decoded(ds, i):
    return np.array(Image.open(ds.samples[i][0]).convert("RGB"))


def test_transform_spec_draws_are_per_seed_and_validated():
    crop, mirror = T.draw([5, 6, 7])
    crop2, mirror2 = T.draw([7])
    assert np.array_equal(crop[2], crop2[0]) and mirror[2] == mirror2[0]  # a position's draw ignores its batch
    assert not np.array_equal(crop[0], crop[1])
    big, _ = T.draw(range(2000))
    assert 0.3 <= big[:, 0].min() and big[:, 0].max() <= 1.0 and 0.4 < big[:, 2].mean() < 0.6
    assert 0.4 < T.draw(range(2000))[1].mean() < 0.6  # flip=0.5
    for bad, match in ((dict(size=0), "size"), (dict(scale=(0.5, 2)), "scale"), (dict(ratio=(2, 1)), "ratio"),
                       (dict(flip=1.5), "flip"), (dict(std=(1, 0, 1)), "std"), (dict(mean=(0, 0)), "mean")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            DaliTrainTransform(**bad)


@pytest.mark.parametrize("shuffle", [False, True])
def test_real_positions_equal_dali_alone(folder, shuffle):
    ds = ImageFolder(str(folder))
    loader = DaliFusionLoader(str(folder), batch_size=4, transform=T, shuffle=shuffle, alpha=0.0, seed=3, return_meta=True)
    assert len(loader) == 3
    batches = run(loader)
    assert [len(b["data"]) for b in batches] == [4, 4, 1]  # PARTIAL last batch
    index = cat(batches, "index").tolist()
    assert index == loader.order(0).tolist() and sorted(index) == list(range(9))
    assert cat(batches, "label").flatten().tolist() == [ds.targets[i] for i in index]
    assert (cat(batches, "kind") == 0).all() and torch.isnan(cat(batches, "strength")).all()
    seeds = loader.plan(0).sample_seed
    images = [(decoded(ds, i), decoded(ds, i).shape[:2]) for i in index]
    assert torch.equal(cat(batches, "data"), reference(images, seeds))  # bit-exact
    # per-position draws: flips and crops differ across positions (the transform is not the identity)
    assert cat(batches, "data").shape == (9, 3, 12, 10)


def test_per_index_replacement_follows_fusionloader_plan(folder):
    ds = ImageFolder(str(folder))
    kw = dict(batch_size=4, shuffle=True, alpha=0.5, seed=11, return_meta=True, late_policy="wait", strengths=0.5,
              synthesizer="stand-in", pool_factory=inline())  # fmt: skip
    with DaliFusionLoader(ds, transform=T, **kw) as loader:
        batches = run(loader)
        stats = loader.stats()
    ref = list(FusionLoader(ImageFolder(str(folder), transform=lambda im: torch.zeros(1)), **kw))
    index, kind = cat(batches, "index"), cat(batches, "kind")
    assert torch.equal(index, torch.cat([m["index"] for _, m in ref]))
    planned = torch.cat([m["planned"] for _, m in ref])
    assert torch.equal(kind == KINDS.index("fresh"), planned) and 0 < int(planned.sum()) < 9
    assert stats["fresh"] == int(planned.sum()) and stats["real"] == 9 - int(planned.sum())
    plan = loader.plan(0)
    assert np.array_equal(planned.numpy(), plan.synthetic)
    strength = cat(batches, "strength")
    assert torch.all(strength[planned] == 0.5) and torch.isnan(strength[~planned]).all()
    # synthetic positions: the producer's image for (index, seed), resized to the real file's size, same transform
    seeds, src = plan.sample_seed, ImageSource(ds)
    images = []
    for p, i in enumerate(index.tolist()):
        real = decoded(ds, i)
        if planned[p]:
            v = expected_variant(src.raw(i)[0], seeds[p], 0.5)
            images.append(((v * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().copy(), real.shape[:2]))
        else:
            images.append((real, real.shape[:2]))
    expect = reference(images, seeds)
    data = cat(batches, "data")
    assert torch.equal(data, expect)  # bit-exact
    # the same run with alpha=0 serves the real positions identically
    real = run(DaliFusionLoader(ds, batch_size=4, transform=T, shuffle=True, alpha=0.0, seed=11, return_meta=True))
    assert torch.equal(cat(real, "data")[~planned], data[~planned])
    assert not torch.allclose(cat(real, "data")[planned], data[planned])


def test_late_positions_fall_back_to_the_real_sample(folder):
    kw = dict(batch_size=3, seed=2, return_meta=True)
    with DaliFusionLoader(str(folder), transform=T, alpha=1.0, late_policy="real", synthesizer="stand-in",
                          pool_factory=inline("never"), **kw) as loader:  # fmt: skip
        late = run(loader)
        assert loader.stats()["fallback"] == 9
    real = run(DaliFusionLoader(str(folder), transform=T, alpha=0.0, **kw))
    assert (cat(late, "kind") == KINDS.index("fallback")).all()
    assert torch.equal(cat(late, "data"), cat(real, "data"))


@pytest.mark.parametrize("world,drop_last", [(3, False), (2, False), (2, True), (4, False)])
def test_shards_are_the_ddp_split_disjoint_and_covering(folder, world, drop_last):
    ds = ImageFolder(str(folder))
    seen = []
    for shard in range(world):
        loader = DaliFusionLoader(ds, batch_size=2, transform=T, shuffle=True, drop_last=drop_last, seed=4,
                                  shard_id=shard, num_shards=world, alpha=0.0, return_meta=True)  # fmt: skip
        loader.set_epoch(1)
        batches = run(loader)
        index = cat(batches, "index").tolist()
        mine = distributed_order(9, shard, world, True, 4, 1, drop_last)
        expect = mine[: len(mine) // 2 * 2] if drop_last else mine  # drop_last also drops the partial batch
        assert index == expect.tolist() and len(batches) == len(loader)
        assert cat(batches, "label").flatten().tolist() == [ds.targets[i] for i in index]  # DALI's shard is this one
        seen.append(mine.tolist())
    flat = [i for s in seen for i in s]
    if 9 % world == 0:
        assert sorted(flat) == list(range(9))  # disjoint and covering
    elif drop_last:
        assert len(set(flat)) == len(flat)  # disjoint
    else:
        assert set(flat) == set(range(9))  # covering (DistributedSampler pads by repeating the first indices)


def test_seeds_reproduce_and_epochs_differ(folder):
    kw = dict(batch_size=4, shuffle=True, alpha=0.5, return_meta=True, late_policy="wait", synthesizer="stand-in")
    a = run(DaliFusionLoader(str(folder), transform=T, seed=7, pool_factory=inline(), **kw), epochs=2)
    b = DaliFusionLoader(str(folder), transform=T, seed=7, pool_factory=inline(), **kw)
    b_run = run(b, epochs=2)
    assert all(torch.equal(x[k], y[k]) if k != "strength" else torch.equal(x[k].nan_to_num(), y[k].nan_to_num())
               for x, y in zip(a, b_run) for k in x)  # fmt: skip
    b.set_epoch(1)
    assert torch.equal(cat(run(b), "data"), cat(a[3:], "data"))  # set_epoch(1) replays epoch 1
    assert not torch.equal(cat(a[:3], "index"), cat(a[3:], "index"))
    c = run(DaliFusionLoader(str(folder), transform=T, seed=8, pool_factory=inline(), **kw))
    assert not torch.equal(cat(c, "data"), cat(a[:3], "data"))


def test_bad_input_is_a_clear_error_at_construction(folder, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such image folder '.*nowhere'"):
        DaliFusionLoader(str(tmp_path / "nowhere"), transform=T, alpha=0.0)
    with pytest.raises(ValueError, match=r"shard_id=2 is not a shard of num_shards=2"):
        DaliFusionLoader(str(folder), transform=T, alpha=0.0, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match=r"shard_id and num_shards together"):
        DaliFusionLoader(str(folder), transform=T, alpha=0.0, shard_id=1)
    with pytest.raises(ValueError, match="num_shards=12 leaves shard 0 no image"):
        DaliFusionLoader(str(folder), transform=T, alpha=0.0, shard_id=0, num_shards=12, drop_last=True)
    with pytest.raises(TypeError, match="DaliTrainTransform"):
        DaliFusionLoader(str(folder), transform=lambda x: x, alpha=0.0)
    with pytest.raises(ValueError, match="dataset.transform is set"):
        DaliFusionLoader(ImageFolder(str(folder), transform=lambda x: x), transform=T, alpha=0.0)
    with pytest.raises(ValueError, match="device_id=0 does not exist"):
        DaliFusionLoader(str(folder), transform=T, alpha=0.0, device_id=0)
    with pytest.raises(ValueError, match="alpha=0.5 > 0 needs a synthesizer"):
        DaliFusionLoader(str(folder), transform=T, alpha=0.5)
    with pytest.raises(ValueError, match="DaliFusionLoader supports mixing='replace'.*'concat'"):
        DaliFusionLoader(str(folder), transform=T, alpha=0.5, synthesizer="stand-in", pool_factory=inline(),
                         mixing="concat")
    ds = ImageFolder(str(folder))
    (folder / "dog" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match="no such image file '.*dog/1.png'"):
        DaliFusionLoader(ds, transform=T, alpha=0.0)


def test_gpu_device_is_a_parameter_of_the_same_graph(folder, monkeypatch):
    # No GPU here: the GPU path is the same graph with device_id set ("mixed" decode, .gpu() synthetic images).
    import fusionloader.sources.dali_loader as dl

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    loader = DaliFusionLoader(str(folder), transform=T, alpha=0.0, device_id=1)
    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(dl, "build_pipeline", capture)
    with pytest.raises(RuntimeError, match="stop"):
        iter(loader)
    assert seen["device_id"] == 1 and seen["shard_id"] == 0 and seen["num_shards"] == 1


def test_a_producer_failure_reaches_the_trainer_with_its_type(folder, recwarn):
    from test_loader import InlinePool

    class Dying(InlinePool):
        def check(self):
            raise RuntimeError("producer 0 died (exit code -9)")

    def factory(synthesizer, source, devices=("cpu",), **kwargs):
        return Dying(synthesizer, source, devices, **kwargs)

    loader = DaliFusionLoader(str(folder), batch_size=2, transform=T, alpha=0.5, seed=0, synthesizer="stand-in",
                              pool_factory=factory)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"producer 0 died \(exit code -9\)"):
        run(loader)
    loader.close()
    assert Dying.instances[-1].closed
    assert not [w for w in recwarn if "not used" in str(w.message)]  # without meta, the feed makes 4 outputs


def test_shard_defaults_to_the_torch_distributed_rank(folder, monkeypatch):
    import fusionloader.sources.dali_loader as dl

    monkeypatch.setattr(dl, "dist_info", lambda: (1, 3))
    loader = DaliFusionLoader(str(folder), batch_size=2, transform=T, shuffle=True, seed=5, alpha=0.0, return_meta=True)
    assert (loader.shard_id, loader.num_shards) == (1, 3)
    assert cat(run(loader), "index").tolist() == distributed_order(9, 1, 3, True, 5, 0, False).tolist()
    assert DaliFusionLoader(str(folder), transform=T, alpha=0.0, distributed=False).num_shards == 1


def test_real_producers_feed_the_dali_pipeline(folder, tiny_sd1_path):
    # The real ProducerPool (spawned CPU producer, tiny SD-1.x model): every position fresh under "wait".
    kw = dict(batch_size=3, shuffle=True, seed=1, return_meta=True)
    with DaliFusionLoader(str(folder), transform=T, alpha=1.0, late_policy="wait", synthesizer=tiny_sd1_path,
                          num_inference_steps=2, producer_devices=["cpu"], **kw) as loader:  # fmt: skip
        batches = run(loader)
        assert loader.stats()["fresh"] == 9
    real = run(DaliFusionLoader(str(folder), transform=T, alpha=0.0, **kw))
    assert (cat(batches, "kind") == KINDS.index("fresh")).all()
    assert torch.equal(cat(batches, "index"), cat(real, "index"))
    assert torch.equal(cat(batches, "label"), cat(real, "label"))  # a variant keeps its image's label
    data = cat(batches, "data")
    assert data.shape == (9, 3, 12, 10) and torch.isfinite(data).all()
    assert not torch.allclose(data, cat(real, "data"))


def test_reuse_serves_stored_variants_of_the_same_index(folder):
    # "late": a job is not ready when its position comes up, ready afterwards (harvested into the store), so
    # epoch 0 falls back to real samples and epoch 1 serves the variants harvested in epoch 0.
    kw = dict(batch_size=3, seed=6, return_meta=True)
    with DaliFusionLoader(str(folder), transform=T, alpha=1.0, late_policy="reuse", synthesizer="stand-in",
                          pool_factory=inline("late"), **kw) as loader:  # fmt: skip
        epochs = [run(loader) for _ in range(2)]
        stats = loader.stats()
    plain = DaliFusionLoader(str(folder), transform=T, alpha=0.0, **kw)
    real, real1 = run(plain), run(plain)
    assert (cat(epochs[0], "kind") == KINDS.index("fallback")).all()
    assert torch.equal(cat(epochs[0], "data"), cat(real, "data"))
    kinds = cat(epochs[1], "kind")
    reused = kinds == KINDS.index("reused")
    assert reused.sum() >= 6 and stats["reused"] == int(reused.sum()) and stats["store"]["variants"] > 0
    assert torch.all(cat(epochs[1], "strength")[reused] == 0.5)
    assert torch.equal(cat(epochs[1], "data")[~reused], cat(real1, "data")[~reused])
    assert not torch.allclose(cat(epochs[1], "data")[reused], cat(real1, "data")[reused])  # same crops, other image


def _ddp_rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        kw = dict(batch_size=2, shuffle=True, alpha=0.5, seed=9, return_meta=True, late_policy="wait",
                  synthesizer="stand-in", pool_factory=inline())  # fmt: skip
        with DaliFusionLoader(root, transform=T, **kw) as loader:
            batches = run(loader)
            shard = (loader.shard_id, loader.num_shards)
        ref = list(FusionLoader(ImageFolder(root, transform=lambda im: torch.zeros(1)), **kw))
        torch.save({"shard": shard, "index": cat(batches, "index"), "label": cat(batches, "label").flatten(),
                    "kind": cat(batches, "kind"), "ref_index": torch.cat([m["index"] for _, m in ref]),
                    "ref_planned": torch.cat([m["planned"] for _, m in ref])}, f"{out}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_read_their_own_shard_with_fusionloaders_plan(folder, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_rank, args=(2, port, str(folder), str(tmp_path)), nprocs=2, start_method="spawn")
    ds = ImageFolder(str(folder))
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, g in enumerate(got):
        assert g["shard"] == (r, 2)
        assert torch.equal(g["index"], g["ref_index"])  # FusionLoader's DistributedSampler shard, same order
        assert torch.equal(g["kind"] == KINDS.index("fresh"), g["ref_planned"])  # and the same coins
        assert g["label"].tolist() == [ds.targets[i] for i in g["index"].tolist()]
    assert set(got[0]["index"].tolist()) | set(got[1]["index"].tolist()) == set(range(9))


@pytest.mark.parametrize("meta", [False, True])
def test_the_gpu_graph_traces_on_a_cpu_machine(folder, meta):
    # Building a GPU pipeline needs CUDA; tracing it runs DALI's placement checks (a CPU operator fed a GPU
    # input, a "mixed" decoder fed GPU data, branches merging on different devices all raise here).
    from nvidia.dali.pipeline import Pipeline

    from fusionloader.sources.dali_pipeline import build_pipeline

    ds = ImageFolder(str(folder))
    files, labels = [p for p, _ in ds.samples], ds.targets
    for device_id in (None, 0):
        pipe = build_pipeline(files, labels, lambda it: None, T, batch_size=4, shard_id=0, num_shards=1,
                              device_id=device_id, meta=meta, build=False)  # fmt: skip
        assert isinstance(pipe, Pipeline)


def test_a_file_list_reads_as_the_folder_does(folder):
    from fusionloader.sources.dali import DaliImageFolder

    ds = ImageFolder(str(folder))
    listed = DaliImageFolder(files=[p for p, _ in ds.samples], labels=ds.targets)
    kw = dict(batch_size=4, transform=T, shuffle=True, alpha=0.0, seed=1, return_meta=True)
    a, b = run(DaliFusionLoader(listed, **kw)), run(DaliFusionLoader(str(folder), **kw))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("data", "label", "index"))
