"""Device names against CUDA_VISIBLE_DEVICES, and a producer binding its device first (torch.cuda patched:
this machine has no GPU, so what is checked is which CUDA calls are made, in which order, on which device)."""

import pytest
import torch

from fusionloader import devices
from fusionloader.devices import bind_process, resolve_device
from fusionloader.producer import ProducerPool, pin_device_for


@pytest.fixture
def cuda_build(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)


def test_visible_ordinals_are_kept(cuda_build):
    assert resolve_device("cuda:1", environ={}, device_count=8) == "cuda:1"
    assert resolve_device("cuda", environ={}, device_count=1) == "cuda:0"
    assert resolve_device(torch.device("cpu"), environ={}) == "cpu"


def test_physical_ids_map_through_a_narrowed_visibility(cuda_build):
    env = {"CUDA_VISIBLE_DEVICES": "6,7"}
    assert resolve_device("cuda:6", environ=env, device_count=2) == "cuda:0"
    assert resolve_device("cuda:7", environ=env, device_count=2) == "cuda:1"
    assert resolve_device("cuda:1", environ=env, device_count=2) == "cuda:1"  # torch's meaning first
    with pytest.raises(ValueError, match=r"'cuda:3' is not visible.*2 CUDA device\(s\).*CUDA_VISIBLE_DEVICES='6,7'"):
        resolve_device("cuda:3", environ=env, device_count=2)


def test_cuda_on_a_cpu_build_fails_at_construction_naming_the_device(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda:0' needs CUDA, but this torch build has none"):
        ProducerPool("unused", None, devices=["cpu", "cuda:0"])
    with pytest.raises(ValueError, match="'tpu:0'"):
        ProducerPool("unused", None, devices=["tpu:0"])


class FakeCuda:
    """Records every torch.cuda call a function makes (name, args) and the current device at that time."""

    def __init__(self, monkeypatch, initialized=False, current=0):
        self.calls, self.current, self.initialized = [], current, initialized
        for name in ("set_device", "current_device", "is_initialized", "current_stream", "cudart", "device", "init"):
            monkeypatch.setattr(torch.cuda, name, self._recorder(name))
        monkeypatch.setattr(torch, "set_num_threads", self._recorder("set_num_threads"))

    def _recorder(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args))
            if name == "set_device":
                self.current = torch.device(args[0]).index
            if name == "current_device":
                return self.current
            if name == "is_initialized":
                return self.initialized
        return call


def test_a_gpu_producer_binds_its_device_before_any_other_cuda_call_and_bounds_threads(monkeypatch):
    fake = FakeCuda(monkeypatch)
    bind_process("cuda:6", threads=None)
    assert fake.calls[0] == ("set_device", (torch.device("cuda:6"),))
    assert ("set_num_threads", (devices.GPU_PRODUCER_THREADS,)) in fake.calls
    fake.calls.clear()
    bind_process("cpu", threads=3)
    assert fake.calls == [("set_num_threads", (3,))]  # a CPU producer never touches CUDA


def test_the_trainer_pins_only_under_a_device_it_already_uses(monkeypatch):
    fake = FakeCuda(monkeypatch, initialized=False)
    assert pin_device_for("cpu") is None  # no CUDA yet: pinning would open a context on GPU 0
    assert [c[0] for c in fake.calls] == ["is_initialized"]
    fake.initialized, fake.current = True, 3
    assert pin_device_for("cpu") == 3
    assert pin_device_for("cuda:3") is None  # a device ring is not pinned host memory
