"""``fusionloader demo`` end to end on the embedded model, shrunk to seconds (the README's first command)."""

import json
import os

from PIL import Image

from fusionloader.demo import DemoConfig, format_summary, run_demo


def test_demo_runs_and_writes_its_files(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), epochs=2, per_class=2, batch_size=8, steps=4, progress=False)
    summary = run_demo(cfg)
    for key in ("accuracy_real_only", "accuracy_fusion", "achieved_alpha", "fresh_fraction", "stall_fraction",
                "images_per_s_fusion", "counts"):
        assert key in summary
    counts = summary["counts"]
    assert counts["real"] + counts["fresh"] + counts["reused"] + counts["fallback"] == 2 * 20  # 2 epochs x 20 images
    preview = Image.open(summary["files"]["preview"])
    assert preview.size[0] == 6 * 96  # real + 4 strengths + text-only
    assert os.path.getsize(summary["files"]["stats_plot"]) > 0
    assert json.load(open(tmp_path / "demo" / "summary.json"))["train_images"] == 20
    assert "achieved alpha" in format_summary(summary)


def test_demo_without_matplotlib_names_the_extra_before_any_work(monkeypatch, tmp_path):
    import sys

    import pytest

    from fusionloader.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"fusionloader demo needs matplotlib: pip install 'fusionloader\[demo\]'"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), epochs=1, progress=False))
    assert not (tmp_path / "demo").exists()
