"""SlotRing: the slot protocol (FREE -> WRITING -> READY -> READING -> FREE), copy-out, named segments.

Cross-process use is exercised by tests/test_producer.py (real producer processes); here a second
``attach`` in the same process stands in for the producer, which maps the same segment.
"""

import os
import pickle

import pytest
import torch

from fusionloader.ring import FREE, READY, WRITING, RingHandle, SlotRing, SlotStateError


def shm_exists(name):
    return os.path.exists(os.path.join("/dev/shm", name))


@pytest.fixture
def ring():
    r = SlotRing(3, (3, 5, 7))
    yield r
    r.unlink()


def test_segment_is_named_and_unlinked():
    r = SlotRing(2, (3, 4, 4))
    assert r.name.startswith(f"fl_ring_{os.getpid()}_") and shm_exists(r.name)
    r.unlink()
    assert not shm_exists(r.name)
    r.unlink()  # idempotent
    r.close()


def test_full_cycle_copies_out(ring):
    producer = SlotRing.attach(pickle.loads(pickle.dumps(ring.handle)))
    img = torch.rand(3, 5, 7)
    ring.assign(1, owner=0)
    assert producer.state(1) == WRITING
    producer.write(1, key=42, image=img, owner=0)
    assert ring.state(1) == READY and ring.counts() == {"free": 2, "writing": 0, "ready": 1, "reading": 0}
    out = ring.read(1, key=42)
    assert torch.equal(out, img) and ring.state(1) == FREE
    # The result is the caller's: reusing the slot does not change it.
    ring.assign(1, owner=0)
    producer.write(1, key=43, image=torch.zeros(3, 5, 7), owner=0)
    assert torch.equal(out, img)
    producer.close()
    assert shm_exists(ring.name)  # an attached ring never unlinks


def test_protocol_violations_raise(ring):
    img = torch.rand(3, 5, 7)
    with pytest.raises(SlotStateError):
        ring.write(0, 1, img, owner=0)  # no credit
    ring.assign(0, owner=0)
    with pytest.raises(SlotStateError):
        ring.assign(0, owner=1)  # credited twice
    with pytest.raises(SlotStateError):
        ring.write(0, 1, img, owner=1)  # someone else's credit
    with pytest.raises(SlotStateError):
        ring.read(0, 1)  # not ready
    with pytest.raises(ValueError):
        ring.write(0, 1, torch.rand(3, 4, 4), owner=0)  # wrong shape
    ring.write(0, 1, img, owner=0)
    with pytest.raises(SlotStateError):
        ring.write(0, 2, img, owner=0)  # READY slots are never overwritten
    with pytest.raises(SlotStateError):
        ring.read(0, 2)  # wrong key
    assert torch.equal(ring.read(0, 1), img)


def test_release_reclaims_a_dead_writers_slot(ring):
    ring.assign(2, owner=5)
    ring.release(2)
    assert ring.state(2) == FREE
    ring.assign(2, owner=6)
    ring.write(2, 9, torch.ones(3, 5, 7), owner=6)
    assert ring.read(2, 9).sum() == 105


def test_handle_pickles_without_data():
    r = SlotRing(1, (3, 2, 2), dtype=torch.float16)
    h = pickle.loads(pickle.dumps(r.handle))
    assert h == RingHandle(r.name, 1, (3, 2, 2), torch.float16, "cpu")
    a = SlotRing.attach(h)
    r.assign(0, 0)
    a.write(0, 3, torch.full((3, 2, 2), 0.5), 0)
    out = r.read(0, 3)
    assert out.dtype == torch.float16 and bool((out == 0.5).all())
    a.close()
    r.unlink()
    assert not shm_exists(r.name)


def test_garbage_collected_ring_unlinks():
    r = SlotRing(1, (3, 2, 2))
    name = r.name
    del r
    assert not shm_exists(name)


# -- issue 14: size check, uint8 slots, pinning under the right device, one sync per publish -------------


def test_a_ring_larger_than_free_shared_memory_is_refused_before_creation():
    from fusionloader.ring import RingSpaceError, ring_bytes

    need = ring_bytes(128, (3, 512, 512), torch.float32)
    with pytest.raises(RingSpaceError) as info:
        SlotRing(128, (3, 512, 512), free_bytes=64 << 20)
    msg = str(info.value)
    assert f"{need / (1 << 20):.1f} MiB" in msg and "64.0 MiB free" in msg
    assert "slots" in msg and "uint8" in msg and "--shm-size" in msg
    assert not any(n.startswith(f"fl_ring_{os.getpid()}_") for n in os.listdir("/dev/shm"))
    assert ring_bytes(128, (3, 512, 512), torch.uint8) < need / 3.9  # the uint8 fix really is ~4x smaller


def test_pool_refuses_an_oversized_ring_at_construction(monkeypatch):
    from fusionloader import ring as ring_module
    from fusionloader.producer import ProducerPool
    from fusionloader.ring import RingSpaceError

    monkeypatch.setattr(ring_module, "_free_shm_bytes", lambda path=ring_module.SHM_DIR: 128 << 20)
    with pytest.raises(RingSpaceError, match="128 slots of \\(3, 512, 512\\) float32"):
        ProducerPool("unused", None, slots=128, image_size=512)
    ProducerPool("unused", None, slots=128, image_size=512, slot_dtype=torch.uint8).close()  # 384 MiB -> 96 MiB: fits


def test_uint8_slots_hold_rounded_images():
    r = SlotRing(2, (3, 4, 4), dtype=torch.uint8)
    img = torch.rand(3, 4, 4)
    r.assign(0, 0)
    r.write(0, 7, img, owner=0)
    out = r.read(0, 7)
    assert out.dtype == torch.uint8 and torch.equal(out, (img * 255).round().to(torch.uint8))
    r.unlink()


class FakeCudaRing:
    """torch.cuda as a pinned ring uses it: which device each registration / allocation / sync runs under."""

    def __init__(self, monkeypatch):
        from fusionloader import ring as ring_module

        self.registered, self.allocated, self.syncs, self.device = [], [], 0, 0
        monkeypatch.setattr(ring_module, "_host_register", lambda ptr, size, device: self.registered.append(device) or True)
        monkeypatch.setattr(ring_module, "_host_unregister", lambda ptr, device: None)

        def pinned_empty(shape, dtype, device):
            t = torch.empty(shape, dtype=dtype)
            self.allocated.append((device, t))
            return t

        monkeypatch.setattr(ring_module, "_pinned_empty", pinned_empty)
        fake = self

        class Stream:
            def synchronize(self):
                fake.syncs += 1

        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)


def test_a_pinned_ring_is_registered_under_its_device_and_read_into_pinned_memory(monkeypatch):
    fake = FakeCudaRing(monkeypatch)
    r = SlotRing(3, (3, 4, 4), pin=5)
    assert r.pinned and fake.registered == [5]
    img = torch.rand(3, 4, 4)
    r.assign(1, 0)
    r.write(1, 9, img, owner=0)
    out = r.read(1, 9)
    assert torch.equal(out, img)
    # the copy-out went into pinned memory allocated under device 5, not a pageable clone
    assert len(fake.allocated) == 1 and fake.allocated[0][0] == 5 and fake.allocated[0][1] is out
    r.unlink()


def test_no_registration_without_a_device_even_when_cuda_is_available(monkeypatch):
    fake = FakeCudaRing(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    r = SlotRing(2, (3, 4, 4))  # (the collector thread makes rings: it must not open a context on GPU 0)
    a = SlotRing.attach(r.handle)
    assert not r.pinned and not a.pinned and fake.registered == []
    a.close()
    r.unlink()


def test_publishing_a_steps_images_synchronises_once(monkeypatch):
    fake = FakeCudaRing(monkeypatch)
    r = SlotRing(4, (3, 2, 2))
    producer = SlotRing.attach(r.handle, pin=5)
    for slot in range(3):
        r.assign(slot, 0)
        producer.fill(slot, torch.full((3, 2, 2), slot / 4), owner=0)
    assert fake.syncs == 0
    producer.publish([0, 1, 2], [10, 11, 12], owner=0)
    assert fake.syncs == 1 and [r.state(s) for s in range(3)] == [READY] * 3
    assert float(r.read(2, 12).mean()) == 0.5
    producer.close()
    r.unlink()
