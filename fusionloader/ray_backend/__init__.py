"""Producers as Ray actors shared by every rank of a training job (extra ``[ray]``; NOTE [Ray backend] in
pool.py). Ray is imported only when a pool starts."""

from .pool import RayProducerPool
from .specs import check_producer_devices, pool_name, resolve_specs

__all__ = ["RayProducerPool", "check_producer_devices", "pool_name", "resolve_specs"]
