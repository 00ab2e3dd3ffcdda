"""The epoch order: which dataset index comes at which position, batch by batch, without building the epoch.

NOTE [Epoch order]
~~~~~~~~~~~~~~~~~~

An order is read lazily, one batch at a time, and held only for a window (O(batch + look-ahead) memory):

* :class:`ArrayOrder` -- the default samplers' orders reproduced as one numpy array (``seed=`` given, or
  ``DistributedSampler`` under torch.distributed): :func:`sequential_order`, :func:`random_order` and
  :func:`distributed_order` give exactly what ``SequentialSampler``, ``RandomSampler`` seeded with
  ``mix_seed(seed, epoch)`` and ``DistributedSampler`` after ``set_epoch`` yield; batch boundaries are
  arithmetic (``BatchSampler`` rules). 10 M indices cost 80 MB and one ``randperm``.
* :class:`StreamOrder` -- any other (batch) sampler, iterated as DataLoader iterates it, a batch at a time,
  when the runner or the request window first needs it. Nothing is recorded: a resume re-derives the order
  from the state the sampler's randomness had at the epoch's start (:class:`OrderSnapshot`).

Resume (:class:`OrderSnapshot`). Before an epoch's sampler draws anything the snapshot captures what decides
the order: the ``generator`` the DataLoader was given, or else torch's global RNG (DataLoader draws its worker
base seed, and ``RandomSampler`` its permutation seed, from it), and for every sampler object its own
``state_dict()`` when it has ``state_dict``/``load_state_dict`` (torchdata's protocol) or its ``generator``'s
state. Restoring the snapshot and iterating again yields the same batches; the consumed ones are skipped
(torchdata's fast-forward). A sampler whose order cannot be re-derived that way (not one of torch's samplers,
no ``state_dict``, no ``generator``, not a plain sequence) is the one case whose remaining order is stored.
Everything in a snapshot is JSON-serialisable (:func:`to_json` / :func:`from_json` for tensors and bytes).
"""

from __future__ import annotations

import base64
import math
from collections import deque
from collections.abc import Sequence
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

__all__ = [
    "ArrayOrder",
    "OrderSnapshot",
    "StreamOrder",
    "batch_order",
    "distributed_order",
    "from_json",
    "mix_seed",
    "random_order",
    "recomputable",
    "sequential_order",
    "to_json",
]

_TORCH_SAMPLERS = (SequentialSampler, RandomSampler, SubsetRandomSampler, WeightedRandomSampler, DistributedSampler)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (order-sensitive, well mixed)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


# --- the default samplers' orders -----------------------------------------------------------------


def sequential_order(n: int) -> np.ndarray:
    """What ``SequentialSampler`` yields."""
    return np.arange(n, dtype=np.int64)


def random_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """What ``RandomSampler(generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))`` yields."""
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, epoch))
    return torch.randperm(n, generator=g).numpy()


def distributed_order(n: int, rank: int, world_size: int, shuffle: bool, seed: int, epoch: int,
                      drop_last: bool) -> np.ndarray:  # fmt: skip
    """What ``DistributedSampler`` yields on ``rank`` after ``set_epoch(epoch)`` (torch's padding rules)."""
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        indices = torch.randperm(n, generator=g).numpy()
    else:
        indices = np.arange(n, dtype=np.int64)
    if drop_last and n % world_size != 0:
        num_samples = math.ceil((n - world_size) / world_size)
    else:
        num_samples = math.ceil(n / world_size)
    total = num_samples * world_size
    if not drop_last:
        padding = total - len(indices)
        if padding > 0:
            indices = np.concatenate([indices, np.resize(indices, padding)])  # np.resize repeats, as torch pads
    else:
        indices = indices[:total]
    return indices[rank:total:world_size]


def batch_order(order, batch_size: int | None, drop_last: bool) -> list[list[int]]:
    """``BatchSampler`` rules as lists (a reference for tests); ``batch_size=None``: one index per batch."""
    order = [int(i) for i in order]
    if batch_size is None:
        return [[i] for i in order]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


# --- orders ---------------------------------------------------------------------------------------


class ArrayOrder:
    """An epoch order held as one int64 array with its batch starts (``starts[b]`` .. ``starts[b + 1]``)."""

    integer = True

    def __init__(self, indices: np.ndarray, starts: np.ndarray, first_batch: int = 0, generated: np.ndarray | None = None):
        # ``first_batch`` > 0: the rest of an epoch from batch ``first_batch`` on (a stored remaining order);
        # ``starts`` then holds absolute positions and ``indices`` begins at ``starts[0]``.
        # ``generated``: bool per position, the position holds the generated copy of its index (a doubled epoch,
        # NOTE [Mixing policies] in policies.py); None: no position does.
        self.indices = np.asarray(indices, dtype=np.int64)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.first_batch = first_batch
        self.generated = None if generated is None else np.asarray(generated, dtype=bool)

    @classmethod
    def batched(cls, indices: np.ndarray, batch_size: int | None, drop_last: bool,
                generated: np.ndarray | None = None) -> "ArrayOrder":  # fmt: skip
        n = len(indices)
        step = 1 if batch_size is None else int(batch_size)
        if drop_last and batch_size is not None:
            n -= n % step
        starts = np.arange(0, n + step, step, dtype=np.int64)
        starts[-1] = n
        starts = starts[: np.searchsorted(starts, n) + 1]
        return cls(indices[:n], starts, generated=None if generated is None else generated[:n])

    @classmethod
    def doubled(cls, virtual: np.ndarray, n: int, batch_size: int | None, drop_last: bool) -> "ArrayOrder":
        """The order of a doubled epoch from its virtual indices in ``[0, 2n)``: ``v`` is index ``v mod n``,
        generated iff ``v >= n`` (policies.Concat)."""
        virtual = np.asarray(virtual, dtype=np.int64)
        return cls.batched(virtual % n, batch_size, drop_last, generated=virtual >= n)

    @classmethod
    def from_batches(cls, batches, first_batch: int = 0, first_position: int = 0) -> "ArrayOrder":
        lengths = [len(b) for b in batches]
        flat = np.fromiter((int(i) for b in batches for i in b), dtype=np.int64, count=sum(lengths))
        return cls(flat, first_position + np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]), first_batch)

    @property
    def num_batches(self) -> int:
        return self.first_batch + len(self.starts) - 1

    @property
    def known_positions(self) -> int:
        return int(self.starts[-1])

    exhausted = True

    def span(self, b: int) -> tuple[int, int] | None:
        if b >= self.num_batches:
            return None
        k = b - self.first_batch
        return int(self.starts[k]), int(self.starts[k + 1])

    def batch(self, b: int) -> np.ndarray:
        s, e = self.span(b)
        return self.indices_between(s, e)

    def indices_between(self, start: int, end: int) -> np.ndarray:
        base = int(self.starts[0])
        return self.indices[max(start - base, 0) : max(end - base, 0)]

    def generated_between(self, start: int, end: int) -> np.ndarray:
        """bool per position in ``start`` .. ``end``: it holds its index's generated copy."""
        if self.generated is None:
            return np.zeros(len(self.indices_between(start, end)), dtype=bool)
        base = int(self.starts[0])
        return self.generated[max(start - base, 0) : max(end - base, 0)]

    def extend_to(self, position: int) -> int:
        return self.known_positions

    def release(self, b: int) -> None:
        pass


class StreamOrder:
    """The batches of a live (batch) sampler iterator, pulled on demand and forgotten once consumed.

    ``batched``: the iterator yields lists (a batch sampler); else single indices (no auto-batching), each
    its own batch. ``num_batches``: ``len()`` of the sampler when it has one. Indices that are not integers
    (a sampler handing ``dataset[...]`` whole lists with ``batch_size=None``) are kept as objects and mark
    the order non-``integer``: such positions can only be real.
    """

    def __init__(self, it: Iterator, batched: bool, num_batches: int | None):
        self._it, self._batched, self.num_batches = it, batched, num_batches
        self._batches: deque[tuple[int, Any]] = deque()  # (start, indices) of batches first .. pulled - 1
        self._first = 0  # batch number of self._batches[0]
        self.known_positions = 0
        self.exhausted = False
        self.integer = True

    def _pull(self) -> bool:
        if self.exhausted:
            return False
        try:
            batch = next(self._it)
        except StopIteration:
            self.exhausted = True
            self.num_batches = self._first + len(self._batches)
            return False
        items = list(batch) if self._batched else [batch]
        if all(isinstance(i, (int, np.integer)) or (isinstance(i, torch.Tensor) and i.ndim == 0
                                                      and not i.is_floating_point()) for i in items):  # fmt: skip
            arr = np.fromiter((int(i) for i in items), dtype=np.int64, count=len(items))
        else:
            self.integer = False
            arr = items
        self._batches.append((self.known_positions, arr))
        self.known_positions += len(items)
        return True

    def _get(self, b: int):
        if b < self._first:
            raise IndexError(f"batch {b} was released (window starts at {self._first})")
        while b >= self._first + len(self._batches):
            if not self._pull():
                return None
        return self._batches[b - self._first]

    def span(self, b: int) -> tuple[int, int] | None:
        got = self._get(b)
        if got is None:
            return None
        start, arr = got
        return start, start + len(arr)

    def batch(self, b: int):
        got = self._get(b)
        return None if got is None else got[1]

    def extend_to(self, position: int) -> int:
        """Pull batches until ``position`` is known or the sampler ends; returns the known positions."""
        while self.known_positions < position and self._pull():
            pass
        return self.known_positions

    def indices_between(self, start: int, end: int) -> np.ndarray:
        """Indices of positions ``start`` .. ``end`` (pulled, not yet released; integer orders only)."""
        self.extend_to(end)
        parts = []
        for s, arr in self._batches:
            e = s + len(arr)
            if e <= start or s >= end:
                continue
            parts.append(np.asarray(arr, dtype=np.int64)[max(start - s, 0) : min(end, e) - s])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def generated_between(self, start: int, end: int) -> np.ndarray:
        """No stream position holds a generated copy (doubled epochs are array orders)."""
        return np.zeros(len(self.indices_between(start, end)), dtype=bool)

    def release(self, b: int) -> None:
        """Forget batches before ``b`` (consumed)."""
        while self._batches and self._first < b:
            self._batches.popleft()
            self._first += 1


# --- resume -----------------------------------------------------------------------------------------


def recomputable(sampler) -> bool:
    """Whether restoring an :class:`OrderSnapshot` and iterating ``sampler`` again yields the same order."""
    if sampler is None:
        return True
    if isinstance(sampler, BatchSampler) and type(sampler) is BatchSampler:
        return recomputable(sampler.sampler)
    if type(sampler) in _TORCH_SAMPLERS or isinstance(sampler, (Sequence, range, np.ndarray, torch.Tensor)):
        return True
    if callable(getattr(sampler, "state_dict", None)) and callable(getattr(sampler, "load_state_dict", None)):
        return True
    return isinstance(getattr(sampler, "generator", None), torch.Generator)


def _has_state_dict(obj) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


class OrderSnapshot:
    """What decides an epoch's order before its sampler draws (NOTE [Epoch order], "Resume")."""

    @staticmethod
    def take(generator: torch.Generator | None, samplers: dict) -> dict:
        state: dict = {"generator": generator.get_state() if generator is not None else None,
                       "global": torch.get_rng_state() if generator is None else None, "samplers": {}}  # fmt: skip
        seen = set()
        for name, obj in samplers.items():
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            if _has_state_dict(obj):
                state["samplers"][name] = {"state_dict": obj.state_dict()}
            elif isinstance(getattr(obj, "generator", None), torch.Generator) and obj.generator is not generator:
                state["samplers"][name] = {"generator": obj.generator.get_state()}
        return state

    @staticmethod
    def restore(state: dict, generator: torch.Generator | None, samplers: dict) -> None:
        if state.get("generator") is not None and generator is not None:
            generator.set_state(state["generator"])
        if state.get("global") is not None and generator is None:
            # The order came from torch's global RNG (no generator): it is the order's state, as a generator's
            # would be. A trainer restoring its own RNG state afterwards takes precedence.
            torch.set_rng_state(state["global"])
        for name, entry in state.get("samplers", {}).items():
            obj = samplers.get(name)
            if obj is None:
                continue
            if "state_dict" in entry:
                obj.load_state_dict(entry["state_dict"])
            elif isinstance(getattr(obj, "generator", None), torch.Generator):
                obj.generator.set_state(entry["generator"])


# --- JSON --------------------------------------------------------------------------------------------


def to_json(obj):
    """``obj`` with tensors, numpy arrays and bytes encoded so that ``json.dumps`` accepts it."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return {"__tensor__": base64.b64encode(t.numpy().tobytes()).decode(), "dtype": str(t.dtype).split(".")[-1],
                "shape": list(t.shape)}  # fmt: skip
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode(), "dtype": str(obj.dtype),
                "shape": list(obj.shape)}  # fmt: skip
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else f"__int__{k}" if isinstance(k, int) else str(k)): to_json(v)
                for k, v in obj.items()}  # fmt: skip
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json(v) for v in obj]}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    return obj


def from_json(obj):
    """The inverse of :func:`to_json`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            arr = np.frombuffer(base64.b64decode(obj["__tensor__"]), dtype=_NP_DTYPES.get(obj["dtype"], obj["dtype"]))
            return torch.from_numpy(arr.copy()).reshape(obj["shape"]).to(getattr(torch, obj["dtype"]))
        if "__ndarray__" in obj:
            return np.frombuffer(base64.b64decode(obj["__ndarray__"]), dtype=obj["dtype"]).reshape(obj["shape"]).copy()
        if "__bytes__" in obj:
            return base64.b64decode(obj["__bytes__"])
        if "__tuple__" in obj:
            return tuple(from_json(v) for v in obj["__tuple__"])
        return {(int(k[7:]) if k.startswith("__int__") else k): from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj


_NP_DTYPES = {"bfloat16": "uint16"}  # numpy has no bfloat16; its bytes round-trip as uint16
