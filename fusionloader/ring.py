"""Fixed slots in shared memory where producers put finished images and the consumer copies them out.

NOTE [Slot protocol]
~~~~~~~~~~~~~~~~~~~~

A ring is ``capacity`` slots of one fixed shape and dtype, plus three small per-slot arrays: ``state``,
``owner`` (producer id) and ``key`` (the job key written there). The arrays always live in one named
host segment (``multiprocessing.shared_memory``, name ``fl_ring_<pid>_<token>``, visible under
/dev/shm so tests can check it is unlinked). The image data lives either in the same segment (host ring)
or in one CUDA tensor on the consumer's device shared with producers through CUDA IPC (device ring).

Every slot moves around one cycle, and every transition has exactly one writer::

      FREE --assign(slot, owner)--> WRITING --write(slot, key, image)--> READY --read(slot, key)--> FREE
      consumer                      producer `owner` only                consumer (READING while copying)

* FREE -> WRITING: the consumer *credits* a free slot to one producer (``assign``). Only the consumer
  allocates, so two producers can never claim the same slot and no cross-process lock is needed (a lock
  held by a SIGKILLed producer would hang everyone else).
* WRITING -> READY: the credited producer copies the finished image in (``write``) -- or has had its
  sampler post-process it straight into the slot and only ``publish``es it -- sets ``key``, then
  ``state`` (data before state), then tells the consumer over its result pipe. The pipe write is a syscall, so the
  consumer, which only looks at a slot after that message, sees the data complete. A producer refuses to
  write a slot whose state/owner is not (WRITING, itself).
* READY -> READING -> FREE: ``read`` checks the key, marks READING, copies the image *out* (the caller
  owns what it gets; the slot is reused at once) and frees the slot. No producer holds a credit for a
  READY or READING slot, so a slot is never overwritten while it is being read.
* Reclaim: when a producer dies, the consumer puts every slot still credited to it back to FREE
  (``release``); a half-written slot is never READY, so nothing torn is ever read.

Device rings (CUDA IPC; written thinly and symmetric with the host path, but not exercised by the
CPU-only test suite): the consumer allocates the data tensor on its device and it travels to producers
pickled as a CUDA IPC handle (torch's ForkingPickler reductions). The consumer process owns the memory
and must outlive the producers (ProducerPool.close stops them first). ``write`` synchronises the
producer's stream before publishing READY and ``read`` synchronises after its copy before FREE, so the
only cross-process ordering needed is the one the pipe message already gives. Host rings are pinned with
``cudaHostRegister`` in the consumer when CUDA is available, so copies from a slot to a GPU are async.

Lifetime: the creating process unlinks (``unlink``); attached processes only ``close``. If the creator
is SIGKILLed, Python's resource tracker (shared with spawned children) unlinks the segment once every
process holding it has exited.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch
import torch.multiprocessing  # noqa: F401  (registers the CUDA IPC reductions a device ring's handle needs)

__all__ = ["FREE", "WRITING", "READY", "READING", "RingHandle", "SlotRing", "SlotStateError"]

FREE, WRITING, READY, READING = 0, 1, 2, 3
STATE_NAMES = {FREE: "free", WRITING: "writing", READY: "ready", READING: "reading"}
NO_OWNER = -1
SEGMENT_PREFIX = "fl_ring_"
_ALIGN = 64


class SlotStateError(RuntimeError):
    """A slot was used out of protocol (e.g. written without a credit, read before it was ready)."""


@dataclass(frozen=True)
class RingHandle:
    """What a producer needs to attach to a ring; picklable (the CUDA tensor pickles as an IPC handle)."""

    name: str
    capacity: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str = "cpu"
    cuda_data: torch.Tensor | None = None


def _layout(capacity: int, shape: tuple[int, ...], dtype: torch.dtype, host_data: bool):
    """Byte offsets of state (int32), owner (int32), key (int64) and data in the host segment."""
    state_off = 0
    owner_off = state_off + 4 * capacity
    key_off = -(-(owner_off + 4 * capacity) // 8) * 8
    data_off = -(-(key_off + 8 * capacity) // _ALIGN) * _ALIGN
    numel = 1
    for s in shape:
        numel *= int(s)
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = data_off + (capacity * numel * itemsize if host_data else 0)
    return state_off, owner_off, key_off, data_off, numel, max(size, 1)


class SlotRing:
    """``capacity`` fixed slots of ``shape``/``dtype`` in shared memory; see NOTE [Slot protocol]."""

    def __init__(self, capacity: int, shape, dtype: torch.dtype = torch.float32, device="cpu", pin: bool | None = None):
        assert capacity >= 1, capacity
        device = str(torch.device(device))
        name = f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
        self._open(RingHandle(name, int(capacity), tuple(int(s) for s in shape), dtype, device), create=True)
        self._state.fill_(FREE)
        self._owner.fill_(NO_OWNER)
        self._key.fill_(-1)
        if device.startswith("cuda"):
            data = torch.empty((self.capacity, *self.shape), dtype=dtype, device=device)
            self._data = data
            self.handle = RingHandle(name, self.capacity, self.shape, dtype, device, cuda_data=data)
        elif torch.cuda.is_available() if pin is None else pin:
            self._pin()

    @classmethod
    def attach(cls, handle: RingHandle, pin: bool = False) -> "SlotRing":
        """Open an existing ring in another process (a producer). Attached rings never unlink.

        ``pin``: page-lock this process's mapping of a host ring (a GPU producer's device -> slot copies).
        """
        ring = cls.__new__(cls)
        ring._open(handle, create=False)
        if handle.device.startswith("cuda"):
            assert handle.cuda_data is not None, "device ring handle without its CUDA tensor"
            ring._data = handle.cuda_data
        elif pin:
            ring._pin()
        return ring

    def _pin(self) -> None:
        # Page-lock the whole mapping (from its page-aligned base: the state array is at offset 0) so
        # copies between slots and a GPU are asynchronous DMA. Pinning is per process and per mapping.
        # Not exercised by the CPU-only test suite.
        err = torch.cuda.cudart().cudaHostRegister(self._state.data_ptr(), self._shm.size, 0)
        self._pinned = int(err) == 0

    def _open(self, handle: RingHandle, create: bool) -> None:
        self.capacity, self.shape, self.dtype, self.device = handle.capacity, handle.shape, handle.dtype, handle.device
        self.handle, self._owns, self._pinned = handle, create, False
        host_data = not handle.device.startswith("cuda")
        s_off, o_off, k_off, d_off, numel, size = _layout(handle.capacity, handle.shape, handle.dtype, host_data)
        self._shm = shared_memory.SharedMemory(name=handle.name, create=create, size=size if create else 0)
        buf = self._shm.buf
        n = handle.capacity
        self._state = torch.frombuffer(buf, dtype=torch.int32, count=n, offset=s_off)
        self._owner = torch.frombuffer(buf, dtype=torch.int32, count=n, offset=o_off)
        self._key = torch.frombuffer(buf, dtype=torch.int64, count=n, offset=k_off)
        if host_data:
            self._data = torch.frombuffer(buf, dtype=handle.dtype, count=n * numel, offset=d_off).view(n, *handle.shape)
        else:
            self._data = None

    # -- introspection ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The shared-memory segment name (a file under /dev/shm on Linux)."""
        return self.handle.name

    def state(self, slot: int) -> int:
        return int(self._state[slot])

    def counts(self) -> dict[str, int]:
        """Number of slots in each state, e.g. ``{"free": 3, "writing": 2, "ready": 1, "reading": 0}``."""
        states = self._state.tolist()
        return {label: states.count(s) for s, label in STATE_NAMES.items()}

    # -- consumer side ------------------------------------------------------------------------------

    def assign(self, slot: int, owner: int) -> None:
        """FREE -> WRITING: credit ``slot`` to producer ``owner`` (consumer only)."""
        if int(self._state[slot]) != FREE:
            raise SlotStateError(f"slot {slot} credited while {STATE_NAMES[int(self._state[slot])]}")
        self._owner[slot] = owner
        self._state[slot] = WRITING

    def release(self, slot: int) -> None:
        """Any state -> FREE: reclaim a slot (a dead producer's credit, a cancelled result)."""
        self._key[slot] = -1
        self._owner[slot] = NO_OWNER
        self._state[slot] = FREE

    def read(self, slot: int, key: int) -> torch.Tensor:
        """READY -> READING -> FREE: copy the image for ``key`` out of ``slot``; the copy is the caller's."""
        if int(self._state[slot]) != READY or int(self._key[slot]) != key:
            raise SlotStateError(
                f"slot {slot} read for key {key} but it is {STATE_NAMES[int(self._state[slot])]} with key {int(self._key[slot])}"
            )
        self._state[slot] = READING
        out = self._data[slot].clone()
        if out.is_cuda:
            torch.cuda.current_stream(out.device).synchronize()
        self.release(slot)
        return out

    # -- producer side ------------------------------------------------------------------------------

    def write(self, slot: int, key: int, image: torch.Tensor, owner: int) -> None:
        """WRITING -> READY: copy ``image`` into a slot credited to ``owner``, then publish ``key``."""
        self._check_credit(slot, owner)
        dst = self._data[slot]
        if tuple(image.shape) != tuple(dst.shape):
            raise ValueError(f"image of shape {tuple(image.shape)} does not fit a slot of shape {tuple(dst.shape)}")
        dst.copy_(image)
        # The copy must be complete before READY is visible to the consumer (a pinned D2H or a peer copy
        # is asynchronous): wait on every device involved.
        for dev in {t.device for t in (dst, image) if t.is_cuda}:
            torch.cuda.current_stream(dev).synchronize()
        self._key[slot] = key
        self._state[slot] = READY  # last: data, then key, then state (see NOTE)

    def publish(self, slot: int, key: int, owner: int) -> None:
        """WRITING -> READY for a slot ``owner`` has already filled in place (e.g. a sampler's ``out_row``)."""
        self._check_credit(slot, owner)
        if self._data.is_cuda:
            torch.cuda.current_stream(self._data.device).synchronize()
        self._key[slot] = key
        self._state[slot] = READY

    def _check_credit(self, slot: int, owner: int) -> None:
        if int(self._state[slot]) != WRITING or int(self._owner[slot]) != owner:
            raise SlotStateError(
                f"producer {owner} wrote slot {slot} that is {STATE_NAMES[int(self._state[slot])]} owned by {int(self._owner[slot])}"
            )

    # -- lifetime -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop this process's mapping (idempotent). Does not remove the segment; see ``unlink``."""
        if self._state is None:
            return
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self._state.data_ptr())
            self._pinned = False
        # Views into the mapping must go before the mapping can be closed.
        self._state = self._owner = self._key = self._data = None
        self.handle = RingHandle(self.handle.name, self.capacity, self.shape, self.dtype, self.device)
        try:
            self._shm.close()
        except BufferError:  # someone still holds a view; the mapping dies with the process
            pass

    def unlink(self) -> None:
        """Close and remove the segment (creator only; idempotent)."""
        self.close()
        if self._owns:
            self._owns = False
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    def __del__(self):
        try:
            self.unlink() if getattr(self, "_owns", False) else self.close()
        except Exception:
            pass
