"""The CPU host-sync detector, and the sampler's denoising loop under it: no sync in the steady state (new
schedules and joins included), one read-back per finished batch, on the fused and the unfused path."""

import pytest
import torch

from fusionloader.engine import Request, Synthesizer
from fusionloader.engine import sampler as sampler_module
from fusionloader.engine.syncs import SyncDetector, staged


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ the detector


@pytest.mark.parametrize(
    "what,op",
    [
        (lambda x: x.sum().item(), "_local_scalar_dense"),
        (lambda x: bool(x[0] > 0), "_local_scalar_dense"),
        (lambda x: float(x[1]), "_local_scalar_dense"),
        (lambda x: x.tolist(), "Tensor.tolist"),
        (lambda x: x.cpu(), "Tensor.cpu"),
        (lambda x: x.numpy(), "Tensor.numpy"),
        (lambda x: x.nonzero(), "nonzero"),
        (lambda x: x[x > 0], "index"),
        (lambda x: x.masked_select(x > 0), "masked_select"),
        (lambda x: x.unique(), "unique"),
        (lambda x: x[[0, 2]], "index"),
        (lambda x: x + torch.tensor([1.0, 2.0, 3.0, 4.0]), "add"),
        (lambda x: x.index_select(0, torch.as_tensor([1, 2])), "index_select"),
    ],
)
def test_detector_flags_each_kind_of_sync(what, op):
    x = torch.randn(4)
    with SyncDetector() as det:
        what(x)
    assert det.count >= 1 and any(op in e.op for e in det.events), det.report()


def test_detector_passes_sync_free_code_and_host_only_work():
    x = torch.randn(4, 3)
    with SyncDetector() as det:
        idx = staged(torch.tensor([0, 2]))  # what the sampler's pinned staging copy declares
        y = x.index_select(0, idx) * 2 + torch.full((2, 3), 0.5)
        torch.where(y > 0, y, 0.0).sum(0)
        host = torch.tensor([1, 2, 3])
        assert (host * 2).tolist() == [2, 4, 6]  # host data read on the host: free
        assert host[1].item() == 2
    assert det.count == 0, det.report()
    with pytest.raises(AssertionError, match="host sync"), SyncDetector(raise_on_sync=True):
        x.sum().item()
    assert torch.Tensor.tolist is not None and "read" not in torch.Tensor.tolist.__name__  # methods restored


# ------------------------------------------------------------------------------------------ the sampler


def _requests(synth, n, steps=12, strengths=(0.5, 1.0, None, 0.75), start_key=0):
    g = torch.Generator().manual_seed(start_key)
    reqs = []
    for k in range(n):
        mean = torch.randn(synth.latent_shape, generator=g)
        reqs.append(Request(
            key=start_key + k, prompt=["a cat", "a dog", "a bird"][k % 3], strength=strengths[k % len(strengths)],
            guidance_scale=[7.5, 1.0, 3.0][k % 3], num_inference_steps=steps, seed=10 + k, eta=0.5,
            latent_mean=mean, latent_std=torch.full_like(mean, 0.1)))  # fmt: skip
    return reqs


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "euler"])
def test_fused_steady_state_has_no_sync(scheduler, tiny_sd1_path):
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler=scheduler)
    sampler = synth.sampler(capacity=4)
    for r in _requests(synth, 3):
        sampler.submit(r)
    sampler.step()  # first admission (the prompt encoder runs; CPU schedule math)
    # A join mid-loop with a schedule never seen before (strength 0.9, 10 steps): its tables are staged too.
    late = _requests(synth, 1, steps=10, strengths=(0.9,), start_key=100)[0]
    sampler.submit(late)
    with torch.inference_mode(), SyncDetector() as det:
        for _ in range(4):  # no sample finishes in these steps (the shortest has 6)
            assert sampler.step() == []
    assert det.count == 0, det.report()
    assert len(list(sampler.drain())) == 4


def test_syncs_bounded_per_finished_batch(tiny_sd1_path):
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim")
    sampler = synth.sampler(capacity=3, decode_chunk=2)
    for r in _requests(synth, 6):
        sampler.submit(r)
    batches = finished = 0
    with torch.inference_mode(), SyncDetector() as det:
        while not sampler.idle:
            done = sampler.step()
            batches += bool(done)
            finished += len(done)
    assert finished == 6 and batches >= 2
    # One read-back (the finiteness flags) per step that finished something, whatever the decode chunks.
    assert det.count == batches, det.report()
    assert all(e.op == "Tensor.tolist" and "_finish" in e.where for e in det.events), det.report()


def test_unfused_path_adds_no_sync_of_its_own(tiny_sd1_path):
    # Euler ancestral has no fused kernel: the sampler groups slots and calls scheduler.step; the sampler's
    # own code (indexing, staging) must not sync; what diffusers' step does inside is not the engine's.
    from diffusers import EulerAncestralDiscreteScheduler

    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler=EulerAncestralDiscreteScheduler)
    sampler = synth.sampler(capacity=4)
    for r in _requests(synth, 3):
        sampler.submit(r)
    sampler.step()
    with torch.inference_mode(), SyncDetector() as det:
        for _ in range(3):
            assert sampler.step() == []
    assert not [e for e in det.events if "engine/" in e.where], det.report()


def test_sampler_runs_under_its_device(tiny_sd1_path, monkeypatch):
    # On cuda:N every submit/step runs under torch.cuda.device(N) (Triton launches, pinned staging use N).
    entered = []

    class Scope:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(sampler_module, "device_scope", Scope)
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim")
    sampler = synth.sampler(capacity=2)
    sampler.submit(_requests(synth, 1, steps=2, strengths=(1.0,))[0])
    list(sampler.drain())
    assert len(entered) >= 3 and set(entered) == {synth.device}


def test_device_scope_enters_cuda_device(monkeypatch):
    from fusionloader.engine.models import device_scope

    seen = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: seen.append(d) or torch.random.fork_rng(devices=[]))
    with device_scope("cuda:1"):
        pass
    with device_scope("cpu"):
        pass
    assert seen == [torch.device("cuda", 1)]


def test_normalised_out_buffer_adds_no_sync(tiny_sd1_path):
    # mean/std given as lists go to the device once, not at every finished batch.
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim")
    out = torch.zeros(4, 3, *synth.resolution)
    sampler = synth.sampler(capacity=2, out=out, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    reqs = _requests(synth, 4, steps=4)
    for row, r in enumerate(reqs):
        r.out_row = row
        sampler.submit(r)
    batches = 0
    with torch.inference_mode(), SyncDetector() as det:
        while not sampler.idle:
            batches += bool(sampler.step())
    assert det.count == batches, det.report()
    assert out.abs().sum() > 0 and out.min() < 0  # normalised images landed in their rows
