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
* WRITING -> READY: the credited producer copies the finished image in (``fill``) -- or has had its
  sampler post-process it straight into the slot -- and ``publish``es it (all of a sampler step's slots
  at once, after one stream synchronisation): sets ``key``, then ``state`` (data before state), then
  tells the consumer over its result pipe. The pipe write is a syscall, so the
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
and must outlive the producers (ProducerPool.close stops them first). ``publish`` synchronises the
producer's stream before marking READY and ``read`` synchronises after its copy before FREE, so the
only cross-process ordering needed is the one the pipe message already gives.

Pinning (issue 14). A host ring is page-locked with ``cudaHostRegister`` (portable: valid in every
context) only where a process names the device to do it under: a GPU producer under its own bound device,
the trainer under the device it already uses (``ProducerPool`` passes ``torch.cuda.current_device()`` only
when the trainer has initialised CUDA). Registering without a device would open a context on GPU 0 in
whatever thread happens to create the ring -- 0.3-0.5 GB of a GPU nobody asked for. A pinned ring's
``read`` copies out into pinned memory (torch's caching host allocator), so the caller's
``.to(device, non_blocking=True)`` stays an async DMA: a pageable clone would make pinning buy nothing.
``uint8`` slots (4x smaller than float32) hold images as ``round(x * 255)``, exactly what the engine's
fused post-process writes; ``check_shm_space`` refuses, before creating it, a ring larger than
``/dev/shm``'s free space (a container's default 64 MB dies of SIGBUS at the first write otherwise).

Lifetime: the creating process unlinks (``unlink``); attached processes only ``close``. If the creator
is SIGKILLed, Python's resource tracker (shared with spawned children) unlinks the segment once every
process holding it has exited.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch
import torch.multiprocessing  # noqa: F401  (registers the CUDA IPC reductions a device ring's handle needs)

__all__ = ["FREE", "READING", "READY", "RingHandle", "RingSpaceError", "SlotRing", "SlotStateError", "WRITING",
           "check_shm_space", "ring_bytes"]

FREE, WRITING, READY, READING = 0, 1, 2, 3
STATE_NAMES = {FREE: "free", WRITING: "writing", READY: "ready", READING: "reading"}
NO_OWNER = -1
SEGMENT_PREFIX = "fl_ring_"
_ALIGN = 64
SHM_DIR = "/dev/shm"
_CUDA_HOST_REGISTER_PORTABLE = 1  # the registration counts as pinned in every CUDA context of the process


class SlotStateError(RuntimeError):
    """A slot was used out of protocol (e.g. written without a credit, read before it was ready)."""


class RingSpaceError(OSError):
    """The ring would not fit in ``/dev/shm``: says how big it is, what is free and how to fix it."""


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


def ring_bytes(capacity: int, shape, dtype: torch.dtype, device="cpu") -> int:
    """Bytes of shared memory a ring takes in ``/dev/shm`` (only the small state arrays for a device ring)."""
    host_data = not str(device).startswith("cuda")
    return _layout(int(capacity), tuple(int(s) for s in shape), dtype, host_data)[-1]


def _free_shm_bytes(path: str = SHM_DIR) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:  # no /dev/shm (not Linux): nothing to check against
        return None


def check_shm_space(capacity: int, shape, dtype: torch.dtype, device="cpu", free_bytes: int | None = None) -> None:
    """Raise ``RingSpaceError`` if the ring would not fit in ``/dev/shm``'s free space (``free_bytes``: for tests).

    tmpfs grants pages lazily, so an oversized segment is created without complaint and the first write past
    the limit kills the writer with SIGBUS; this check turns that into an error at construction."""
    need = ring_bytes(capacity, shape, dtype, device)
    free = _free_shm_bytes() if free_bytes is None else free_bytes
    if free is None or need <= free:
        return
    mib = 1 << 20
    dtype_name = str(dtype).replace("torch.", "")
    fixes = ["fewer slots (ProducerPool slots= / FusionLoader producer_slots=)"]
    if dtype != torch.uint8:
        fixes.append("uint8 slots (slot_dtype=torch.uint8, 4x smaller than float32)")
    fixes.append("more shared memory for the container (docker run --shm-size=2g, or a larger /dev/shm mount)")
    raise RingSpaceError(
        f"a ring of {capacity} slots of {tuple(shape)} {dtype_name} needs {need / mib:.1f} MiB of shared memory but "
        f"{SHM_DIR} has {free / mib:.1f} MiB free; use " + ", or ".join(fixes)
    )


def _host_register(ptr: int, size: int, device: int) -> bool:
    """Page-lock ``size`` bytes at ``ptr`` under ``device`` (never the thread's default device 0)."""
    with torch.cuda.device(device):
        err = torch.cuda.cudart().cudaHostRegister(ptr, size, _CUDA_HOST_REGISTER_PORTABLE)
    return int(err) == 0


def _host_unregister(ptr: int, device: int) -> None:
    with torch.cuda.device(device):
        torch.cuda.cudart().cudaHostUnregister(ptr)


def _pinned_empty(shape, dtype: torch.dtype, device: int) -> torch.Tensor:
    with torch.cuda.device(device):  # the host allocator's cudaHostAlloc needs a context: ours, not GPU 0's
        return torch.empty(shape, dtype=dtype, pin_memory=True)


class SlotRing:
    """``capacity`` fixed slots of ``shape``/``dtype`` in shared memory; see NOTE [Slot protocol].

    ``pin``: a CUDA device index to page-lock a host ring under, or None (not pinned). ``free_bytes``:
    override ``/dev/shm``'s free space for the size check (tests)."""

    def __init__(self, capacity: int, shape, dtype: torch.dtype = torch.float32, device="cpu", pin: int | None = None,
                 free_bytes: int | None = None):
        if capacity < 1:
            raise ValueError(f"a ring needs at least one slot, got capacity={capacity}")
        if dtype != torch.uint8 and not dtype.is_floating_point:
            raise ValueError(f"ring slots hold uint8 or float images, got dtype={dtype}")
        device = str(torch.device(device))
        check_shm_space(capacity, shape, dtype, device, free_bytes)
        name = f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
        self._open(RingHandle(name, int(capacity), tuple(int(s) for s in shape), dtype, device), create=True)
        self._state.fill_(FREE)
        self._owner.fill_(NO_OWNER)
        self._key.fill_(-1)
        if device.startswith("cuda"):
            data = torch.empty((self.capacity, *self.shape), dtype=dtype, device=device)
            self._data = data
            self.handle = RingHandle(name, self.capacity, self.shape, dtype, device, cuda_data=data)
        elif pin is not None:
            self._pin(pin)

    @classmethod
    def attach(cls, handle: RingHandle, pin: int | None = None) -> "SlotRing":
        """Open an existing ring in another process (a producer). Attached rings never unlink.

        ``pin``: the (bound) CUDA device to page-lock this process's mapping of a host ring under (a GPU
        producer's device -> slot copies), or None.
        """
        ring = cls.__new__(cls)
        ring._open(handle, create=False)
        if handle.device.startswith("cuda"):
            assert handle.cuda_data is not None, "device ring handle without its CUDA tensor"
            ring._data = handle.cuda_data
        elif pin is not None:
            ring._pin(pin)
        return ring

    def _pin(self, device: int) -> None:
        # Page-lock the whole mapping (from its page-aligned base: the state array is at offset 0) so
        # copies between slots and a GPU are asynchronous DMA. Pinning is per process and per mapping.
        self._pinned = _host_register(self._state.data_ptr(), self._shm.size, device)
        self._pin_device = device if self._pinned else None

    @property
    def pinned(self) -> bool:
        return self._pinned

    @property
    def data(self) -> torch.Tensor:
        """All slots, ``(capacity, *shape)``: for a producer that fills its credited slots in place."""
        return self._data

    def _open(self, handle: RingHandle, create: bool) -> None:
        self.capacity, self.shape, self.dtype, self.device = handle.capacity, handle.shape, handle.dtype, handle.device
        self.handle, self._owns, self._pinned, self._pin_device = handle, create, False, None
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
        src = self._data[slot]
        if self._pinned:  # keep what pinning bought: the caller's copy is pinned too (see NOTE)
            out = _pinned_empty(src.shape, src.dtype, self._pin_device).copy_(src)
        else:
            out = src.clone()
        if out.is_cuda:
            torch.cuda.current_stream(out.device).synchronize()
        self.release(slot)
        return out

    def peek(self, keys) -> dict[int, torch.Tensor]:
        """Copies of the READY slots holding any of ``keys`` (host rings), without changing any state: for a
        process that is not the consumer (a runner worker, NOTE [Worker side] in worker.py). The consumer still
        ``read``s (frees) those slots itself. A slot freed and re-credited during the copy is detected
        (state and key are checked again after it) and left out, so a torn image is never returned."""
        if not keys or self._data is None or self._data.is_cuda:
            return {}
        want = torch.as_tensor(list(keys), dtype=torch.int64)
        key_now = self._key.clone()
        slots = ((self._state == READY) & torch.isin(key_now, want)).nonzero().flatten().tolist()
        out = {}
        for slot in slots:
            key = int(key_now[slot])
            image = self._data[slot].clone()
            if int(self._state[slot]) == READY and int(self._key[slot]) == key:  # unchanged while copying
                out[key] = image
        return out

    # -- producer side ------------------------------------------------------------------------------

    def fill(self, slot: int, image: torch.Tensor, owner: int) -> None:
        """Copy ``image`` into a slot credited to ``owner`` without publishing it (possibly asynchronously:
        ``publish`` waits). A float image in [0, 1] goes into a uint8 slot as ``round(x * 255)``."""
        self._check_credit(slot, owner)
        dst = self._data[slot]
        if tuple(image.shape) != tuple(dst.shape):
            raise ValueError(f"image of shape {tuple(image.shape)} does not fit a slot of shape {tuple(dst.shape)}")
        if dst.dtype == torch.uint8 and image.dtype != torch.uint8:
            image = image.float().mul(255.0).round_().clamp_(0, 255)
        # Asynchronous only into memory the DMA engine can reach without staging (device or pinned), where
        # ``publish`` synchronises; a device-to-pageable copy is synchronous anyway.
        dst.copy_(image, non_blocking=image.is_cuda and (dst.is_cuda or self._pinned))

    def publish(self, slots, keys, owner: int) -> None:
        """WRITING -> READY for slots ``owner`` has filled (``fill``, or in place, e.g. a sampler's
        ``out_row``); one int or sequences. One stream synchronisation for all of them (not one per image)."""
        slots, keys = ([slots], [keys]) if isinstance(slots, int) else (list(slots), list(keys))
        for slot in slots:
            self._check_credit(slot, owner)
        # The copies must be complete before READY is visible to the consumer (a pinned D2H or a peer copy
        # is asynchronous): wait on the current stream of this process's device.
        if self._data.is_cuda or self._pinned:
            torch.cuda.current_stream().synchronize()  # this process's bound device (devices.bind_process)
            if self._data.is_cuda and self._data.device.index != torch.cuda.current_device():
                torch.cuda.current_stream(self._data.device).synchronize()  # a peer copy into the trainer's GPU
        for slot, key in zip(slots, keys):
            self._key[slot] = key
            self._state[slot] = READY  # last: data, then key, then state (see NOTE)

    def write(self, slot: int, key: int, image: torch.Tensor, owner: int) -> None:
        """WRITING -> READY: ``fill`` then ``publish`` one slot."""
        self.fill(slot, image, owner)
        self.publish(slot, key, owner)

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
            _host_unregister(self._state.data_ptr(), self._pin_device)
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
