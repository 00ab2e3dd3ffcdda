"""Per-class UNet deltas (ESD-erased concepts) resident on one UNet, switched per UNet batch.

    adapters = ClassAdapters({3: "esd/three.safetensors", 7: "esd/seven.safetensors"})
    sampler = synth.sampler(capacity=8)
    sampler.adapters = adapters.attach(synth.components.unet)        # loads every delta once
    sampler.submit(Request(key, prompt, ..., adapter=7))              # class 7's images use the UNet without "seven"

Each class's delta (a file of :func:`fusionloader.methods.erase.erase_concept`) is loaded ONCE: a LoRA delta
becomes a peft adapter of the resident UNet (``add_adapter``), and switching classes is ``set_adapter`` -- no model
reload, no weight copy. A full-weight delta keeps its tensors on the device and is swapped by copying them into the
touched parameters (the base values are kept for classes without one). Classes absent from the mapping, and
requests with ``adapter=None``, run the base UNet (adapters disabled, base weights in place): their images are
exactly what they would be without this object.

NOTE [one class per UNet batch; fairness]. A UNet call runs one set of weights, so a sampler batch holds one class.
When the batch is empty, the class of the OLDEST queued request is activated (a swap only if it differs from the
last one) and that class's queued requests fill the free slots in queue order. While the batch runs, freed slots
take further requests of the same class (again in queue order, skipping other classes) -- so swaps happen only
when the batch drains -- UNTIL the oldest request of another class has waited ``patience`` sampler steps; then no
more are admitted, the batch drains, and that class goes next. ``patience=0`` is strict queue order per batch.
The swaps made so far are counted in ``swaps``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import deque
from collections.abc import Hashable, Mapping
from typing import Any

import torch

__all__ = ["ClassAdapters", "deltas_in"]


class ClassAdapters:
    """``{class key: erased-concept file (or Erased)}`` -> deltas switchable on one UNet (see the module docstring)."""

    def __init__(self, deltas: Mapping[Hashable, Any], *, patience: int = 64):
        from ..methods.erase import Erased, read_erased

        if not isinstance(deltas, Mapping):
            raise TypeError(f"deltas must be a mapping {{class: file}}, got {type(deltas).__name__}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0 (sampler steps), got {patience!r}")
        self.patience = patience
        self._deltas: dict[Hashable, Erased] = {}
        self._sources: dict[Hashable, Any] = {}
        for key, source in deltas.items():
            if key is None:
                raise ValueError("class key None is reserved for the base UNet")
            if isinstance(source, Erased):
                erased = source
            else:
                try:
                    erased = read_erased(source)
                except (OSError, ValueError) as e:
                    raise ValueError(f"class {key!r}: {e}") from e
            self._deltas[key] = erased
            self._sources[key] = source
        self._names = {key: f"esd_{i}" for i, key in enumerate(self._deltas)}
        self._unet = None
        self._active: Hashable | None = None
        self._base: dict[str, torch.Tensor] = {}
        self._full: dict[Hashable, dict[str, torch.Tensor]] = {}
        self.swaps = 0
        self._now = 0
        self._seen: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._deltas)

    def __contains__(self, key) -> bool:
        return key in self._deltas

    @property
    def classes(self) -> list:
        return list(self._deltas)

    @property
    def active(self) -> Hashable | None:
        """The class whose delta the UNet runs now (None: the base UNet)."""
        return self._active

    def __getstate__(self):  # pickles as its sources: producers attach to their own UNet
        return {"deltas": self._sources, "patience": self.patience}

    def __setstate__(self, state):
        self.__init__(state["deltas"], patience=state["patience"])

    def __repr__(self) -> str:
        kinds = {k: e.kind for k, e in self._deltas.items()}
        return f"ClassAdapters({kinds}, patience={self.patience}, attached={self._unet is not None})"

    # -- loading ---------------------------------------------------------------------------------------------

    def attach(self, unet: torch.nn.Module) -> ClassAdapters:
        """Load every delta onto ``unet`` once (in its device and dtype); leaves the base UNet active. Returns self."""
        if self._unet is not None:
            raise RuntimeError("these ClassAdapters are already attached to a UNet; make a new ClassAdapters per UNet")
        params = dict(unet.named_parameters())
        # Full-weight deltas first: they hold the Parameter objects, which LoRA injection below keeps as they are.
        for key, erased in self._deltas.items():
            if erased.kind != "full":
                continue
            tensors = {}
            for k, v in erased.tensors.items():
                name = k[len("unet.") :]
                p = params.get(name)
                if p is None or tuple(p.shape) != tuple(v.shape):
                    shape = None if p is None else tuple(p.shape)
                    raise ValueError(f"class {key!r}: delta tensor {name!r} {tuple(v.shape)} does not fit the UNet ({shape})")
                tensors[name] = (p, v.to(p.device, p.dtype))  # the Parameter itself: peft keeps it as base_layer's
                if name not in self._base:
                    self._base[name] = (p, p.detach().clone())
            self._full[key] = tensors
        lora = [k for k, e in self._deltas.items() if e.kind == "lora"]
        if lora:
            from ..methods.erase import lora_config_of, require_peft

            require_peft()
            from peft.utils import set_peft_model_state_dict

            taken = set(getattr(unet, "peft_config", {}) or {})
            for key in lora:
                name = self._names[key]
                if name in taken:
                    raise ValueError(f"class {key!r}: the UNet already has an adapter named {name!r}")
                erased = self._deltas[key]
                modules = dict(unet.named_modules())
                missing = [m for m in json.loads(erased.metadata["target_modules"]) if m not in modules]
                if missing:
                    raise ValueError(f"class {key!r}: delta for another UNet (no module {missing[0]!r} here)")
                with warnings.catch_warnings():  # peft warns on every adapter after the first: that is the point here
                    warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                    unet.add_adapter(lora_config_of(erased), adapter_name=name)
                state = {k[len("unet.") :]: v for k, v in erased.tensors.items()}
                result = set_peft_model_state_dict(unet, state, adapter_name=name)
                unexpected = getattr(result, "unexpected_keys", None) or []
                if unexpected:
                    raise ValueError(f"class {key!r}: delta keys not in the UNet: {unexpected[:3]}")
            unet.requires_grad_(False)
            unet.disable_adapters()
        self._unet = unet
        self._active = None
        return self

    # -- switching -------------------------------------------------------------------------------------------

    def resolve(self, key) -> Hashable | None:
        """The delta a request's class key selects: itself when it has one, else None (the base UNet)."""
        return key if key is not None and key in self._deltas else None

    @torch.no_grad()
    def activate(self, key) -> None:
        """Make the UNet run ``key``'s delta (None or a class without one: the base UNet)."""
        if self._unet is None:
            raise RuntimeError("attach(unet) first")
        key = self.resolve(key)
        if key == self._active:
            return
        unet, old = self._unet, self._active
        if old in self._full:
            for name in self._full[old]:
                param, base = self._base[name]
                param.copy_(base)
        if key in self._full:
            for param, value in self._full[key].values():
                param.copy_(value)
        has_lora = any(e.kind == "lora" for e in self._deltas.values())
        if key is not None and self._deltas[key].kind == "lora":
            unet.enable_adapters()
            unet.set_adapter(self._names[key])
            unet.requires_grad_(False)  # peft marks the active adapter trainable; producers only infer
        elif has_lora:
            unet.disable_adapters()
        self._active = key
        self.swaps += 1

    # -- admission (called by the sampler once per step) -----------------------------------------------------

    def admit(self, queue: deque, free: int, busy: bool) -> list:
        """Remove and return the queued requests that may join the UNet batch now (see the module NOTE).

        ``queue``: the sampler's queue of requests (``request.adapter`` is the class key; a ``cohort`` -- members
        sharing one generator, queued together -- joins whole or not at all, as the class of its first member).
        ``free``: free slots; ``busy``: whether the batch still runs samples (of the active class).
        """
        self._now += 1
        for r in queue:
            self._seen.setdefault(id(r), self._now)
        if not queue or free <= 0:
            return []
        if busy:
            cls = self._active
            for r in queue:
                if self.resolve(getattr(r, "adapter", None)) != cls:
                    if self._now - self._seen[id(r)] >= self.patience:
                        return []  # another class waited long enough: let this batch drain
                    break
        else:
            cls = self.resolve(getattr(queue[0], "adapter", None))
        picks: list = []
        items = list(queue)
        taken = set()
        i = 0
        while i < len(items):
            r = items[i]
            cohort = getattr(r, "cohort", None)
            size = cohort.size if cohort is not None else 1
            if self.resolve(getattr(r, "adapter", None)) == cls:
                if len(picks) + size > free:
                    break
                unit = items[i : i + size]
                picks += unit
                taken.update(id(u) for u in unit)
            i += size
        if not picks:
            return []
        if not busy:
            self.activate(cls)
        queue.clear()
        queue.extend(r for r in items if id(r) not in taken)
        for r in picks:
            self._seen.pop(id(r), None)
        return picks


def deltas_in(folder: str | os.PathLike, classes: Mapping[Hashable, str]) -> dict:
    """``{class key: folder/<name>.safetensors}`` for the classes whose file exists (``fusionloader erase`` layout)."""
    folder = os.fspath(folder)
    out = {}
    for key, name in classes.items():
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name).strip())
        path = os.path.join(folder, f"{stem}.safetensors")
        if os.path.isfile(path):
            out[key] = path
    return out
