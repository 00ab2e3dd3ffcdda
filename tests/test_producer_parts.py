"""Producer-side pieces in-process: the memory estimate, the child's start-up phase report, its use of the
latent cache (prefetch on arrival, one get per admission round) and its non-finite handling (no per-image
host sync)."""

import os
import time
from types import SimpleNamespace

import pytest
import torch

from fusionloader.memory import estimate_memory, format_bytes, memory_estimate
from fusionloader.producer_child import Producer, load_phase
from fusionloader.protocol import DOWNLOAD, LOAD, ChildConfig


@pytest.fixture(scope="module")
def engine(tiny_sd1_path):
    from fusionloader.engine import Synthesizer

    return Synthesizer.from_pretrained(tiny_sd1_path)


def test_memory_estimate_counts_every_module_once_and_scales_with_capacity(engine):
    c = engine.components
    modules = {id(m): m for m in (c.unet, c.vae, c.decoder, c.text_encoder)}
    weights = sum(t.numel() * t.element_size() for m in modules.values() for t in [*m.parameters(), *m.buffers()])
    one, eight = estimate_memory(engine, 1, ring_bytes=100), estimate_memory(engine, 8)
    assert one["weights"] == eight["weights"] == weights
    assert eight["latents"] == 8 * one["latents"] > 0 and eight["decode"] == 8 * one["decode"] > 0
    assert one["total"] == sum(v for k, v in one.items() if k != "total") and one["ring"] == 100
    assert format_bytes(3 << 30) == "3.0 GiB" and format_bytes(512) == "512 B"


def test_the_engines_own_estimate_is_preferred():
    class Engine:  # shaped like Synthesizer.memory_estimate: weights per module, the larger peak in total
        def memory_estimate(self, capacity):
            return {"capacity": capacity, "weights": {"unet": 6, "vae": 4}, "weights_by_dtype": {"float16": 10},
                    "unet_activations": 5 * capacity, "decode_activations": 3, "total": 20}

    assert memory_estimate(Engine(), 2, ring_bytes=1) == {
        "unet_activations": 10, "decode_activations": 3, "weights": 10, "ring": 1, "total": 21}


def test_load_phase_names_a_download_for_hub_ids(tmp_path):
    assert load_phase(str(tmp_path)) == LOAD
    assert load_phase({"path_or_id": str(tmp_path), "device": "cpu"}) == LOAD
    assert load_phase("runwayml/stable-diffusion-v1-5") == DOWNLOAD


class Sent:
    def __init__(self):
        self.msgs, self.t_sent = [], 0.0

    def send(self, *msg):
        self.msgs.append(msg)
        self.t_sent = time.monotonic()


class Latents:
    """A SourceLatents stand-in that records the child's calls; ``get`` gives each index's value as its latents."""

    def __init__(self, bad=None):
        self.prefetched, self.gets, self.bad, self.closed = [], [], bad, False
        self.cache = SimpleNamespace(close=lambda: setattr(self, "closed", True))

    def prefetch(self, indices):
        self.prefetched.append(list(indices))

    def get(self, indices):
        self.gets.append(list(indices))
        if self.bad in indices:
            raise OSError(f"cannot identify image file 'img_{self.bad}.png'")
        mean = torch.tensor(indices, dtype=torch.float32)[:, None]
        return mean, mean + 0.5


def job(key, index, strength=0.5):
    from fusionloader.protocol import Job

    return Job(key, index, "a cat", strength, 2.0, 2, seed=key)


def child_with(latents, capacity=4):
    child = Producer(ChildConfig(0, "cpu", None, None, capacity, None, os.getpid(), None, False), None, Sent(), None)
    child._latents = latents
    child.Request = lambda key, *args, **kw: SimpleNamespace(key=key, **kw)
    child.submitted = []
    child.sampler = SimpleNamespace(submit=child.submitted.append)
    return child


def test_jobs_prefetch_their_latents_on_arrival_and_each_round_makes_one_get():
    latents = Latents()
    child = child_with(latents)
    child.handle(("jobs", [job(0, 10), job(1, 11, None), job(2, 12), job(3, 13), job(4, 14)]))
    assert latents.prefetched == [[10, 12, 13, 14]] and latents.gets == []  # text-only jobs need none
    child.handle(("credit", [5, 6, 7]))
    child.admit()  # three credits: one round of three jobs, one get for its two img2img ones
    assert latents.gets == [[10, 12]]
    got = {r.key: r for r in child.submitted}
    assert float(got[0].latent_mean) == 10 and float(got[0].latent_std) == 10.5 and got[0].out_row is None
    assert float(got[2].latent_mean) == 12 and float(got[2].latent_std) == 12.5
    assert got[1].latent_mean is None and got[1].latent_std is None
    assert {k: slot for k, (_, slot) in child.inflight.items()} == {0: 5, 1: 6, 2: 7}
    child.handle(("credit", [8, 9]))
    child.admit()  # capacity 4: one more job this round
    assert latents.gets == [[10, 12], [13]] and set(child.inflight) == {0, 1, 2, 3} and list(child.credits) == [9]
    child.close()
    assert latents.closed and child._latents is None


def test_a_bad_image_in_a_round_fails_naming_its_job_and_returns_unused_credits():
    latents = Latents(bad=7)
    child = child_with(latents)
    child.handle(("jobs", [job(0, 1), job(1, 7), job(2, 3)]))
    child.handle(("credit", [0, 1, 2]))
    with pytest.raises(OSError, match="img_7.png"):
        child.admit()
    assert latents.gets == [[1, 7, 3], [1], [7]]  # the round's get failed; alone, index 7's does
    assert [j.key for j in child.current] == [1]  # the error report names the job whose image is bad
    assert child.submitted == [] and sorted(child.credits) == [0, 1, 2]  # no slot stays reserved


def test_nonfinite_results_use_the_samplers_flag_and_free_their_slot(monkeypatch):
    # The sampler flags finiteness once per finished batch; the producer must not read each image back again.
    cfg = ChildConfig(0, "cpu", None, None, 2, None, os.getpid(), None, False)
    child = Producer(cfg, None, Sent(), None)
    published = []
    child.ring = SimpleNamespace(shape=(3, 2, 2), fill=lambda *a: None,
                                 publish=lambda slots, keys, owner: published.append((list(slots), list(keys))))
    image = torch.zeros(3, 2, 2)
    finished = [SimpleNamespace(key=1, image=image, finite=False), SimpleNamespace(key=2, image=image, finite=True)]
    child.sampler = SimpleNamespace(step=lambda: finished)
    child.inflight = {1: (None, 5), 2: (None, 6)}
    calls = []
    monkeypatch.setattr(torch, "isfinite", lambda *a: calls.append(a) or torch.tensor(True))
    child.step()
    assert calls == [] and list(child.credits) == [5]
    assert published == [([6], [2])]  # one publish (one sync) for the step's images
    assert [m[:2] for m in child.results.msgs] == [("dropped", 1), ("done", 2)]


def test_pool_warns_in_the_trainer_when_most_outputs_of_a_window_are_nonfinite(caplog):
    from fusionloader.producer import ProducerPool

    pool = ProducerPool("unused", None, image_size=8, slots=2)  # not started: its core is driven by hand
    core, producer = pool._core, pool._core.supervisor.procs[0]
    with caplog.at_level("WARNING", logger="fusionloader"):
        for key in range(31):
            core.on_message(producer, ("dropped", key, "nonfinite"))
        assert not core.notices
        core.on_message(producer, ("dropped", 31, "nonfinite"))
    assert "32 of the last 32 synthetic images were non-finite" in caplog.text
    core.started = True
    with pytest.warns(RuntimeWarning, match="vae_dtype=torch.float32"):
        pool.check()
    pool.close()
