"""fusionloader evaluate: the grid end to end on tiny settings, resume, reproducibility, ImageFolder, statistics."""

import json
import math
import os

import pytest
import torch

pytest.importorskip("sklearn.datasets", reason="the embedded digits need scikit-learn (extra [evaluate])")

from fusionloader import evaluate  # noqa: E402
import importlib  # noqa: E402

run_module = importlib.import_module("fusionloader.evaluate.run")
from fusionloader.evaluate.data import few_shot  # noqa: E402
from fusionloader.evaluate.stats import summarize, t_interval  # noqa: E402

TINY = dict(ks=(1, 2), seeds=(0, 1), epochs=2, epoch_size=10, steps=4, inversion_steps=1, backbone_epochs=1, m=2,
            val_per_class=3, width=8, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval-digits"))
    summary = evaluate.run(out=out, json_path=os.path.join(out, "copy.json"), **TINY)
    return out, summary


def test_every_method_has_results_with_intervals_and_pairs(digits_run):
    out, summary = digits_run
    with open(os.path.join(out, "copy.json")) as f:
        data = json.load(f)
    assert set(data["results"]) == set(evaluate.METHODS)
    for method, row in data["results"].items():
        for k in ("1", "2"):
            r = row[k]
            assert r["n_seeds"] == 2 and r["low"] <= r["mean"] <= r["high"] and 0 <= r["mean"] <= 1
    assert set(data["paired"]["da_fusion"]["1"]) == {"vs_real", "vs_da_fusion_fixed_m10"}
    assert set(data["paired"]["real"]["2"]) == {"vs_da_fusion_fixed_m10"}
    assert set(data["protocols"]) == {"linear", "full"}
    assert os.path.exists(os.path.join(out, "results.md")) and "Paired difference" in summary["markdown"]
    assert summary["plot"] is None or os.path.getsize(summary["plot"]) > 0
    assert len(os.listdir(os.path.join(out, "cells"))) == len(evaluate.METHODS) * 2 * 2


def test_rerun_skips_finished_cells(digits_run, monkeypatch):
    out, summary = digits_run

    def boom(*a, **k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(run_module, "run_cell", boom)
    again = evaluate.run(out=out, **TINY)
    assert again["cells_run"] == 0 and again["results"] == summary["results"]


def test_a_deleted_cell_is_rerun_with_the_same_accuracy(digits_run):
    out, summary = digits_run
    path = os.path.join(out, "cells", "da_fusion__k2__s1.json")
    with open(path) as f:
        before = json.load(f)["curves"]
    os.remove(path)  # as if the run had been killed before this cell finished
    again = evaluate.run(out=out, **TINY)
    with open(path) as f:
        after = json.load(f)["curves"]
    assert again["cells_run"] == 1
    assert after == before  # same seed, same accuracy curves, both protocols


def test_report_only_tables_the_finished_cells_and_runs_nothing(digits_run, monkeypatch):
    out, _ = digits_run
    monkeypatch.setattr(run_module, "run_cell", lambda *a, **k: pytest.fail("report_only ran a cell"))
    os.remove(os.path.join(out, "cells", "templates__k1__s0.json"))
    partial = evaluate.run(out=out, report_only=True, **TINY)
    assert partial["grid"].startswith("PARTIAL: 31 of 32 cells")
    assert partial["results"]["templates"]["1"]["n_seeds"] == 1 and partial["results"]["templates"]["2"]["n_seeds"] == 2


def test_cells_of_another_configuration_are_refused(digits_run):
    out, _ = digits_run
    with pytest.raises(ValueError, match="another configuration"):
        evaluate.run(out=out, **(TINY | {"epochs": 3}))


def test_few_shot_subsets_are_nested_and_disjoint_from_validation():
    labels = torch.arange(10).repeat(20)
    subsets, val = few_shot(labels, (1, 2, 4), seed=3, num_classes=10)
    assert set(subsets[1]) <= set(subsets[2]) <= set(subsets[4])
    assert [int((labels[subsets[4]] == c).sum()) for c in range(10)] == [4] * 10
    assert not set(val) & set(subsets[4]) and len(val) == 10 * 16
    assert few_shot(labels, (1, 2, 4), seed=3, num_classes=10) == (subsets, val)
    assert few_shot(labels, (1, 2, 4), seed=4, num_classes=10)[0][4] != subsets[4]
    with pytest.raises(ValueError, match="class 0 has 2"):
        few_shot(torch.tensor([0, 0, 1, 1, 1]), (2,), seed=0, num_classes=2)


def test_t_interval_and_best_epoch_on_the_seed_averaged_curve():
    r = t_interval([0.1, 0.2, 0.3])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert r["mean"] == pytest.approx(0.2) and r["high"] - r["mean"] == pytest.approx(half, rel=1e-4)
    assert t_interval([0.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5, "n_seeds": 1}
    # Seed 0 peaks at epoch 0, seed 1 at epoch 2; the mean curve peaks at epoch 1.
    cells = {
        ("a", 1, 0): {"curves": {"full": {"val": [0.9, 0.8, 0.1], "test": [0.5, 0.6, 0.7]}}},
        ("a", 1, 1): {"curves": {"full": {"val": [0.1, 0.8, 0.9], "test": [0.2, 0.4, 0.9]}}},
        ("real", 1, 0): {"curves": {"full": {"val": [1.0, 0.0, 0.0], "test": [0.3, 0.0, 0.0]}}},
        ("real", 1, 1): {"curves": {"full": {"val": [1.0, 0.0, 0.0], "test": [0.3, 0.0, 0.0]}}},
    }
    s = summarize(cells, ["full"], ["a", "real"], [1])
    assert s["results"]["a"]["1"]["best_epoch"] == 1 and s["results"]["a"]["1"]["mean"] == pytest.approx(0.5)
    assert s["paired"]["a"]["1"]["vs_real"]["mean"] == pytest.approx(0.2)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="methods: unknown"):
        evaluate.run(methods=("real", "magic"), progress=False)
    with pytest.raises(ValueError, match="protocols"):
        evaluate.run(protocols=("probe",), progress=False)


def _image_folder(root, classes=("cat", "dog", "bird"), per_class=6):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            x = (torch.rand(16, 16, 3, generator=g) * 80 + 60 * c).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(x).save(os.path.join(root, name, f"{i}.png"))
    return root


def test_image_folder_with_a_checkpoint_and_a_backbone_file(tmp_path, tiny_sd1_path):
    images = _image_folder(str(tmp_path / "images"))
    backbone = str(tmp_path / "backbone.pt")
    torch.save(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten()), backbone)
    summary = evaluate.run(out=str(tmp_path / "out"), images=images, model=tiny_sd1_path, backbone=backbone,
                           methods=("real", "real_guidance", "da_fusion", "templates"), ks=(1, 2), seeds=(0, 1),
                           epochs=2, epoch_size=6, steps=4, inversion_steps=1, image_size=16, guidance_scale=2.0,
                           progress=False)  # fmt: skip
    assert set(summary["protocols"]) == {"linear", "full"}
    assert summary["results"]["da_fusion"]["2"]["n_seeds"] == 2
    with pytest.raises(ValueError, match="--retrieval-pool"):
        evaluate.run(out=str(tmp_path / "out2"), images=images, model=tiny_sd1_path, methods=("retrieval",), ks=(1,),
                     seeds=(0,), epochs=1, epoch_size=3, protocols=("full",), image_size=16, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="--backbone"):
        evaluate.run(out=str(tmp_path / "out3"), images=images, methods=("real",), ks=(1,), seeds=(0,), epochs=1,
                     epoch_size=3, image_size=16, progress=False)  # fmt: skip


def test_cli_writes_the_tables(tmp_path, capsys):
    from fusionloader.cli import main

    out = str(tmp_path / "cli")
    main(["evaluate", "--out", out, "--json", str(tmp_path / "e.json"), "--methods", "real", "standard", "--ks", "1",
          "--seeds", "0", "1", "--epochs", "2", "--epoch-size", "10", "--protocols", "full", "--no-progress"])
    text = capsys.readouterr().out
    assert "| standard |" in text and "Paired difference vs `real`" in text
    with open(tmp_path / "e.json") as f:
        assert json.load(f)["results"]["standard"]["1"]["n_seeds"] == 2


def test_one_step_students_pass_the_steps_check_only_under_lcm_span(tmp_path):
    # DA-Fusion's randomized strengths include 0.25: int(0.25 * steps) needs steps >= 4 under the SD img2img rule,
    # but a student under scheduler="lcm_span" runs all its steps at every strength (README "Producer speed").
    from fusionloader.evaluate.run import EvalConfig, _check

    cfg = dict(out=str(tmp_path), methods=("real", "da_fusion"), ks=(1,), seeds=(0,), steps=1)
    with pytest.raises(ValueError, match="steps >= 4"):
        _check(EvalConfig(**cfg))
    _check(EvalConfig(**cfg, scheduler="lcm_span"))
    assert EvalConfig(**cfg, scheduler="lcm_span").fingerprint() != EvalConfig(**cfg).fingerprint()
