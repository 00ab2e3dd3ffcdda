"""Distil the embedded model into a few-step Latent Consistency Model student (LCM, Luo et al. 2023).

    python -m fusionloader.pretrained.train_lcm --out fusionloader/assets/digits-lcm

Runs on CPU, seeded, deterministic algorithms (``torch.use_deterministic_algorithms``). The recipe is that of
diffusers' ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``, at the embedded model's size:

1. Teacher: the shipped ``digits-ldm`` (UNet, VAE, text encoder all frozen). Data: the *generator* split's
   VAE latents (posterior mean + std x noise, times ``scaling_factor``), prompts drawn as train.py draws them.
2. Student: the teacher's UNet with ``time_cond_proj_dim`` set (a guidance-scale embedding w added to the
   timestep embedding, as SD-LCM's UNet has); it starts from the teacher's weights with the new projection
   zero-initialised, so step 0 of the student *is* the teacher. A target network is the student's EMA.
3. One step: skip ``k = 1000 / num_ddim_timesteps`` (20) timesteps. Noise a latent to ``t_{n+k}``; the teacher
   with classifier-free guidance ``1 + w`` (``w ~ U[w_min, w_max]``) takes one DDIM step to ``t_n``; the
   student's consistency output ``c_skip x + c_out x0_pred`` at ``t_{n+k}`` is pulled (pseudo-Huber loss)
   towards the target network's at ``t_n`` (boundary conditions of LCMScheduler: sigma_data 0.5,
   timestep_scaling 10).
4. Save: a full ``StableDiffusionPipeline`` folder (the teacher's VAE, text encoder and tokenizer, the student
   UNet in fp16) with an ``LCMScheduler`` built from the teacher's scheduler config (original_inference_steps
   = num_ddim_timesteps, so the sampler visits exactly the distillation grid). diffusers runs it as any LCM
   checkpoint: ``guidance_scale`` g feeds ``w = g - 1`` to the UNet and there is no second (unconditional)
   pass. ``train_info.json`` records the run, its wall time and the machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

from fusionloader.pretrained import (
    TRAIN_TEMPLATES, class_names, default_model_path, load_digits_splits, recorded_command, recorded_path,
    write_train_info,
)

__all__ = ["DDIMSolver", "boundary_scalings", "guidance_embedding", "lcm_step_loss", "main", "make_student"]

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0  # LCMScheduler's default; the boundary conditions must match the sampler's


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = TIMESTEP_SCALING):
    """LCMScheduler's ``c_skip, c_out`` for integer timesteps ``t`` (``get_scalings_for_boundary_condition_discrete``)."""
    scaled = t.float() * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The pipeline's ``get_guidance_scale_embedding`` (the student must see exactly what diffusers feeds it)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


class DDIMSolver:
    """The teacher's ODE solver on the distillation grid: timesteps ``(i + 1) * k - 1``, ``i < num_ddim_timesteps``."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int = 50):
        k = len(alphas_cumprod) // num_ddim_timesteps
        self.k = k
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1) * k - 1
        self.alphas_cumprod = alphas_cumprod.float()
        # The alpha DDIM lands on from grid point i: grid point i - 1, or alphas_cumprod[0] below the grid.
        self.alpha_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]]).float()

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a = self.alpha_prev[index].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps


def _x0(eps: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def make_student(teacher_unet, cond_dim: int = 256):
    """The teacher's UNet config plus ``time_cond_proj_dim``; teacher weights, zero-initialised guidance projection."""
    from diffusers import UNet2DConditionModel

    config = dict(teacher_unet.config)
    config["time_cond_proj_dim"] = cond_dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"student/teacher mismatch: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.float()


def lcm_step_loss(student, target, teacher, solver: DDIMSolver, z0, emb, uncond, gen: torch.Generator,
                  w_range=(1.0, 5.0), huber_c: float = 1e-3) -> torch.Tensor:  # fmt: skip
    """One consistency-distillation loss on clean latents ``z0`` with prompt embeddings ``emb`` (``uncond``: "")."""
    n = len(z0)
    acp = solver.alphas_cumprod
    index = torch.randint(0, len(solver.timesteps), (n,), generator=gen)
    t_start = solver.timesteps[index]
    t_end = (t_start - solver.k).clamp(min=0)
    noise = torch.randn(z0.shape, generator=gen)
    a_s = acp[t_start].view(-1, 1, 1, 1)
    x = a_s.sqrt() * z0 + (1 - a_s).sqrt() * noise
    w = w_range[0] + (w_range[1] - w_range[0]) * torch.rand(n, generator=gen)
    w_emb = guidance_embedding(w, student.config.time_cond_proj_dim)
    w4 = w.view(-1, 1, 1, 1)

    cs_s, co_s = boundary_scalings(t_start)
    eps = student(x, t_start, emb, timestep_cond=w_emb).sample
    pred = cs_s * x + co_s * _x0(eps, x, a_s)

    with torch.no_grad():
        both = teacher(torch.cat([x, x]), torch.cat([t_start, t_start]), torch.cat([emb, uncond.expand(n, -1, -1)])).sample
        e_c, e_u = both.chunk(2)
        x0_c, x0_u = _x0(e_c, x, a_s), _x0(e_u, x, a_s)
        x0_g = x0_c + w4 * (x0_c - x0_u)  # CFG scale 1 + w, as the diffusers script (and pipeline: w = g - 1)
        e_g = e_c + w4 * (e_c - e_u)
        x_prev = solver.step(x0_g, e_g, index)
        a_e = acp[t_end].view(-1, 1, 1, 1)
        eps_t = target(x_prev, t_end, emb, timestep_cond=w_emb).sample
        cs_e, co_e = boundary_scalings(t_end)
        tgt = cs_e * x_prev + co_e * _x0(eps_t, x_prev, a_e)
    return (torch.sqrt((pred - tgt) ** 2 + huber_c**2) - huber_c).mean()


def _command(argv: list[str], out: str) -> str:
    return recorded_command("fusionloader.pretrained.train_lcm", argv, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (e.g. fusionloader/assets/digits-lcm)")
    ap.add_argument("--teacher", default=default_model_path())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ema", type=float, default=0.95, help="target network EMA (the LCM paper's mu)")
    ap.add_argument("--num-ddim-timesteps", type=int, default=50)
    ap.add_argument("--w-min", type=float, default=1.0, help="guidance w = guidance_scale - 1")
    ap.add_argument("--w-max", type=float, default=5.0)
    ap.add_argument("--cond-dim", type=int, default=256, help="time_cond_proj_dim of the student")
    ap.add_argument("--uncond-prob", type=float, default=0.0, help="prompt dropout (the student always sees its prompt)")
    ap.add_argument("--fp16-unet", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)

    from diffusers import LCMScheduler, StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    torch.manual_seed(args.seed)
    teacher_pipe = StableDiffusionPipeline.from_pretrained(args.teacher, torch_dtype=torch.float32, safety_checker=None,
                                                           requires_safety_checker=False)  # fmt: skip
    vae, text_encoder, tokenizer, teacher = teacher_pipe.vae, teacher_pipe.text_encoder, teacher_pipe.tokenizer, teacher_pipe.unet
    for m in (vae, text_encoder, teacher):
        m.eval().requires_grad_(False)
    scaling = vae.config.scaling_factor

    splits = load_digits_splits(size=teacher_pipe.vae.config.sample_size)
    x = splits.generator.images * 2 - 1
    labels = splits.generator.labels
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        lat_mean, lat_std = post.mean.clone(), post.std.clone()
        prompts = [""] + [t.format(c) for c in class_names for t in TRAIN_TEMPLATES]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        table = text_encoder(ids)[0]  # every prompt's embedding, once: the text encoder is frozen
    n_t = len(TRAIN_TEMPLATES)
    _log(f"teacher {recorded_path(args.teacher)}; {len(labels)} generator latents; threads {torch.get_num_threads()}")

    student = make_student(teacher, args.cond_dim).train()
    target = copy.deepcopy(student).eval().requires_grad_(False)
    solver = DDIMSolver(teacher_pipe.scheduler.alphas_cumprod, args.num_ddim_timesteps)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 10)
    t0 = time.time()
    loss_avg = 0.0
    for step in range(args.steps):
        idx = torch.randint(0, len(labels), (args.batch,), generator=gen)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        tmpl = torch.where(torch.rand(args.batch, generator=gen) < 0.5, torch.zeros(args.batch, dtype=torch.long),
                           torch.randint(1, n_t, (args.batch,), generator=gen))  # fmt: skip
        row = 1 + labels[idx] * n_t + tmpl
        row = torch.where(torch.rand(args.batch, generator=gen) < args.uncond_prob, torch.zeros_like(row), row)
        loss = lcm_step_loss(student, target, teacher, solver, z0, table[row], table[:1], gen, (args.w_min, args.w_max))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for p, q in zip(student.parameters(), target.parameters()):
                q.lerp_(p, 1 - args.ema)
        loss_avg = 0.95 * loss_avg + 0.05 * loss.item() if step else loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t0
            _log(f"lcm step {step}/{args.steps} loss {loss_avg:.5f} ({el:.0f}s, eta {el / (step + 1) * (args.steps - step - 1):.0f}s)")
    train_seconds = time.time() - t0

    # The target (EMA) network is the one shipped, as in the diffusers script.
    unet = target.half() if args.fp16_unet else target
    scheduler = LCMScheduler.from_config(teacher_pipe.scheduler.config, original_inference_steps=args.num_ddim_timesteps,
                                         timestep_scaling=TIMESTEP_SCALING)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    info = {
        "command": _command(argv if argv is not None else sys.argv[1:], args.out),
        "teacher": recorded_path(args.teacher),
        "seed": args.seed,
        "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("out", "teacher")},
        "final_loss": loss_avg,
        "train_seconds": train_seconds,
    }
    info = write_train_info(args.out, info, t_start)
    _log(f"saved to {recorded_path(args.out)}; wall {info['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
