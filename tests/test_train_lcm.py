"""The LCM-distillation and tiny-autoencoder training scripts: a few steps on a tiny model, deterministic,
saving folders diffusers loads as the shipped ones are loaded."""

import json
import os

import pytest
import torch

pytest.importorskip("sklearn", reason="the training data (sklearn digits) needs scikit-learn (extra 'demo')")

from fusionloader.pretrained import train_lcm, train_taesd  # noqa: E402


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def test_student_starts_as_the_teacher(tiny_sd1_path):
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(os.path.join(tiny_sd1_path, "unet"))
    student = train_lcm.make_student(teacher, cond_dim=16)
    assert student.config.time_cond_proj_dim == 16
    x = torch.randn(2, teacher.config.in_channels, 16, 16)
    emb = torch.randn(2, 77, teacher.config.cross_attention_dim)
    t = torch.tensor([999, 19])
    w = train_lcm.guidance_embedding(torch.tensor([2.0, 4.0]), 16)
    with torch.no_grad():  # zero-initialised guidance projection: any w gives the teacher's prediction
        torch.testing.assert_close(student(x, t, emb, timestep_cond=w).sample, teacher(x, t, emb).sample)


def test_boundary_scalings_and_solver_match_lcm_scheduler():
    from diffusers import LCMScheduler

    from fusionloader.pretrained.components import sd1_scheduler

    sched = LCMScheduler.from_config(sd1_scheduler().config, original_inference_steps=50)
    t = torch.tensor([0, 19, 259, 999])
    c_skip, c_out = train_lcm.boundary_scalings(t)
    for i, ti in enumerate(t.tolist()):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(float(ref_skip)) and c_out[i].item() == pytest.approx(float(ref_out))
    solver = train_lcm.DDIMSolver(sched.alphas_cumprod, 50)
    sched.set_timesteps(50)  # LCM at 50 steps visits exactly the distillation grid
    assert sorted(sched.timesteps.tolist()) == solver.timesteps.tolist()
    # One DDIM step from grid point i lands on alpha at grid point i - 1 (alphas_cumprod[0] from the first).
    x0, eps = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    out = solver.step(x0, eps, torch.tensor([0, 5]))
    assert out.flatten().tolist() == pytest.approx(
        [sched.alphas_cumprod[0].sqrt().item(), sched.alphas_cumprod[solver.timesteps[4]].sqrt().item()])


def test_train_lcm_is_deterministic_and_loads_as_lcm(tiny_sd1_path, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    args = ["--teacher", tiny_sd1_path, "--steps", "2", "--batch", "2", "--cond-dim", "16", "--no-fp16-unet"]
    for name in ("a", "b"):
        assert train_lcm.main(["--out", str(tmp_path / name), *args]) == 0
    wa, wb = _weights(tmp_path / "a" / "unet"), _weights(tmp_path / "b" / "unet")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert wa["time_embedding.cond_proj.weight"].abs().sum() > 0  # the guidance projection was trained
    info = json.load(open(tmp_path / "a" / "train_info.json"))
    assert info["train_seconds"] > 0 and info["hyperparameters"]["steps"] == 2 and str(tmp_path) not in info["command"]
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a"), safety_checker=None, requires_safety_checker=False)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 50
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of the digit one", num_inference_steps=2, guidance_scale=3.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all()


def test_train_taesd_is_deterministic_and_loads_as_autoencoder_tiny(tiny_sd1_path, tmp_path):
    from diffusers import AutoencoderKL, AutoencoderTiny

    args = ["--model", tiny_sd1_path, "--steps", "3", "--batch", "4", "--copies", "1"]
    for name in ("a", "b"):
        assert train_taesd.main(["--out", str(tmp_path / name), *args]) == 0
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    tiny = AutoencoderTiny.from_pretrained(str(tmp_path / "a"))
    vae = AutoencoderKL.from_pretrained(os.path.join(tiny_sd1_path, "vae"))
    assert tiny.config.scaling_factor == 1.0  # TAESD convention: decodes scaled latents as they are
    z = torch.randn(2, vae.config.latent_channels, 16, 16)
    with torch.no_grad():
        assert tiny.decode(z).sample.shape == vae.decode(z).sample.shape
        assert tiny.encode(torch.zeros(2, 3, 32, 32)).latents.shape == z.shape
    info = json.load(open(tmp_path / "a" / "train_info.json"))
    assert info["heldout_decoder_mse_vs_kl_decoder"] >= 0 and info["parameters"] > 0


def test_taesd_loss_falls_on_a_fixed_batch(tiny_sd1_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(os.path.join(tiny_sd1_path, "vae")).eval()
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    z, img, mean = train_taesd.kl_targets(vae, x, torch.Generator().manual_seed(0))
    tiny = train_taesd.build_tiny(vae.config.latent_channels, levels=len(vae.config.block_out_channels))
    opt = torch.optim.Adam(tiny.parameters(), lr=2e-3)
    first = None
    for _ in range(30):
        dec, enc = train_taesd.taesd_losses(tiny, x, z, img, mean)
        first = first if first is not None else (dec + enc).item()
        opt.zero_grad()
        (dec + enc).backward()
        opt.step()
    assert (dec + enc).item() < 0.5 * first
