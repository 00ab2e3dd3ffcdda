"""Process backend, one node, several ranks: how the node's spare producer devices are split among its ranks
(issue 11 item 3: with fewer GPUs than local ranks, refuse rather than load one model per rank onto one GPU)."""

import pytest

from fusionloader import FusionLoader
from fusionloader.distributed import devices_for_rank


def test_enough_devices_are_split_among_local_ranks():
    devices = ("cuda:4", "cuda:5", "cuda:6", "cuda:7")
    assert [devices_for_rank(devices, r, 2) for r in range(2)] == [("cuda:4", "cuda:6"), ("cuda:5", "cuda:7")]
    assert [devices_for_rank(devices[:2], r, 2) for r in range(2)] == [("cuda:4",), ("cuda:5",)]
    assert devices_for_rank(devices, 0, 1) == devices


def test_cpu_producers_are_shared():
    assert devices_for_rank(("cpu",), 3, 4) == ("cpu",)


def test_fewer_gpus_than_local_ranks_is_refused_pointing_to_ray():
    for devices, world in ((("cuda:7",), 2), (("cuda:6", "cuda:7"), 4), (("cuda:7", "cpu"), 4)):
        for rank in range(world):
            with pytest.raises(ValueError, match="producer_backend='ray'") as e:
                devices_for_rank(devices, rank, world)
            assert repr(devices) in str(e.value) and f"{world} training ranks" in str(e.value)


class _Images:
    def __len__(self):
        return 4

    def __getitem__(self, i):
        import torch

        return torch.zeros(3, 8, 8), 0


def test_loader_refuses_at_first_iteration(monkeypatch, tiny_sd1_path):
    # two local ranks under torchrun, one GPU named: the error comes before any producer is spawned
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr("fusionloader.config.check_device", lambda name, d: str(d))  # no CUDA on this machine
    loader = FusionLoader(_Images(), batch_size=2, synthesizer=tiny_sd1_path, alpha=0.5, producer_devices=("cuda:3",),
                          distributed=False)
    with pytest.raises(ValueError, match="its own copy of the model"):
        iter(loader)
    loader.close()
