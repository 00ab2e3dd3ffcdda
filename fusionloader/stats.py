"""What the loader actually delivered, per epoch and cumulative (DESIGN.md: "Honesty").

Every sample is exactly one of: ``real`` (its coin said real), ``fresh`` (synthetic, made for this
position), ``reused`` (synthetic, an earlier variant of the same index from the store), ``retrieved`` (a
pool image retrieved for its class, ``retrieval=``; not counted as synthetic) or ``fallback`` (its coin said
synthetic but it was delivered real because nothing synthetic was ready in time, or nothing was retrieved
for its class). ``achieved_alpha = (fresh + reused + retrieved) / samples`` (the share replaced); ``stall_s`` is the time the consumer spent waiting for
synthetic samples (``late_policy="wait"``) — time spent waiting for real data is the DataLoader's own
and is reported apart as ``real_wait_s``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields

__all__ = ["EpochStats", "LoaderStats"]

logger = logging.getLogger("fusionloader")


@dataclass
class EpochStats:
    samples: int = 0
    batches: int = 0
    real: int = 0
    fresh: int = 0
    reused: int = 0
    fallback: int = 0
    retrieved: int = 0
    stall_s: float = 0.0
    real_wait_s: float = 0.0
    wall_s: float = 0.0

    @property
    def synthetic(self) -> int:
        return self.fresh + self.reused

    @property
    def replaced(self) -> int:
        return self.fresh + self.reused + self.retrieved

    @property
    def planned_synthetic(self) -> int:
        return self.fresh + self.reused + self.retrieved + self.fallback

    def as_dict(self) -> dict:
        d = asdict(self)
        n = max(self.samples, 1)
        d["achieved_alpha"] = self.replaced / n if self.samples else 0.0
        d["planned_alpha"] = self.planned_synthetic / n if self.samples else 0.0
        # undefined (NaN) while nothing synthetic has been delivered: never a flattering 1.0
        d["fresh_fraction"] = self.fresh / self.synthetic if self.synthetic else float("nan")
        d["stall_fraction"] = self.stall_s / self.wall_s if self.wall_s > 0 else 0.0
        return d

    def add(self, other: "EpochStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class LoaderStats:
    """Per-epoch and cumulative counters; producer-side figures are merged in by the loader."""

    def __init__(self):
        self.epochs: dict[int, EpochStats] = {}
        self.total = EpochStats()
        self.current: EpochStats | None = None
        self.current_epoch: int | None = None

    def begin(self, epoch: int) -> EpochStats:
        self.current = self.epochs.setdefault(epoch, EpochStats())
        self.current_epoch = epoch
        return self.current

    def record(self, kind: str, n: int = 1) -> None:
        for s in (self.current, self.total):
            setattr(s, kind, getattr(s, kind) + n)
            s.samples += n

    def add_time(self, name: str, seconds: float) -> None:
        for s in (self.current, self.total):
            setattr(s, name, getattr(s, name) + seconds)

    def end_batch(self) -> None:
        self.current.batches += 1
        self.total.batches += 1

    def as_dict(self, producer: dict | None = None) -> dict:
        out = {
            "epoch": self.current_epoch,
            "current": self.current.as_dict() if self.current else EpochStats().as_dict(),
            "cumulative": self.total.as_dict(),
            "per_epoch": {e: s.as_dict() for e, s in sorted(self.epochs.items())},
        }
        out["producer"] = dict(producer or {})
        out["retrieved"] = self.total.retrieved  # cumulative retrieved samples delivered (also per epoch)
        return out

    def postfix(self, producer: dict | None = None) -> dict:
        """A short dict for ``tqdm.set_postfix``."""
        s = self.current or EpochStats()
        d = s.as_dict()
        post = {"alpha": f"{d['achieved_alpha']:.2f}", "fresh": f"{d['fresh_fraction']:.2f}", "stall": f"{s.stall_s:.1f}s"}
        if producer and "images_per_s" in producer:
            post["gen/s"] = f"{producer['images_per_s']:.1f}"
        return post

    def state_dict(self) -> dict:
        return {"epochs": {e: asdict(s) for e, s in self.epochs.items()}, "total": asdict(self.total)}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = {int(e): EpochStats(**s) for e, s in state.get("epochs", {}).items()}
        self.total = EpochStats(**state.get("total", {}))

    def log(self, producer: dict | None = None, level: int = logging.INFO) -> None:
        s = (self.current or EpochStats()).as_dict()
        logger.log(
            level,
            "epoch %s: %d samples, real %d, fresh %d, reused %d, retrieved %d, fallback %d, alpha %.3f, stall %.2fs%s",
            self.current_epoch, s["samples"], s["real"], s["fresh"], s["reused"], s["retrieved"], s["fallback"],
            s["achieved_alpha"], s["stall_s"],
            f", producers {producer.get('images_per_s', 0.0):.1f} img/s" if producer else "",
        )
