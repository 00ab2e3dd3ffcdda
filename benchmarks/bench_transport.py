"""Transport of finished images from producers to the trainer: the process ring vs Ray's object store.

    python -m fusionloader.benchmarks.bench_transport [--quick] [--json out/bench_transport.json]

One run, medians, baselines in the same run:

* ``transport``: per-image cost of moving one finished image (3x512x512, float32 and uint8) to the trainer,
  data path only, against a plain memory copy of the same bytes (``torch.Tensor.copy_``, the floor):
  - ``ring``: the process backend -- the producer's copy into its shared-memory slot (``fill``+``publish``)
    plus the trainer's copy out (``read``), slot bookkeeping included;
  - ``ray``: the Ray backend on one node -- the producer actor's ``ray.put`` into the object store (timed in
    the actor) plus the trainer's ``ray.get`` (zero-copy mapping) and its copy out (``take`` copies).
  The control messages (the ring's state words; the Ray backend's coordinator calls, batched per sync) are
  not in these figures.
* ``throughput``: images/s of the tiny benchmark model (benchmarks.common.tiny_sd_model) with 1 and 2 Ray
  producer actors, and the process pool with 1 and 2 producers as the baseline, on this machine (a local Ray
  runtime with ``num_cpus`` = the machine's cores): ``jobs`` jobs submitted at once, taken in order, timed
  from submission to the last take, after one warm-up round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from .common import environment, tiny_sd_model, warn_if_interpreting, write_json

__all__ = ["main", "run"]

SHAPE = (3, 512, 512)


class _Source:
    def __init__(self, size):
        self.size = size

    def raw(self, index):
        return torch.rand(3, self.size, self.size, generator=torch.Generator().manual_seed(index)), 0


def _median_us(times) -> float:
    return statistics.median(times) * 1e6


def bench_memcpy(dtype, n) -> float:
    src, dst = torch.rand(SHAPE).to(dtype), torch.empty(SHAPE, dtype=dtype)
    times = []
    for _ in range(n + 2):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return _median_us(times[2:])


def bench_ring(dtype, n) -> float:
    from fusionloader.ring import SlotRing

    ring = SlotRing(4, SHAPE, dtype)
    image = torch.rand(SHAPE) if dtype.is_floating_point else torch.randint(0, 256, SHAPE, dtype=torch.uint8)
    times = []
    try:
        for k in range(n + 2):
            slot = k % 4
            t0 = time.perf_counter()
            ring.assign(slot, 0)
            ring.fill(slot, image, 0)
            ring.publish(slot, k, 0)
            out = ring.read(slot, k)
            ring.release(slot)
            times.append(time.perf_counter() - t0)
        assert out.shape == SHAPE
    finally:
        ring.unlink()
    return _median_us(times[2:])


class _Putter:
    """A stand-in producer actor: puts ``n`` images into the object store, timing each put."""

    def make(self, n, dtype_name):
        import ray

        from fusionloader.ray_backend.slots import to_numpy

        dtype = getattr(torch, dtype_name)
        image = torch.rand(SHAPE).to(dtype)
        refs, times = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            refs.append(ray.put(to_numpy(image)))
            times.append(time.perf_counter() - t0)
        return refs, times


def bench_ray(dtype, n) -> dict:
    import ray

    from fusionloader.ray_backend.slots import from_numpy

    actor = ray.remote(_Putter).options(num_cpus=0).remote()
    try:
        refs, put_times = ray.get(actor.make.remote(n + 2, str(dtype).split(".")[1]))
        get_times = []
        for ref in refs:
            t0 = time.perf_counter()
            image = from_numpy(ray.get(ref), dtype)
            get_times.append(time.perf_counter() - t0)
        assert tuple(image.shape) == SHAPE
        del refs
    finally:
        ray.kill(actor)
    put, get = _median_us(put_times[2:]), _median_us(get_times[2:])
    return {"us_per_image": put + get, "put_us": put, "get_and_copy_us": get}


def transport(n) -> dict:
    out = {}
    for dtype in (torch.float32, torch.uint8):
        mb = np.prod(SHAPE) * dtype.itemsize / 2**20
        memcpy, ring, ray_ = bench_memcpy(dtype, n), bench_ring(dtype, n), bench_ray(dtype, n)
        out[str(dtype).split(".")[1]] = {
            "image_mib": round(float(mb), 3),
            "memcpy_us": memcpy,
            "ring_us": ring,
            "ray": ray_,
            "ring_over_memcpy": ring / memcpy,
            "ray_over_memcpy": ray_["us_per_image"] / memcpy,
        }
    return out


def images_per_s(pool, jobs, steps) -> float:
    from fusionloader.protocol import Job

    def batch(base):
        return [Job(base + k, k % 8, "a photo", 0.5, 1.0, steps, 1000 + base + k) for k in range(jobs)]

    pool.submit(batch(0))  # warm-up round
    assert all(pool.take(k, timeout=600) is not None for k in range(jobs))
    t0 = time.perf_counter()
    pool.submit(batch(jobs))
    got = sum(pool.take(jobs + k, timeout=600) is not None for k in range(jobs))
    return got / (time.perf_counter() - t0)


def throughput(model, jobs, steps) -> dict:
    from fusionloader.producer import ProducerPool
    from fusionloader.ray_backend import RayProducerPool

    out = {}
    for n in (1, 2):
        with RayProducerPool(model, _Source(64), devices=n, capacity=4, image_size=64) as pool:
            out[f"ray_{n}_actors_images_per_s"] = images_per_s(pool, jobs, steps)
        with ProducerPool(model, _Source(64), devices=("cpu",) * n, capacity=4, image_size=64) as pool:
            out[f"process_{n}_producers_images_per_s"] = images_per_s(pool, jobs, steps)
    return out


def run(quick: bool = False, model: str | None = None) -> dict:
    import os

    import ray

    n = 20 if quick else 100
    jobs, steps = (8, 2) if quick else (32, 4)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 _system_config={"automatic_object_spilling_enabled": False})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = model or tiny_sd_model(tmp)
            result = {"transport": transport(n), "throughput": throughput(model, jobs, steps)}
    finally:
        if started:
            ray.shutdown()
    result.update(environment("cpu"), ray=ray.__version__, settings={"repeats": n, "jobs": jobs, "steps": steps,
                                                                     "shape": list(SHAPE), "quick": quick})
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="diffusers checkpoint (default: tiny random pipeline)")
    parser.add_argument("--json", default="out/bench_transport.json")
    args = parser.parse_args(argv)
    warn_if_interpreting()
    result = run(quick=args.quick, model=args.model)
    write_json(args.json, result)
    print({k: result[k] for k in ("transport", "throughput")})


if __name__ == "__main__":
    main()
