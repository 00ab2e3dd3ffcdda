"""Loading: checkpoint folder or pipeline object, dtypes, schedulers, attention backends, tiny decoder, errors."""

import json
import pathlib
import shutil

import pytest
import torch

from fusionloader.engine import MissingComponentError, Synthesizer, load_components
from fusionloader.engine.models import components_from_pipe



def test_load_folder(tiny_path):
    c = load_components(tiny_path)
    assert type(c.unet).__name__ == "UNet2DConditionModel" and type(c.vae).__name__ == "AutoencoderKL"
    assert c.decoder is c.vae and c.resolution == (32, 32) and c.latent_channels == 4
    assert c.scaling_factor == pytest.approx(0.18215)
    assert type(c.scheduler).__name__ == "DDIMScheduler"  # the checkpoint's own
    assert not any(p.requires_grad for p in c.unet.parameters())
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in c.unet.attn_processors.values())


@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler"),
                                      ("dpmpp_2m", "DPMSolverMultistepScheduler")])  # fmt: skip
def test_named_schedulers(name, cls, tiny_sd2_path):
    c = load_components(tiny_sd2_path, scheduler=name)
    assert type(c.scheduler).__name__ == cls
    assert c.scheduler.config.prediction_type == "v_prediction"  # configured from the checkpoint


def test_half_unet_with_fp32_vae(tiny_sd1_path):
    c = load_components(tiny_sd1_path, dtype=torch.float16, vae_dtype=torch.float32)
    assert c.unet.dtype == torch.float16 and c.text_encoder.dtype == torch.float16
    assert c.vae.dtype == torch.float32 and c.vae_dtype == torch.float32


def test_attention_errors(tiny_sd1_path):
    with pytest.raises(RuntimeError, match="xformers"):
        load_components(tiny_sd1_path, attention="xformers")
    with pytest.raises(ValueError, match="unknown attention backend"):
        load_components(tiny_sd1_path, attention="flash")


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_names_folder_and_component(component, tiny_sd1_path, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_sd1_path, broken)
    shutil.rmtree(broken / component)
    with pytest.raises(MissingComponentError) as err:
        load_components(str(broken))
    assert err.value.component == component and str(broken) in str(err.value)


def test_component_listed_as_null(tiny_sd1_path, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_sd1_path, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(MissingComponentError, match="text_encoder"):
        load_components(str(broken))


def test_weights_missing_inside_component(tiny_sd1_path, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_sd1_path, broken)
    for f in (broken / "vae").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(MissingComponentError, match="'vae'"):
        load_components(str(broken))


def test_from_pipe_shares_modules(tiny_sd1_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd1_path, safety_checker=None)
    synth = Synthesizer(pipe, scheduler="dpmpp_2m")
    assert synth.components.unet is pipe.unet and synth.components.vae is pipe.vae
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # the pipeline's own scheduler is left alone
    pipe.tokenizer = None
    with pytest.raises(MissingComponentError, match="tokenizer"):
        components_from_pipe(pipe)


def test_tiny_decoder(tiny_sd1_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4,
    )  # fmt: skip
    synth = Synthesizer.from_pretrained(tiny_sd1_path, tiny_vae=tiny)
    assert synth.components.decoder is not synth.components.vae
    assert synth.components.decoder_scaling_factor == 1.0
    images = torch.rand(2, 3, 32, 32)
    out, lat = synth.augment(images, ["a cat"] * 2, num_inference_steps=4, seeds=[1, 2], return_latents=True)
    ref = tiny.decode(lat, return_dict=False)[0]  # TAESD decodes the scaled latents directly
    assert (out - (ref / 2 + 0.5).clamp(0, 1)).abs().max().item() <= 1e-5


# ------------------------------------------------------------------- CUDA defaults (selection, on CPU)


def test_default_precision_by_device():
    from fusionloader.engine.models import default_precision

    assert default_precision("cpu") == (torch.float32, torch.float32)
    assert default_precision("cpu", torch.float16) == (torch.float16, torch.float16)  # CPU: unchanged behaviour
    assert default_precision("cuda:3") == (torch.float16, torch.float32)
    assert default_precision("cuda", "bf16") == (torch.bfloat16, torch.float32)
    assert default_precision("cuda:0", torch.float32, "fp16") == (torch.float32, torch.float16)
    with pytest.raises(ValueError, match="dtype='fp8'"):
        default_precision("cuda", "fp8")


def _as_pndm(src, dst):
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg_path = dst / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "PNDMScheduler"
    cfg.pop("clip_sample", None)  # SD-1.x PNDM configs may lack it; DDIM's default would clip
    cfg["skip_prk_steps"] = True
    cfg_path.write_text(json.dumps(cfg))
    index = json.loads((dst / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (dst / "model_index.json").write_text(json.dumps(index))
    return str(dst)


def test_cuda_checkpoint_gets_fp16_and_a_fused_scheduler(tiny_sd1_path, tmp_path, monkeypatch, caplog):
    # The device is only a name here: placement is patched to cast without moving, so nothing touches CUDA.
    import logging

    from fusionloader.engine import models
    from fusionloader.engine.schedules import fused_kind

    def place(module, device, dtype):
        p = next(module.parameters(), None)
        if p is not None and p.dtype != dtype:
            module = torch.nn.Module.to(module, dtype)
        return module.eval().requires_grad_(False)

    monkeypatch.setattr(models, "_place", place)
    path = _as_pndm(pathlib.Path(tiny_sd1_path), tmp_path / "pndm")
    with caplog.at_level(logging.WARNING, logger="fusionloader.engine.models"):
        synth = Synthesizer.from_pretrained(path, device="cuda:1")
    c = synth.components
    assert c.device == torch.device("cuda", 1)
    assert c.unet.dtype == c.text_encoder.dtype == torch.float16 and c.vae.dtype == torch.float32
    assert type(c.scheduler).__name__ == "DDIMScheduler" and fused_kind(c.scheduler) == "ddim"
    assert c.scheduler.config.steps_offset == 1 and c.scheduler.config.beta_schedule == "scaled_linear"
    assert "PNDMScheduler has no fused kernel" in caplog.text and "DDIMScheduler" in caplog.text
    # Overrides win: bf16, the checkpoint's own scheduler, or a named one.
    kept = Synthesizer.from_pretrained(path, device="cuda:1", dtype="bf16", scheduler="checkpoint")
    assert kept.components.unet.dtype == torch.bfloat16 and kept.components.vae.dtype == torch.float32
    assert type(kept.components.scheduler).__name__ == "PNDMScheduler"
    named = Synthesizer.from_pretrained(path, device="cuda:1", scheduler="dpmpp_2m")
    assert fused_kind(named.components.scheduler) == "dpmpp_2m"
    # CPU: fp32, the checkpoint's scheduler, as before.
    cpu = Synthesizer.from_pretrained(path)
    assert cpu.components.unet.dtype == cpu.components.vae.dtype == torch.float32
    assert type(cpu.components.scheduler).__name__ == "PNDMScheduler"
