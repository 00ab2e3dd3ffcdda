"""Trainer feedback (fusionloader/feedback.py and FusionLoader.report): validation, loss -> probability, state."""

import json

import numpy as np
import pytest
import torch

from fusionloader.feedback import HardSampleTracker, tail_classes
from fusionloader.policies import HardWeighted
from test_loader import TensorImages, fusion


def test_report_records_the_latest_probability_per_index():
    t = HardSampleTracker(6)
    assert np.isnan(t.prob).all() and not t.hard(0.5).any()  # never reported: never hard by probability
    t.report([0, 1, 2], [0.1, 0.6, 0.4])
    t.report(torch.tensor([2, 2]), torch.tensor([0.9, 0.2]))  # duplicates: the last one wins
    t.report(np.array([[3], [4]]), np.array([[1.0], [0.0]]))  # (batch, 1) columns
    t.report(torch.tensor([5]), torch.tensor([np.log(4.0)], dtype=torch.float64), kind="loss")  # exp(-ln 4) = 0.25
    assert t.prob.tolist() == pytest.approx([0.1, 0.6, 0.2, 1.0, 0.0, 0.25])
    assert t.hard(0.5).tolist() == [True, False, True, False, True, True]
    assert t.reports == 4 and t.reported == 8
    t.report([], [])  # an empty batch is fine


@pytest.mark.parametrize("args, kind, words", [
    (([0, 1], [0.5]), "prob", ["indices and values", "2 indices", "1 values"]),
    (([0, 6], [0.5, 0.5]), "prob", ["indices", "6", "[0, 6)"]),
    (([-1], [0.5]), "prob", ["indices", "-1"]),
    (([0.5], [0.5]), "prob", ["indices", "integer"]),
    (([0, 1], [0.5, 1.5]), "prob", ["values", "1.5", "[0, 1]"]),
    (([0], [float("nan")]), "prob", ["values", "nan"]),
    (([0], [-0.1]), "loss", ["values", "-0.1", "loss"]),
    (([0], [float("inf")]), "loss", ["values", "inf"]),
    (([0], [0.5]), "logit", ["kind", "logit"]),
    ((np.zeros((2, 2), int), np.zeros((2, 2))), "prob", ["indices", "one-dimensional"]),
])  # fmt: skip
def test_invalid_reports_name_the_argument(args, kind, words):
    t = HardSampleTracker(6)
    with pytest.raises(ValueError) as e:
        t.report(*args, kind=kind)
    for w in words:
        assert w in str(e.value)
    assert np.isnan(t.prob).all()  # nothing recorded from a refused call


def test_tail_classes():
    labels = np.array(["a"] * 5 + ["b"] * 2 + ["c"] * 3)
    assert tail_classes(labels, 3).tolist() == [False] * 5 + [True] * 2 + [False] * 3
    assert tail_classes(labels, 0).tolist() == [False] * 10
    assert tail_classes(np.array([], int), 20).tolist() == []


def test_loader_report_state_round_trip():
    ds = TensorImages(n=20)
    policy = HardWeighted(tail_class_size=0)  # three classes of ~7 images would all be tail classes
    loader = fusion(ds, batch_size=4, mixing=policy, return_meta=True)
    _, meta = next(iter(loader))
    loader.report(meta["index"], torch.full((4,), 0.1))  # what a trainer does every step
    loader.report(torch.tensor([10, 11]), torch.tensor([5.0, 0.01]), kind="loss")
    want = sorted(meta["index"].tolist() + [10])
    assert loader.hard_samples().tolist() == want
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["feedback"]["reports"] == 2
    fresh = fusion(ds, batch_size=4, mixing=policy, return_meta=True)
    fresh.load_state_dict(state)
    assert fresh.hard_samples().tolist() == want
    assert np.array_equal(fresh._feedback.prob, loader._feedback.prob, equal_nan=True)
    # a state saved before any report resets the tracker
    empty = fusion(ds, batch_size=4).state_dict()
    fresh.load_state_dict(empty)
    assert fresh.hard_samples().tolist() == []
    with pytest.raises(ValueError, match="indices"):
        loader.report([20], [0.5])
    loader.close()
