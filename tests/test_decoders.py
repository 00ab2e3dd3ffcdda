"""Per-request decoders (engine/decoders.py): decoder="tiny" runs an AutoencoderTiny loaded from the checkpoint's
vae_tiny/ folder (or a user path, or TAESD's original taesd_decoder.pth), beside "vae" requests in one batch."""

import os
import shutil

import pytest
import torch

from fusionloader.engine import Request, Synthesizer
from fusionloader.engine.decoders import TINY_SUBFOLDER, load_tiny_decoder

STEPS = 4


def _tiny(seed=0, channels=(16, 16)):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    # 16 px latents -> 32 px images: two blocks, one 2x upsampling... the factor must match the VAE's (2 here).
    return AutoencoderTiny(
        encoder_block_out_channels=channels, decoder_block_out_channels=channels, num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4, upsampling_scaling_factor=2,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def with_tiny(tiny_sd1_path, tmp_path_factory):
    """The tiny SD-1 checkpoint plus a vae_tiny/ folder written by save_pretrained."""
    path = str(tmp_path_factory.mktemp("with-tiny") / "ckpt")
    shutil.copytree(tiny_sd1_path, path)
    _tiny().save_pretrained(os.path.join(path, TINY_SUBFOLDER))
    return path


def _requests(synth, decoders):
    g = torch.Generator().manual_seed(5)
    out = []
    for k, dec in enumerate(decoders):
        mean = torch.randn(synth.latent_shape, generator=g)
        out.append(Request(key=k, prompt="a cat", strength=[1.0, 0.5, 0.75][k % 3], guidance_scale=7.5,
                           num_inference_steps=STEPS, seed=k, latent_mean=mean, decoder=dec))  # fmt: skip
    return out


def _drain(synth, reqs, capacity, **kw):
    sampler = synth.sampler(capacity=capacity, return_latents=True, **kw)
    for r in reqs:
        sampler.submit(r)
    return {f.key: f for f in sampler.drain()}, sampler


def test_tiny_decoder_from_the_checkpoint_folder(with_tiny):
    synth = Synthesizer.from_pretrained(with_tiny, scheduler="ddim")
    reqs = _requests(synth, ["vae", "tiny", "tiny", "vae", "tiny"])
    done, sampler = _drain(synth, reqs, capacity=5, decode_chunk=2)
    reference = _tiny().eval()  # the very weights that were saved
    for r in reqs:
        f = done[r.key]
        if r.decoder == "tiny":
            expected = reference.decode(f.latents[None], return_dict=False)[0][0]
        else:
            vae = synth.components.vae
            expected = vae.decode(f.latents[None] / vae.config.scaling_factor, return_dict=False)[0][0]
        torch.testing.assert_close(f.image, (expected / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)
        assert f.finite
    # A request in a mixed batch gets what it gets alone (to the UNet's batch-size-dependent last bits).
    for r in _requests(synth, ["vae", "tiny"]):
        alone, _ = _drain(synth, [r], capacity=1)
        torch.testing.assert_close(alone[r.key].image, done[r.key].image, rtol=0, atol=1e-4)


def test_mixed_decoders_into_out_rows(with_tiny):
    synth = Synthesizer.from_pretrained(with_tiny, scheduler="ddim")
    out = torch.zeros((6, 3, 32, 32), dtype=torch.uint8)
    reqs = _requests(synth, ["tiny", "vae", "tiny"])
    for r, row in zip(reqs, [5, 0, 2]):
        r.out_row = row
    sampler = synth.sampler(capacity=3, out=out)
    sampler.trace = []
    for r in reqs:
        sampler.submit(r)
    done = {f.key: f for f in sampler.drain()}
    assert done[0].image.data_ptr() == out[5].data_ptr() and out[[1, 3, 4]].sum() == 0
    assert out[5].float().sum() > 0 and out[2].float().sum() > 0
    assert ("decode_tiny", 1) in sampler.trace
    plain = {}
    for r in _requests(synth, ["tiny", "vae", "tiny"]):
        one = torch.zeros((1, 3, 32, 32), dtype=torch.uint8)
        r.out_row = 0
        s = synth.sampler(capacity=1, out=one)
        s.submit(r)
        list(s.drain())
        plain[r.key] = one[0]
    for k, row in zip(range(3), [5, 0, 2]):
        assert (plain[k].int() - out[row].int()).abs().max() <= 1


def test_user_path_module_and_original_taesd_weights(tiny_sd1_path, tmp_path):
    # A diffusers-format folder given by path, a module, and TAESD's original decoder file (default TAESD config).
    folder = tmp_path / "taesd"
    _tiny(seed=1).save_pretrained(folder)
    latents = torch.randn(2, 4, 16, 16)
    by_path = load_tiny_decoder(folder, "cpu", torch.float32)
    torch.testing.assert_close(by_path.decode(latents).sample, _tiny(seed=1).decode(latents).sample)
    from diffusers import AutoencoderTiny

    torch.manual_seed(2)
    full = AutoencoderTiny().eval()  # madebyollin/taesd's shape
    original = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v
                for k, v in full.state_dict().items() if k.startswith("decoder.layers.")}  # fmt: skip
    (tmp_path / "orig").mkdir()
    torch.save(original, tmp_path / "orig" / "taesd_decoder.pth")
    loaded = load_tiny_decoder(tmp_path / "orig", "cpu", torch.float32)
    small = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(loaded.decode(small).sample, full.decode(small).sample)
    torch.save({"encoder.0.weight": torch.zeros(1)}, tmp_path / "orig" / "taesd_decoder.pth")
    with pytest.raises(ValueError, match="unexpected key"):
        load_tiny_decoder(tmp_path / "orig", "cpu", torch.float32)
    # Through the Synthesizer: tiny_decoder= a module.
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim", tiny_decoder=_tiny(seed=1))
    done, _ = _drain(synth, _requests(synth, ["tiny"]), capacity=1)
    expected = _tiny(seed=1).decode(done[0].latents[None]).sample[0]
    torch.testing.assert_close(done[0].image, (expected / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_tiny_without_a_tiny_decoder_is_rejected(tiny_sd1_path, tmp_path):
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim")
    with pytest.raises(ValueError, match="no tiny decoder.*vae_tiny"):
        synth.sampler(capacity=1).submit(_requests(synth, ["tiny"])[0])
    with pytest.raises(ValueError, match="decoder must be one of"):
        synth.sampler(capacity=1).submit(_requests(synth, ["taesd"])[0])
    from fusionloader.engine.errors import MissingComponentError

    with pytest.raises(MissingComponentError, match="taesd_decoder"):
        load_tiny_decoder(tmp_path, "cpu", torch.float32)


def test_augment_decoder_option(with_tiny):
    synth = Synthesizer.from_pretrained(with_tiny, scheduler="ddim")
    images = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    kw = dict(strengths=0.75, num_inference_steps=STEPS, seeds=[1, 2])
    vae = synth.augment(images, ["a cat", "a dog"], **kw)
    mixed = synth.augment(images, ["a cat", "a dog"], decoder=["tiny", "vae"], **kw)
    assert (vae[0] - mixed[0]).abs().max() > 1e-3
    torch.testing.assert_close(vae[1], mixed[1], rtol=0, atol=1e-6)
