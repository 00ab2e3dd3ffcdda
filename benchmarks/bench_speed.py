"""Producer speed and quality in one run: diffusers' pipeline, the plain engine, and each speed option.

    python -m fusionloader.benchmarks.bench_speed --json out/bench_speed.json     # or: fusionloader bench --sections speed

The work: held-out real digits (the classifier-test split, class-balanced) augmented img2img, each image at a
strength drawn (seeded) from DA-Fusion's randomized {0.25, 0.5, 0.75, 1.0}, prompted with its class, guidance
3.0 (inside the LCM student's distilled range w = g - 1 in [1, 5]); the embedded model (``digits-ldm``) unless
``--model``. Every configuration makes the same images from the same seeds; each reports

* ``images_per_s``: images / median wall time of ``repeats`` whole-batch calls (after one untimed call);
* ``recognisability`` and ``frechet`` (:mod:`fusionloader.pretrained.quality`: the embedded classifier's accuracy
  on the outputs; Fréchet distance to the real held-out split on its features), with ``per_strength``
  recognisability; ``text_only``: the same on text-only generations (one per source image).

Configurations (the result's keys):

* ``speed.pipeline_images_per_s`` / ``speed.pipeline``: ``StableDiffusionImg2ImgPipeline`` at its default 50 steps
  (DDIM, one call per strength group -- a pipeline call has one strength);
* ``speed.engine``: ``Synthesizer.augment`` with nothing switched on, 50 steps;
* ``speed.options[name]``: the engine with one option (a Synthesizer loaded with ``scheduler="lcm"`` on the LCM
  student ``digits-lcm`` at 4/8 steps, or ``scheduler="lcm_span"`` at 1/2 steps, ``deepcache_interval``,
  ``decoder="tiny"``, ``compile``, ``cuda_graphs``), ``best`` (the combination), and -- measured with diffusers
  alone, so they exist whatever the engine supports -- ``diffusers_lcm_{k}`` (the student in diffusers'
  ``LatentConsistencyModelImg2ImgPipeline``: k steps at every strength) and ``diffusers_lcm_4_taesd`` (plus the shipped tiny
  autoencoder ``digits-ldm/vae_tiny`` as the pipeline's VAE).

An option this engine does not have is reported as ``{"status": "unavailable", "reason": ...}`` with the
error it raised -- never a number. ``speedup_vs_pipeline`` is each ``images_per_s`` over the pipeline's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from fusionloader.benchmarks.common import environment, synchronize, warn_if_interpreting, write_json

__all__ = ["OPTION_SPECS", "best_measured", "run"]

STRENGTHS = (0.25, 0.5, 0.75, 1.0)  # DA-Fusion's randomized intensity
GUIDANCE = 3.0
PIPELINE_STEPS = 50  # StableDiffusionImg2ImgPipeline's default

# name -> (model: "teacher"|"student", Synthesizer.from_pretrained kwargs, augment kwargs, steps or None = PIPELINE_STEPS)
OPTION_SPECS: dict[str, tuple[str, dict, dict, int | None]] = {
    # The engine's few-step img2img runs the last int(k * strength) of k steps, as StableDiffusionImg2ImgPipeline
    # does (docs/CONTRACTS.md, Schedules): at strength 0.25 k = 4 is the fewest that leaves a step.
    "lcm_4": ("student", {"scheduler": "lcm"}, {}, 4),
    "lcm_8": ("student", {"scheduler": "lcm"}, {}, 8),
    # "lcm_span": LatentConsistencyModelImg2ImgPipeline's rule, all k steps at every strength (so k = 1, 2 run).
    "lcm_span_1": ("student", {"scheduler": "lcm_span"}, {}, 1),
    "lcm_span_2": ("student", {"scheduler": "lcm_span"}, {}, 2),
    "deepcache_3": ("teacher", {}, {"deepcache_interval": 3}, None),
    "tiny_decoder": ("teacher", {}, {"decoder": "tiny"}, None),
    "compile": ("teacher", {"compile": True}, {}, None),
    "cuda_graphs": ("teacher", {"cuda_graphs": True}, {}, None),
}
# The combination: the few-step student with the step-cost options that apply to it (compile is left out: on
# CPU its first calls at each new batch size recompile for minutes, and it is measured on its own above).
BEST_SPEC = ("student", {"scheduler": "lcm"}, {"decoder": "tiny"}, 4)


def _student_path() -> str:
    from fusionloader.pretrained import default_model_path

    return os.path.join(os.path.dirname(default_model_path()), "digits-lcm")


def _time(fn, repeats: int, device) -> tuple[object, list[float]]:
    """(output of the untimed first call, the timed calls' seconds)."""
    out = fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return out, times


def _figures(judge, images, labels, strengths, times, n) -> dict:
    q = judge(images, labels)
    strengths = np.asarray(strengths, dtype=float)
    per = {str(s): judge(images[strengths == s], labels[strengths == s])["recognisability"]
           for s in STRENGTHS if (strengths == s).sum() >= 2}  # a Fréchet estimate needs >= 2 images
    med = statistics.median(times)
    return {"images_per_s": n / med, "median_s": med, "times_s": times, **q, "per_strength": per}


def _pipeline_runner(pipe, images, prompts, strengths, steps, seeds):
    def run():
        out = torch.empty(len(prompts), *images.shape[1:])
        with torch.no_grad():
            for s in sorted(set(strengths)):
                idx = [i for i, v in enumerate(strengths) if v == s]
                out[idx] = pipe([prompts[i] for i in idx], image=images[idx], strength=s, guidance_scale=GUIDANCE,
                                num_inference_steps=steps, generator=[torch.Generator().manual_seed(seeds[i]) for i in idx],
                                output_type="pt").images.cpu().float()  # fmt: skip
        return out

    return run


def _engine_config(synth_kwargs, call_kwargs, steps, model, device, images, prompts, strengths, seeds):
    from fusionloader import Synthesizer

    synth = Synthesizer.from_pretrained(model, device=device, **synth_kwargs)

    def run(strengths=strengths):
        with torch.no_grad():
            return synth.augment(images, prompts, strengths=strengths, guidance_scale=GUIDANCE, num_inference_steps=steps,
                                 seeds=seeds, **call_kwargs).cpu().float()  # fmt: skip

    return run


def _unavailable(e: Exception) -> dict:
    return {"status": "unavailable", "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def run(quick: bool = False, model: str | None = None, device: str | None = None, per_class: int | None = None,
        repeats: int | None = None, steps: int | None = None, options=None) -> dict:  # fmt: skip
    """The speed section (see the module docstring). ``steps``: the 50-step baselines' steps (tests use fewer)."""
    from diffusers import AutoencoderTiny, StableDiffusionImg2ImgPipeline

    from fusionloader.pretrained import default_model_path, prompts_for, recorded_path
    from fusionloader.pretrained.quality import QualityJudge

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model or default_model_path()
    student = _student_path()
    per_class = per_class or (1 if quick else 4)
    repeats = repeats or (1 if quick else 3)
    steps = steps or (4 if quick else PIPELINE_STEPS)
    if int(steps * min(STRENGTHS)) < 1:  # diffusers' img2img runs int(steps * strength) steps: none would fail
        raise ValueError(f"steps={steps}: the pipeline needs steps >= {int(1 / min(STRENGTHS))} to run strength {min(STRENGTHS)}")
    names = list(OPTION_SPECS) if options is None else list(options)
    unknown = [n for n in names if n not in OPTION_SPECS]
    if unknown:
        raise ValueError(f"options: unknown {unknown} (choose from {', '.join(OPTION_SPECS)})")
    judge = QualityJudge()
    te = judge.splits.test
    pick = np.concatenate([np.flatnonzero(te.labels.numpy() == c)[:per_class] for c in range(10)])
    images, labels = te.images[pick], te.labels.numpy()[pick]
    g = np.random.default_rng(0)
    strengths = [float(s) for s in g.choice(STRENGTHS, size=len(labels))]
    prompts = prompts_for(labels)
    seeds = list(range(len(labels)))
    n = len(labels)
    res: dict = {"images": n, "strengths": strengths, "guidance_scale": GUIDANCE, "steps": steps, "repeats": repeats,
                 "model": recorded_path(model), "student": recorded_path(student), "quick": quick,
                 "real_test_recognisability": judge.real_test_accuracy, "options": {}}  # fmt: skip

    def measure(run_fn, text_fn=None) -> dict:
        out, times = _time(run_fn, repeats, device)
        fig = _figures(judge, out, labels, strengths, times, n)
        if text_fn is not None:
            fig["text_only"] = judge(text_fn(), labels)
        return fig

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    res["pipeline"] = measure(_pipeline_runner(pipe, images, prompts, strengths, steps, seeds))
    res["pipeline"]["scheduler"] = type(pipe.scheduler).__name__
    res["pipeline_images_per_s"] = res["pipeline"]["images_per_s"]

    eng = _engine_config({"scheduler": "ddim"}, {}, steps, model, device, images, prompts, strengths, seeds)
    res["engine"] = measure(eng, lambda: eng(strengths=[None] * n))

    for name in names + ["best"]:
        which, synth_kwargs, call_kwargs, k = BEST_SPEC if name == "best" else OPTION_SPECS[name]
        if name == "cuda_graphs" and device.type != "cuda":
            res["options"][name] = {"status": "skipped", "reason": "CUDA graphs need a CUDA device"}
            continue
        path = student if which == "student" else model
        if not os.path.isdir(path):
            res["options"][name] = {"status": "unavailable", "reason": f"no model folder {recorded_path(path)}"}
            continue
        try:
            fn = _engine_config(synth_kwargs, call_kwargs, k or steps, path, device, images, prompts, strengths, seeds)
            res["options"][name] = measure(fn, lambda: fn(strengths=[None] * n))
        except (TypeError, ValueError, NotImplementedError, RuntimeError, KeyError) as e:
            res["options"][name] = _unavailable(e)

    # Diffusers alone with the student (and the shipped tiny autoencoder): the few-step figures before any engine option.
    if os.path.isdir(student):
        from diffusers import LatentConsistencyModelImg2ImgPipeline as I2I  # k steps at any strength (see quality.py)

        lcm = I2I.from_pretrained(student, safety_checker=None, requires_safety_checker=False).to(device)
        lcm.set_progress_bar_config(disable=True)
        for k in (1, 2, 4):
            res["options"][f"diffusers_lcm_{k}"] = measure(_pipeline_runner(lcm, images, prompts, strengths, k, seeds))
        tiny_dir = os.path.join(model, "vae_tiny")
        if os.path.isdir(tiny_dir):
            lcm_t = I2I(**{**lcm.components, "vae": AutoencoderTiny.from_pretrained(tiny_dir).to(device)})
            lcm_t.set_progress_bar_config(disable=True)
            res["options"]["diffusers_lcm_4_taesd"] = measure(_pipeline_runner(lcm_t, images, prompts, strengths, 4, seeds))
    base = res["pipeline_images_per_s"]
    ref = res["engine"]["recognisability"]
    for fig in [res["engine"], *res["options"].values()]:
        if "images_per_s" in fig:
            fig["speedup_vs_pipeline"] = fig["images_per_s"] / base
            fig["recognisability_drop_vs_engine_points"] = 100 * (ref - fig["recognisability"])
    res["best_measured"] = best_measured(res)
    res["environment"] = environment(device)
    return res


def best_measured(res: dict, max_drop_points: float = 2.0) -> dict | None:
    """The fastest measured configuration (engine or option) whose recognisability is within ``max_drop_points``
    of the plain engine's; None when none was measured."""
    rows = {"engine": res["engine"], **res["options"]}
    ok = {k: v for k, v in rows.items() if "images_per_s" in v and v["recognisability_drop_vs_engine_points"] <= max_drop_points}
    if not ok:
        return None
    name = max(ok, key=lambda k: ok[k]["images_per_s"])
    return {"name": name, "images_per_s": ok[name]["images_per_s"], "speedup_vs_pipeline": ok[name]["speedup_vs_pipeline"],
            "recognisability": ok[name]["recognisability"],
            "recognisability_drop_vs_engine_points": ok[name]["recognisability_drop_vs_engine_points"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="diffusers folder (default: the embedded digits-ldm)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--per-class", type=int, default=None, help="source images per class (default 4; quick 1)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default="out/bench_speed.json")
    args = parser.parse_args(argv)
    warn_if_interpreting()
    torch.manual_seed(0)
    result = run(args.quick, args.model, args.device, args.per_class, args.repeats)
    write_json(args.json, result)
    rows = {"pipeline": result["pipeline"], "engine": result["engine"], **result["options"]}
    for name, fig in rows.items():
        if "images_per_s" in fig:
            print(f"{name:24s} {fig['images_per_s']:8.2f} img/s  x{fig['images_per_s'] / result['pipeline_images_per_s']:5.2f}  "
                  f"recog {fig['recognisability']:.3f}  FD {fig['frechet']:.1f}")  # fmt: skip
        else:
            print(f"{name:24s} {fig['status']}: {fig['reason']}")


if __name__ == "__main__":
    main()
