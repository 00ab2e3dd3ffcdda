"""Drives a producer child (producer_child.Producer) in-process, as the pool would: jobs, slot credits, a ring.

The ring is a stand-in that keeps what the producer writes into each slot; the consumer side takes every finished
image at once and credits its slot back, so a run ends when each job is done or dropped.
"""

from __future__ import annotations

import os
import time

import torch

from fusionloader.producer_child import Producer
from fusionloader.protocol import ChildConfig


class Sent:
    def __init__(self):
        self.msgs, self.t_sent = [], 0.0

    def send(self, *msg):
        self.msgs.append(msg)
        self.t_sent = time.monotonic()


class KeepingRing:
    """What the producer fills and publishes, by slot."""

    def __init__(self, resolution):
        self.shape = (3, *resolution)
        self.slots: dict[int, torch.Tensor] = {}

    def fill(self, slot, image, owner):
        self.slots[slot] = image.detach().clone()

    def publish(self, slots, keys, owner):
        pass

    def close(self):
        pass


def make_producer(synthesizer, source=None, *, capacity=2, adapters=None, clip_filter=None) -> Producer:
    cfg = ChildConfig(0, "cpu", synthesizer, source, capacity, None, os.getpid(), None, False,
                      adapters=adapters, clip_filter=clip_filter)  # fmt: skip
    child = Producer(cfg, None, Sent(), None)
    child.load()
    child.ring = KeepingRing(child.resolution)
    return child


def run(child: Producer, jobs, slots: int = 4, max_steps: int = 10_000) -> dict:
    """Serve ``jobs``; returns ``{key: image}`` for the images delivered (dropped jobs are absent)."""
    child.handle(("jobs", list(jobs)))
    held = set(child.credits) | {slot for _, slot in child.inflight.values()}  # a later run: credit each slot once
    child.handle(("credit", [s for s in range(slots) if s not in held]))
    out, open_keys = {}, {job.key for job in jobs}
    for _ in range(max_steps):
        if not open_keys:
            return out
        child.admit()
        mark = len(child.results.msgs)
        if child.inflight:
            child.step()
        for msg in child.results.msgs[mark:]:
            if msg[0] == "done":
                _, key, slot, _, _ = msg
                out[key] = child.ring.slots[slot]
                open_keys.discard(key)
                child.handle(("credit", [slot]))
            elif msg[0] == "dropped":
                open_keys.discard(msg[1])
    raise AssertionError(f"jobs {sorted(open_keys)} not finished after {max_steps} steps")


def counts(child: Producer) -> dict:
    """The counters the producer reported (summed increments, as the pool sums them)."""
    total: dict = {}
    for msg in child.results.msgs:
        if msg[0] == "counts":
            for k, v in msg[1].items():
                total[k] = total.get(k, 0) + v
    return total
