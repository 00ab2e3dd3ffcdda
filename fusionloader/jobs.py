"""The pool's job book: where every live job is, in which order to make them, and how fast things go.

A live job is in exactly one of three places (the book's invariant, ``check()``):

* **pending** -- submitted, not yet handed to a producer (kept in submission = consumption order);
* **owned** -- handed to producer p, not finished (``owner[key] == p``);
* **ready** -- finished, its image waiting in ring slot s for ``take``.

A job leaves the book when it is taken or cancelled, or with an *outcome* remembered for ``state``:
``"lost"`` (its producer died) or ``"dropped"`` (NaN/inf output, or rejected by the CLIP filter). Orthogonal flags: **passed** (the
trainer went past it without its image; kept for the variant store, made last -- one name for that
concept across fusionloader) and **urgent** (a ``take`` is waiting for it).

The book also keeps what NOTE [Deadlines] in producer.py needs: the consumption rate (jobs taken or
passed per second) and the job latency (median of the last jobs' receipt-to-done, as the producers
measure it), and from them the order to dispatch pending jobs in. It does no I/O and takes its clock as a
collaborator, so every rule here is tested in-process with a fake clock (tests/test_jobs.py).
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import Callable, Iterable

from .protocol import Job

__all__ = ["DEADLINE_MARGIN", "JobBook", "LATENCY_WINDOW", "NonFiniteWindow"]

DEADLINE_MARGIN = 1.25  # dispatch this many latencies' worth of jobs ahead: the latency is a median, not a worst case
LATENCY_WINDOW = 32  # jobs in the latency median (cold starts do not skew it)
OUTCOMES_KEPT = 1 << 16  # remembered lost/dropped keys
RATE_PERIOD_S = 0.5  # the consumption rate is refreshed at most this often (an EMA of per-period rates)


class JobBook:
    """Pending / owned / ready jobs with the deadline order; not thread-safe (the pool holds its lock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.pending: collections.OrderedDict[int, Job] = collections.OrderedDict()
        self.owned: dict[int, collections.OrderedDict[int, Job]] = collections.defaultdict(collections.OrderedDict)
        self.owner: dict[int, int] = {}  # key -> producer, for owned jobs
        self.ready: dict[int, int] = {}  # key -> ring slot
        self.outcomes: collections.OrderedDict[int, str] = collections.OrderedDict()  # key -> "lost" | "dropped"
        self.passed: set[int] = set()  # live keys the consumer went past
        self.urgent: set[int] = set()  # pending keys a take() waits for
        self.dispatched_at: dict[int, float] = {}  # key -> when it went to a producer (latency bookkeeping)
        self.counters: collections.Counter = collections.Counter()
        self.latency_s = 0.0
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.consume_rate = 0.0
        self._consumed, self._t_rate = 0, clock()

    # -- where a job is -------------------------------------------------------------------------------

    def live(self, key: int) -> bool:
        return key in self.pending or key in self.owner or key in self.ready

    def state(self, key: int) -> str:
        """"pending" (pending or owned), "ready", "lost", "dropped" or "unknown"."""
        if key in self.ready:
            return "ready"
        if key in self.pending or key in self.owner:
            return "pending"
        return self.outcomes.get(key, "unknown")

    def check(self) -> None:
        """Assert the invariant: each live key in exactly one place; flags only on live keys."""
        owned = [k for jobs in self.owned.values() for k in jobs]
        assert len(owned) == len(set(owned)) == len(self.owner), "a job owned twice"
        assert all(self.owner[k] == p for p, jobs in self.owned.items() for k in jobs), "owner map out of step"
        places = [set(self.pending), set(self.owner), set(self.ready)]
        for i in range(3):
            for j in range(i + 1, 3):
                assert not places[i] & places[j], f"job(s) in two places: {sorted(places[i] & places[j])}"
        live = set().union(*places)
        assert self.passed <= live, f"passed flag on dead job(s) {sorted(self.passed - live)}"
        assert self.urgent <= set(self.pending), f"urgent flag on non-pending job(s) {sorted(self.urgent - set(self.pending))}"
        assert not live & set(self.outcomes), "a live job with an outcome"

    # -- transitions ----------------------------------------------------------------------------------

    def submit(self, jobs: Iterable[Job]) -> list[Job]:
        """Queue jobs (all or nothing); a key already live raises ``ValueError``."""
        jobs, seen = list(jobs), set()
        for job in jobs:
            if job.key in seen or self.live(job.key):
                raise ValueError(f"job key {job.key} is already queued")
            seen.add(job.key)
        for job in jobs:
            self.outcomes.pop(job.key, None)
            self.pending[job.key] = job
        self.counters["submitted"] += len(jobs)
        return jobs

    def assign(self, key: int, producer: int) -> Job:
        """pending -> owned by ``producer``."""
        job = self.pending.pop(key)
        self.urgent.discard(key)
        self.owned[producer][key] = job
        self.owner[key] = producer
        if key not in self.passed:  # a passed job waits on purpose: its delay is no latency
            self.dispatched_at[key] = self.clock()
        return job

    def _unown(self, key: int) -> Job | None:
        producer = self.owner.pop(key, None)
        if producer is None:
            return None
        self.dispatched_at.pop(key, None)
        return self.owned[producer].pop(key)

    def finish(self, key: int, producer: int, slot: int, latency_s: float | None) -> bool:
        """owned -> ready in ``slot``. False if ``producer`` no longer owns it (cancelled meanwhile): the
        caller frees the slot."""
        if self.owner.get(key) != producer:
            return False
        timed = key in self.dispatched_at  # not for jobs made last on purpose
        self._unown(key)
        self.ready[key] = slot
        self.counters["produced"] += 1
        if timed and latency_s is not None:
            self._latencies.append(latency_s)
            self.latency_s = statistics.median(self._latencies)
        return True

    def drop(self, key: int, producer: int, reason: str = "nonfinite") -> None:
        """owned -> outcome "dropped": a non-finite output (``reason="nonfinite"``) or every generation rejected
        by the CLIP filter (``"clip"``); counted as ``<reason>_dropped``."""
        self.counters[f"{reason}_dropped"] += 1
        if self.owner.get(key) == producer:
            self._unown(key)
            self.passed.discard(key)
            self._remember(key, "dropped")

    def lose(self, producer: int) -> list[Job]:
        """Every job ``producer`` owned -> outcome "lost" (it died); returns them in dispatch order."""
        jobs = list(self.owned.pop(producer, {}).values())
        for job in jobs:
            del self.owner[job.key]
            self.dispatched_at.pop(job.key, None)
            self.passed.discard(job.key)
            self._remember(job.key, "lost")
        self.counters["lost"] += len(jobs)
        return jobs

    def take(self, key: int) -> int | None:
        """ready -> gone: its slot (counted as consumed unless it was passed already), or None."""
        slot = self.ready.pop(key, None)
        if slot is None:
            return None
        self.counters["taken"] += 1
        if key in self.passed:  # collected late for the store: counted when it was passed
            self.passed.discard(key)
        else:
            self.consumed()
        return slot

    def settle(self, key: int) -> bool:
        """For a take that found no image: True if none will ever come (lost, dropped, unknown), forgetting
        the outcome; False while the job is pending or owned."""
        if self.outcomes.pop(key, None) is not None or not (key in self.pending or key in self.owner):
            self.passed.discard(key)
            return True
        return False

    def cancel(self, key: int) -> tuple[str, int] | None:
        """Forget a job: ("pending", -1), ("owned", producer) or ("ready", slot) where it was, or None."""
        self.outcomes.pop(key, None)
        self.urgent.discard(key)
        self.passed.discard(key)
        if self.pending.pop(key, None) is not None:
            where = ("pending", -1)
        elif key in self.owner:
            producer = self.owner[key]
            self._unown(key)
            where = ("owned", producer)
        elif key in self.ready:
            where = ("ready", self.ready.pop(key))
        else:
            return None
        self.counters["cancelled"] += 1
        return where

    def mark_passed(self, keys: Iterable[int]) -> dict[int, list[int]]:
        """The consumer went past these: flag them (made last), count them as consumed. Returns the newly
        passed owned keys per producer (each producer moves them behind its other jobs)."""
        keys = [k for k in keys if (k in self.pending or k in self.owner) and k not in self.passed]
        self.passed.update(keys)
        self.counters["passed"] += len(keys)
        self.counters["passed_unstarted"] += sum(1 for k in keys if k in self.pending)
        self.consumed(len(keys))
        per_producer = collections.defaultdict(list)
        for k in keys:
            if k in self.owner:
                per_producer[self.owner[k]].append(k)
        return dict(per_producer)

    def wait_for(self, key: int) -> bool:
        """A take() waits for ``key``: make it urgent. True if that changes the dispatch order."""
        if key in self.pending and key not in self.urgent:
            self.urgent.add(key)
            return True
        return False

    def _remember(self, key: int, outcome: str) -> None:
        self.outcomes[key] = outcome
        while len(self.outcomes) > OUTCOMES_KEPT:
            self.outcomes.popitem(last=False)

    # -- rates and order (NOTE [Deadlines] in producer.py) ----------------------------------------------

    def consumed(self, n: int = 1) -> None:
        """Count jobs the consumer took or passed; refresh the rate estimate at most every RATE_PERIOD_S."""
        self._consumed += n
        self.counters["consumed"] += n
        now = self.clock()
        dt = now - self._t_rate
        if dt >= RATE_PERIOD_S:
            rate = self._consumed / dt
            self.consume_rate = rate if self.consume_rate == 0.0 else 0.7 * self.consume_rate + 0.3 * rate
            self._consumed, self._t_rate = 0, now

    def ahead(self, keys: Iterable[int]) -> int:
        """How many of ``keys`` the consumer has still to reach (not passed)."""
        return sum(1 for k in keys if k not in self.passed)

    def load(self, producer: int) -> int:
        """Jobs ``producer`` owns that the consumer still wants."""
        return self.ahead(self.owned.get(producer, ()))

    def due_order(self, deadlines: bool = True) -> list[int]:
        """Pending keys in the order to dispatch them.

        Jobs in flight or ready stand between the consumer and the first pending key; if the consumer
        reaches ``too_late`` more keys within one latency than that, the first ``too_late`` pending jobs would come
        out after it passed them: make the ones after them first (unless a take() waits: the awaited job
        needs a ring slot, and far-ahead results would hold them all). Passed jobs go last, urgent first.
        """
        keys = [k for k in self.pending if k not in self.passed]
        reach = int(DEADLINE_MARGIN * self.consume_rate * self.latency_s)
        too_late = reach - self.ahead(self.owner) - self.ahead(self.ready)
        if too_late > 0 and not self.urgent and deadlines:
            keys = keys[too_late:] + keys[:too_late]
        if self.passed:
            keys += [k for k in self.pending if k in self.passed]
        if self.urgent:
            keys = [k for k in keys if k in self.urgent] + [k for k in keys if k not in self.urgent]
        return keys


class NonFiniteWindow:
    """Warns when most of the last ``window`` outputs were non-finite (issue 10: nothing warned when every
    output was NaN, and the trainer quietly trained on real images only). Once per window of outputs."""

    def __init__(self, window: int = 32):
        self.window = window
        self.outcomes: collections.deque[bool] = collections.deque(maxlen=window)

    def record(self, finite: bool) -> str | None:
        """Record one output; a warning text when the window just filled with a non-finite majority."""
        self.outcomes.append(bool(finite))
        if len(self.outcomes) < self.window:
            return None
        bad = self.window - sum(self.outcomes)
        self.outcomes.clear()  # the next warning needs a fresh window
        if 2 * bad <= self.window:
            return None
        return (f"{bad} of the last {self.window} synthetic images were non-finite (NaN/inf) and dropped; their "
                f"samples fell back to real images. Usual cause: a half-precision VAE overflowing -- load the "
                f"Synthesizer with vae_dtype=torch.float32, or lower guidance_scale")
