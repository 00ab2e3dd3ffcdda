"""``compile=True`` and ``cuda_graphs=True`` of a sampler: the UNet call through ``torch.compile``, and the fused
step captured as CUDA graphs over fixed slot shapes.

``compile``: :func:`unet_call` wraps the UNet once per module (shared by every sampler over it) with
``torch.compile`` (inductor; on CPU too). Shapes change as slots join and leave, so the first calls at new
batch sizes compile again until dynamo marks the batch dimension dynamic; results equal the eager call to
floating-point reassociation (tests/test_compile.py).

``cuda_graphs`` (CUDA only): a graph replays fixed addresses and shapes, so :func:`fixed_plan` pads a step to
fixed slot shapes -- every one of the ``capacity`` slots is a UNet row (free slots run on whatever their rows
hold and their results are never read), and the CFG rows are padded to a bucket (:func:`cfg_bucket`, powers of
two up to ``capacity``) by repeating a guided slot, whose extra predictions nothing reads. Padding never
changes a live slot's result: every row is computed from its own inputs only. :class:`GraphedStep` captures
one graph per (CFG bucket, ping-pong parity) and replays it after copying the step's per-slot values into its
static inputs. Elsewhere ``cuda_graphs=True`` raises :class:`ValueError` at construction, naming the device.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["GraphedStep", "cfg_bucket", "check_cuda_graphs", "fixed_plan", "unet_call"]

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unet_call(unet, compile: bool = False):
    """``call(xin, t, emb, tc) -> model_out``: the UNet call the sampler makes, compiled when asked."""
    fn = unet
    if compile:
        if unet not in _COMPILED:
            _COMPILED[unet] = torch.compile(unet)
        fn = _COMPILED[unet]

    def call(xin, t, emb, tc=None):
        if tc is None:  # the plain engine's call, argument for argument
            return fn(xin, t, encoder_hidden_states=emb, return_dict=False)[0]
        return fn(xin, t, encoder_hidden_states=emb, timestep_cond=tc, return_dict=False)[0]

    return call


def check_cuda_graphs(device) -> None:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(
            f"cuda_graphs=True captures the sampler step as CUDA graphs and needs a CUDA device; this sampler is on "
            f"{device} (leave cuda_graphs=False there; compile=True works on CPU)"
        )


def cfg_bucket(k: int, capacity: int) -> int:
    """CFG rows a graph is captured for: 0, or the smallest power of two >= k (at most ``capacity``)."""
    if k <= 0:
        return 0
    b = 1
    while b < k:
        b *= 2
    return min(b, capacity)


def fixed_plan(bases, cfg, capacity: int):
    """Host lists of one padded step: ``(rows, uncond_index, cfg_rows)`` with ``capacity`` rows and a CFG bucket.

    ``bases``: each live slot's schedule-table row (slot order); ``cfg``: the live slots with CFG. Free slots
    read table row 0 and have no CFG; the CFG list is padded by repeating its first slot.
    """
    B = len(bases)
    if B > capacity:
        raise ValueError(f"{B} live slots for a capacity of {capacity}")
    rows = list(bases) + [0] * (capacity - B)
    bucket = cfg_bucket(len(cfg), capacity)
    cfg_rows = list(cfg) + [cfg[0]] * (bucket - len(cfg)) if cfg else []
    uncond_index = [-1] * capacity
    for k, b in enumerate(cfg):
        uncond_index[b] = capacity + k
    return rows, uncond_index, cfg_rows


class GraphedStep:
    """CUDA graphs of the fused step over ``capacity`` padded slots (see the module doc).

    ``step(fn, key, inputs)``: ``inputs`` maps names to device tensors of fixed shapes for ``key``; they are
    copied into the graph's static buffers and the graph for ``key`` (captured on its first use, after a warm-up
    run on a side stream as torch.cuda.graphs requires) replays; returns the static outputs.
    """

    def __init__(self, device, capture: bool = True):
        # capture=False runs the same padded step eagerly (how tests check the shape fixing on CPU).
        if capture:
            check_cuda_graphs(device)
        self.device, self.capture = torch.device(device), capture
        self._graphs: dict = {}

    def step(self, fn, key, inputs: dict):
        if not self.capture:
            return fn(**inputs)
        if key not in self._graphs:
            static = {k: v.clone() for k, v in inputs.items()}
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                fn(**static)  # warm-up: lazy initialisation and autotuning outside the capture
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = fn(**static)
            self._graphs[key] = (graph, static, outputs)
        graph, static, outputs = self._graphs[key]
        for k, v in inputs.items():
            static[k].copy_(v, non_blocking=True)
        graph.replay()
        return outputs

    def reset(self) -> None:
        """Drop every graph (the schedule tables grew: their addresses changed)."""
        self._graphs.clear()
