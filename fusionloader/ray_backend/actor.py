"""One producer as a Ray actor: the producer process's engine-side code (``producer_child.Producer``: the
Synthesizer load, the latent cache, the continuous-batching sampler, admission by slot credit) run in a thread
of the actor, talking to the coordinator through an inbox and an outbox instead of a queue and a pipe.

The actor is threaded (``max_concurrency`` > 1) so ``poll`` answers while the sampler steps: a poll is the
coordinator's heartbeat, and a poll that does not come back within the liveness timeout means the actor or its
node is gone (NOTE [Ray backend] in pool.py). Calls from one caller to a threaded actor may run out of order,
so every message carries a sequence number and the inbox hands them to the producer in that order.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback

import torch

from .. import protocol as P
from ..devices import bind_process
from ..producer_child import Producer
from ..protocol import ChildConfig, ErrorInfo, ReadyInfo
from .slots import ObjectSlots

__all__ = ["ProducerActor"]


class _Outbox:
    """The producer's result channel: messages wait here until the coordinator's next ``poll``. A DONE message
    leaves with the reference of its image (``("done", key, slot, busy_s, latency_s, ref)``)."""

    def __init__(self):
        self.cv = threading.Condition()
        self.messages: list = []
        self.t_sent = time.monotonic()
        self.slots: ObjectSlots | None = None

    def send(self, *msg) -> None:
        if msg[0] == P.DONE:
            msg = (*msg, self.slots.take_ref(msg[2]))
        with self.cv:
            self.messages.append(msg)
            self.t_sent = time.monotonic()
            self.cv.notify_all()

    def drain(self, wait_s: float) -> list:
        with self.cv:
            if not self.messages:
                self.cv.wait(wait_s)
            out, self.messages = self.messages, []
            return out


class _ActorProducer(Producer):
    def __init__(self, cfg, requests, results: _Outbox, stop_event, put):
        super().__init__(cfg, requests, results, stop_event)
        self._put = put

    def attach(self, handle) -> None:  # the ring is the object store (slots.py), not shared memory
        self.results.slots = ObjectSlots(handle, self._put)
        self.use_ring(self.results.slots)


class ProducerActor:
    """Wrapped with ``ray.remote`` by the supervisor (this module imports no Ray at import time)."""

    def __init__(self, cfg: ChildConfig):
        import ray

        self.cfg = cfg
        self.inbox: queue.Queue = queue.Queue()
        self.outbox = _Outbox()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.next_seq, self.early = 0, {}
        self.thread = threading.Thread(target=self._run, args=(ray.put,), name="fl-producer", daemon=True)
        self.thread.start()

    def _run(self, put) -> None:
        cfg = self.cfg
        bind_process(cfg.device, cfg.threads)  # Ray narrowed CUDA_VISIBLE_DEVICES to this actor's GPU(s)
        producer = _ActorProducer(cfg, self.inbox, self.outbox, self.stop, put)
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                producer.load()
                memory = producer.memory()
                producer.send(P.READY, ReadyInfo(os.getpid(), time.perf_counter() - t0, producer.resolution, memory))
                producer.serve()
        except BaseException as e:  # noqa: BLE001 - everything goes back to the coordinator
            self.outbox.send(P.ERROR, ErrorInfo(os.getpid(), f"{type(e).__name__}: {e}",
                                                tuple(j.key for j in producer.current),
                                                tuple(j.index for j in producer.current), traceback.format_exc()))
        finally:
            producer.close()

    def send(self, seq: int, msg) -> None:
        """Deliver request message number ``seq`` (P.RING, P.JOBS, ...) in order."""
        with self.lock:
            self.early[seq] = msg
            while self.next_seq in self.early:
                message = self.early.pop(self.next_seq)
                self.next_seq += 1
                if message[0] == P.STOP:
                    self.stop.set()
                self.inbox.put(message)

    def poll(self, wait_s: float) -> list:
        """The messages the producer sent since the last poll, after waiting up to ``wait_s`` for one."""
        return self.outbox.drain(wait_s)

    def pid(self) -> int:
        return os.getpid()
