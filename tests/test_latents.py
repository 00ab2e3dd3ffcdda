"""LatentCache: encode once, persist without pickle, reload, one folder per fingerprint, entries keyed by the data
(another dataset at the same path is re-encoded, never served), damaged files rebuilt, private files, shared by
processes (real concurrent writers), node-shared default folder, batched misses off the critical path, one staged
host->device transfer per call, sample mode == the pipeline's latent_dist.sample(generator)."""

import contextlib
import gc
import glob
import logging
import multiprocessing as mp
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from fusionloader.engine import LatentCache
from fusionloader.engine import latents as latents_mod
from fusionloader.engine.latent_store import default_cache_dir, file_digest, private_dir
from fusionloader.engine.latents import preprocess_images, source_digest


@pytest.fixture(autouse=True)
def _node_cache_in_tmp(tmp_path, monkeypatch):
    # path=None is the node-shared folder; keep each test's in its own temp folder.
    monkeypatch.setenv("FUSIONLOADER_LATENT_CACHE", str(tmp_path / "node-cache"))


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
    assert sorted(load.calls) == [0, 2, 5] and cache.encoded == 3  # each item loaded once, duplicates too
    assert mean.shape == (4, 4, 16, 16) and std.shape == mean.shape and (std > 0).all()
    assert len(cache) == 3 and 5 in cache and 1 not in cache
    assert os.listdir(tmp_path / "c") == [cache.fingerprint]
    assert sorted(os.listdir(cache.folder)) == ["data.f32", "digest.bin", "index.json", "lock"]
    again = LatentCache(vae, tmp_path / "c", resolution=32)
    m2, s2 = again.get([0, 5, 2, 5], Loader())
    assert again.encoded == 0 and not again.rebuilt
    assert torch.equal(m2, mean) and torch.equal(s2, std)
    # With a digest function (file stat, an id) hits do not even load the item.
    ids = LatentCache(vae, tmp_path / "d", resolution=32)
    ids.get([0, 5], Loader(), digest=lambda i: f"item-{i}")
    load3 = Loader()
    m3, _ = ids.get([0, 5], load3, digest=lambda i: f"item-{i}")
    assert load3.calls == [] and ids.encoded == 2 and torch.allclose(m3, mean[[0, 1]], atol=1e-5)


def test_lazy_miss_encodes_only_missing(vae, tmp_path):
    cache = LatentCache(vae, tmp_path, resolution=32, batch_size=2)
    cache.get([1, 3], Loader())
    load = Loader()
    mean, _ = cache.get([1, 3, 4, 6, 7], load, digest=lambda i: str(i))
    assert load.calls == [1, 3, 4, 6, 7]  # 1 and 3 were cached under content digests, not under "1", "3"
    load.calls.clear()
    mean, _ = cache.get([1, 3, 4, 6, 7], load, digest=lambda i: str(i))
    assert load.calls == [] and cache.encoded == 7
    ref = vae.encode(2 * IMAGES[[1, 3, 4, 6, 7]] - 1).latent_dist.mean
    assert (mean - ref).abs().max().item() <= 1e-5


def test_models_on_one_path_keep_their_own_folders(vae, tmp_path):
    # Issue 10: two runs with different models on one path rebuilt each other's files (and one died of SIGBUS).
    import copy

    cache = LatentCache(vae, tmp_path, resolution=32)
    mean, _ = cache.get([0, 1], Loader())
    other = LatentCache(vae, tmp_path, resolution=32, resize="nearest")  # other preprocessing
    assert not other.rebuilt and len(other) == 0 and other.fingerprint != cache.fingerprint
    other.get([0], Loader())
    changed = copy.deepcopy(vae)
    with torch.no_grad():
        changed.quant_conv.weight.mul_(1.01)  # a fine-tuned VAE: same config, other weights
    third = LatentCache(changed, tmp_path, resolution=32, resize="nearest")
    assert len(third) == 0 and third.fingerprint != other.fingerprint
    third.get([0, 1, 2], Loader())
    bigger = LatentCache(vae, tmp_path, resolution=64)
    assert bigger.latent_shape == (4, 32, 32) and len(bigger) == 0
    half = LatentCache(copy.deepcopy(vae).half(), tmp_path, resolution=32)  # an fp16 encoder's latents differ
    assert half.fingerprint != cache.fingerprint
    # The first model's entries survived the others, in the same (still mapped) files and for a new process.
    assert len({c.folder for c in (cache, other, third, bigger, half)}) == 5
    m1, _ = cache.get([0, 1], Loader())
    again = LatentCache(vae, tmp_path, resolution=32)
    m2, _ = again.get([0, 1], Loader())
    assert not again.rebuilt and again.encoded == 0 and cache.encoded == 2
    assert torch.equal(m1, mean) and torch.equal(m2, mean)


def test_sample_mode_reproduces_pipeline_draw_and_mean_is_deterministic(vae):
    cache = LatentCache(vae, None, resolution=32, temporary=True)
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


def test_temporary_cache_is_removed_on_every_exit_path(vae, tmp_path):
    # Garbage collection (and so interpreter exit: weakref.finalize runs atexit).
    cache = LatentCache(vae, None, resolution=32, temporary=True)
    path = cache.path
    cache.get([0], Loader())
    assert os.path.isdir(cache.folder) and os.path.dirname(path) == default_cache_dir()
    del cache
    gc.collect()
    assert not os.path.exists(path)
    # A with block, also when it raises; close() is idempotent and refuses later use.
    with pytest.raises(KeyError):
        with LatentCache(vae, None, resolution=32, temporary=True) as cache:
            path = cache.path
            cache.get([1], Loader())
            raise KeyError("trainer error")
    assert not os.path.exists(path)
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        cache.get([0], Loader())
    # An owner killed without a chance to clean up: the next private folder on the host removes its folder.
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    root = str(tmp_path / "private-root")
    os.makedirs(os.path.join(root, f"private-{host}-{dead.pid}-0123456789ab", "fp"))
    os.makedirs(os.path.join(root, f"private-{host}-{os.getpid()}-0123456789ab"))  # alive: kept
    os.makedirs(os.path.join(root, "private-otherhost-1-0123456789ab"))  # another host's pid space: kept
    mine = private_dir(root)
    assert sorted(os.listdir(root)) == sorted([os.path.basename(mine), f"private-{host}-{os.getpid()}-0123456789ab",
                                               "private-otherhost-1-0123456789ab"])
    with pytest.raises(ValueError, match="temporary=True"):
        LatentCache(vae, tmp_path / "x", resolution=32, temporary=True)


def test_another_process_sees_and_extends_the_cache(vae, tiny_sd1_path, tmp_path):
    cache = LatentCache(vae, tmp_path, resolution=32)
    ids = lambda i: f"image {i}"  # noqa: E731  (a cheap identity: hits do not load)
    mean, _ = cache.get([0, 1], Loader(), digest=ids)
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
        mean, _ = cache.get([0, 1, 2], load, digest=lambda i: f"image {{i}}")
        assert cache.encoded == 1
        torch.save(mean, {str(tmp_path / "mean.pt")!r})
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    other = torch.load(tmp_path / "mean.pt")
    assert torch.equal(other[:2], mean)
    assert 2 in cache  # written by the other process, visible here
    load = Loader()
    m2, _ = cache.get([2], load, digest=ids)
    assert load.calls == [] and torch.equal(m2[0], other[2])


# -- keyed by the data --------------------------------------------------------------------------------------------


def test_another_dataset_at_the_same_path_is_reencoded_never_served(vae, tmp_path):
    # Issue 10: the fingerprint covered the model, not the data; a new few-shot draw at the same path got the
    # first draw's latents. The call is the one producers make today: get(indices, load), no digest.
    first = Loader(IMAGES)
    LatentCache(vae, tmp_path, resolution=32).get(range(8), first)
    second_images = torch.rand((8, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    second_images[3] = IMAGES[3]  # one image both draws share: still a hit
    cache = LatentCache(vae, tmp_path, resolution=32, batch_size=4)
    mean, std = cache.get(range(8), Loader(second_images))
    ref = vae.encode(2 * second_images - 1).latent_dist
    assert (mean - ref.mean).abs().max().item() <= 1e-5 and (std - ref.std).abs().max().item() <= 1e-5
    assert cache.encoded == 7
    # ... and the first dataset, back again, gets its own latents (re-encoded where the second overwrote them).
    back = LatentCache(vae, tmp_path, resolution=32)
    m1, _ = back.get(range(8), Loader(IMAGES))
    assert (m1 - vae.encode(2 * IMAGES - 1).latent_dist.mean).abs().max().item() <= 1e-5 and back.encoded == 7


class FolderSource:
    """A producer source over image files (like ImageSource over an ImageFolder): path(i), raw(i)."""

    def __init__(self, paths):
        self.paths, self.raws = list(paths), []

    def path(self, i):
        return self.paths[i]

    def raw(self, i):
        self.raws.append(i)
        return torch.load(self.paths[i]), 0


def test_file_backed_items_keyed_by_path_size_mtime(vae, tmp_path):
    files = []
    for i in range(4):
        files.append(str(tmp_path / f"img{i}.pt"))
        torch.save(IMAGES[i], files[-1])
    source = FolderSource(files)
    cache = LatentCache(vae, tmp_path / "cache", resolution=32)
    load = lambda i: source.raw(i)[0]  # noqa: E731
    cache.get(range(4), load, digest=source_digest(source))
    source.raws.clear()
    cache.get(range(4), load, digest=source_digest(source))
    assert source.raws == [] and cache.encoded == 4  # hits: one stat each, no read
    # The folder gained a file sorting first: every index now names another file -> all re-encoded.
    extra = str(tmp_path / "img-first.pt")
    torch.save(IMAGES[7], extra)
    grown = FolderSource([extra, *files])
    mean, _ = cache.get(range(5), lambda i: grown.raw(i)[0], digest=source_digest(grown))
    ref = vae.encode(2 * IMAGES[[7, 0, 1, 2, 3]] - 1).latent_dist.mean
    assert (mean - ref).abs().max().item() <= 1e-5 and cache.encoded == 9
    # A file rewritten in place (new mtime/size) is re-encoded; its neighbours are not.
    torch.save(IMAGES[6], files[2])
    os.utime(files[2], ns=(1, 1))
    n = cache.encoded
    mean, _ = cache.get(range(5), lambda i: grown.raw(i)[0], digest=source_digest(grown))
    assert cache.encoded == n + 1 and (mean[3] - vae.encode(2 * IMAGES[6:7] - 1).latent_dist.mean[0]).abs().max() <= 1e-5
    assert file_digest(files[0]) != file_digest(files[1])
    # A source whose items are not files falls back to their bytes.
    mem = FolderSource(["not-a-file"] * 2)
    mem.raw = lambda i: (IMAGES[i], 0)
    assert source_digest(mem)(0) != source_digest(mem)(1)
    with pytest.raises(TypeError, match=r"digest\(0\)"):
        cache.get([0], load, digest=lambda i: None)


# -- files -----------------------------------------------------------------------------------------------------


def test_truncated_data_file_is_rebuilt_not_served(vae, tmp_path, caplog):
    # Issue 10: a truncated data.f32 was zero-extended by the memmap and served as latents.
    cache = LatentCache(vae, tmp_path, resolution=32)
    cache.get(range(4), Loader())
    (data,) = glob.glob(str(tmp_path / "**" / "data.f32"), recursive=True)
    size = os.path.getsize(data)
    with open(data, "r+b") as f:
        f.truncate(size // 3)
    with caplog.at_level(logging.WARNING, logger="fusionloader"):
        again = LatentCache(vae, tmp_path, resolution=32)
    assert again.rebuilt and any(data in r.getMessage() for r in caplog.records)
    mean, _ = again.get(range(4), Loader())
    assert again.encoded == 4
    assert (mean - vae.encode(2 * IMAGES[:4] - 1).latent_dist.mean).abs().max().item() <= 1e-5
    # The first object, which still maps the old (replaced) files, notices the rebuild instead of reading past
    # the end of a shorter file, and serves what is in the new files.
    m_old, _ = cache.get(range(4), Loader())
    assert torch.equal(m_old, mean) and cache.encoded == 4
    # A damaged digest file (not a whole number of digests) is rebuilt too.
    with open(os.path.join(again.folder, "digest.bin"), "ab") as f:
        f.write(b"x")
    assert LatentCache(vae, tmp_path, resolution=32).rebuilt


def test_files_and_folders_are_private(vae, tmp_path):
    old = os.umask(0o022)
    try:
        cache = LatentCache(vae, tmp_path / "new" / "cache", resolution=32)
        cache.get([0, 1], Loader())
    finally:
        os.umask(old)
    found = glob.glob(str(tmp_path / "new" / "**" / "*"), recursive=True)
    files = [f for f in found if os.path.isfile(f)]
    for folder in [str(tmp_path / "new")] + [f for f in found if os.path.isdir(f)]:
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
    assert len(files) == 4
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f


def test_default_cache_dir_is_per_user_private_and_shared(vae, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.delenv("FUSIONLOADER_LATENT_CACHE")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    root = default_cache_dir()
    assert root == str(tmp_path / "tmp" / f"fusionloader-{os.getuid()}" / "latents")
    assert stat.S_IMODE(os.stat(os.path.dirname(root)).st_mode) == 0o700
    # Two producers of the node, no path given: one folder, one set of entries.
    a, b = LatentCache(vae, None, resolution=32), LatentCache(vae, None, resolution=32)
    assert a.folder == b.folder == os.path.join(root, a.fingerprint)
    a.get([0, 1], Loader())
    b.get([0, 1], Loader())
    assert b.encoded == 0
    # A root another user could have planted, or that others can read, is refused with its name.
    os.chmod(os.path.dirname(root), 0o755)
    with pytest.raises(PermissionError, match=f"fusionloader-{os.getuid()}"):
        default_cache_dir()
    os.chmod(os.path.dirname(root), 0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp2"))
    os.makedirs(tmp_path / "tmp2")
    os.symlink(os.path.dirname(root), tmp_path / "tmp2" / f"fusionloader-{os.getuid()}")
    with pytest.raises(PermissionError, match="symlink"):
        default_cache_dir()


# -- concurrency: real processes ------------------------------------------------------------------------------


class _Config(dict):
    __getattr__ = dict.__getitem__


class _Posterior:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std


class _Encoded:
    def __init__(self, mean, std):
        self.latent_dist = _Posterior(mean, std)


class FakeVAE(torch.nn.Module):
    """AutoencoderKL's encoder interface on a 2x2 pool and a 1x1 conv: exact per item, no diffusers import."""

    def __init__(self):
        super().__init__()
        self.config = _Config(block_out_channels=[8, 8], latent_channels=4)
        self.proj = torch.nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.arange(12.0).view(4, 3, 1, 1) / 10)
            self.proj.bias.zero_()

    @property
    def dtype(self):
        return self.proj.weight.dtype

    def encode(self, x):
        mean = self.proj(torch.nn.functional.avg_pool2d(x, 2))
        return _Encoded(mean, torch.sigmoid(mean) + 0.1)


def _dataset(seed: int, n: int = 96) -> torch.Tensor:
    return torch.rand((n, 3, 8, 8), generator=torch.Generator().manual_seed(seed))


def _concurrent_worker(path: str, seed: int, rounds: int) -> tuple[int, int]:
    torch.set_num_threads(1)
    vae, images = FakeVAE(), _dataset(seed)
    expected = vae.encode(2 * images - 1).latent_dist.mean.detach()
    cache = LatentCache(vae, path, resolution=8, batch_size=5)
    rng = np.random.default_rng(seed * 1000 + os.getpid())
    served = 0
    for r in range(rounds):  # growing index range: the files grow under the others' mappings
        hi = max(8, len(images) * (r + 1) // rounds)
        idx = rng.choice(hi, size=7, replace=False).tolist()
        mean, _ = cache.get(idx, lambda i: images[i])
        err = (mean - expected[idx]).abs().max().item()
        assert err <= 1e-5, f"seed {seed}: served another dataset's latents (error {err}) for {idx}"
        served += len(idx)
    return served, cache.encoded


def test_concurrent_processes_on_one_path(tmp_path):
    # Three processes, two datasets, one folder, reading and writing at once; every latent served is for the
    # reader's own data. (Before the data key, dataset 2's process was served dataset 1's latents.)
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap(_concurrent_worker, [(str(tmp_path), 1, 24), (str(tmp_path), 1, 24),
                                                    (str(tmp_path), 2, 24)])  # fmt: skip
    assert all(served == 24 * 7 for served, _ in results)
    assert len(LatentCache(FakeVAE(), tmp_path, resolution=8)) > 0
    assert len(os.listdir(tmp_path)) == 1  # one fingerprint folder


# -- batching, prefetch, staging --------------------------------------------------------------------------------


class CountingVAE(FakeVAE):
    def __init__(self):
        super().__init__()
        self.batches = []

    def encode(self, x):
        self.batches.append(len(x))
        return super().encode(x)


def test_prefetch_encodes_misses_in_batches_off_get(tmp_path):
    vae, images = CountingVAE(), _dataset(3, 12)
    cache = LatentCache(vae, tmp_path, resolution=8, batch_size=4)
    load = lambda i: images[i]  # noqa: E731
    fut = cache.prefetch(range(10), load)
    mean, _ = cache.get([9], load)  # admitted while its batch is being encoded: waits, does not encode alone
    assert fut.done() and fut.result() == 10 and vae.batches == [4, 4, 2]
    expected = vae.encode(2 * images - 1).latent_dist.mean.detach()
    vae.batches.clear()
    for i in range(10):
        m, _ = cache.get([i], load)
        assert torch.allclose(m[0], expected[i], atol=1e-6)
    assert vae.batches == [] and cache.encoded == 10
    # ensure(): misses among hits, in full batches; mixed image sizes (an ImageFolder) batch too.
    mixed = [torch.rand(3, 8 + 4 * (i % 3), 8) for i in range(12)]
    other = LatentCache(vae, tmp_path / "mixed", resolution=8, batch_size=3)
    assert other.ensure([0, 1, 5, 6, 7, 11, 1], lambda i: mixed[i]) == 6 and vae.batches == [3, 3]
    m, _ = other.get([5], lambda i: mixed[i])
    ref = vae.encode(preprocess_images(mixed[5][None], (8, 8))).latent_dist.mean.detach()
    assert torch.allclose(m, ref, atol=1e-6)
    # An error in a prefetch belongs to the item: the get of that item raises it, others are unaffected.
    bad = lambda i: torch.rand(1, 8, 8) if i == 2 else images[i]  # noqa: E731
    with LatentCache(vae, tmp_path / "bad", resolution=8, batch_size=4) as third:
        third.prefetch(range(4), bad).exception()
        assert third.get([3], bad)[0].shape == (1, 4, 4, 4)
        with pytest.raises(ValueError, match=r"load\(2\)"):
            third.get([2], bad)


def test_get_stages_one_pinned_non_blocking_transfer_per_call(tmp_path, monkeypatch):
    vae, images = FakeVAE(), _dataset(4, 6)
    load = lambda i: images[i]  # noqa: E731
    cpu = LatentCache(vae, tmp_path, resolution=8)
    mean_cpu, std_cpu = cpu.get([0, 1, 2, 3, 1], load)
    # The CUDA path, watched on a CPU build: entries cached, read by a cache whose device is a GPU.
    calls = []

    def host_buffer(shape, pinned):
        calls.append(("host", shape, pinned))
        return torch.empty(shape, dtype=torch.float32)

    def to_device(host, device, pinned):
        calls.append(("copy", str(device), pinned))
        return host

    monkeypatch.setattr(latents_mod, "_host_buffer", host_buffer)
    monkeypatch.setattr(latents_mod, "_to_device", to_device)
    gpu = LatentCache(vae, tmp_path, resolution=8, device="cuda:0")
    mean, std = gpu.get([0, 1, 2, 3, 1], load)
    assert calls == [("host", (5, gpu.record), True), ("copy", "cuda:0", True)]
    assert torch.equal(mean, mean_cpu) and torch.equal(std, std_cpu)
    # On CPU: no pinning, and the result does not alias the mapped file.
    calls.clear()
    m, _ = cpu.get([0], load)
    assert calls == [("host", (1, cpu.record), False), ("copy", "cpu", False)]
    m.zero_()
    assert torch.equal(cpu.get([0], load)[0], mean_cpu[:1])
    # A prefetch for a GPU cache runs its thread under that device (CUDA's current device is per thread).
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append((str(device), threading.current_thread().name))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    gpu3 = LatentCache(vae, tmp_path, resolution=8, device="cuda:3")
    assert gpu3.prefetch([0, 1], load).result() == 0  # hits: nothing encoded, nothing touches a device
    assert entered == [("cuda:3", entered[0][1])] and entered[0][1].startswith("fusionloader-latents")


def test_bound_to_a_source_the_producer_calls(tmp_path):
    # The producer's calls: prefetch as jobs arrive (batched, in the background), one get per admission round.
    vae, images = CountingVAE(), _dataset(5, 6)
    files = []
    for i in range(6):
        files.append(str(tmp_path / f"{i}.pt"))
        torch.save(images[i], files[-1])
    source = FolderSource(files)
    latents = LatentCache(vae, tmp_path / "cache", resolution=8, batch_size=4).bind(source)
    latents.prefetch([0, 1, 2, 3, 4]).result()
    source.raws.clear()
    mean, std = latents.get([4, 0, 2])
    assert vae.batches == [4, 1] and source.raws == []  # stat-keyed hits: no reads at admission
    ref = vae.encode(2 * images[[4, 0, 2]] - 1).latent_dist
    assert torch.allclose(mean, ref.mean, atol=1e-6) and torch.allclose(std, ref.std, atol=1e-6)
    assert latents.ensure(range(6)) == 1
    with pytest.raises(TypeError, match="raw"):
        latents.cache.bind(object())


def test_a_lock_held_too_long_is_an_error_naming_the_file(tmp_path):
    import fcntl

    cache = LatentCache(FakeVAE(), tmp_path, resolution=8, lock_timeout=0.2)
    fd = os.open(os.path.join(cache.folder, "lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another holder (stopped or hung)
        with pytest.raises(TimeoutError, match=r"latent cache lock .*lock"):
            cache.get([0], lambda i: _dataset(0, 1)[0])
    finally:
        os.close(fd)
    assert cache.get([0], lambda i: _dataset(0, 1)[0])[0].shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="lock_timeout"):
        LatentCache(FakeVAE(), tmp_path, resolution=8, lock_timeout=0)
