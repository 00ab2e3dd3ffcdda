"""The benchmark scripts run and report what they promise (speed is measured there, never asserted here)."""

import json

from fusionloader.benchmarks import bench_engine, bench_kernels, bench_loader, run_all
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
    engine = {"fusion_over_model_compute": 1.02, "speedup_vs_diffusers_pipeline": 2.0, "speedup_vs_dafusion_style": 4.0}
    loader = {}
    for regime in ("ample", "scarce"):
        loader.update({f"{regime}_fusion_vs_plain": 0.96, f"{regime}_fresh_fraction": 1.0, f"{regime}_stall_fraction": 0.01,
                       f"{regime}_fusion_vs_inline": 6.0, f"{regime}_first_step_vs_offline": 0.05,
                       f"{regime}_fusion_disk_bytes": 0, f"{regime}_capacity_over_demand": 1.5})
    loader["scarce_capacity_over_demand"] = 0.3
    t = run_all._targets(engine, loader)
    assert t["engine_fusion_vs_model_compute"]["met"] and t["engine_speedup_vs_dafusion_style"]["value"] == 4.0
    assert all(v["met"] for v in t.values())
    loader["ample_fresh_fraction"] = 0.99
    loader["scarce_fusion_disk_bytes"] = 1
    t = run_all._targets(engine, loader)
    assert not t["loader_ample_every_synthetic_fresh"]["met"] and not t["loader_scarce_fusion_disk_bytes"]["met"]


def test_loader_benchmark_smoke(tiny_sd1_path, monkeypatch):
    # Producers run the torch reference kernels, as CPU producers do outside the kernel tests.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tiny = bench_loader.Settings(images=4, batch_size=2, variants=1, sampler_steps=2, producers=1, inline_steps=1,
                                 burn_in=1, regimes=(bench_loader.Regime("ample", 0.05, 3),
                                                     bench_loader.Regime("scarce", 0.0, 3)))  # fmt: skip
    r = bench_loader.run(model=tiny_sd1_path, device="cpu", settings=tiny)
    for regime in ("ample", "scarce"):
        fusion = r["regimes"][regime]["fusion"]
        assert fusion["timed_steps"] == 3 and fusion["samples"] == 6 and fusion["disk_bytes"] == 0
        assert fusion["fresh"] <= fusion["synthetic"] <= fusion["samples"]
        assert r[f"{regime}_offline_disk_bytes"] > 0 and r[f"{regime}_fusion_vs_inline"] > 0
