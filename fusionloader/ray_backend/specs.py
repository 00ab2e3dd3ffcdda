"""Producer actor resource specs and the job-scoped pool name (no Ray import: config validation uses it)."""

from __future__ import annotations

import numbers
import os
import socket

__all__ = ["ACTOR_OPTIONS", "check_producer_devices", "pool_name", "resolve_specs"]

ACTOR_OPTIONS = ("accelerator_type", "memory", "num_cpus", "num_gpus", "resources")


def check_producer_devices(devices):
    """``producer_devices`` for the Ray backend: an int N >= 1 (N actors, one GPU each when the cluster has GPUs,
    else one CPU each) or a sequence of Ray resource dicts (``{"num_gpus": 0.5}``, ``{"num_cpus": 2}``). Returns
    an int or a tuple of dicts; a bad value is a ``ValueError`` naming it."""
    if isinstance(devices, numbers.Integral) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"producer_devices for producer_backend='ray' must be >= 1 actors, got {devices!r}")
        return int(devices)
    if isinstance(devices, dict):
        devices = (devices,)
    try:
        specs = tuple(devices)
    except TypeError:
        specs = None
    if not specs or not all(isinstance(s, dict) for s in specs):
        raise ValueError(f"producer_devices for producer_backend='ray' must be a number of actors or a list of Ray "
                         f"resource dicts such as {{'num_gpus': 1}}, got {devices!r}")
    for i, spec in enumerate(specs):
        unknown = sorted(set(spec) - set(ACTOR_OPTIONS))
        if unknown:
            raise ValueError(f"producer_devices[{i}] = {spec!r}: unknown option(s) {unknown}; allowed {list(ACTOR_OPTIONS)}")
        for name in ("num_cpus", "num_gpus"):
            value = spec.get(name, 0)
            if not isinstance(value, numbers.Real) or value < 0:
                raise ValueError(f"producer_devices[{i}] = {spec!r}: {name} must be a number >= 0, got {value!r}")
    return tuple(dict(s) for s in specs)


def resolve_specs(devices, cluster_gpus: float) -> list[dict]:
    """One ``{"options", "device", "threads"}`` per actor: N becomes N one-GPU actors when the cluster has GPUs,
    else N one-CPU actors. A GPU actor computes on ``cuda:0`` (Ray narrows ``CUDA_VISIBLE_DEVICES`` to its
    GPU); a fractional GPU shares that device with other actors."""
    specs = check_producer_devices(devices)
    if isinstance(specs, int):
        specs = [{"num_gpus": 1} if cluster_gpus >= 1 else {"num_cpus": 1}] * specs
    out = []
    for spec in specs:
        options = {"num_cpus": 1 if spec.get("num_gpus", 0) == 0 else 0, **spec}  # a GPU actor needs no CPU slot
        gpu = options.get("num_gpus", 0) > 0
        threads = None if gpu else max(1, int(options["num_cpus"]))
        out.append({"options": options, "device": "cuda:0" if gpu else "cpu", "threads": threads})
    return out


def pool_name(explicit: str | None = None, serial: int = 0, environ=None) -> str:
    """The job's pool name: ``explicit``, else ``$FUSIONLOADER_RAY_POOL``, else torchrun's run id with its
    rendezvous address (the same for every rank of one job, different across jobs), else this process's.
    ``serial`` counts the pools this process made: every rank makes its loaders in the same order."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit
    if env.get("FUSIONLOADER_RAY_POOL"):
        return f"{env['FUSIONLOADER_RAY_POOL']}-{serial}"
    if "TORCHELASTIC_RUN_ID" in env or "MASTER_PORT" in env:
        parts = (env.get("TORCHELASTIC_RUN_ID", ""), env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", ""))
        return "fusionloader-" + "-".join(p for p in parts if p) + f"-{serial}"
    return f"fusionloader-{socket.gethostname()}-{os.getpid()}-{serial}"
