"""Ring slots whose images live in Ray's object store (NOTE [Ray backend] in pool.py).

The Ray pool keeps the process pool's slot accounting unchanged -- the coordinator credits each producer
actor up to ``capacity`` slots, a result holds its slot until the rank that asked for it takes it, so the
slots bound what the pool keeps in the object store -- but a slot is a number, not memory: the producer
puts the finished image into the object store (``ray.put``, one object per image) and the coordinator keeps
the reference under the slot's number until the rank takes it.

* ``ObjectSlots`` is the producer actor's side: the ``SlotRing`` calls ``Producer`` makes (``fill``,
  ``publish``, ``shape``, ``dtype``, ``device``, ``data``, ``close``).
* ``ObjectSlotRing`` is the coordinator's side: the ``SlotRing`` calls ``_PoolCore`` makes (``assign``,
  ``release``, ``counts``, ``capacity``, ``handle``, ``unlink``) plus ``deposit``/``pop`` of references.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ObjectSlotHandle", "ObjectSlotRing", "ObjectSlots", "from_numpy", "to_numpy"]


def to_numpy(image: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the array Ray stores zero-copy (bfloat16, which numpy lacks, travels as its int16 bits)."""
    image = image.detach().contiguous()
    return image.view(torch.int16).numpy() if image.dtype == torch.bfloat16 else image.numpy()


def from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The consumer's own tensor: one copy out of the (read-only, shared) object-store buffer -- the ring's
    ``read`` copies out of its slot too, so a caller may write into what ``take`` returns."""
    tensor = torch.from_numpy(np.array(array, copy=True))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


@dataclass(frozen=True)
class ObjectSlotHandle:
    """What a producer actor needs to serve into object-store slots (sent as the ``("ring", handle)`` message)."""

    capacity: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class ObjectSlots:
    """Producer side. ``device`` is ``"meta"``: no slot memory exists where the producer computes, so the
    producer never asks its sampler to write into a slot in place (``Producer.direct`` stays False) and hands
    each finished image to ``fill``."""

    device = "meta"
    data = None

    def __init__(self, handle: ObjectSlotHandle, put):
        self.capacity, self.shape, self.dtype = handle.capacity, tuple(handle.shape), handle.dtype
        self._put = put  # ray.put, passed in (this module does not import ray)
        self.filled: dict[int, torch.Tensor] = {}
        self.refs: dict[int, object] = {}  # slot -> ObjectRef, until the DONE message carries it away

    def fill(self, slot: int, image: torch.Tensor, owner: int) -> None:
        if tuple(image.shape) != self.shape:
            raise ValueError(f"image of shape {tuple(image.shape)} does not fit a slot of shape {self.shape}")
        if self.dtype == torch.uint8 and image.dtype != torch.uint8:  # as SlotRing.fill rounds
            image = image.float().mul(255.0).round_().clamp_(0, 255)
        self.filled[slot] = image.to("cpu", self.dtype)

    def publish(self, slots, keys, owner: int) -> None:
        slots = [slots] if isinstance(slots, int) else list(slots)
        for slot in slots:
            self.refs[slot] = self._put(to_numpy(self.filled.pop(slot)))

    def take_ref(self, slot: int):
        return self.refs.pop(slot, None)

    def close(self) -> None:
        self.filled.clear()
        self.refs.clear()


FREE, WRITING, READY = "free", "writing", "ready"


class ObjectSlotRing:
    """Coordinator side: slot states for ``_PoolCore``'s credit accounting and the references of finished
    images. Same constructor as ``SlotRing`` (``ring_factory``); ``device``/``pin`` are meaningless here."""

    def __init__(self, capacity: int, shape, dtype: torch.dtype = torch.float32, device="cpu", pin=None):
        self.capacity, self.shape, self.dtype = int(capacity), tuple(shape), dtype
        self.handle = ObjectSlotHandle(self.capacity, self.shape, dtype)
        self.states = [FREE] * self.capacity
        self.refs: dict[int, object] = {}

    def counts(self) -> dict[str, int]:
        return {label: self.states.count(label) for label in (FREE, WRITING, READY)}

    def assign(self, slot: int, owner: int) -> None:
        if self.states[slot] != FREE:
            raise RuntimeError(f"slot {slot} credited while {self.states[slot]}")
        self.states[slot] = WRITING

    def deposit(self, slot: int, ref) -> None:
        self.refs[slot] = ref
        self.states[slot] = READY

    def pop(self, slot: int):
        """The reference of ``slot``'s image; the slot stays taken until ``release``."""
        return self.refs.pop(slot, None)

    def release(self, slot: int) -> None:
        self.refs.pop(slot, None)  # dropping the last reference frees the object
        self.states[slot] = FREE

    def unlink(self) -> None:
        self.refs.clear()
        self.states = [FREE] * self.capacity
