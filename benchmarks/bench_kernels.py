"""Scheduler arithmetic per denoising step: fused ``cfg_step`` against diffusers' ``scheduler.step``.

A continuous batch holds samples at different timesteps (mixed strengths, joined at different times).
diffusers' schedulers step one timestep at a time, so such a batch costs one ``step`` call per distinct
timestep plus the CFG combine as separate tensor ops; the fused kernel does CFG + step for every slot in
one pass. On CPU the kernel's torch reference runs (the Triton path needs CUDA or the interpreter); on CUDA
the Triton kernel runs and its bandwidth is reported too.

    python -m fusionloader.benchmarks.bench_kernels --json out/kernels.json
"""

from __future__ import annotations

import argparse

import torch

from fusionloader.benchmarks.common import environment, median_seconds, warn_if_interpreting, write_json

__all__ = ["run"]


def _setup(scheduler_name: str, batch: int, latent: tuple[int, int, int], steps: int, device):
    from diffusers import DDIMScheduler

    from fusionloader.engine.schedules import get_scheduler, make_schedule

    base = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)
    sched = get_scheduler(scheduler_name, base.config)
    strengths = [(0.25, 0.5, 0.75, 1.0)[b % 4] for b in range(batch)]
    schedules = [make_schedule(sched, steps, s) for s in strengths]
    # Every sample at step 0 of its own schedule: distinct timesteps, as in a mixed continuous batch.
    coefs = torch.stack([s.coefs[0] for s in schedules]).to(device)
    timesteps = [s.timesteps[0] for s in schedules]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, *latent, generator=g).to(device)
    model_out = torch.randn(2 * batch, *latent, generator=g).to(device)
    return sched, steps, timesteps, coefs, x, model_out


def _per_sample_schedulers(sched, steps, timesteps):
    """One diffusers scheduler per sample (each owns its step index and multistep history), set up once."""
    import copy

    owned = []
    for t in timesteps:
        s = copy.deepcopy(sched)
        s.set_timesteps(steps)
        s.is_scale_input_called = True  # Euler warns otherwise; the UNet input scaling is not timed here
        owned.append((s, int((s.timesteps == t).nonzero()[0])))
    return owned


def _diffusers_step(owned, timesteps, x, model_out, guidance: float):
    """What a diffusers loop does for a batch whose samples sit at different timesteps."""
    batch = x.shape[0]
    cond, uncond = model_out[:batch], model_out[batch:]
    m = uncond + guidance * (cond - uncond)
    outs = []
    for b, (s, index) in enumerate(owned):
        s._step_index = index
        outs.append(s.step(m[b : b + 1], timesteps[b], x[b : b + 1]).prev_sample)
    return torch.cat(outs)


def run(quick: bool = False, device: str | None = None, repeats: int | None = None) -> dict:
    """Median ms per step (all slots) for diffusers' per-timestep stepping and the fused kernel."""
    from fusionloader.kernels import cfg_step

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch, latent, steps = (8, (4, 64, 64), 50)  # SD-1.x at 512 px, a UNet batch of 8
    repeats = repeats or (5 if quick else 20)
    result = {"environment": environment(device), "batch": batch, "latent_shape": list(latent)}
    for name in ("ddim", "euler", "dpmpp_2m"):
        sched, n, timesteps, coefs, x, model_out = _setup(name, batch, latent, steps, device)
        guidance = torch.full((batch,), 7.5, device=device)
        uncond_index = torch.arange(batch, 2 * batch, device=device)
        prev = torch.zeros_like(x)
        fused = median_seconds(lambda: cfg_step(model_out, x, guidance, uncond_index, coefs, prev_x0=prev),
                               repeats=repeats, warmup=2, device=device)
        owned = _per_sample_schedulers(sched, n, timesteps)
        ref = median_seconds(lambda: _diffusers_step(owned, timesteps, x, model_out, 7.5),
                             repeats=repeats, warmup=1, device=device)
        row = {
            "fused_ms_per_step": 1e3 * fused["median_s"],
            "diffusers_ms_per_step": 1e3 * ref["median_s"],
            "speedup": ref["median_s"] / fused["median_s"],
        }
        if device.type == "cuda":
            # Bytes the fused kernel must move: model_out (2B rows), x, prev in; x_next, x0 out (fp32).
            moved = 4 * x.numel() * (2 + 1 + 1 + 2)
            row["fused_GBps"] = moved / fused["median_s"] / 1e9
        result[name] = row
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default="out/bench_kernels.json")
    args = parser.parse_args(argv)
    warn_if_interpreting()
    result = run(args.quick, args.device)
    write_json(args.json, result)
    print(result)


if __name__ == "__main__":
    main()
