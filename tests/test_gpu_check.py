"""benchmarks/gpu_check.py --dry-run: every section of the GPU check runs on CPU with the tiny model."""

import json



def test_gpu_check_dry_run(tmp_path, monkeypatch):
    from fusionloader.benchmarks import gpu_check

    # The engine sections on the torch references (the interpreter is slow); the kernels section forces Triton.
    monkeypatch.setenv("FUSIONLOADER_KERNELS", "torch")
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["device"] == "cpu" and result["passed"]
    for section in ("kernels", "oracle", "throughput", "memory", "syncs", "producer"):
        assert "error" not in result[section], result[section]
    assert result["kernels"]["backend"] == "triton" and result["kernels"]["float16"]["passed"]
    assert result["oracle"]["max_abs_diff"] <= 1e-3
    assert result["throughput"]["engine_images_per_s"] > 0 and result["throughput"]["diffusers_pipeline_images_per_s"] > 0
    assert result["memory"]["estimate"]["total"] > sum(result["memory"]["estimate"]["weights"].values())
    assert result["syncs"]["syncs_steady"] == 0 and result["syncs"]["finished_batches"] >= 1
    assert result["syncs"]["syncs_per_finished_batch"] <= 1
    producer = result["producer"]
    assert producer["planned_synthetic"] > 0 and producer["fresh"] == producer["planned_synthetic"]
