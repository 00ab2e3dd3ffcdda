"""Supervisor in-process (fake clock, fake processes): start-up phase budgets, starts again after a kill while
starting, hang detection and ``stalled``; log records and warnings of the child reaching the trainer."""

import logging
import threading
import warnings

import pytest

from fusionloader import protocol as P
from fusionloader.producer import make_config
from fusionloader.producer_child import ResultChannel, forward_logs
from fusionloader.protocol import ErrorInfo, StartupBudget
from fusionloader.supervisor import DEAD, READY, STARTING, Supervisor, startup_overdue


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


class FakeProcess:
    def __init__(self, exitcode=None):
        self.exitcode, self.killed, self.pid, self.sentinel = exitcode, False, 4242, None

    def kill(self):
        self.killed = True

    def join(self, timeout=None):
        pass

    def close(self):
        pass


class Listener:
    def __init__(self, busy=False):
        self.is_busy, self.deaths = busy, []

    def on_message(self, p, msg):
        pass

    def on_death(self, p):
        self.deaths.append(p.producer)
        return [P.Job(7, 3, "p", 0.5, 2.0, 3, 0)]

    def busy(self, p):
        return self.is_busy

    def tick(self):
        pass


def make_supervisor(listener=None, **kw):
    kw = {"timeout": 10.0, "startup": StartupBudget(boot_s=60, download_s=3600, load_s=600, warmup_s=900), **kw}
    cfg = make_config("unused", None, ["cpu"], None, None, kw.pop("on_error", "raise"), 3, None, 2, kw.pop("timeout"),
                      ring_device="cpu", threads=1, warmup=True, wait_ready=True, deadlines=True,
                      slot_dtype=P.torch.float32, startup=kw.pop("startup"), start_retries=kw.pop("start_retries", 2))
    lock = threading.RLock()
    lock.acquire()  # the supervisor is always called under the pool's lock; this thread holds it throughout
    clock = Clock()
    sup = Supervisor(cfg, lock, threading.Condition(lock), listener or Listener(), clock=clock)
    spawned = []
    sup.spawn = lambda p: (spawned.append(p.producer), setattr(p, "state", STARTING), setattr(p, "starts", p.starts + 1))
    p = sup.procs[0]
    p.process, p.state, p.starts = FakeProcess(), STARTING, 1
    return sup, p, clock, spawned


def test_each_startup_phase_has_its_own_budget():
    budget = StartupBudget(boot_s=60, download_s=3600, load_s=600, warmup_s=900)
    assert startup_overdue(P.DOWNLOAD, 0.0, 601.0, budget) is None  # a cold download may take long
    assert "'load' took more than 600 s (StartupBudget.load_s)" in startup_overdue(P.LOAD, 0.0, 601.0, budget)
    sup, p, clock, _ = make_supervisor()
    p.phase, p.phase_since, clock.t = P.DOWNLOAD, 0.0, 601.0
    sup.check_stalls()
    assert not p.process.killed and sup.stalled() == []
    sup.on_message(p, (P.PHASE, P.LOAD))  # the clock restarts with each phase the child reports
    assert p.phase_since == 601.0
    clock.t = 601.0 + 599.0
    sup.check_stalls()
    assert not p.process.killed
    clock.t += 2.0
    assert sup.stalled() == [0]
    sup.check_stalls()
    assert p.process.killed and "'load' took more than 600 s" in p.error_info.error
    with pytest.raises(ValueError, match="StartupBudget.load_s must be > 0 seconds, got nan"):
        StartupBudget(load_s=float("nan"))


def test_a_producer_killed_while_starting_is_started_again_at_most_start_retries_times():
    sup, p, clock, spawned = make_supervisor()
    for attempt in (1, 2):
        p.process, p.state = FakeProcess(exitcode=-9), STARTING
        sup.on_death(p)
        assert spawned == [0] * attempt and sup.error is None
        assert f"starting it again ({attempt}/2)" in sup.notices[-1] and "killed by signal 9" in sup.notices[-1]
        assert sup.stalled() == [0]  # restarting: a waiting trainer need not wait for it
    p.process, p.state = FakeProcess(exitcode=-9), STARTING
    sup.on_death(p)
    assert spawned == [0, 0] and "start_retries=2 exhausted" in str(sup.error)


def test_a_start_that_fails_on_its_own_is_not_retried():
    sup, p, _, spawned = make_supervisor()
    p.error_info = ErrorInfo(4242, "FileNotFoundError: no such checkpoint", traceback="Traceback ...")
    p.process = FakeProcess(exitcode=1)
    sup.on_death(p)
    assert spawned == [] and "no such checkpoint" in str(sup.error) and p.state == DEAD
    sup, p, _, spawned = make_supervisor()
    p.process = FakeProcess(exitcode=1)  # died before reporting: a script without a main guard
    sup.on_death(p)
    assert spawned == [] and "if __name__ == '__main__':" in str(sup.error)


def test_a_busy_silent_producer_is_stalled_then_killed_an_idle_one_is_not():
    listener = Listener(busy=False)
    sup, p, clock, _ = make_supervisor(listener, timeout=10.0)
    p.state, p.t_heard, clock.t = READY, 0.0, 11.0
    sup.check_stalls()
    assert sup.stalled() == [] and not p.process.killed  # idle silence is no hang
    listener.is_busy = True
    assert sup.stalled() == [0]
    sup.check_stalls()
    assert p.process.killed and "no progress for 11 s (timeout=10)" in p.error_info.error


def test_restart_policy_counts_and_reports_lost_jobs():
    sup, p, _, spawned = make_supervisor(on_error="restart")
    p.state, p.process = READY, FakeProcess(exitcode=-9)
    sup.on_death(p)
    assert spawned == [0] and sup.restarts == 1 and sup.start_retries == 0
    assert "key=7 index=3" in sup.notices[-1] and "restarting it (1/3), 1 job(s) lost" in sup.notices[-1]


def test_child_log_records_and_warnings_reach_the_trainers_logging(caplog):
    sent = []

    class Conn:
        def send(self, msg):
            sent.append(msg)

    root, fl = logging.getLogger(), logging.getLogger("fusionloader")
    handlers, root_level, fl_level = list(root.handlers), root.level, fl.level
    try:
        forward_logs(ResultChannel(Conn()))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("attention slicing is slow here", UserWarning)
        logging.getLogger("fusionloader.producer").info("memory estimate 1.0 GiB")
        logging.getLogger("diffusers").info("chatty library info")  # not forwarded: only WARNING and up
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = handlers
        root.setLevel(root_level)
        fl.setLevel(fl_level)
    kinds = [(m[0], m[1], m[2]) for m in sent]
    assert kinds == [(P.LOG, logging.WARNING, "py.warnings"), (P.LOG, logging.INFO, "fusionloader.producer")]
    assert "attention slicing is slow here" in sent[0][3]
    sup, p, _, _ = make_supervisor()
    with caplog.at_level(logging.INFO, logger="fusionloader"):
        for msg in sent:
            sup.on_message(p, msg)
    records = [r for r in caplog.records if r.name == "fusionloader"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
    assert "producer 0 (cpu) [py.warnings]" in records[0].getMessage()
    assert "attention slicing is slow here" in records[0].getMessage()
