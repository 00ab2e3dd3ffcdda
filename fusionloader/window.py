"""The request window: synthetic positions submitted to the pool ahead of the trainer, across epochs.

NOTE [Request window]
~~~~~~~~~~~~~~~~~~~~~

Before each batch, synthetic positions up to the horizon (``lookahead`` samples, or adaptively 2x what the
trainer consumes during one job's latency) are submitted in consumption order; a job's key is the epoch
iteration's base plus the position, so keys grow in consumption order, as the pool's deadline order needs.
When the window runs past the epoch's end and the coming epochs' orders are pure functions of them (``seed=``
given, or distributed default sampling) and nobody pinned the next epoch, as many coming epochs as the window
covers are planned early and their positions requested (a few-shot epoch can be shorter than one job's
latency); the next ``iter()`` adopts its epoch's requests when its plan is the same, else they are cancelled.
Only the window's span of the order is ever read (NOTE [Epoch order]).
"""

from __future__ import annotations

import weakref
from typing import Callable

__all__ = ["RequestWindow"]

KEY_STRIDE = 1 << 32  # job keys: iteration serial * stride + position
MAX_EPOCHS_AHEAD = 64  # bounds the look-ahead in epochs (an epoch may hold a single sample)


class RequestWindow:
    """Submits, adopts and cancels requests. ``make_jobs(key_base, plan, positions, indices, draws)``."""

    def __init__(self, make_jobs: Callable):
        # a weak reference: the loader owns the window, and its __del__ must run when the user drops it
        self._make_jobs = weakref.WeakMethod(make_jobs) if hasattr(make_jobs, "__self__") else (lambda: make_jobs)
        self.pool = None
        self.outstanding: set[int] = set()  # the current epoch's submitted, not yet taken keys
        self.ahead: dict[int, dict] = {}  # epoch -> {"plan", "key_base", "submitted", "keys"}
        self.serial = 0

    def new_key_base(self) -> int:
        self.serial += 1
        return self.serial * KEY_STRIDE

    def submit(self, plan, key_base: int, start: int, end: int, keys: set) -> int:
        """Request the synthetic positions in ``start`` .. ``end``; returns where submission now stands."""
        if self.pool is None or end <= start:
            return start
        positions, indices, draws = plan.synthetic_between(start, end)
        jobs = self._make_jobs()(key_base, plan, positions, indices, draws)
        if jobs:
            self.pool.submit(jobs)
            keys.update(j.key for j in jobs)
        return min(end, plan.order.known_positions)  # synthetic_between read the order up to ``end``

    def adopt(self, plan) -> tuple[int, int] | None:
        """(key_base, submitted) of the requests made ahead for ``plan``'s epoch when they match it."""
        ahead = self.ahead.pop(plan.epoch, None)
        if ahead is not None and plan.same_as(ahead["plan"]):
            self.outstanding |= ahead["keys"]
            for e in [e for e in self.ahead if e < plan.epoch]:  # skipped epochs (set_epoch jumped ahead)
                self.drop_ahead(e)
            return ahead["key_base"], ahead["submitted"]
        if ahead is not None:  # later epochs' keys were made for consumption after this one's
            self.ahead[plan.epoch] = ahead
        self.drop_ahead()
        return None

    def plan_ahead(self, epoch: int, positions: int, plan_for: Callable) -> None:
        """Request the first ``positions`` samples from the start of ``epoch`` on (into the epochs after it
        when it is shorter); ``plan_for(e)`` plans epoch ``e``."""
        last = epoch
        for e in range(epoch, epoch + MAX_EPOCHS_AHEAD):
            if positions <= 0:
                break
            last = e
            ahead = self.ahead.get(e)
            if ahead is None:
                ahead = self.ahead[e] = {"plan": plan_for(e), "key_base": self.new_key_base(), "submitted": 0,
                                         "keys": set()}  # fmt: skip
            plan = ahead["plan"]
            end = min(positions, plan.num_positions)
            ahead["submitted"] = max(ahead["submitted"], self.submit(plan, ahead["key_base"], ahead["submitted"], end,
                                                                     ahead["keys"]))  # fmt: skip
            positions -= plan.num_positions
        # The look-ahead shrank: free what it no longer covers -- past a margin of three times as many epochs,
        # or a look-ahead that breathes with the latency estimate would cancel and re-request the same jobs.
        for e in [e for e in self.ahead if e > last + 3 * (last - epoch + 1)]:
            self.drop_ahead(e)

    def _cancel(self, keys) -> None:
        if keys and self.pool is not None:
            try:
                self.pool.cancel(list(keys))
            except Exception:  # a failed pool has nothing left to cancel
                pass

    def drop_ahead(self, epoch: int | None = None) -> None:
        """Cancel the requests made ahead for ``epoch`` (default: every epoch)."""
        for e in [epoch] if epoch is not None else list(self.ahead):
            ahead = self.ahead.pop(e, None)
            if ahead is not None:
                self._cancel(ahead["keys"])

    def cancel_outstanding(self) -> None:
        keys, self.outstanding = self.outstanding, set()
        self._cancel(keys)
