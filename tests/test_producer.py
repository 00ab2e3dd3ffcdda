"""ProducerPool: producer processes feeding the ring; faults (raise / restart / SIGKILL); shutdown paths.

Orphans are checked by PID (``os.kill(pid, 0)`` and /proc, zombies count as gone) and shared memory by
name under /dev/shm. Spawning a producer costs several seconds (torch + diffusers imports, model load,
warm-up), so pools are shared within this module where a test does not need a fresh one.
"""

import gc
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fusionloader.producer import Job, ProducerError, ProducerPool
from fusionloader.testing import process_alive as alive

STEPS = 3  # sampler steps per job: enough to exercise continuous batching, cheap on CPU
SIZE = 32  # the tiny fixture's resolution


class Source:
    """A picklable stand-in dataset: seeded random images; one index can be NaN, one unreadable."""

    def __init__(self, n=16, nan_index=None, bad_index=None):
        self.n, self.nan_index, self.bad_index = n, nan_index, bad_index

    def raw(self, index):
        if index == self.bad_index:
            raise OSError(f"cannot identify image file 'img_{index}.png' (dataset index {index})")
        image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(index))
        if index == self.nan_index:
            image.fill_(float("nan"))
        return image, index % 2


@pytest.fixture(scope="module", autouse=True)
def cache_root(tmp_path_factory):
    # Producers inherit the environment. conftest sets TRITON_INTERPRET=1 for the kernel tests; a CPU
    # producer in real use runs the torch reference kernels, so spawn them that way (and fast). The node's
    # shared latent cache is moved to a folder of this module's own (FUSIONLOADER_LATENT_CACHE), so what the
    # pools leave in it can be checked exactly (other processes of this user share the default one).
    root = str(tmp_path_factory.mktemp("node-latents"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        mp.setenv("FUSIONLOADER_LATENT_CACHE", root)
        yield root


@pytest.fixture(scope="module")
def synth(tiny_sd1_path):
    return tiny_sd1_path


# -- helpers ---------------------------------------------------------------------------------------


def shm_exists(name):
    return os.path.exists(os.path.join("/dev/shm", name))


def wait_gone(pids, names, within=5.0):
    """True when every pid has exited and every segment is unlinked within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids) and not any(shm_exists(n) for n in names):
            return True
        time.sleep(0.05)
    return False


def jobs(keys, index=lambda k: k % 8, strength=0.5, prompt="a photo of a cat"):
    return [Job(k, index(k), prompt, strength, 2.0, STEPS, seed=1000 + k) for k in keys]


def cache_leftovers(root):
    """What is under the latent-cache root besides cache folders (``<fingerprint>/`` holding index.json,
    data.f32, digest.bin and lock): temporary folders or stray files a pool or producer left behind."""
    odd = []
    for name in os.listdir(root):
        sub = os.path.join(root, name)
        if not (os.path.isdir(sub) and re.fullmatch(r"[0-9a-f]{32}", name)):
            odd.append(name)
            continue
        odd += [f"{name}/{f}" for f in os.listdir(sub) if f not in {"index.json", "data.f32", "digest.bin", "lock"}]
    return odd


def take_all(pool, keys, timeout=60.0):
    return {k: pool.take(k, timeout=timeout) for k in keys}


def make_pool(synth, **kw):
    kw.setdefault("source", Source(nan_index=13))
    kw.setdefault("capacity", 2)
    kw.setdefault("image_size", SIZE)
    kw.setdefault("timeout", 120.0)
    return ProducerPool(synth, **kw)


@pytest.fixture(scope="module")
def pool(synth):
    p = make_pool(synth, devices=("cpu", "cpu"), slots=4)
    p.start()
    yield p
    p.close()


# -- production ------------------------------------------------------------------------------------


def test_produces_every_job_into_the_ring(pool):
    keys = list(range(10))
    pool.submit(jobs(keys[:6]) + jobs(keys[6:], strength=None))  # SDEdit and text-only
    images = take_all(pool, keys)
    for k, img in images.items():
        assert img is not None, k
        assert img.shape == (3, SIZE, SIZE) and img.dtype == torch.float32
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    st = pool.stats()
    assert st["images"] >= 10 and st["jobs_pending"] == 0 and st["ring"]["ready"] == 0
    assert {p["device"] for p in st["producers"]} == {"cpu"} and len(st["producers"]) == 2
    assert all(p["images"] > 0 for p in st["producers"]), "both producers should have served jobs"


def test_same_images_as_the_engine_in_process(pool, synth, cache_root):
    # "async equals sync": through processes, the ring and direct slot writes, a job gives what the
    # engine gives for the same request in this process (batch invariance makes batching irrelevant).
    # The latents come from the node's shared cache, which the producers filled: this process only reads.
    from fusionloader.engine import Request, Synthesizer

    todo = jobs([700, 701, 702]) + jobs([703], strength=None)
    pool.submit(todo)
    got = take_all(pool, [j.key for j in todo])
    engine = Synthesizer.from_pretrained(synth)
    cache, sampler, source = engine.latent_cache(), engine.sampler(capacity=1), Source(nan_index=13)
    for j in todo:
        mean = std = None
        if j.strength is not None:
            mean, std = cache.get([j.index], lambda i: source.raw(i)[0])
            mean, std = mean[0], (None if std is None else std[0])
        sampler.submit(Request(j.key, j.prompt, j.strength, j.guidance_scale, j.num_inference_steps, seed=j.seed,
                               latent_mean=mean, latent_std=std))
        done = []
        while not done:
            done = sampler.step()
        torch.testing.assert_close(got[j.key], done[0].image.float(), atol=1e-4, rtol=0)
    assert cache.path == pool.config.latent_cache_path == cache_root
    assert cache.encoded == 0  # every img2img job's entry was there: written by the producers, shared
    cache.close()


def test_slots_recycle_under_backpressure_and_cancel(pool):
    # More jobs than slots: producers block on credits until the consumer takes or cancels.
    keys = list(100 + k for k in range(12))
    pool.submit(jobs(keys))
    got = [pool.take(k, timeout=60.0) for k in keys[:6]]
    assert all(g is not None for g in got)
    pool.cancel(keys[6:])
    deadline = time.monotonic() + 10
    while pool.stats()["ring"]["ready"] and time.monotonic() < deadline:
        time.sleep(0.05)
    st = pool.stats()
    assert st["jobs_pending"] == 0 and st["ring"]["ready"] == 0 and st["ring"]["reading"] == 0
    assert pool.take(keys[-1]) is None and pool.state(keys[-1]) == "unknown"
    # The ring still works after all that.
    pool.submit(jobs([200]))
    assert pool.take(200, timeout=60.0) is not None


def test_taken_image_is_the_callers(pool):
    pool.submit(jobs([300]))
    a = pool.take(300, timeout=60.0)
    kept = a.clone()
    pool.submit(jobs(range(301, 309), strength=None))
    take_all(pool, range(301, 309))  # every slot reused at least once
    assert torch.equal(a, kept)


def test_nonfinite_output_is_dropped_and_counted(pool):
    before = pool.stats()["nonfinite_dropped"]
    pool.submit(jobs([400, 401], index=lambda k: 13 if k == 400 else 1))
    assert pool.take(401, timeout=60.0) is not None
    deadline = time.monotonic() + 30
    while pool.state(400) == "pending" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.state(400) == "dropped"
    assert pool.take(400, timeout=5.0) is None
    assert pool.stats()["nonfinite_dropped"] == before + 1


def test_duplicate_key_rejected(pool):
    pool.submit(jobs([500]))
    with pytest.raises(ValueError, match="500"):
        pool.submit(jobs([501, 500]))
    assert pool.state(501) == "unknown"  # all or nothing
    assert pool.take(500, timeout=60.0) is not None


# -- faults ----------------------------------------------------------------------------------------


def test_producer_exception_reraises_naming_producer_device_and_sample(synth, pool, cache_root):
    # (This pool's slots are smaller than the model's 32 px: results are resized into them.)
    from fusionloader.engine.latents import default_cache_dir

    with make_pool(synth, source=Source(bad_index=7), image_size=16) as p:
        pids, names = p.pids, p.shm_names
        # by default, two pools (and every producer of each) share the node's latent cache
        assert p.config.latent_cache_path == pool.config.latent_cache_path == default_cache_dir() == cache_root
        p.submit(jobs([0]))
        image = p.take(0, timeout=60.0)
        assert image.shape == (3, 16, 16) and 0 <= float(image.min()) and float(image.max()) <= 1
        p.submit(jobs([1, 2, 3], index=lambda k: 7 if k == 2 else k))
        with pytest.raises(ProducerError) as info:
            for k in (1, 2, 3):
                p.take(k, timeout=60.0)
        msg = str(info.value)
        assert "producer 0" in msg and "device cpu" in msg and "index=7" in msg and "key=2" in msg
        assert "img_7.png" in msg  # the producer's own error and traceback come along
        assert info.value.producer == 0 and info.value.device == "cpu" and info.value.indices == [7]
        with pytest.raises(ProducerError):  # a failed pool stays failed
            p.check()
    # context-manager exit cleans up: no process, no segment; the shared cache stays, holding entries only
    assert wait_gone(pids, names)
    assert os.path.isdir(cache_root) and cache_leftovers(cache_root) == []


def wait_for(cond, within):
    deadline = time.monotonic() + within
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_restart_after_sigkill_and_exception_then_hang_gives_up(synth):
    # timeout is only the silence limit of a busy producer: start-up phases have their own budgets
    p = make_pool(synth, source=Source(bad_index=7), on_error="restart", max_restarts=2, timeout=3.0)
    p.start()
    first, names = p.pids[0], p.shm_names
    # 1. SIGKILL while holding jobs: seen within seconds, warned, counted, its jobs reported lost
    p.submit(jobs(range(10, 14)))
    os.kill(first, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match=r"producer 0 \(device cpu.*killed by signal 9.*restarting it \(1/2\)"):
        assert wait_for(lambda: p.stats()["restarts"] == 1, 10)
        p.check()
    assert time.monotonic() - t0 < 3.0
    outcomes = {k: p.state(k) for k in range(10, 14)}
    assert set(outcomes.values()) <= {"lost", "ready"} and "lost" in outcomes.values(), outcomes
    lost = [k for k, o in outcomes.items() if o == "lost"]
    t0 = time.monotonic()
    assert p.take(lost[0], timeout=5.0) is None and time.monotonic() - t0 < 1.0  # at once, not after 5 s
    assert p.stats()["lost"] == len(lost)
    # 2. while the replacement loads, a take does not wait for it (stalled() names it); then it serves jobs
    p.submit(jobs([20]))
    assert p.stalled() == [0]
    t0 = time.monotonic()
    assert p.take(20, timeout=30.0) is None and time.monotonic() - t0 < 1.0
    assert wait_for(lambda: p.stats()["producers"][0]["state"] == "ready", 60) and p.stalled() == []
    assert p.take(20, timeout=60.0) is not None
    second = p.pids[0]
    assert second != first and not alive(first)
    # 3. an exception (unreadable image): restarted too, the warning names the sample
    p.submit(jobs([21], index=lambda k: 7))
    with pytest.warns(RuntimeWarning, match=r"key=21 index=7: OSError: cannot identify image file 'img_7.png'"):
        assert wait_for(lambda: p.stats()["restarts"] == 2, 60)
        p.check()
    assert p.take(21) is None and p.state(21) == "unknown"
    # 4. a hung producer (SIGSTOP) holding jobs is killed after `timeout` s of silence; restarts are exhausted
    assert wait_for(lambda: p.stats()["producers"][0]["state"] == "ready", 60)
    third = p.pids[0]
    time.sleep(3.5)  # idle silence is not a hang: new work after it must not get the producer killed
    p.submit(jobs(range(30, 32), index=lambda k: 1))
    assert all(p.take(k, timeout=60.0) is not None for k in range(30, 32))
    p.submit(jobs(range(32, 36), index=lambda k: 2))
    os.kill(third, signal.SIGSTOP)
    assert wait_for(lambda: p.stalled() == [0], 10)  # a waiting trainer can tell at once
    with pytest.raises(ProducerError, match=r"(?s)producer 0 .*no progress for \d+ s.*max_restarts=2 exhausted"):
        assert wait_for(lambda: p.state(32) == "lost", 10)
        p.check()
    # garbage collection closes the pool
    del p
    gc.collect()
    assert wait_gone([first, second, third], names)


# -- shutdown --------------------------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, {tests!r})
    from fusionloader.producer import Job, ProducerPool
    from test_producer import Source

    if __name__ == "__main__":
        mode = sys.argv[1]
        pool = ProducerPool({synth!r}, Source(), capacity=2, image_size={size})
        pool.start()
        print("PIDS", *pool.pids, flush=True)
        print("SHM", *pool.shm_names, flush=True)
        print("CACHE", pool.config.latent_cache_path, flush=True)
        pool.submit([Job(k, k, "a cat", 0.5, 2.0, 2, k) for k in range(4)])
        if mode == "exit":
            sys.exit(0)  # no close(): the atexit path must clean up
        print("WAITING", flush=True)
        with pool:  # SIGINT: KeyboardInterrupt unwinds through __exit__; SIGKILL: nothing runs at all
            pool.take(3, timeout=600)
            time.sleep(600)
    """
)


def run_script(synth, tmp_path, mode):
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "script.py"
    path.write_text(SCRIPT.format(tests=os.path.dirname(__file__), synth=synth, size=SIZE))
    return subprocess.Popen([sys.executable, str(path), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_ids(proc, until):
    pids, names, cache = [], [], []
    for line in proc.stdout:
        if line.startswith("PIDS"):
            pids = [int(x) for x in line.split()[1:]]
        elif line.startswith("SHM"):
            names = line.split()[1:]
        elif line.startswith("CACHE"):
            cache.append(line.split()[1])
        if line.startswith(until):
            break
    else:
        pytest.fail("script ended early:\n" + proc.stderr.read())
    return pids, names, cache


def test_consumer_exit_paths_leave_nothing(synth, tmp_path, cache_root):
    # Three training processes at once (start-up dominates): one exits without close() (atexit), one
    # gets SIGINT inside `with pool:` (KeyboardInterrupt), one is SIGKILLed (producer watchdogs, and the
    # resource tracker for the segment). Each must leave no producer and no segment within 5 s, and
    # nothing temporary: their producers share the node's latent cache, which keeps complete entries only.
    procs = {mode: run_script(synth, tmp_path / mode, mode) for mode in ("exit", "SIGINT", "SIGKILL")}
    ids = {mode: read_ids(proc, "CACHE" if mode == "exit" else "WAITING") for mode, proc in procs.items()}
    assert all(pids and names and cache for pids, names, cache in ids.values()), ids
    time.sleep(0.3)
    procs["SIGINT"].send_signal(signal.SIGINT)
    procs["SIGKILL"].send_signal(signal.SIGKILL)
    for mode, proc in procs.items():
        proc.wait(timeout=30)
        err = proc.stderr.read()
        proc.stdout.close(), proc.stderr.close()
        if mode == "exit":
            assert proc.returncode == 0, err
        if mode == "SIGINT":
            assert "KeyboardInterrupt" in err, err
        pids, names, (cache_dir,) = ids[mode]
        assert wait_gone(pids, names), (mode, ids[mode])
        assert cache_dir == cache_root, mode  # the environment's node cache, inherited by the script
    assert cache_leftovers(cache_root) == []


UNGUARDED = textwrap.dedent(
    """
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, {tests!r})
    from fusionloader.producer import ProducerPool
    from test_producer import Source

    # No main guard: spawn re-runs this in the child, whose own start() then fails while bootstrapping.
    with ProducerPool({synth!r}, Source(), capacity=2, image_size={size}) as pool:
        pool.start()
    """
)


def test_script_without_main_guard_gets_a_hint_not_a_crash_in_cleanup(synth, tmp_path):
    path = tmp_path / "unguarded.py"
    path.write_text(UNGUARDED.format(tests=os.path.dirname(__file__), synth=synth, size=SIZE))
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ProducerError" in proc.stderr and "exited while starting" in proc.stderr
    assert "if __name__ == '__main__':" in proc.stderr
    assert "AssertionError" not in proc.stderr  # the child's failed start() cleans up without joining


def test_sigkill_raises_and_close_cleans_up(pool):
    # Runs last, on the shared pool: kill one producer while the other has work queued; then close().
    pids, names = pool.pids, pool.shm_names
    assert all(alive(pid) for pid in pids), pool.stats()
    pool.submit(jobs(range(600, 620)))
    time.sleep(0.2)
    assert all(alive(pid) for pid in pids), pool.stats()
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(ProducerError, match=r"producer 1 \(device cpu, pid \d+\) failed on job key=\d+ index=\d+: .*signal 9"):
        while time.monotonic() - t0 < 10:
            pool.check()
            time.sleep(0.02)
    assert time.monotonic() - t0 < 3.0
    t0 = time.monotonic()
    pool.close()
    assert time.monotonic() - t0 < 5.0
    assert wait_gone(pids, names, within=0.5)
    pool.close()  # idempotent


def test_start_without_waiting_serves_jobs_queued_while_producers_load(synth, caplog):
    caplog.set_level("INFO", logger="fusionloader")
    pool = ProducerPool(synth, Source(), devices=["cpu"], capacity=2, timeout=60, wait_ready=False)
    t0 = time.monotonic()
    pool.start()
    assert time.monotonic() - t0 < 2.0  # spawn only; loading happens in the background
    pool.submit(jobs(range(3)))
    assert pool.take(0, timeout=0.0) is None  # nothing can be ready yet: the trainer falls back, no stall
    images = [pool.take(k, timeout=60) for k in range(3)]
    assert all(img is not None and img.shape == (3, SIZE, SIZE) for img in images)
    assert pool.stats()["latency_s"] > 0
    # the child's log records reach the trainer's logging: its memory estimate, logged at start
    estimate = pool.stats()["producers"][0]["memory"]
    assert estimate["weights"] > 0 and estimate["total"] >= estimate["weights"]
    assert any(r.name == "fusionloader" and "producer 0 (cpu)" in r.getMessage() and "memory estimate" in r.getMessage()
               for r in caplog.records), caplog.text
    pool.close()
    assert not any(alive(p) for p in pool.pids)


def test_passed_jobs_are_made_after_due_ones(synth):
    with ProducerPool(synth, Source(), devices=["cpu"], capacity=1, timeout=60) as pool:
        pool.submit(jobs(range(6)))
        pool.passed([2, 3])  # the trainer went past these: they go to the back of the queue
        for k in (0, 1, 4, 5):  # (taking in turn: the two ring slots are the back-pressure)
            assert pool.take(k, timeout=60) is not None
        assert pool.state(3) == "pending"  # made one job at a time, in the order 0 1 4 5 2 3
        for k in (2, 3):
            assert pool.take(k, timeout=60) is not None


def test_producer_admits_wanted_jobs_first_and_times_them_without_slot_waits():
    # In-process, sampler stubbed: the child's admission order and latency bookkeeping (NOTE [Deadlines]).
    from types import SimpleNamespace

    from fusionloader.producer_child import Producer
    from fusionloader.protocol import ChildConfig

    child = Producer(ChildConfig(0, "cpu", None, None, 2, None, os.getpid(), None, False), None, None, None)
    admitted = []
    child.sampler = SimpleNamespace(submit=admitted.append)
    child._latents = SimpleNamespace(prefetch=lambda indices: None,
                                     get=lambda indices: (torch.zeros(len(indices), 1), torch.ones(len(indices), 1)))
    child._request = lambda job, slot, mean, std: job.key
    child.handle(("jobs", jobs(range(4))))
    child.handle(("passed", [0, 1]))  # the trainer went past these while they waited here
    child.starved_since = time.perf_counter() - 5.0  # no slot credit for 5 s so far
    child.handle(("credit", [0, 1, 2, 3]))
    child.admit()
    assert admitted == [2, 3]  # capacity 2: the jobs still wanted
    assert set(child.received) == {2, 3} and all(4.9 < starved < 6.0 for _, starved in child.received.values())
    child.inflight.pop(2)
    child.admit()
    assert admitted == [2, 3]  # a passed job takes at most half the sampler: none while one wanted job runs
    child.inflight.clear()
    child.admit()
    assert admitted == [2, 3, 0]


def test_producer_killed_while_starting_is_started_again_and_uint8_slots_hold_the_same_image(synth):
    # One producer, SIGKILLed right after spawn (an OOM kill while loading): started again, then serves jobs
    # into uint8 slots -- the same image as a float ring, rounded as the engine's post-process rounds.
    from fusionloader.engine import Request, Synthesizer

    pool = ProducerPool(synth, Source(), devices=["cpu"], capacity=2, image_size=SIZE, wait_ready=False,
                        slot_dtype=torch.uint8, start_retries=1)
    pool.start()
    first = pool.pids[0]
    os.kill(first, signal.SIGKILL)
    with pytest.warns(RuntimeWarning, match=r"killed by signal 9.*starting it again \(1/1\)"):
        assert wait_for(lambda: pool.stats()["start_retries"] == 1, 30)
        pool.check()
    pool.submit(jobs([0]))
    assert wait_for(lambda: pool.state(0) == "ready", 120), pool.stats()
    image = pool.take(0)
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE) and pool.pids[0] != first
    engine = Synthesizer.from_pretrained(synth)
    j = jobs([0])[0]
    mean, std = engine.latent_cache().get([j.index], lambda i: Source().raw(i)[0])
    sampler = engine.sampler(capacity=1)
    sampler.submit(Request(0, j.prompt, j.strength, j.guidance_scale, j.num_inference_steps, seed=j.seed,
                           latent_mean=mean[0], latent_std=std[0]))
    done = []
    while not done:
        done = sampler.step()
    expected = (done[0].image.float() * 255).round()
    assert (image.float() - expected).abs().max() <= 1  # rounding of the last ulp may differ
    pool.close()
    assert pool.config.latent_cache_path == engine.latent_cache().path  # one node cache, persistent
    assert not alive(first) and not any(alive(p) for p in pool.pids)


def test_a_start_up_phase_over_its_budget_fails_naming_the_phase(synth):
    # The child reports its phases; loading the model cannot take 1 ms, so the load budget is what trips.
    from fusionloader.producer import StartupBudget

    pool = ProducerPool(synth, Source(), devices=["cpu"], capacity=2, image_size=SIZE,
                        startup=StartupBudget(load_s=0.001))
    t0 = time.monotonic()
    with pytest.raises(ProducerError, match=r"start-up phase 'load' took more than 0.001 s \(StartupBudget.load_s\)"):
        pool.start()
    assert time.monotonic() - t0 < 120 and pool.closed
