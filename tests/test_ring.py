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
