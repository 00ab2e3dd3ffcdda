"""Real launches (issue 13): 2 CPU processes with gloo under torchrun, one per client -- a plain DDP loop, an
accelerate loop (``accelerator.prepare(model, optimizer, loader)``) and a Lightning ``Trainer(strategy="ddp",
devices=2)`` -- each training with a synthesizer built in memory and one loaded from a path
(tests/launch/worker.py). Every rank must train, get fresh synthetic variants of its own shard
(``return_meta``), the ranks' positions must be disjoint and cover the epoch, and no producer, shared-memory
segment or temporary checkpoint may outlive the job."""

import glob
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from torch.utils.data import DistributedSampler

from fusionloader.testing import process_alive

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "launch", "worker.py")
N = 16  # tests/launch/worker.py's epoch
SOURCES = ("memory", "path")


def launch(script, args, tmp_path, timeout=420):
    """``torchrun --standalone --nproc-per-node 2 script args`` in a clean environment; returns its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error", TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(HERE), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}"
    return out


def check_ranks(out_dir, source):
    """The per-rank records of one source: training, fresh variants of the rank's own shard, the shards."""
    records = [torch.load(os.path.join(out_dir, f"{source}-rank{r}.pt")) for r in range(2)]
    shards = []
    for rank, rec in enumerate(records):
        batches = rec["batches"]
        assert batches, f"{source}: rank {rank} trained no step"
        assert all(b["loss"] == b["loss"] for b in batches), f"{source}: rank {rank} had a NaN loss"
        index = torch.cat([b["index"] for b in batches])
        synthetic = torch.cat([b["synthetic"] for b in batches])
        fresh = torch.cat([b["fresh"] for b in batches])
        differs = torch.cat([b["differs"] for b in batches])
        # late_policy="wait": every synthetic position gets a variant made for it, and it is not the real image
        assert synthetic.sum() > 0, f"{source}: rank {rank} got no synthetic sample"
        assert torch.equal(fresh, synthetic), f"{source}: rank {rank} synthetic {synthetic} but fresh {fresh}"
        assert torch.equal(differs, synthetic), f"{source}: rank {rank}: variants equal to the real image"
        ref = DistributedSampler(range(N), num_replicas=2, rank=rank, shuffle=True, seed=0)
        ref.set_epoch(0)
        assert index.tolist() == list(ref), f"{source}: rank {rank} positions {index.tolist()} != {list(ref)}"
        shards.append(index.tolist())
        assert rec["producers"], f"{source}: rank {rank} saw no producer process"
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(N))
    return records


def check_nothing_left(records):
    for rec in records:
        for pid in rec["producers"]:
            assert not process_alive(pid), f"producer {pid} of rank {rec['rank']} still runs"
        left = glob.glob(f"/dev/shm/fl_ring_{rec['pid']}_*")
        assert not left, f"shared memory of rank {rec['rank']} left behind: {left}"
        tmp = glob.glob(os.path.join(tempfile.gettempdir(), f"fusionloader-synth-rank*-pid{rec['pid']}-*"))
        assert not tmp, f"temporary checkpoints of rank {rec['rank']} left behind: {tmp}"


CLIENTS = [
    "plain",
    pytest.param("accelerate", marks=pytest.mark.skipif(
        __import__("importlib").util.find_spec("accelerate") is None, reason="accelerate not installed")),
    pytest.param("lightning", marks=pytest.mark.skipif(
        __import__("importlib").util.find_spec("lightning") is None, reason="lightning not installed")),
]


@pytest.mark.parametrize("client", CLIENTS)
def test_two_rank_launch(client, tiny_sd1_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    launch(WORKER, ["--client", client, "--path", tiny_sd1_path, "--out", str(out)], tmp_path)
    records = []
    for source in SOURCES:
        records += check_ranks(out, source)
    check_nothing_left(records)
