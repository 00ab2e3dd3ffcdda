"""A real 2-rank torchrun job (gloo, CPU) whose ranks share one Ray producer pool (tests/launch/ray_worker.py):
one actor serves both ranks, both get fresh variants of their own shard, nothing is duplicated or lost, and no
actor outlives the job."""

import os

import pytest
import torch
from torch.utils.data import DistributedSampler

pytest.importorskip("ray", reason="the Ray backend needs the [ray] extra")

from test_launch import HERE, launch  # noqa: E402

WORKER = os.path.join(HERE, "launch", "ray_worker.py")
N = 16


def test_two_ranks_share_one_ray_pool(tiny_sd1_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    launch(WORKER, ["--path", tiny_sd1_path, "--out", str(out)], tmp_path)
    records = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    shards, images = [], []
    for rank, rec in enumerate(records):
        b = rec["batches"]
        index = torch.cat([x["index"] for x in b])
        synthetic, fresh = torch.cat([x["synthetic"] for x in b]), torch.cat([x["fresh"] for x in b])
        assert synthetic.sum() > 0 and torch.equal(fresh, synthetic), f"rank {rank}: {synthetic} vs fresh {fresh}"
        assert torch.equal(torch.cat([x["differs"] for x in b]), synthetic), f"rank {rank}: a variant equals its real image"
        ref = DistributedSampler(range(N), num_replicas=2, rank=rank, shuffle=True, seed=0)
        ref.set_epoch(0)
        assert index.tolist() == list(ref)
        shards.append(index.tolist())
        images += [x["images"][p] for x in b for p in range(len(x["index"])) if x["synthetic"][p]]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(N))
    # one pool, one actor, both ranks attached; every synthetic position got its own image, none lost
    s0, s1 = records[0]["stats"], records[1]["stats"]
    assert s0["pool"] == s1["pool"] and s0["ranks"] == s1["ranks"] == [0, 1]
    assert len(s0["producers"]) == 1 and s0["producers"][0]["pid"] == s1["producers"][0]["pid"]
    total = sum(int(torch.cat([x["synthetic"] for x in r["batches"]]).sum()) for r in records)
    assert s1["lost"] == 0 and s1["nonfinite_dropped"] == 0 and s1["taken"] == total
    assert s1["producers"][0]["images"] >= total
    flat = torch.stack(images).flatten(1)
    assert len({tuple(v.tolist()) for v in flat}) == len(images), "a synthetic image was delivered twice"
