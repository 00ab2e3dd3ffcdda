"""Host-sync detection that works on CPU: which ops of a code region would read device memory back on a GPU.

On a GPU a host sync stalls the CPU until the stream drains, so the next step cannot be queued behind the
running one. ``torch.cuda.set_sync_debug_mode`` finds them, but only on a GPU. :class:`SyncDetector` is a
``TorchDispatchMode`` (plus a few ``torch.Tensor`` methods that never reach the dispatcher on CPU) that
flags, while active, every op that would sync if the tensors lived on a device:

- read-backs: ``aten._local_scalar_dense`` (``item``, ``bool``, ``int``, ``float``, ``if t:``), ``tolist``,
  ``numpy``, ``cpu``;
- data-dependent shapes: ``nonzero``/``argwhere``, ``masked_select``, ``unique*``, ``repeat_interleave``
  without ``output_size``, ``equal``, ``is_nonzero``, and indexing / index-assignment with a boolean mask;
- host data used on the device: a tensor built from Python data inside the region (``torch.tensor(list)``,
  ``x[[1, 2]]``, ``torch.as_tensor(list, device=...)``: ``aten.lift_fresh``) that then meets a device
  tensor -- on a GPU that is a copy from pageable memory, which waits for the stream. Code that stages host
  data through pinned memory with ``non_blocking=True`` (no sync) declares the result with
  :func:`staged`. A 0-dim host tensor (``t[...] = 0``) is passed to a kernel by value: no copy, not flagged.

Code that by construction computes on CPU tensors whatever the engine's device (the schedule math of
``make_schedule``, diffusers' ``set_timesteps`` without a device) runs under :func:`host_only`: nothing in it
is flagged and what it returns counts as host data (so it is flagged if it meets the device unstaged).

Provenance on CPU: tensors made by ``lift_fresh`` inside the region are *host* tensors (as are results of
ops on host tensors alone); everything else counts as a device tensor. Reads of host tensors are free.

While active, ``Tensor.tolist``/``numpy``/``cpu`` are patched process-wide (they never reach the dispatcher on
CPU): a check for tests and prepared scripts, not for production threads.

    with SyncDetector() as syncs:
        sampler.step()
    assert not syncs.events, syncs.report()
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["SyncDetector", "SyncEvent", "host_only", "staged"]

# Ops whose result size or value the host needs before it can go on.
_SHAPE_SYNCS = {
    "nonzero": "nonzero (data-dependent shape)",
    "argwhere": "argwhere (data-dependent shape)",
    "masked_select": "masked_select (data-dependent shape)",
    "_unique": "unique (data-dependent shape)",
    "_unique2": "unique (data-dependent shape)",
    "unique_dim": "unique (data-dependent shape)",
    "unique_consecutive": "unique (data-dependent shape)",
    "equal": "equal (returns a host bool)",
    "is_nonzero": "is_nonzero (returns a host bool)",
    "_local_scalar_dense": "read-back of a device value (item/bool/int/float)",
}
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"}
_LIFT = {"lift_fresh", "lift_fresh_copy"}
_PY_READS = ("tolist", "numpy", "cpu")

_active: list[SyncDetector] = []


@dataclasses.dataclass(frozen=True)
class SyncEvent:
    """One op that would sync: what, why, and where (innermost frame outside torch)."""

    op: str
    reason: str
    where: str

    def __str__(self) -> str:
        return f"{self.op}: {self.reason} at {self.where}"


def staged(tensor: torch.Tensor) -> torch.Tensor:
    """Declare ``tensor`` a device tensor that reached the device without a sync (pinned, ``non_blocking``).

    A no-op outside a :class:`SyncDetector`; returns ``tensor``.
    """
    for det in _active:
        det._host.pop(id(tensor), None)
    return tensor


@contextlib.contextmanager
def host_only():
    """Host-side work: not checked, and every tensor it makes counts as host data (see the module doc)."""
    saved = [(det, det._host_region) for det in _active]
    for det in _active:
        det._host_region = True
    try:
        yield
    finally:
        for det, value in saved:
            det._host_region = value


def _where() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename.replace("\\", "/")
        if "/torch/" not in name and not name.endswith("/engine/syncs.py"):
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{frame.lineno} ({frame.name})"
    return "?"


class SyncDetector(TorchDispatchMode):
    """Records a :class:`SyncEvent` for every op that would read device memory back (see the module doc).

    ``events``: the list of events; ``count``; ``report()``: one line per distinct (op, place) with counts.
    ``raise_on_sync=True`` raises ``AssertionError`` at the first one instead.
    """

    def __init__(self, raise_on_sync: bool = False):
        super().__init__()
        self.raise_on_sync = raise_on_sync
        self.events: list[SyncEvent] = []
        self._host: dict[int, weakref.ref] = {}  # id -> weakref of host tensors made inside the region
        self._saved: dict[str, object] = {}
        self._host_region = False

    # -- provenance -------------------------------------------------------------------------------------

    def _is_host(self, t) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _mark_host(self, t: torch.Tensor) -> None:
        key = id(t)
        self._host[key] = weakref.ref(t, lambda _, key=key, host=self._host: host.pop(key, None))

    # -- recording --------------------------------------------------------------------------------------

    def _flag(self, op: str, reason: str) -> None:
        event = SyncEvent(op, reason, _where())
        self.events.append(event)
        if self.raise_on_sync:
            raise AssertionError(f"host sync: {event}")

    @property
    def count(self) -> int:
        return len(self.events)

    def report(self) -> str:
        counts: dict[tuple[str, str, str], int] = {}
        for e in self.events:
            counts[(e.op, e.reason, e.where)] = counts.get((e.op, e.reason, e.where), 0) + 1
        return "\n".join(f"{n} x {op}: {reason} at {where}" for (op, reason, where), n in counts.items()) or "none"

    def clear(self) -> None:
        self.events.clear()

    # -- the mode ---------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._host_region:
            out = func(*args, **kwargs)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._mark_host(t)
            return out
        name = func.overloadpacket.__name__
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        host = [self._is_host(t) for t in tensors]
        # A 0-dim host tensor next to device tensors is a wrapped scalar, passed to the kernel by value.
        if not all(host):
            host = [h for t, h in zip(tensors, host) if not (h and t.dim() == 0)]
        if name in _SHAPE_SYNCS and not all(host):
            self._flag(str(func), _SHAPE_SYNCS[name])
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and not all(host) and tensors:
            self._flag(str(func), "repeat_interleave without output_size (data-dependent shape)")
        elif name in _INDEX_OPS and not all(host):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                self._flag(str(func), "boolean-mask indexing (data-dependent shape)")
        if name not in _LIFT and any(host) and not all(host):
            self._flag(str(func), "tensor built from host data used on the device (pageable host->device copy)")
        out = func(*args, **kwargs)
        if name in _LIFT or (tensors and all(host)):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._mark_host(t)
        return out

    def __enter__(self):
        _active.append(self)
        for method in _PY_READS:
            self._saved[method] = getattr(torch.Tensor, method)

            def read(t, *a, _method=method, _real=self._saved[method], **k):
                if not self._is_host(t) and not self._host_region:
                    self._flag(f"Tensor.{_method}", "read-back of device memory to the host")
                return _real(t, *a, **k)

            setattr(torch.Tensor, method, read)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for method, real in self._saved.items():
                setattr(torch.Tensor, method, real)
            self._saved.clear()
            if self in _active:
                _active.remove(self)

