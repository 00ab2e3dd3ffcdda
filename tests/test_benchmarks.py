"""The benchmark scripts run and report what they promise (speed is measured there, never asserted here)."""

import json

from fusionloader.benchmarks import bench_engine, bench_kernels, run_all
from fusionloader.benchmarks.common import median_seconds, write_json


def test_median_seconds_and_json(tmp_path):
    calls = []
    timing = median_seconds(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(timing["times_s"]) == 3 and timing["median_s"] >= 0
    write_json(str(tmp_path / "a" / "r.json"), {"x": 1})
    assert json.load(open(tmp_path / "a" / "r.json")) == {"x": 1}


def test_engine_benchmark_smoke(tiny_sd1_path):
    r = bench_engine.run(model=tiny_sd1_path, batch=2, steps=4, repeats=1, device="cpu")
    for key in ("fusion_ms_per_image", "model_compute_ms_per_image", "diffusers_pipeline_ms_per_image",
                "dafusion_style_ms_per_image"):
        assert r[key] > 0
    assert r["environment"]["torch"]


def test_kernel_benchmark_smoke():
    r = bench_kernels.run(quick=True, device="cpu", repeats=1)
    for name in ("ddim", "euler", "dpmpp_2m"):
        assert r[name]["fused_ms_per_step"] > 0 and r[name]["diffusers_ms_per_step"] > 0


def test_targets_are_evaluated_from_the_figures():
    engine = {"fusion_ms_per_image": 10.0, "model_compute_ms_per_image": 9.8, "diffusers_pipeline_ms_per_image": 20.0,
              "dafusion_style_ms_per_image": 40.0}
    loader = {"plain_steps_per_s": 100.0, "fusion_steps_per_s": 96.0, "inline_steps_per_s": 10.0,
              "stall_fraction": 0.01, "offline_time_to_first_step_s": 50.0, "fusion_time_to_first_step_s": 4.0,
              "fusion_disk_bytes": 0}
    t = run_all._targets(engine, loader)
    assert t["engine_fusion_vs_model_compute"]["met"] and t["engine_speedup_vs_dafusion_style"]["value"] == 4.0
    assert t["loader_fusion_vs_plain_steps"]["met"] and t["loader_fusion_vs_inline_steps"]["met"]
    loader["fusion_disk_bytes"] = 1
    assert not run_all._targets(engine, loader)["loader_fusion_disk_bytes"]["met"]
