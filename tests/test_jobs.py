"""JobBook in-process, with a fake clock: the pending / owned / ready invariant, the deadline order, the
latency and consumption-rate estimates; NonFiniteWindow."""

import random

import pytest

from fusionloader.jobs import DEADLINE_MARGIN, JobBook, NonFiniteWindow
from fusionloader.protocol import Job


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def jobs(keys):
    return [Job(k, k % 5, "p", 0.5, 2.0, 3, k) for k in keys]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def book(clock):
    return JobBook(clock)


def test_a_job_is_in_exactly_one_place_through_random_operations(book, clock):
    rng = random.Random(0)
    next_key, slots = 0, iter(range(10**6))
    for _ in range(3000):
        op = rng.randrange(9)
        live = list(book.pending) + list(book.owner) + list(book.ready)
        key = rng.choice(live) if live else -1
        if op == 0:
            book.submit(jobs(range(next_key, next_key + rng.randint(1, 4))))
            next_key = max(book.pending, default=next_key) + 1
        elif op == 1 and book.pending:
            book.assign(rng.choice(list(book.pending)), rng.randrange(3))
        elif op == 2 and book.owner:
            k = rng.choice(list(book.owner))
            book.finish(k, book.owner[k], next(slots), rng.random())
        elif op == 3:
            book.cancel(key)
        elif op == 4:
            book.lose(rng.randrange(3))
        elif op == 5:
            book.take(key)
        elif op == 6:
            book.mark_passed([key])
        elif op == 7 and book.owner:
            k = rng.choice(list(book.owner))
            book.drop(k, book.owner[k])
        elif op == 8:
            book.wait_for(key)
        clock.t += 0.01
        book.check()
        assert set(book.due_order()) == set(book.pending)


def test_finish_by_a_non_owner_is_refused(book):
    book.submit(jobs([1]))
    book.assign(1, producer=0)
    assert book.cancel(1) == ("owned", 0)
    assert not book.finish(1, 0, slot=5, latency_s=1.0)  # cancelled meanwhile: the caller frees the slot
    assert book.state(1) == "unknown" and not book.ready


def test_duplicate_submit_is_all_or_nothing(book):
    book.submit(jobs([1]))
    with pytest.raises(ValueError, match="job key 1"):
        book.submit(jobs([2, 1]))
    assert book.state(2) == "unknown"
    book.assign(1, 0)
    with pytest.raises(ValueError):
        book.submit(jobs([1]))  # owned is live too


def test_outcomes_lost_and_dropped_then_settled(book):
    book.submit(jobs([1, 2, 3]))
    for k in (1, 2, 3):
        book.assign(k, producer=k % 2)
    book.drop(2, producer=0)
    assert book.lose(1) == jobs([1, 3])
    assert [book.state(k) for k in (1, 2, 3)] == ["lost", "dropped", "lost"]
    assert book.counters["lost"] == 2 and book.counters["nonfinite_dropped"] == 1
    assert book.settle(1) and book.state(1) == "unknown"  # the take that learns it forgets it
    book.submit(jobs([4]))
    assert not book.settle(4)


def test_consumption_rate_and_latency_median(book, clock):
    book.submit(jobs(range(40)))
    for k in range(40):
        book.assign(k, 0)
        book.finish(k, 0, slot=k, latency_s=float(k % 4))  # 0 1 2 3 ...
    assert book.latency_s == 1.5  # median of the last 32, not the mean, not all 40
    for k in range(10):
        clock.t += 0.1  # 10 per second
        book.take(k)
    assert book.consume_rate == pytest.approx(10.0, rel=0.01)


def test_passed_jobs_do_not_count_in_the_latency_and_are_not_consumed_twice(book, clock):
    book.submit(jobs([1, 2]))
    book.mark_passed([1])
    book.assign(1, 0)
    book.assign(2, 0)
    book.finish(1, 0, 0, latency_s=100.0)  # made last on purpose: its wait is no latency
    book.finish(2, 0, 1, latency_s=2.0)
    assert book.latency_s == 2.0
    assert book.counters["passed"] == 1 and book.counters["passed_unstarted"] == 1
    assert book.counters["consumed"] == 1
    book.take(1)
    assert book.counters["consumed"] == 1  # counted when it was passed, not again when collected
    book.take(2)
    assert book.counters["consumed"] == 2


def test_deadline_order_skips_what_would_arrive_too_late(book, clock):
    book.submit(jobs(range(20)))
    book.consume_rate, book.latency_s = 4.0, 1.0  # the trainer reaches 5 keys (with the margin) per latency
    reach = int(DEADLINE_MARGIN * 4.0 * 1.0)
    assert book.due_order() == list(range(reach, 20)) + list(range(reach))
    assert book.due_order(deadlines=False) == list(range(20))
    book.assign(0, 0)  # one job in flight stands between the trainer and the pending ones
    assert book.due_order()[:2] == [reach, reach + 1]
    assert book.due_order()[-(reach - 1):] == list(range(1, reach))
    book.wait_for(2)  # a take waits: urgent first, and no skipping (its slot must not be held by far jobs)
    assert book.due_order() == [2] + [k for k in range(1, 20) if k != 2]
    book.mark_passed([3])
    assert book.due_order()[-1] == 3 and book.due_order()[0] == 2


def test_nonfinite_window_warns_once_per_window_on_a_majority():
    w = NonFiniteWindow(window=8)
    assert [w.record(i % 2 == 0) for i in range(8)] == [None] * 8  # half: not most
    texts = [w.record(False) for _ in range(7)] + [w.record(True)]
    assert texts[:7] == [None] * 7 and "7 of the last 8" in texts[7] and "vae_dtype=torch.float32" in texts[7]
    assert w.record(False) is None  # a fresh window starts
