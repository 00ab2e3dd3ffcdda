"""Train a tiny autoencoder (diffusers ``AutoencoderTiny``, TAESD-shaped) for the embedded model.

    python -m fusionloader.pretrained.train_taesd --out fusionloader/assets/digits-ldm/vae_tiny

TAESD (madebyollin/taesd) is a small conv-only encoder/decoder distilled from Stable Diffusion's VAE: it
decodes *scaled* latents (``scaling_factor`` 1.0, so ``vae.config.scaling_factor * posterior`` goes in as is)
to images in [-1, 1], and encodes images to scaled latents. This does the same for ``digits-ldm``'s VAE:

* decoder: ``tiny.decode(z)`` is fitted (MSE) to the KL VAE's ``vae.decode(z / scaling_factor)`` on latents
  drawn from the posteriors of the *generator* split (mean + std x noise, +-2 px shifted images; a bank of
  ``--copies`` such draws per image, computed once), so it
  matches what the big decoder makes of the latents the sampler produces, not only of clean encodings;
* encoder: ``tiny.encode(x)`` is fitted to ``scaling_factor x`` the posterior mean of the same images.

Seeded, deterministic algorithms, CPU. The folder it writes loads with ``AutoencoderTiny.from_pretrained``,
which is what ``Synthesizer(..., tiny_vae=PATH)`` and the engine's ``decoder="tiny"`` option read (the
engine looks for ``vae_tiny/`` inside the checkpoint). ``train_info.json`` records the run and the held-out
(classifier-test split) errors against the KL VAE.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from fusionloader.pretrained import default_model_path, load_digits_splits, recorded_path, write_train_info

__all__ = ["build_tiny", "kl_targets", "main", "taesd_losses"]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_tiny(latent_channels: int = 4, levels: int = 3, channels: int = 16):
    """An ``AutoencoderTiny`` with ``levels`` resolutions (``levels - 1`` down/upsamplings: factor 4 for
    digits-ldm's 3-level VAE), ``channels`` wide; the extra block sits at the latent resolution, where it is cheap.
    (``DecoderTiny`` needs one width for all levels.)"""
    from diffusers import AutoencoderTiny

    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    return AutoencoderTiny(
        in_channels=3, out_channels=3, encoder_block_out_channels=(channels,) * levels,
        decoder_block_out_channels=(channels,) * levels, num_encoder_blocks=(1,) * (levels - 1) + (2,),
        num_decoder_blocks=(2,) + (1,) * (levels - 1), latent_channels=latent_channels, scaling_factor=1.0,
    )  # fmt: skip


def kl_targets(vae, x: torch.Tensor, gen: torch.Generator, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KL VAE's answers for images ``x`` in [-1, 1]: (sampled scaled latents z, ``vae.decode(z / sf)``,
    scaled posterior means). Computed once into a bank, so training runs only the tiny model."""
    sf = vae.config.scaling_factor
    zs, imgs, means = [], [], []
    with torch.no_grad():
        for a in range(0, len(x), chunk):
            post = vae.encode(x[a : a + chunk]).latent_dist
            z = (post.mean + post.std * torch.randn(post.mean.shape, generator=gen)) * sf
            zs.append(z)
            imgs.append(vae.decode(z / sf).sample)
            means.append(post.mean * sf)
    return torch.cat(zs), torch.cat(imgs), torch.cat(means)


def taesd_losses(tiny, x, z, target_img, target_lat) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder MSE against the KL decoder's image of ``z``, encoder MSE against the scaled posterior mean of ``x``)."""
    return F.mse_loss(tiny.decode(z).sample, target_img), F.mse_loss(tiny.encode(x).latents, target_lat)


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    d = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([pad[i, :, d[i, 0] : d[i, 0] + h, d[i, 1] : d[i, 1] + w] for i in range(n)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (e.g. fusionloader/assets/digits-ldm/vae_tiny)")
    ap.add_argument("--model", default=default_model_path(), help="the diffusers folder whose VAE is matched")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--copies", type=int, default=4, help="shifted, noise-sampled copies of each image in the target bank")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args(argv)

    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    vae = AutoencoderKL.from_pretrained(os.path.join(args.model, "vae")).eval().requires_grad_(False)
    splits = load_digits_splits(size=vae.config.sample_size)
    x = splits.generator.images * 2 - 1
    gen = torch.Generator().manual_seed(args.seed + 20)
    bank_x = torch.cat([_shift(x, gen, 2) for _ in range(args.copies)])
    bank_z, bank_img, bank_mean = kl_targets(vae, bank_x, gen)
    _log(f"target bank: {len(bank_x)} shifted copies of {len(x)} generator images ({time.time() - t_start:.0f}s)")
    torch.manual_seed(args.seed)
    tiny = build_tiny(vae.config.latent_channels, levels=len(vae.config.block_out_channels)).train()
    opt = torch.optim.AdamW(tiny.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps, eta_min=args.lr * 0.05)
    avg = (0.0, 0.0)
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(bank_x), (args.batch,), generator=gen)
        dec, enc = taesd_losses(tiny, bank_x[idx], bank_z[idx], bank_img[idx], bank_mean[idx])
        opt.zero_grad(set_to_none=True)
        (dec + enc).backward()
        torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
        opt.step()
        sched.step()
        avg = (0.95 * avg[0] + 0.05 * dec.item(), 0.95 * avg[1] + 0.05 * enc.item()) if step else (dec.item(), enc.item())
        if step % 100 == 0 or step == args.steps - 1:
            _log(f"taesd step {step}/{args.steps} dec mse {avg[0]:.5f} enc mse {avg[1]:.5f} ({time.time() - t0:.0f}s)")
    train_seconds = time.time() - t0

    tiny.eval()
    with torch.no_grad():  # held-out figures: the classifier-test split, which neither model was trained on
        xt = splits.test.images * 2 - 1
        sf = vae.config.scaling_factor
        zt = vae.encode(xt).latent_dist.mean * sf
        kl_img = vae.decode(zt / sf).sample
        tiny_img = tiny.decode(zt).sample
        held = {
            "heldout_decoder_mse_vs_kl_decoder": float(F.mse_loss(tiny_img, kl_img)),
            "heldout_kl_decoder_mse_vs_real": float(F.mse_loss(kl_img, xt)),
            "heldout_tiny_decoder_mse_vs_real": float(F.mse_loss(tiny_img, xt)),
            "heldout_encoder_mse_vs_kl_mean": float(F.mse_loss(tiny.encode(xt).latents, zt)),
            "heldout_latent_variance": float(zt.var()),
        }
    os.makedirs(args.out, exist_ok=True)
    tiny.save_pretrained(args.out, safe_serialization=True)
    argv_rec = list(argv if argv is not None else sys.argv[1:])
    for i, a in enumerate(argv_rec):
        if a == "--out" and i + 1 < len(argv_rec):
            argv_rec[i + 1] = recorded_path(args.out)
    info = {
        "command": " ".join(["python -m fusionloader.pretrained.train_taesd", *argv_rec]),
        "model": recorded_path(args.model),
        "seed": args.seed,
        "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
        "parameters": sum(p.numel() for p in tiny.parameters()),
        "kl_vae_parameters": sum(p.numel() for p in vae.parameters()),
        "final_decoder_mse": avg[0],
        "final_encoder_mse": avg[1],
        **held,
        "train_seconds": train_seconds,
    }
    info = write_train_info(args.out, info, t_start)
    _log(f"saved to {recorded_path(args.out)}; held-out {held}; wall {info['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
