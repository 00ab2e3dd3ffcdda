"""Kernels against their torch references (odd shapes, every storage dtype) and against first principles.

conftest.py sets TRITON_INTERPRET=1, so the Triton kernels run on CPU tensors through the interpreter and
the public functions dispatch to them; ``*_reference`` are the torch twins.
"""

import ast
import pathlib
import time

import numpy as np
import pytest
import torch

from fusionloader import kernels as K
from fusionloader.kernels import _dispatch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

KERNELS_DIR = pathlib.Path(K.__file__).parent
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative to the output's scale (max |reference|): one storage rounding that may flip when the fp32
# results differ in their last bit (as documented in each kernel's docstring).
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LATENT = (3, 4, 13, 7)  # odd batch and spatial sizes


def assert_rel(actual, expected, rtol):
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().clamp_min(1e-12)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol:.3g}"


# ---------------------------------------------------------------------------------------------- philox


@triton.jit
def _randn_at(seeds_ptr, offsets_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # The plain tl.randn(seed, offset) that every kernel's noise is defined by.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    seed = tl.load(seeds_ptr + offs * 0)
    z = tl.randn(tl.max(seed, axis=0), tl.load(offsets_ptr + offs, mask=mask))
    tl.store(out_ptr + offs, z, mask=mask)


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 12345, 2**62 + 3])
def test_philox_reference_equals_tl_randn(seed):
    numel = 1000
    streams = torch.tensor([0, 1, 2, 5, 2**23])  # the last one puts offsets above 2**32 (high word used)
    offsets = (streams[:, None] * numel + torch.arange(numel)).reshape(-1).contiguous()
    expected = torch.empty(offsets.numel())
    seeds = torch.full((offsets.numel(),), seed, dtype=torch.int64)
    _randn_at[(triton.cdiv(offsets.numel(), 1024),)](seeds, offsets, expected, offsets.numel(), BLOCK=1024)
    ref = K.philox_randn_reference(torch.full((5,), seed), streams, numel)
    torch.testing.assert_close(ref.reshape(-1), expected, rtol=1e-5, atol=2e-6)
    # ... and the dispatched kernel (Triton here) gives the same numbers.
    torch.testing.assert_close(K.philox_randn(torch.full((5,), seed), streams, numel), ref, rtol=1e-5, atol=2e-6)


def test_philox_statistics_and_independence():
    seeds = torch.tensor([1, 2, 3])
    z = K.philox_randn_reference(seeds, 2, 20_000)
    assert z.dtype == torch.float32 and z.shape == (3, 20_000)
    assert z.mean().abs() < 0.02 and (z.std() - 1).abs() < 0.02  # 3-sigma bounds are ~0.012
    assert z.isfinite().all()
    # Different seeds and different streams give different (uncorrelated) noise.
    other_stream = K.philox_randn_reference(seeds, 3, 20_000)
    for a, b in [(z[0], z[1]), (z[0], other_stream[0])]:
        assert torch.corrcoef(torch.stack([a, b]))[0, 1].abs() < 0.035  # ~5 sigma


def test_philox_batch_invariant():
    seeds, streams = torch.tensor([11, 22, 33]), torch.tensor([2, 7, 3])
    batch = K.philox_randn(seeds, streams, 777)
    for b in range(3):
        alone = K.philox_randn(seeds[b : b + 1], streams[b : b + 1], 777)
        assert torch.equal(alone[0], batch[b])
    # Permuting the batch permutes the rows, nothing else.
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(K.philox_randn(seeds[perm], streams[perm], 777), batch[perm])
    from_lists = K.philox_randn_reference([11, 22, 33], [2, 7, 3], 777)
    assert torch.equal(from_lists, K.philox_randn_reference(seeds, streams, 777))


# ------------------------------------------------------------------------------------------- add_noise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [LATENT, (2, 1823, 781)])
def test_add_noise_matches_reference(dtype, shape):
    x0 = torch.randn(shape).to(dtype)
    noise = torch.randn(shape).to(dtype)
    coef_x, coef_noise = torch.rand(shape[0]), torch.rand(shape[0]) * 10
    out = K.add_noise(x0, coef_x, coef_noise, noise=noise)
    ref = K.add_noise_reference(x0, coef_x, coef_noise, noise=noise)
    assert out.dtype == dtype and out.shape == shape
    assert_rel(out, ref, RTOL[dtype])
    # The reference is the formula.
    per_sample = (-1,) + (1,) * (len(shape) - 1)
    expected = coef_x.view(per_sample) * x0.float() + coef_noise.view(per_sample) * noise.float()
    assert_rel(ref, expected, RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise_philox(dtype):
    x0 = torch.randn(LATENT).to(dtype)
    seeds, streams = torch.tensor([3, 1, 4]), torch.tensor([1, 1, 5])
    coef_x, coef_noise = torch.tensor([0.9, 0.5, 0.0]), torch.tensor([0.4, 0.8, 14.6])
    out = K.add_noise(x0, coef_x, coef_noise, seeds=seeds, streams=streams)
    assert_rel(out, K.add_noise_reference(x0, coef_x, coef_noise, seeds=seeds, streams=streams), RTOL[dtype])
    # Same as materialising the Philox noise and passing it as a tensor.
    z = K.philox_randn_reference(seeds, streams, x0[0].numel()).view(LATENT)
    assert_rel(out, K.add_noise_reference(x0, coef_x, coef_noise, noise=z), RTOL[dtype])
    # streams defaults to 1 (SDEdit start noise); python numbers are accepted for the coefficients.
    default = K.add_noise(x0, [0.9, 0.5, 0.0], [0.4, 0.8, 14.6], seeds=seeds)
    assert_rel(default, K.add_noise_reference(x0, coef_x, coef_noise, seeds=seeds, streams=1), RTOL[dtype])


def test_add_noise_in_place_and_batch_invariant():
    x0 = torch.randn(LATENT)
    seeds, coef_x, coef_noise = torch.tensor([5, 6, 7]), torch.tensor([0.3, 0.6, 0.9]), torch.tensor([1.0, 0.5, 0.2])
    expected = K.add_noise(x0, coef_x, coef_noise, seeds=seeds)
    inplace = x0.clone()
    assert K.add_noise(inplace, coef_x, coef_noise, seeds=seeds, out=inplace) is inplace
    assert torch.equal(inplace, expected)
    alone = K.add_noise(x0[1:2], coef_x[1:2], coef_noise[1:2], seeds=seeds[1:2])
    assert torch.equal(alone[0], expected[1])


def test_add_noise_rejects_bad_input():
    x0 = torch.randn(LATENT)
    with pytest.raises(AssertionError, match="noise or seeds"):
        K.add_noise(x0, torch.ones(3), torch.ones(3))
    with pytest.raises(AssertionError, match="coef_x"):
        K.add_noise(x0, torch.ones(2), torch.ones(3), noise=x0)
    with K.backend("triton"), pytest.raises(AssertionError, match="contiguous"):  # the torch path copes
        K.add_noise(x0.transpose(2, 3), torch.ones(3), torch.ones(3), noise=x0.transpose(2, 3))


# -------------------------------------------------------------------------------------------- cfg_step


def _cfg_inputs(dtype, shape=LATENT):
    batch = shape[0]
    # Conditional rows first, unconditional rows after in a shuffled order; sample 1 has no CFG.
    model_out = torch.randn(batch + 2, *shape[1:]).to(dtype)
    guidance = torch.tensor([7.5, 1.0, 3.0][:batch] + [2.0] * max(0, batch - 3))
    uncond_index = torch.tensor([batch + 1, -1, batch][:batch] + [-1] * max(0, batch - 3))
    coefs = torch.randn(batch, 7)
    return model_out, torch.randn(shape).to(dtype), guidance, uncond_index, coefs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "prev", "noise", "philox"])
def test_cfg_step_matches_reference(dtype, variant):
    model_out, sample, guidance, uncond_index, coefs = _cfg_inputs(dtype)
    kwargs = {}
    if variant in ("prev", "philox"):
        kwargs["prev_x0"] = torch.randn(LATENT).to(dtype)
    if variant == "noise":
        kwargs["noise"] = torch.randn(LATENT).to(dtype)
    if variant == "philox":
        kwargs.update(seeds=torch.tensor([9, 8, 7]), streams=torch.tensor([2, 3, 4]))
    x_next, x0 = K.cfg_step(model_out, sample, guidance, uncond_index, coefs, **kwargs)
    ref_next, ref_x0 = K.cfg_step_reference(model_out, sample, guidance, uncond_index, coefs, **kwargs)
    assert x_next.dtype == dtype and x0.dtype == dtype
    assert_rel(x_next, ref_next, RTOL[dtype])
    assert_rel(x0, ref_x0, RTOL[dtype])


def test_cfg_step_flat_odd_size():
    model_out, sample, guidance, uncond_index, coefs = _cfg_inputs(torch.float32, (3, 1823 * 71))
    x_next, x0 = K.cfg_step(model_out, sample, guidance, uncond_index, coefs, prev_x0=sample)
    ref_next, ref_x0 = K.cfg_step_reference(model_out, sample, guidance, uncond_index, coefs, prev_x0=sample)
    assert_rel(x_next, ref_next, 1e-5)
    assert_rel(x0, ref_x0, 1e-5)


@pytest.mark.parametrize("impl", ["cfg_step", "cfg_step_reference"])
def test_cfg_combine_and_coefficients(impl):
    fn = getattr(K, impl)
    model_out, sample, guidance, uncond_index, _ = _cfg_inputs(torch.float32)
    c, u = model_out[:3], model_out[uncond_index.clamp_min(0)]
    g = guidance.view(3, 1, 1, 1)
    m = torch.where((uncond_index >= 0).view(3, 1, 1, 1), u + g * (c - u), c)  # diffusers' order
    prev, noise = torch.randn(LATENT), torch.randn(LATENT)
    # x0 = m, then one x_next coefficient at a time isolates each term of the formula.
    for k, term in [(2, sample), (3, m), (4, m), (5, prev), (6, noise)]:
        coefs = torch.zeros(3, 7)
        coefs[:, 1] = 1.0
        coefs[:, k] = 1.0
        x_next, x0 = fn(model_out, sample, guidance, uncond_index, coefs, prev_x0=prev, noise=noise)
        assert_rel(x0, m, 1e-6)
        assert_rel(x_next, term, 1e-6)
    coefs = torch.zeros(3, 7)
    coefs[:, 0] = 1.0  # x0 = x
    coefs[:, 4] = 2.0  # x_next = 2 * x0
    x_next, x0 = fn(model_out, sample, guidance, uncond_index, coefs)
    assert_rel(x0, sample, 1e-6)
    assert_rel(x_next, 2 * sample, 1e-6)
    # Per-sample scalars really are per sample.
    coefs = torch.zeros(3, 7)
    coefs[:, 3] = torch.tensor([1.0, 2.0, 3.0])
    x_next, _ = fn(model_out, sample, guidance, uncond_index, coefs)
    assert_rel(x_next, m * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1), 1e-6)


@pytest.mark.parametrize("impl", ["cfg_step", "cfg_step_reference"])
def test_cfg_step_in_place(impl):
    fn = getattr(K, impl)
    model_out, sample, guidance, uncond_index, coefs = _cfg_inputs(torch.float32)
    prev = torch.randn(LATENT)
    kwargs = dict(seeds=torch.tensor([1, 2, 3]), streams=torch.tensor([4, 5, 6]))
    x_next, x0 = fn(model_out, sample, guidance, uncond_index, coefs, prev_x0=prev, **kwargs)
    s, p = sample.clone(), prev.clone()
    out, x0_out = fn(model_out, s, guidance, uncond_index, coefs, prev_x0=p, out=s, x0_out=p, **kwargs)
    assert out is s and x0_out is p
    assert torch.equal(s, x_next) and torch.equal(p, x0)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy computes c*NaN
@pytest.mark.parametrize("impl", ["cfg_step", "cfg_step_reference"])
def test_cfg_step_zero_coefficient_ignores_garbage(impl):
    # Before a slot's first DPM++ 2M step its prev_x0 is whatever the buffer held; c5 = 0 must ignore it.
    model_out, sample, guidance, uncond_index, coefs = _cfg_inputs(torch.float32)
    coefs[:, 5:] = 0.0
    garbage = torch.full(LATENT, float("nan"))
    garbage[1] = float("inf")
    x_next, _ = getattr(K, impl)(model_out, sample, guidance, uncond_index, coefs, prev_x0=garbage, noise=garbage)
    expected, _ = K.cfg_step_reference(model_out, sample, guidance, uncond_index, coefs)
    assert x_next.isfinite().all()
    assert_rel(x_next, expected, 1e-6)


def test_cfg_step_batch_invariant():
    # A sample's result depends on its own inputs and seed, not on its batch-mates or its row.
    model_out, sample, guidance, uncond_index, coefs = _cfg_inputs(torch.float32)
    seeds, streams = torch.tensor([1, 2, 3]), torch.tensor([2, 2, 9])
    x_next, x0 = K.cfg_step(model_out, sample, guidance, uncond_index, coefs, seeds=seeds, streams=streams)
    alone_out = torch.stack([model_out[0], model_out[uncond_index[0]]])
    a_next, a_x0 = K.cfg_step(
        alone_out, sample[:1], guidance[:1], torch.tensor([1]), coefs[:1], seeds=seeds[:1], streams=streams[:1]
    )
    assert torch.equal(a_next[0], x_next[0]) and torch.equal(a_x0[0], x0[0])


def test_cfg_step_rejects_bad_input():
    model_out, sample, guidance, uncond_index, coefs = _cfg_inputs(torch.float32)
    with pytest.raises(AssertionError, match="coefs"):
        K.cfg_step(model_out, sample, guidance, uncond_index, coefs[:, :6])
    with pytest.raises(AssertionError, match="model_out"):
        K.cfg_step(model_out[:2], sample, guidance, uncond_index, coefs)
    with pytest.raises(AssertionError, match="streams"):
        K.cfg_step(model_out, sample, guidance, uncond_index, coefs, seeds=torch.tensor([1, 2, 3]))


# ----------------------------------------------------------------------------------------- postprocess


def test_postprocess_uint8_rounds_like_numpy():
    # A dense grid over [-1.1, 1.1] hits exact .5 ties of y*255; numpy (and diffusers' numpy_to_pil) round
    # them half to even.
    decoded = torch.linspace(-1.1, 1.1, 3 * 2 * 101 * 173).view(2, 3, 101, 173).contiguous()
    y = np.clip(decoded.numpy() / np.float32(2) + np.float32(0.5), 0, 1)
    v = (y * np.float32(255)).astype(np.float32)
    assert ((v - np.floor(v)) == 0.5).any(), "the grid should contain ties"
    expected = torch.from_numpy(np.round(v).astype(np.uint8))
    for fn in (K.postprocess, K.postprocess_reference):
        out = torch.zeros(2, 3, 101, 173, dtype=torch.uint8)
        assert fn(decoded, out) is out
        assert torch.equal(out, expected)


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.uint8] + DTYPES)
def test_postprocess_matches_reference_at_rows(in_dtype, out_dtype):
    decoded = (torch.randn(3, 3, 37, 29) * 0.8).to(in_dtype)
    rows = torch.tensor([4, 0, 2])
    normalize = {} if out_dtype == torch.uint8 else dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    out = torch.full((5, 3, 37, 29), 7, dtype=out_dtype)
    ref = out.clone()
    K.postprocess(decoded, out, rows=rows, **normalize)
    K.postprocess_reference(decoded, ref, rows=rows, **normalize)
    if out_dtype == torch.uint8:
        assert torch.equal(out, ref)
    else:
        assert_rel(out, ref, {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype])
    # Rows not named are untouched; the named ones hold the formula.
    assert (out[[1, 3]] == 7).all()
    y = (decoded.float() / 2 + 0.5).clamp(0, 1)
    if out_dtype == torch.uint8:
        assert torch.equal(ref[rows], (y * 255).round().to(torch.uint8))
    else:
        mean, std = torch.tensor(normalize["mean"]).view(3, 1, 1), torch.tensor(normalize["std"]).view(3, 1, 1)
        assert_rel(ref[rows], (y - mean) / std, 1e-6 if out_dtype == torch.float32 else 8e-3)


def test_postprocess_plain_float_and_errors():
    decoded = torch.randn(2, 3, 8, 9) * 2
    out = torch.empty(2, 3, 8, 9)
    torch.testing.assert_close(K.postprocess(decoded, out), (decoded / 2 + 0.5).clamp(0, 1))
    with pytest.raises(ValueError, match="float out"):
        K.postprocess(decoded, torch.empty(2, 3, 8, 9, dtype=torch.uint8), mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(ValueError, match="both"):
        K.postprocess(decoded, out, mean=[0.5] * 3)
    with pytest.raises(AssertionError, match="per-image shape"):
        K.postprocess(decoded, torch.empty(2, 3, 9, 8))


# ------------------------------------------------------------------------------------ dispatch, compile


def test_dispatch_rules(monkeypatch):
    monkeypatch.delenv("FUSIONLOADER_KERNELS", raising=False)
    t = torch.zeros(1)
    assert _dispatch.resolve(t) == "triton"  # TRITON_INTERPRET=1 (conftest)
    with K.backend("torch"):
        assert _dispatch.resolve(t) == "torch"
        with K.backend("auto"):
            assert _dispatch.resolve(t) == "triton"
        assert _dispatch.resolve(t) == "torch"
    assert _dispatch.resolve(t) == "triton"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        with K.backend("cuda"):
            pass
    monkeypatch.setenv("FUSIONLOADER_KERNELS", "torch")
    assert _dispatch.resolve(t) == "torch"
    with K.backend("triton"):
        assert _dispatch.resolve(t) == "triton"  # the context manager wins over the environment
    monkeypatch.setenv("FUSIONLOADER_KERNELS", "bogus")
    with pytest.raises(ValueError, match="FUSIONLOADER_KERNELS"):
        _dispatch.resolve(t)
    monkeypatch.setenv("FUSIONLOADER_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _dispatch.resolve(t) == "torch"  # CPU tensor, no interpreter: the torch reference
    with K.backend("triton"), pytest.raises(RuntimeError, match="CUDA tensors or TRITON_INTERPRET"):
        _dispatch.resolve(t)


def test_torch_backend_compiles_without_graph_breaks():
    # fullgraph=True fails on any graph break, e.g. a host sync (.item(), data-dependent Python branch).
    # That is what lets the sampler capture a denoising step as a CUDA graph.
    def step(x0, coef_x, coef_noise, seeds, model_out, guidance, uncond_index, coefs, prev):
        x = K.add_noise(x0, coef_x, coef_noise, seeds=seeds, streams=1)
        return K.cfg_step(model_out, x, guidance, uncond_index, coefs, prev_x0=prev, seeds=seeds, streams=2)

    model_out, sample, guidance, uncond_index, coefs = _cfg_inputs(torch.float32)
    seeds, prev = torch.tensor([1, 2, 3]), torch.randn(LATENT)
    args = (sample, torch.rand(3), torch.rand(3), seeds, model_out, guidance, uncond_index, coefs, prev)
    torch._dynamo.reset()
    start = time.perf_counter()
    with K.backend("torch"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got = compiled(*args)
        expected = step(*args)
    assert time.perf_counter() - start < 60
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_kernels_import_nothing_from_diffusers_or_engine():
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("diffusers", "fusionloader")), f"{path.name} imports {name}"


def test_public_api():
    assert K.__all__ == sorted(K.__all__)
    for name in K.__all__:
        assert callable(getattr(K, name))


# ------------------------------------------------------------------------------ device binding, fallback


class _FakeCuda:
    """Stands in for a CUDA tensor where only ``is_cuda`` / ``device`` are read."""

    is_cuda = True
    device = torch.device("cuda", 6)


def test_launch_device_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)
    with _dispatch.launch_device(_FakeCuda()):
        pass
    assert entered == [torch.device("cuda", 6)]
    with _dispatch.launch_device(torch.zeros(1)):  # CPU (interpreter): nothing to enter
        pass
    assert entered == [torch.device("cuda", 6)]


@pytest.mark.parametrize("name", ["add_noise", "cfg_step", "postprocess", "philox_randn"])
def test_every_kernel_launches_inside_the_device_context(name, monkeypatch):
    # Triton launches on the *current* device: the launch itself must happen inside launch_device(tensor).
    import importlib

    module = importlib.import_module(f"fusionloader.kernels.{'philox' if name == 'philox_randn' else name}")
    kernel_name = {"add_noise": "_add_noise_kernel", "cfg_step": "_cfg_step_kernel",
                   "postprocess": "_postprocess_kernel", "philox_randn": "_philox_randn_kernel"}[name]  # fmt: skip
    state = {"inside": 0, "launched": 0, "tensor": None}

    class Guard:
        def __init__(self, tensor):
            state["tensor"] = tensor

        def __enter__(self):
            state["inside"] += 1

        def __exit__(self, *exc):
            state["inside"] -= 1

    real = getattr(module, kernel_name)

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert state["inside"] == 1, "kernel launched outside launch_device()"
                state["launched"] += 1
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, "launch_device", Guard)
    monkeypatch.setattr(module, kernel_name, Launcher())
    model_out, sample, guidance, uncond_index, coefs = _cfg_inputs(torch.float32)
    if name == "add_noise":
        K.add_noise(sample, torch.rand(3), torch.rand(3), seeds=torch.tensor([1, 2, 3]))
        first = sample
    elif name == "cfg_step":
        K.cfg_step(model_out, sample, guidance, uncond_index, coefs)
        first = sample
    elif name == "postprocess":
        first = torch.randn(2, 3, 5, 4)
        K.postprocess(first, torch.empty(2, 3, 5, 4))
    else:
        first = torch.tensor([1, 2])
        K.philox_randn(first, 2, 10)
    assert state["launched"] == 1 and state["inside"] == 0
    assert state["tensor"] is first or torch.equal(state["tensor"], first)


def test_fallback_when_triton_cannot_launch(monkeypatch):
    # "import triton" works but the launcher cannot be built (no C compiler in a slim CUDA image).
    monkeypatch.setattr(_dispatch, "_probes", {})
    calls = []

    def no_compiler(device):
        calls.append(device)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(_dispatch, "_probe_launch", no_compiler)
    monkeypatch.delenv("FUSIONLOADER_KERNELS", raising=False)
    x0, coef_x, coef_n, seeds = torch.randn(LATENT), torch.rand(3), torch.rand(3), torch.tensor([4, 5, 6])
    with pytest.warns(RuntimeWarning, match="C compiler.*torch references"):
        got = K.add_noise(x0, coef_x, coef_n, seeds=seeds)
    torch.testing.assert_close(got, K.add_noise_reference(x0, coef_x, coef_n, seeds=seeds))
    assert _dispatch.resolve(x0) == "torch"
    assert "C compiler" in K.fallback_reason() and not K.triton_launchable("cpu")
    assert len(calls) == 1  # probed once, cached
    with K.backend("triton"), pytest.raises(RuntimeError, match="cannot launch.*C compiler"):
        _dispatch.resolve(x0)


def test_probe_launches_for_real_here(monkeypatch):
    monkeypatch.setattr(_dispatch, "_probes", {})
    assert K.triton_launchable("cpu") and K.fallback_reason() is None  # the interpreter can launch


# ------------------------------------------------------------------------------ ahead-of-time compile

_AOT_SCRIPT = r"""
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def kernel(module, name):
    return getattr(importlib.import_module(f"fusionloader.kernels.{module}"), name)

P16, P32, I64 = "*fp16", "*fp32", "*i64"
cases = [  # each kernel in the configuration the sampler launches it in (fp16 UNet storage, fp32 latents)
    (kernel("add_noise", "_add_noise_kernel"),
     dict(x0_ptr=P32, coef_x_ptr=P32, coef_noise_ptr=P32, noise_ptr=P32, seeds_ptr=I64, streams_ptr=I64,
          out_ptr=P32, numel="i32", HAS_NOISE="constexpr", BLOCK="constexpr"),
     dict(HAS_NOISE=False, BLOCK=1024), {}),
    (kernel("cfg_step", "_cfg_step_kernel"),
     dict(model_out_ptr=P16, sample_ptr=P32, guidance_ptr=P32, uncond_index_ptr=I64, coefs_ptr=P32,
          prev_x0_ptr=P32, noise_ptr=P32, seeds_ptr=I64, streams_ptr=I64, out_ptr=P32, x0_out_ptr=P32,
          numel="i32", HAS_PREV="constexpr", NOISE="constexpr", BLOCK="constexpr"),
     dict(HAS_PREV=True, NOISE=2, BLOCK=1024), {}),
    # The configurations the other fused schedulers launch: DDIM eta > 0, SD-Turbo's Euler ancestral and LCM
    # (in-kernel Philox, no prev_x0), and the deterministic ones (DDIM eta = 0, Euler, one-step LCM).
    (kernel("cfg_step", "_cfg_step_kernel"),
     dict(model_out_ptr=P16, sample_ptr=P32, guidance_ptr=P32, uncond_index_ptr=I64, coefs_ptr=P32,
          prev_x0_ptr=P32, noise_ptr=P32, seeds_ptr=I64, streams_ptr=I64, out_ptr=P32, x0_out_ptr=P32,
          numel="i32", HAS_PREV="constexpr", NOISE="constexpr", BLOCK="constexpr"),
     dict(HAS_PREV=False, NOISE=2, BLOCK=1024), {}),
    (kernel("cfg_step", "_cfg_step_kernel"),
     dict(model_out_ptr=P16, sample_ptr=P32, guidance_ptr=P32, uncond_index_ptr=I64, coefs_ptr=P32,
          prev_x0_ptr=P32, noise_ptr=P32, seeds_ptr=I64, streams_ptr=I64, out_ptr=P32, x0_out_ptr=P32,
          numel="i32", HAS_PREV="constexpr", NOISE="constexpr", BLOCK="constexpr"),
     dict(HAS_PREV=False, NOISE=0, BLOCK=1024), {}),
    (kernel("postprocess", "_postprocess_kernel"),
     dict(decoded_ptr=P32, out_ptr="*u8", rows_ptr=I64, mean_ptr=P32, std_ptr=P32, C="i32", HW="i32",
          HAS_ROWS="constexpr", NORMALIZE="constexpr", TO_UINT8="constexpr", BLOCK="constexpr"),
     dict(HAS_ROWS=True, NORMALIZE=False, TO_UINT8=True, BLOCK=1024), dict(enable_fp_fusion=False)),
    (kernel("philox", "_philox_randn_kernel"),
     dict(seeds_ptr=I64, streams_ptr=I64, out_ptr=P32, numel="i32", BLOCK="constexpr"), dict(BLOCK=1024), {}),
]
for arch in (80, 90):
    for fn, signature, constexprs, options in cases:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        assert compiled.asm["cubin"], (fn, arch)
        print(f"sm_{arch} {fn.__name__} ok")
"""


def test_kernels_compile_ahead_of_time_for_sm80_and_sm90():
    # The kernels as a GPU would build them (not the interpreter): Triton -> PTX -> cubin with the bundled ptxas.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == 12, proc.stdout
