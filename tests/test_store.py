"""The variant store: per-index bound, byte bound with LRU eviction, seeded uniform choice."""

import torch

from fusionloader.store import VariantStore


def img(v, r=4):
    return torch.full((3, r, r), v)


def test_keeps_most_recent_variants_per_index():
    s = VariantStore(variants_per_index=3)
    for k in range(5):
        s.put(7, img(k / 10), strength=k / 10)
    assert s.count(7) == 3 and len(s) == 3
    values = {round(s.choose(7, seed)[0][0, 0, 0].item(), 1) for seed in range(200)}
    assert values == {0.2, 0.3, 0.4}  # the oldest two dropped; every kept one reachable
    assert s.choose(8, 0) is None


def test_choice_is_seeded_and_uniform():
    s = VariantStore(variants_per_index=4)
    for k in range(4):
        s.put(1, img(k / 4), strength=0.5)
    a = [round(s.choose(1, seed)[0][0, 0, 0].item(), 2) for seed in range(400)]
    b = [round(s.choose(1, seed)[0][0, 0, 0].item(), 2) for seed in range(400)]
    assert a == b
    counts = torch.tensor([a.count(round(k / 4, 2)) for k in range(4)], dtype=torch.float)
    assert (counts > 60).all()
    image, strength = s.choose(1, 0)
    assert image.dtype == torch.float32 and image.shape == (3, 4, 4) and strength == 0.5


def test_byte_cap_evicts_least_recently_used_index():
    one = img(0.5).numel()  # bytes per uint8 variant
    s = VariantStore(variants_per_index=10, max_bytes=3 * one)
    s.put(0, img(0.1))
    s.put(1, img(0.2))
    s.put(2, img(0.3))
    s.choose(0, 0)  # index 0 becomes most recently used
    s.put(3, img(0.4))
    assert 1 not in s and {0, 2, 3} <= {i for i in range(4) if i in s}
    assert s.nbytes == 3 * one and s.evicted == 1


def test_uint8_storage_round_trip_and_zero_capacity():
    s = VariantStore()
    x = torch.rand(3, 8, 8)
    s.put(0, x)
    y, _ = s.choose(0, 1)
    assert (y - x).abs().max() <= 0.5 / 255 + 1e-6
    off = VariantStore(variants_per_index=0)
    off.put(0, x)
    assert off.choose(0, 0) is None and len(off) == 0


def test_choose_only_among_allowed_strengths():
    store = VariantStore(variants_per_index=4)
    for s in (0.25, 0.75, None):
        store.put(3, torch.full((3, 2, 2), 0.5), s)
    for seed in range(20):
        assert store.choose(3, seed, allowed={0.75})[1] == 0.75
        assert store.choose(3, seed, allowed={None})[1] is None
    assert store.choose(3, 0, allowed={0.5}) is None
    assert {store.choose(3, seed)[1] for seed in range(50)} == {0.25, 0.75, None}
