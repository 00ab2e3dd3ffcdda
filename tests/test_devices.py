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


def test_the_childs_process_setup_binds_the_device_first(monkeypatch):
    import os
    import signal
    import threading

    from fusionloader import producer_child
    from fusionloader.protocol import ChildConfig

    fake = FakeCuda(monkeypatch)
    order = []
    monkeypatch.setattr(signal, "signal", lambda *a: order.append("signal"))
    monkeypatch.setattr(threading, "Thread", lambda **kw: type("T", (), {"start": lambda self: order.append("watchdog")})())
    monkeypatch.setattr(os, "nice", lambda n: order.append("nice"))
    monkeypatch.setattr(producer_child, "bind_process", lambda device, threads: (order.append("bind"),
                                                                                  bind_process(device, threads)))
    producer_child.prepare_process(ChildConfig(0, "cuda:6", None, None, 2, None, os.getpid(), None, False))
    assert order[0] == "bind" and "nice" not in order  # a GPU producer keeps its priority
    assert fake.calls[0] == ("set_device", (torch.device("cuda:6"),))


def test_a_gpu_producer_pins_its_ring_mapping_under_its_own_device(monkeypatch):
    import os

    from fusionloader import ring as ring_module
    from fusionloader.producer_child import Producer
    from fusionloader.protocol import ChildConfig
    from fusionloader.ring import SlotRing

    registered = []
    monkeypatch.setattr(ring_module, "_host_register", lambda ptr, size, device: registered.append(device) or True)
    monkeypatch.setattr(ring_module, "_host_unregister", lambda ptr, device: None)
    ring = SlotRing(2, (3, 4, 4))  # the trainer's (no CUDA there: not pinned)
    FakeCuda(monkeypatch)
    bind_process("cuda:6", None)
    child = Producer(ChildConfig(0, "cuda:6", None, None, 2, None, os.getpid(), None, False), None, None, None)
    child.resolution = (4, 4)
    child.attach(ring.handle)
    assert registered == [6] and child.ring.pinned and not ring.pinned
    assert not child.direct  # a GPU producer copies into the host ring (device -> pinned slot)
    child.ring.close()
    ring.unlink()
