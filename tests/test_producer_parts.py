"""Producer-side pieces in-process: the memory estimate, the pool's scratch folder, the child's start-up
phase report and its non-finite handling (no per-image host sync)."""

import os
import time
from types import SimpleNamespace

import pytest
import torch

from fusionloader import scratch
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


def test_scratch_folder_is_private_and_stale_ones_are_swept(tmp_path):
    path = scratch.make_scratch(str(tmp_path))
    assert os.path.basename(path).startswith(f"fusionloader-pool-{os.getpid()}-")
    assert os.stat(path).st_mode & 0o777 == 0o700
    dead = tmp_path / "fusionloader-pool-999999999-abc"  # no such pid
    dead.mkdir()
    (dead / "data.f32").write_bytes(b"x")
    assert scratch.sweep_stale(str(tmp_path)) == [str(dead)] and not dead.exists() and os.path.isdir(path)
    scratch.remove_scratch(path)
    assert not os.path.exists(path)


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
