"""The Ray producer backend on a local Ray runtime (``ray.init(num_cpus=2)``): the same planned positions,
coins, per-sample seeds and so images as the process backend; an actor killed mid-epoch is survived and
counted; a lost coordinator is an error, not a hang; shutdown leaves no actor and no object.

One runtime for the module (starting one costs seconds); each test's pool is closed by the test, and the
module checks at the end that nothing of any pool is left. Images of 64 px float32 (48 KiB) and 128 px
(192 KiB, above Ray's 100 KiB inline limit: those go through the shared-memory object store).
"""

import os
import signal
import time
import warnings

import pytest
import torch

ray = pytest.importorskip("ray", reason="the Ray backend needs the [ray] extra")

from fusionloader import FusionLoader  # noqa: E402
from fusionloader.producer import Job, ProducerError  # noqa: E402
from fusionloader.ray_backend import RayProducerPool, check_producer_devices, pool_name, resolve_specs  # noqa: E402

SIZE = 32  # the tiny checkpoint's resolution
STEPS = 2


class Images(torch.utils.data.Dataset):
    def __init__(self, n=12):
        self.images = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
        self.classes = ["cat", "dog"]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 2


class Source:
    def raw(self, index):
        return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(index)), index % 2


def alive_actors():
    from ray._private import state

    return [a for a in state.actors().values() if a["State"] != "DEAD"]


def plasma_objects() -> int:
    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)
    return int(text.split("MiB, ")[1].split(" objects")[0])


@pytest.fixture(scope="module", autouse=True)
def runtime():
    # Ray's workers import this module's test classes by name, as they would a training script's package
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="fusionloader",
             _system_config={"automatic_object_spilling_enabled": False})
    yield
    try:
        deadline = time.monotonic() + 10
        while alive_actors() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive_actors(), f"actors left behind: {alive_actors()}"
    finally:
        ray.shutdown()


def jobs(keys, steps=STEPS):
    return [Job(k, k % 8, "a photo", 0.5, 1.0, steps, 1000 + k) for k in keys]


# -- specs ----------------------------------------------------------------------------------------------


def test_specs_and_names():
    assert check_producer_devices(2) == 2
    assert check_producer_devices({"num_gpus": 0.5}) == ({"num_gpus": 0.5},)
    for bad in (0, -1, "cuda:0", [{"gpus": 1}], [{"num_gpus": -1}], []):
        with pytest.raises(ValueError, match="producer_devices"):
            check_producer_devices(bad)
    cpu = resolve_specs(2, cluster_gpus=0)
    assert [s["device"] for s in cpu] == ["cpu", "cpu"] and cpu[0]["options"] == {"num_cpus": 1}
    gpu = resolve_specs(1, cluster_gpus=4)
    assert gpu[0]["device"] == "cuda:0" and gpu[0]["options"] == {"num_cpus": 0, "num_gpus": 1}
    half = resolve_specs([{"num_gpus": 0.5}, {"num_cpus": 2}], cluster_gpus=1)
    assert [s["device"] for s in half] == ["cuda:0", "cpu"] and half[1]["threads"] == 2
    env = {"TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert pool_name(None, 0, env) == pool_name(None, 0, dict(env, RANK="1")) == "fusionloader-abc-10.0.0.1-29500-0"
    assert pool_name(None, 0, dict(env, MASTER_PORT="29501")) != pool_name(None, 0, env)
    with pytest.raises(ValueError, match="producer_backend"):
        FusionLoader(Images(), synthesizer="x", producer_backend="dask")
    with pytest.raises(ValueError, match="producer_devices"):
        FusionLoader(Images(), synthesizer="x", producer_backend="ray", producer_devices=0)


# -- equivalence with the process backend ------------------------------------------------------------------


def epoch(backend, path):
    devices = 1 if backend == "ray" else ("cpu",)
    loader = FusionLoader(Images(), batch_size=4, shuffle=True, seed=7, synthesizer=path, alpha=0.5,
                          late_policy="wait", wait_timeout=120.0, return_meta=True, num_inference_steps=STEPS,
                          guidance_scale=1.0, strengths=[0.5, 1.0], producer_capacity=1, producer_timeout=120.0,
                          producer_backend=backend, producer_devices=devices)
    with loader:
        out = [(x.clone(), y.clone(), meta) for (x, y), meta in loader]
        stats = loader.stats()
    return out, stats


def test_same_positions_coins_seeds_and_images_as_process_backend(tiny_sd1_path):
    ray_out, ray_stats = epoch("ray", tiny_sd1_path)
    proc_out, _ = epoch("process", tiny_sd1_path)
    assert len(ray_out) == len(proc_out) == 3
    fresh = 0
    for (xr, yr, mr), (xp, yp, mp) in zip(ray_out, proc_out):
        for name in ("index", "planned", "synthetic", "fresh"):
            assert torch.equal(mr[name], mp[name]), name
        assert torch.equal(torch.nan_to_num(mr["strength"], -1), torch.nan_to_num(mp["strength"], -1))
        assert torch.equal(yr, yp)
        fresh += int(mr["fresh"].sum())
        # same per-sample seeds and strengths on the same engine: the same images
        torch.testing.assert_close(xr, xp, atol=1e-5, rtol=0)
    assert fresh > 0 and torch.equal(mr["fresh"], mr["planned"])
    assert ray_stats["producer"]["backend"] == "ray" and ray_stats["producer"]["lost"] == 0


# -- faults and shutdown --------------------------------------------------------------------------------


def test_actor_killed_mid_epoch_is_survived_and_counted(tiny_sd1_path):
    pool = RayProducerPool(tiny_sd1_path, Source(), devices=1, capacity=2, image_size=128, on_error="restart",
                           max_restarts=2, timeout=60.0)
    pool.start()
    try:
        pool.submit(jobs(range(0, 6)))
        first = pool.take(0, timeout=60)
        assert first is not None and first.shape == (3, 128, 128)
        (victim,) = ray.get(pool.coordinator.producer_handles.remote())
        t0 = time.monotonic()
        ray.kill(victim, no_restart=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            while pool.stats()["restarts"] < 1:
                assert time.monotonic() - t0 < 10, "the actor's death was not seen within 10 s"
                time.sleep(0.1)
            got = {k: pool.take(k, timeout=60) for k in range(1, 6)}
            while not any("restarting it (1/2)" in str(w.message) for w in caught):  # at the next heartbeat
                assert time.monotonic() - t0 < 60
                pool.check()
                time.sleep(0.1)
        stats = pool.stats()
        assert stats["restarts"] == 1
        lost = [k for k, v in got.items() if v is None]
        assert lost and stats["lost"] == len(lost)  # every job either came or is counted lost
        assert any("restarting it (1/2)" in str(w.message) for w in caught)
        while pool.stats()["producers"][0]["state"] != "ready":  # the new actor loads its model
            assert time.monotonic() - t0 < 60
            time.sleep(0.2)
        pool.submit(jobs(range(6, 9)))  # the restarted actor serves what comes next
        assert all(pool.take(k, timeout=60) is not None for k in range(6, 9))
        assert pool.stats()["lost"] == stats["lost"]
    finally:
        pool.close()


def test_silent_actor_is_declared_dead_within_liveness_timeout(tiny_sd1_path):
    # A stopped process answers nothing and fails no call -- what a lost node looks like from the coordinator
    # until Ray's own health check gives up on it.
    pool = RayProducerPool(tiny_sd1_path, Source(), devices=1, capacity=2, image_size=SIZE, on_error="restart",
                           max_restarts=1, liveness_s=2.0)
    pool.start()
    try:
        (pid,) = [p["pid"] for p in pool.stats()["producers"]]
        pool.submit(jobs(range(4), steps=50))
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            while pool.stats()["restarts"] < 1:
                assert time.monotonic() - t0 < 8, "a silent actor was not declared dead within liveness_s + 6 s"
                time.sleep(0.1)
            while not any("no answer" in str(w.message) for w in caught):  # heard at the next heartbeat (1 s)
                assert time.monotonic() - t0 < 10, [str(w.message) for w in caught]
                pool.check()
                time.sleep(0.1)
        assert all(pool.take(k, timeout=0.5) is None for k in range(4)) and pool.stats()["lost"] == 4
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # ray.kill already asked; make sure the stopped process goes
        except ProcessLookupError:
            pass
        pool.close()


def test_lost_coordinator_is_an_error_within_bounded_time(tiny_sd1_path):
    pool = RayProducerPool(tiny_sd1_path, Source(), devices=1, capacity=2, image_size=SIZE, call_timeout=5.0)
    pool.start()
    try:
        pool.submit(jobs(range(3), steps=50))
        ray.kill(pool.coordinator, no_restart=True)  # as if the cluster went away under the trainer
        t0 = time.monotonic()
        with pytest.raises(ProducerError, match="unreachable"):
            for k in range(3):
                pool.take(k, timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        pool.close()


def test_shutdown_leaves_no_actor_and_no_object(tiny_sd1_path):
    pool = RayProducerPool(tiny_sd1_path, Source(), devices=2, capacity=1, image_size=128)
    pool.start()
    name = pool.name
    pool.submit(jobs(range(8)))
    assert pool.take(0, timeout=60) is not None
    deadline = time.monotonic() + 60
    while len(pool.ready_keys()) < 3 and time.monotonic() < deadline:  # results waiting in the object store
        time.sleep(0.1)
    assert plasma_objects() >= 3
    assert len(pool.stats()["producers"]) == 2 and len(alive_actors()) == 3
    pool.close()
    deadline = time.monotonic() + 10
    while (alive_actors() or plasma_objects()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive_actors() and plasma_objects() == 0
    assert name not in [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]


def test_transport_benchmark_measures_all_three_paths():
    from fusionloader.benchmarks.bench_transport import transport

    out = transport(2)
    for dtype in ("float32", "uint8"):
        r = out[dtype]
        assert r["memcpy_us"] > 0 and r["ring_us"] > 0 and r["ray"]["put_us"] > 0 and r["ray"]["get_and_copy_us"] > 0
        assert r["ray"]["us_per_image"] == r["ray"]["put_us"] + r["ray"]["get_and_copy_us"]
