"""LatentCache: encode once, persist without pickle, reload, rebuild on fingerprint mismatch, lazy misses,
sample mode == the pipeline's latent_dist.sample(generator), mean mode deterministic, shared across processes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fusionloader.engine import LatentCache
from fusionloader.engine.latents import preprocess_images



@pytest.fixture(scope="module")
def vae(tiny_sd1_path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_sd1_path, subfolder="vae").eval()


IMAGES = torch.rand((8, 3, 32, 32), generator=torch.Generator().manual_seed(0))


class Loader:
    """load(i) that counts calls."""

    def __init__(self, images=IMAGES):
        self.images, self.calls = images, []

    def __call__(self, i):
        self.calls.append(i)
        return self.images[i]


def test_persist_and_reload(vae, tmp_path):
    load = Loader()
    cache = LatentCache(vae, tmp_path / "c", resolution=32)
    mean, std = cache.get([0, 5, 2, 5], load)
    assert sorted(load.calls) == [0, 2, 5]  # each miss loaded once, duplicates too
    assert mean.shape == (4, 4, 16, 16) and std.shape == mean.shape and (std > 0).all()
    assert len(cache) == 3 and 5 in cache and 1 not in cache
    assert sorted(os.listdir(tmp_path / "c")) == ["data.f32", "index.safetensors", "lock", "present.u8"]
    again = LatentCache(vae, tmp_path / "c", resolution=32)
    load2 = Loader()
    m2, s2 = again.get([0, 5, 2, 5], load2)
    assert load2.calls == [] and not again.rebuilt
    assert torch.equal(m2, mean) and torch.equal(s2, std)


def test_lazy_miss_encodes_only_missing(vae, tmp_path):
    cache = LatentCache(vae, tmp_path, resolution=32, batch_size=2)
    load = Loader()
    cache.get([1, 3], load)
    load.calls.clear()
    mean, _ = cache.get([1, 3, 4, 6, 7], load)
    assert load.calls == [4, 6, 7] and cache.encoded == 5
    ref = vae.encode(2 * IMAGES[[1, 3, 4, 6, 7]] - 1).latent_dist.mean
    assert (mean - ref).abs().max().item() <= 1e-5


def test_fingerprint_mismatch_rebuilds(vae, tmp_path):
    import copy

    cache = LatentCache(vae, tmp_path, resolution=32)
    cache.get([0, 1], Loader())
    other = LatentCache(vae, tmp_path, resolution=32, resize="nearest")  # other preprocessing
    assert other.rebuilt and len(other) == 0 and other.fingerprint != cache.fingerprint
    other.get([0], Loader())
    changed = copy.deepcopy(vae)
    with torch.no_grad():
        changed.quant_conv.weight.mul_(1.01)  # a fine-tuned VAE: same config, other weights
    third = LatentCache(changed, tmp_path, resolution=32, resize="nearest")
    assert third.rebuilt and len(third) == 0
    bigger = LatentCache(vae, tmp_path, resolution=64)
    assert bigger.rebuilt and bigger.latent_shape == (4, 32, 32)


def test_sample_mode_reproduces_pipeline_draw_and_mean_is_deterministic(vae):
    cache = LatentCache(vae, None, resolution=32)
    mean, std = cache.get(range(3), Loader())
    dist = vae.encode(2 * IMAGES[:3] - 1).latent_dist
    expected = dist.sample(torch.Generator().manual_seed(4))
    got = LatentCache.sample(mean, std, torch.Generator().manual_seed(4))
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.equal(LatentCache.sample(mean, std, mode="mean"), mean)
    with pytest.raises(ValueError, match="mode"):
        LatentCache.sample(mean, std, mode="argmax")


def test_build_resizes_and_checks_items(vae, tmp_path):
    big = torch.rand((3, 3, 48, 40))
    cache = LatentCache(vae, tmp_path, resolution=32)
    cache.build(3, Loader(big), batch_size=2, progress=False)
    assert len(cache) == 3
    mean, _ = cache.get([2], Loader(big))
    ref = vae.encode(preprocess_images(big[2:3], (32, 32))).latent_dist.mean
    assert (mean - ref).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        cache.get([5], lambda i: torch.rand(1, 32, 32))


def test_temporary_cache_is_removed(vae):
    cache = LatentCache(vae, None, resolution=32)
    path = cache.path
    assert os.path.isdir(path)
    del cache
    import gc

    gc.collect()
    assert not os.path.exists(path)


def test_another_process_sees_and_extends_the_cache(vae, tiny_sd1_path, tmp_path):
    cache = LatentCache(vae, tmp_path, resolution=32)
    mean, _ = cache.get([0, 1], Loader())
    torch.save(IMAGES, tmp_path / "images.pt")
    script = textwrap.dedent(f"""
        import torch
        from diffusers import AutoencoderKL
        from fusionloader.engine import LatentCache
        torch.set_num_threads(1)
        vae = AutoencoderKL.from_pretrained({tiny_sd1_path!r}, subfolder="vae").eval()
        images = torch.load({str(tmp_path / "images.pt")!r})
        cache = LatentCache(vae, {str(tmp_path)!r}, resolution=32)
        assert not cache.rebuilt and len(cache) == 2
        def load(i):
            assert i >= 2, f"index {{i}} should be cached"
            return images[i]
        mean, _ = cache.get([0, 1, 2], load)
        torch.save(mean, {str(tmp_path / "mean.pt")!r})
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    other = torch.load(tmp_path / "mean.pt")
    assert torch.equal(other[:2], mean)
    assert 2 in cache  # written by the other process, visible here
    load = Loader()
    m2, _ = cache.get([2], load)
    assert load.calls == [] and torch.equal(m2[0], other[2])
