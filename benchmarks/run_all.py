"""Run the engine, loader, transform and kernel benchmarks in one process -> one JSON file plus PNG plots.

    fusionloader bench --quick --json out/bench.json      # or: python -m fusionloader.benchmarks.run_all

The JSON has one section per benchmark (``engine``, ``loader``, ``transforms``, ``kernels``, ``speed``) with every figure
from this run (``sections`` / ``--sections`` picks some), plus ``environment`` and ``targets`` (each target of the issues, the measured ratio, and whether it
is met).
"""

from __future__ import annotations

import argparse
import os
import time

from fusionloader.benchmarks.common import environment, warn_if_interpreting, write_json

__all__ = ["SECTIONS", "run_all"]

SECTIONS = ("engine", "loader", "transforms", "kernels", "speed")


def _targets(engine: dict, loader: dict, transforms: dict | None = None, speed: dict | None = None) -> dict:
    """The speed targets of the engine and loader issues, evaluated on this run's figures."""
    t = {}
    if speed:  # issue 12: the best configuration >= 5x diffusers' pipeline within 2 recognisability points
        best = speed.get("best_measured")
        v = best["speedup_vs_pipeline"] if best else 0.0
        t["speed_best_within_2_points_vs_pipeline"] = {"target": ">= 5", "value": v, "met": v >= 5,
                                                       "config": best["name"] if best else None}
    if engine:
        ratio = engine["fusion_over_model_compute"]  # medians of per-round ratios (bench_engine)
        t["engine_fusion_vs_model_compute"] = {"target": "<= 1.05", "value": ratio, "met": ratio <= 1.05}
        for ref in ("diffusers_pipeline", "dafusion_style"):
            r = engine[f"speedup_vs_{ref}"]
            t[f"engine_speedup_vs_{ref}"] = {"target": "> 1", "value": r, "met": r > 1}
    if loader:
        ample, scarce = ("ample",), ("ample", "scarce")
        checks = (  # (regimes, summary key, target name, target, predicate)
            (ample, "fusion_vs_plain", "fusion_vs_plain_steps", ">= 0.95", lambda v: v >= 0.95),
            (ample, "fresh_fraction", "every_synthetic_fresh", "== 1", lambda v: v == 1),
            (ample, "capacity_over_demand", "capacity_over_demand", ">= 1", lambda v: v >= 1),
            (("scarce",), "capacity_over_demand", "capacity_over_demand", "< 1", lambda v: v < 1),
            (scarce, "stall_fraction", "stall_fraction", "<= 0.05", lambda v: v <= 0.05),
            (scarce, "fusion_vs_inline", "fusion_vs_inline_steps", ">= 5", lambda v: v >= 5),
            (scarce, "first_step_vs_offline", "first_step_vs_offline", "<= 0.1", lambda v: v <= 0.1),
            (scarce, "fusion_disk_bytes", "fusion_disk_bytes", "== 0", lambda v: v == 0),
        )
        for regimes, key, name, target, ok in checks:
            for regime in regimes:
                v = loader[f"{regime}_{key}"]
                t[f"loader_{regime}_{name}"] = {"target": target, "value": v, "met": bool(ok(v))}
    if transforms:  # realistic train transforms at batch 256: the loaders' own cost, producers keeping up
        for key, name, target, ok in (
            ("fusion_vs_plain", "transforms_fusion_vs_plain_steps", ">= 0.95", lambda v: v >= 0.95),
            ("capacity_over_demand", "transforms_capacity_over_demand", ">= 1", lambda v: v >= 1),
            ("fresh_fraction", "transforms_every_synthetic_fresh", "== 1", lambda v: v == 1),
        ):
            t[name] = {"target": target, "value": transforms[key], "met": bool(ok(transforms[key]))}
    return t


def _plots(result: dict, folder: str) -> list[str]:
    from fusionloader.plots import bar_chart

    paths = []
    e, lo, k, tr = result.get("engine", {}), result.get("loader", {}), result.get("kernels", {}), result.get("transforms", {})
    if e:
        bars = {name: e[f"{key}_ms_per_image"] for name, key in (
            ("fusionloader augment", "fusion"), ("model compute alone", "model_compute"),
            ("diffusers img2img pipeline", "diffusers_pipeline"), ("DA-Fusion style (1 call/image)", "dafusion_style"))}  # fmt: skip
        paths.append(bar_chart({"engine: ms per image (lower is better)": bars}, os.path.join(folder, "bench_engine.png")))
    if lo:
        panels = {}
        for regime in ("ample", "scarce"):
            panels[f"{regime}: train steps/s"] = {n: lo[f"{regime}_{key}_steps_per_s"] for n, key in (
                ("DataLoader, no synthesis", "plain"), ("FusionLoader", "fusion"), ("inline pipeline in __getitem__", "inline"))}  # fmt: skip
        panels["time to first step (s)"] = {"offline (DA-Fusion)": lo["ample_offline_time_to_first_step_s"],
                                            "FusionLoader": lo["ample_fusion_time_to_first_step_s"]}  # fmt: skip
        if tr:
            panels["train transforms, batch 256: steps/s"] = {"DataLoader": tr["plain_steps_per_s"],
                                                              "FusionLoader a=0.5": tr["fusion_steps_per_s"]}  # fmt: skip
        paths.append(bar_chart(panels, os.path.join(folder, "bench_loader.png")))
    sp = result.get("speed", {})
    if sp:
        rows = {"diffusers pipeline": sp["pipeline"], "engine": sp["engine"], **sp["options"]}
        bars = {name: v["images_per_s"] for name, v in rows.items() if "images_per_s" in v}
        paths.append(bar_chart({"producer speed: images/s (higher is better)": bars}, os.path.join(folder, "bench_speed.png")))
    if k:
        per = {f"{name} {impl}": k[name][f"{impl}_ms_per_step"] for name in ("ddim", "euler", "dpmpp_2m")
               for impl in ("fused", "diffusers") if name in k}  # fmt: skip
        paths.append(bar_chart({"scheduler step, mixed-timestep batch (ms)": per}, os.path.join(folder, "bench_kernels.png")))
    return paths


def run_all(quick: bool = False, json_path: str = "out/bench.json", plots_dir: str | None = None, model: str | None = None,
            device: str | None = None, sections=None) -> dict:  # fmt: skip
    """Run the benchmarks named in ``sections`` (default: all of :data:`SECTIONS`); write ``json_path`` and the plots;
    return the result dict."""
    from fusionloader.benchmarks import bench_engine, bench_kernels, bench_loader, bench_speed, bench_transforms
    from fusionloader.extras import require

    sections = SECTIONS if sections is None else tuple(sections)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"sections: unknown {unknown} (choose from {', '.join(SECTIONS)})")
    require("matplotlib", "fusionloader bench", "bench")  # the plots; checked before minutes of benchmarks
    started = time.perf_counter()
    result = {"environment": environment(device or "cpu"), "quick": quick, "sections": list(sections)}
    runs = {
        "engine": lambda: bench_engine.run(quick=quick, model=model, device=device),
        "loader": lambda: bench_loader.run(quick=quick, model=model),
        "transforms": lambda: bench_transforms.run(quick=quick, model=model, device=device),
        "kernels": lambda: bench_kernels.run(quick=quick, device=device),
        "speed": lambda: bench_speed.run(quick=quick, model=model, device=device),  # default: the embedded digits model
    }
    for name in SECTIONS:
        if name in sections:
            result[name] = runs[name]()
    result["targets"] = _targets(result.get("engine", {}), result.get("loader", {}), result.get("transforms"),
                                 result.get("speed"))  # fmt: skip
    result["wall_s"] = time.perf_counter() - started
    result["plots"] = _plots(result, plots_dir or os.path.dirname(os.path.abspath(json_path)))
    write_json(json_path, result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run all fusionloader benchmarks.")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="out/bench.json")
    parser.add_argument("--plots", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=None, help="default: all")
    args = parser.parse_args(argv)
    warn_if_interpreting()
    run_all(args.quick, args.json, args.plots, args.model, args.device, args.sections)


if __name__ == "__main__":
    main()
