"""Trainer feedback for hard-sample mixing (DisCL): the latest true-class probability per dataset index.

``FusionLoader.report(indices, values, kind="prob" | "loss")`` lands here. It is meant to be called every step
with the batch's ``meta["index"]`` and the model's per-sample true-class probabilities (or per-sample
cross-entropy losses, turned into probabilities as ``exp(-loss)``, which is exact for softmax cross-entropy), so it
is one vectorised validation and one fancy-index assignment: O(batch), no Python loop. The latest value per index
wins (within one call too). Indices never reported hold NaN and are never hard by probability.

What is hard is decided by :class:`~fusionloader.policies.HardWeighted` from :meth:`HardSampleTracker.hard`
(``prob < threshold``) and :func:`tail_classes` (every index of a class with fewer than ``tail_class_size``
images). The tracker's state (the probabilities, float32) is part of the loader's ``state_dict`` once something
was reported.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FEEDBACK_KINDS", "HardSampleTracker", "tail_classes"]

FEEDBACK_KINDS = ("prob", "loss")


def _array(name: str, value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (possibly on a GPU: one copy of the batch's values)
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as e:
        raise TypeError(f"{name} must be an array of numbers, got {type(value).__name__} ({e})") from None
    if arr.ndim == 2 and arr.shape[1] == 1:  # a (batch, 1) column
        arr = arr[:, 0]
    if arr.ndim > 1:
        raise ValueError(f"{name} must be one-dimensional (one value per sample), got shape {arr.shape}")
    return arr.reshape(-1)


class HardSampleTracker:
    """The latest true-class probability of each of ``num_samples`` dataset indices (NaN: never reported)."""

    def __init__(self, num_samples: int):
        self.num_samples = int(num_samples)
        self.prob = np.full(self.num_samples, np.nan, dtype=np.float32)
        self.reports = 0  # calls
        self.reported = 0  # values received

    def report(self, indices, values, kind: str = "prob") -> None:
        """Record per-sample true-class probabilities (``kind="prob"``, in [0, 1]) or cross-entropy losses
        (``kind="loss"``, >= 0). ``ValueError`` naming the argument for bad input."""
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"kind must be one of {FEEDBACK_KINDS}, got {kind!r}")
        idx = _array("indices", indices)
        val = _array("values", values)
        if len(idx) != len(val):
            raise ValueError(f"indices and values differ in length: {len(idx)} indices, {len(val)} values")
        if not len(idx):
            return
        if idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be integer dataset indices, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        bad = (idx < 0) | (idx >= self.num_samples)
        if bad.any():
            raise ValueError(f"indices: index {int(idx[bad][0])} is outside the dataset [0, {self.num_samples})")
        if not (np.issubdtype(val.dtype, np.floating) or np.issubdtype(val.dtype, np.integer)) or val.dtype == bool:
            raise ValueError(f"values must be numbers, got dtype {val.dtype}")
        val = val.astype(np.float64, copy=False)
        finite = np.isfinite(val)
        if kind == "prob":
            bad = ~finite | (val < 0.0) | (val > 1.0)
            if bad.any():
                raise ValueError(f"values: probability {float(val[bad][0])!r} (for index {int(idx[bad][0])}) is outside [0, 1]")
            prob = val
        else:
            bad = ~finite | (val < 0.0)
            if bad.any():
                raise ValueError(f"values: loss {float(val[bad][0])!r} (for index {int(idx[bad][0])}) is not a finite "
                                 "cross-entropy >= 0")  # fmt: skip
            prob = np.exp(-val)
        self.prob[idx] = prob  # duplicates: the last one wins (numpy assigns in order)
        self.reports += 1
        self.reported += len(idx)

    def hard(self, threshold: float) -> np.ndarray:
        """bool per index: reported true-class probability below ``threshold``."""
        with np.errstate(invalid="ignore"):
            return self.prob < np.float32(threshold)

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "prob": self.prob.copy(), "reports": self.reports,
                "reported": self.reported}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        prob = np.asarray(state["prob"], dtype=np.float32).reshape(-1)
        if len(prob) != self.num_samples:
            raise ValueError(f"feedback state: {len(prob)} samples, but this dataset has {self.num_samples}")
        self.prob = prob.copy()
        self.reports, self.reported = int(state.get("reports", 0)), int(state.get("reported", 0))


def tail_classes(labels, tail_class_size: int) -> np.ndarray:
    """bool per index: its class has fewer than ``tail_class_size`` images (DisCL's long-tail hard samples)."""
    labels = np.asarray(labels)
    if not len(labels) or tail_class_size <= 0:
        return np.zeros(len(labels), dtype=bool)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] < tail_class_size
