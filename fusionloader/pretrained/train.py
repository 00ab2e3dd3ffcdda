"""Train the embedded default model (a tiny class-conditioned latent diffusion model on sklearn digits).

    python -m fusionloader.pretrained.train --out fusionloader/assets/digits-ldm

Runs on CPU (no download, no GPU needed); with the defaults it takes about half an hour on two shared
cores. Seeded and, on CPU, deterministic (``torch.use_deterministic_algorithms``), so the same command on
the same torch build gives the same weights.

What it does, in order:

1. Data: ``load_digits_splits()`` (see ``fusionloader.pretrained``); only the *generator* split
   (898 images, 32x32, grey in 3 channels, scaled to [-1, 1] as SD expects) is used.
2. VAE: an ``AutoencoderKL`` with channels (16, 32, 64): 32x32x3 pixels <-> 8x8x4 latents; MSE plus a
   small KL term, random +-2 px shifts as augmentation. ``scaling_factor`` is then set to
   1 / std of the generator latents so the UNet sees ~unit-variance latents (as SD's 0.18215 does).
3. UNet + text encoder: a ``UNet2DConditionModel`` (channels 64/128/128, cross-attention at 8x8 and
   4x4) and a small ``CLIPTextModel`` (64 wide, 2 layers, tokenizer from
   ``fusionloader.components.build_clip_tokenizer`` in which every class name is one token), trained
   jointly with epsilon prediction on SD-1.x's scaled-linear 1000-step schedule, min-SNR(5) loss
   weighting, EMA weights, several prompt templates and 10% prompt dropout to "" (so classifier-free
   guidance works).
4. Save: ``StableDiffusionImg2ImgPipeline.save_pretrained`` with a ``DDIMScheduler`` in SD-1.x settings
   (scaled_linear 0.00085..0.012, steps_offset 1, set_alpha_to_one False, clip_sample False, leading
   spacing), no safety checker. The UNet is stored in fp16 to stay under 20 MB; diffusers loads it as
   float32 unless asked otherwise. ``train_info.json`` records the run.

Measure the result with ``python -m fusionloader.pretrained.evaluate``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from fusionloader.pretrained import (
    TRAIN_TEMPLATES, class_names, load_digits_splits, recorded_command, recorded_path, write_train_info,
)

EXTRA_WORDS = ("handwritten", "number", "photograph", "black", "white")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _lr_lambda(warmup: int, total: int, floor: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random integer translation per image, padding with the background value (-1)."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    d = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([pad[i, :, d[i, 0] : d[i, 0] + h, d[i, 1] : d[i, 1] + w] for i in range(n)])


def _command(argv: list[str], out: str) -> str:
    return recorded_command("fusionloader.pretrained.train", argv, out)


def build_components(seed: int):
    """Fresh (untrained) VAE, UNet, text encoder, tokenizer and scheduler of the shipped model's shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from fusionloader.pretrained import components

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    with tempfile.TemporaryDirectory() as tmp:
        words = tuple(components.DEFAULT_WORDS) + tuple(w for w in EXTRA_WORDS if w not in components.DEFAULT_WORDS)
        tokenizer = components.build_clip_tokenizer(tmp, words)
    text_hidden = 64
    text_encoder = components.build_clip_text_encoder(tokenizer, text_hidden, layers=2, intermediate_size=4 * text_hidden)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_hidden,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = components.sd1_scheduler("epsilon")
    for m in (vae, unet, text_encoder):
        m.train()
    return vae, unet, text_encoder, tokenizer, scheduler


def train_vae(vae, x: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, steps))
    t0 = time.time()
    rec_avg = kl_avg = 0.0
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb = _shift(x[idx], gen, 2)
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, xb, reduction="none").flatten(1).sum(1).mean()
        kl = post.kl().mean()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        rec_avg = 0.98 * rec_avg + 0.02 * rec_loss.item() / xb[0].numel() if step else rec_loss.item() / xb[0].numel()
        kl_avg = 0.98 * kl_avg + 0.02 * kl.item() if step else kl.item()
        if step % 100 == 0 or step == steps - 1:
            _log(f"vae step {step}/{steps} mse/px {rec_avg:.5f} kl {kl_avg:.1f} ({time.time() - t0:.0f}s)")
    return {"vae_final_mse_per_px": rec_avg, "vae_final_kl": kl_avg, "vae_seconds": time.time() - t0}


def train_unet(unet, text_encoder, tokenizer, scheduler, lat_mean, lat_std, labels, args) -> dict:
    gen = torch.Generator().manual_seed(args.seed + 2)
    # All prompts the run can draw, tokenized once; row 0 is the empty (unconditional) prompt.
    prompts = [""] + [t.format(c) for c in class_names for t in TRAIN_TEMPLATES]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    n_t = len(TRAIN_TEMPLATES)

    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for p in list(ema_unet.parameters()) + list(ema_text.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.AdamW(
        [
            {"params": unet.parameters(), "lr": args.unet_lr},
            {"params": text_encoder.parameters(), "lr": args.text_lr},
        ],
        weight_decay=1e-2,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(200, args.unet_steps))
    acp = scheduler.alphas_cumprod.float()
    snr = acp / (1 - acp)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction
    params = list(unet.parameters()) + list(text_encoder.parameters())
    t0 = time.time()
    loss_avg = 0.0
    for step in range(args.unet_steps):
        idx = torch.randint(0, len(labels), (args.batch,), generator=gen)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * args.scaling_factor
        # Template choice: PROMPT_TEMPLATE half of the time, one of the others otherwise; 10% dropout.
        tmpl = torch.where(
            torch.rand(args.batch, generator=gen) < 0.5,
            torch.zeros(args.batch, dtype=torch.long),
            torch.randint(1, n_t, (args.batch,), generator=gen),
        )
        row = 1 + labels[idx] * n_t + tmpl
        row = torch.where(torch.rand(args.batch, generator=gen) < args.uncond_prob, torch.zeros_like(row), row)
        uniq, inv = torch.unique(row, return_inverse=True)
        emb = text_encoder(ids[uniq])[0][inv]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        pred = unet(a * z0 + s * noise, t, emb).sample
        loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in ((unet, ema_unet), (text_encoder, ema_text)):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - decay)
        loss_avg = 0.98 * loss_avg + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == args.unet_steps - 1:
            el = time.time() - t0
            eta = el / (step + 1) * (args.unet_steps - step - 1)
            _log(f"unet step {step}/{args.unet_steps} loss {loss_avg:.4f} ({el:.0f}s, eta {eta:.0f}s)")
    return {"unet_final_loss": loss_avg, "unet_seconds": time.time() - t0, "ema_unet": ema_unet, "ema_text": ema_text}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (e.g. fusionloader/assets/digits-ldm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (results can differ in the last bits with another count)")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-4, help="KL weight against per-image summed MSE")
    ap.add_argument("--unet-steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--unet-lr", type=float, default=3e-4)
    ap.add_argument("--text-lr", type=float, default=1e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--uncond-prob", type=float, default=0.1)
    ap.add_argument("--fp16-unet", action=argparse.BooleanOptionalAction, default=True, help="store UNet weights in fp16")
    args = ap.parse_args(argv)

    from diffusers import StableDiffusionImg2ImgPipeline

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    splits = load_digits_splits()
    x = splits.generator.images * 2 - 1  # SD pixel range
    labels = splits.generator.labels
    _log(f"generator split: {len(labels)} images {tuple(x.shape[1:])}; threads {torch.get_num_threads()}")

    vae, unet, text_encoder, tokenizer, scheduler = build_components(args.seed)
    info = {"command": _command(argv if argv is not None else sys.argv[1:], args.out)}
    info.update(train_vae(vae, x, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight, args.seed))

    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        lat_mean, lat_std = post.mean.clone(), post.std.clone()
        rec = vae.decode(post.mean).sample
        g = torch.Generator().manual_seed(args.seed + 3)
        sample = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=g)
        args.scaling_factor = float(1.0 / sample.std())
        test_x = splits.test.images * 2 - 1
        test_rec = vae.decode(vae.encode(test_x).latent_dist.mean).sample
    vae.register_to_config(scaling_factor=args.scaling_factor)
    info["vae_recon_mse_generator"] = float(F.mse_loss(rec, x))
    info["vae_recon_mse_heldout_test"] = float(F.mse_loss(test_rec, test_x))
    info["scaling_factor"] = args.scaling_factor
    _log(f"scaling_factor {args.scaling_factor:.4f}; recon mse gen {info['vae_recon_mse_generator']:.5f} heldout {info['vae_recon_mse_heldout_test']:.5f}")

    res = train_unet(unet, text_encoder, tokenizer, scheduler, lat_mean, lat_std, labels, args)
    ema_unet, ema_text = res.pop("ema_unet"), res.pop("ema_text")
    info.update(res)

    if args.fp16_unet:
        ema_unet = ema_unet.half()
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=ema_text,
        tokenizer=tokenizer,
        unet=ema_unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    os.makedirs(args.out, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    info.update(
        {
            "seed": args.seed,
            "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("out",)},
            "train_templates": list(TRAIN_TEMPLATES),
            "generator_images": len(labels),
        }
    )
    info = write_train_info(args.out, info, t_start)
    _log(f"saved to {recorded_path(args.out)} ({size / 1e6:.2f} MB); wall {info['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
