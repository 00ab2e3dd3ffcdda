"""compile=True (torch.compile of the UNet call, inductor on CPU) and cuda_graphs=True (fixed slot shapes; CUDA
only): equality with the eager engine, the shape-fixing logic on CPU, and the clear error off CUDA."""

import pytest
import torch

from fusionloader.engine import Request, Sampler, Synthesizer
from fusionloader.engine.compile import GraphedStep, cfg_bucket, fixed_plan
from fusionloader.engine.syncs import SyncDetector

STEPS = 6


def _requests(synth, n=4, steps=STEPS):
    g = torch.Generator().manual_seed(9)
    out = []
    for k in range(n):
        mean = torch.randn(synth.latent_shape, generator=g)
        out.append(Request(key=k, prompt=["a cat", "a dog"][k % 2], strength=[1.0, 0.5, None, 0.75][k % 4],
                           guidance_scale=[7.5, 1.0, 3.0, 7.5][k % 4], num_inference_steps=steps, seed=70 + k,
                           eta=0.4, latent_mean=mean, latent_std=torch.full_like(mean, 0.1)))  # fmt: skip
    return out


def _drain(sampler, reqs):
    for r in reqs:
        sampler.submit(r)
    return {f.key: f.latents for f in sampler.drain()}


@pytest.fixture(scope="module")
def synth(tiny_sd1_path):
    return Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim")


def test_compiled_unet_call_equals_eager(tiny_sd1_path, synth):
    compiled = Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim", compile=True)
    assert compiled.load_spec()["compile"] is True
    torch._dynamo.reset()
    # Capacity 2, three requests: batch sizes 2 and 1 (each compiles once; a third size would go dynamic).
    eager = _drain(synth.sampler(capacity=2, return_latents=True), _requests(synth, 3))
    sampler = compiled.sampler(capacity=2, return_latents=True)
    assert sampler.compile
    got = _drain(sampler, _requests(compiled, 3))
    for k in eager:  # inductor reassociates floating point: equal to tolerance, not bit for bit
        torch.testing.assert_close(got[k], eager[k], rtol=1e-4, atol=1e-4)
    # It really ran through dynamo (compiled frames were produced).
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 1


def test_cuda_graphs_off_cuda_is_a_clear_error(tiny_sd1_path, synth):
    with pytest.raises(ValueError, match="cuda_graphs=True .* CUDA device.*cpu"):
        Synthesizer.from_pretrained(tiny_sd1_path, scheduler="ddim", cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA device"):
        Sampler(synth.components, synth.prompt_cache, 2, cuda_graphs=True)


def test_fixed_plan_pads_to_capacity_and_buckets():
    assert [cfg_bucket(k, 8) for k in range(10)] == [0, 1, 2, 4, 4, 8, 8, 8, 8, 8]
    assert cfg_bucket(5, 6) == 6
    rows, uncond, cfg = fixed_plan([10, 11, 12], [0, 2], capacity=4)
    assert rows == [10, 11, 12, 0]  # free slot reads table row 0
    assert uncond == [4, -1, 5, -1]  # uncond rows follow the capacity rows
    assert cfg == [0, 2]
    rows, uncond, cfg = fixed_plan([3, 4, 5], [0, 1, 2], capacity=8)
    assert cfg == [0, 1, 2, 0] and uncond[:3] == [8, 9, 10]  # padded by repeating a guided slot
    assert fixed_plan([1], [], capacity=2) == ([1, 0], [-1, -1], [])
    with pytest.raises(ValueError, match="capacity"):
        fixed_plan([1, 2, 3], [], capacity=2)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
def test_padded_step_equals_the_plain_step(scheduler, tiny_sd1_path):
    # The step a CUDA graph captures (all capacity rows, bucketed CFG rows), run eagerly on CPU: live slots get
    # what the plain engine gives them, through joins, leaves and compaction.
    synth = Synthesizer.from_pretrained(tiny_sd1_path, scheduler=scheduler)
    plain = _drain(synth.sampler(capacity=3, return_latents=True), _requests(synth, 6))
    sampler = synth.sampler(capacity=3, return_latents=True)
    sampler._graphs = GraphedStep("cpu", capture=False)  # the graphed path without the capture (CPU)
    padded = _drain(sampler, _requests(synth, 6))
    assert sampler.unet_rows >= 3 * sampler.steps_run  # every step ran all capacity rows
    for k in plain:
        err = (padded[k] - plain[k]).abs().max().item()
        assert err <= 1e-4 * max(1.0, plain[k].abs().max().item()), (k, err)


def test_padded_step_is_sync_free_and_rejects_generators(synth):
    sampler = synth.sampler(capacity=4)
    sampler._graphs = GraphedStep("cpu", capture=False)
    for r in _requests(synth, 3, steps=12):
        sampler.submit(r)
    sampler.step()
    with torch.inference_mode(), SyncDetector() as det:
        for _ in range(3):
            assert sampler.step() == []
    assert det.count == 0, det.report()
    r = _requests(synth, 1)[0]
    r.seed, r.generator = None, torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="needs seeds"):
        sampler.submit(r)
    r = _requests(synth, 1)[0]
    r.deepcache_interval = 2
    with pytest.raises(ValueError, match="deepcache_interval is not supported with cuda_graphs"):
        sampler.submit(r)


def test_graphed_step_captures_once_per_key_and_replays(monkeypatch):
    # The capture logic with torch.cuda's graph API stood in for (no GPU here): one capture per key, later
    # steps copy their inputs into the static buffers and replay.
    events = []

    class FakeGraph:
        def replay(self):
            events.append("replay")

    class Ctx:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            events.append("capture")

        def __exit__(self, *exc):
            return False

    class FakeStream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", Ctx)
    monkeypatch.setattr(torch.cuda, "stream", Ctx)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    graphs = GraphedStep(torch.device("cuda", 0).__class__("cuda", 0), capture=False)
    graphs.capture = True  # the CPU stand-in for a CUDA device
    calls = []

    def fn(a):
        calls.append(a.clone())
        return a * 2

    out = graphs.step(fn, "k", {"a": torch.tensor([1.0])})
    assert events == ["capture", "capture", "replay"]  # warm-up on the side stream, capture, replay
    graphs.step(fn, "k", {"a": torch.tensor([5.0])})
    assert events[-1] == "replay" and events.count("capture") == 2 and len(calls) == 2  # not traced again
    assert graphs._graphs["k"][1]["a"].item() == 5.0  # the static input holds the new step's value
    assert out is graphs._graphs["k"][2]
    graphs.reset()
    assert not graphs._graphs
