"""Distributed awareness: which rank am I, which positions are mine, which producer devices are mine.

Producers are child processes of each training rank (or, with ``producer_backend="ray"``, actors of one pool
shared by every rank), never torch.distributed ranks, so the user's DDP setup stays untouched (DESIGN.md "Where it grows"). Positions are sharded exactly like
``DistributedSampler`` (see :func:`fusionloader.plan.distributed_order`); each rank draws its coins
and seeds from its own stream ``(seed, epoch, rank, world_size)``.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

__all__ = ["devices_for_rank", "dist_info", "local_info"]


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def local_info() -> tuple[int, int]:
    """``(local_rank, local_world_size)`` from torchrun's environment, else derived from the process group."""
    rank, world = dist_info()
    if "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return local_rank, max(local_world, 1)
    return rank, world


def devices_for_rank(devices: Sequence[str], local_rank: int = 0, local_world_size: int = 1) -> tuple[str, ...]:
    """Split the node's spare producer devices among its training ranks (process backend).

    With at least as many devices as local ranks, rank ``r`` gets ``devices[r::local_world_size]``. ``"cpu"``
    entries are shared by everyone (each rank's producers run on the node's cores). With fewer CUDA devices
    than local ranks this refuses (``ValueError``): each rank spawns its own producers, so sharing a GPU would
    load one copy of the model per rank onto it (N times the weights, text encoder and VAE, and N processes
    time-slicing one GPU without batching across ranks -- no more images per second than one producer, and
    the memory often does not fit). One producer serving several ranks is the Ray backend
    (``producer_backend="ray"``): one pool per job whose actors batch every rank's requests together.
    """
    devices = tuple(str(d) for d in devices)
    if not devices:
        raise ValueError("producer_devices is empty")
    if local_world_size <= 1:
        return devices
    if len(devices) >= local_world_size:
        return devices[local_rank::local_world_size]
    if all(d == "cpu" for d in devices):
        return devices
    raise ValueError(
        f"producer_devices={devices!r} gives {len(devices)} producer device(s) to {local_world_size} training ranks "
        f"on this node: each rank would load its own copy of the model onto a shared GPU (one per rank, "
        f"{local_world_size // len(devices) + (local_world_size % len(devices) > 0)} on one device), which "
        f"multiplies its memory and does not make it faster. Give at least one device per local rank, or share "
        f"the devices among all ranks with producer_backend='ray' (producer_devices=N or Ray resource dicts; "
        f"README \"Past one machine\")")
