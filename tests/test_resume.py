"""Resume: state_dict mid-epoch, reload into a fresh loader, and the rest equals an uninterrupted run.

``check_resume`` is the reusable save-at-midpoint helper (torchdata's pattern): run ``epochs`` epochs,
saving ``state_dict()`` after ``k`` batches (or right after an epoch's loop ends) on the way; build a
*new* loader, ``load_state_dict`` and finish the run there. Indices and coins must
match exactly, real images bit-exactly, synthetic images to float tolerance (they are recomputed from
the plan's seeds; nothing of the ring is saved).
"""

import pytest
import torch
from torch.utils.data import SubsetRandomSampler

from test_loader import TensorImages, engine_ready, fusion, real_fusion, real_synth  # noqa: F401  (fixture)


def _flatten(batches):
    out = []
    for (x, y), meta in batches:
        for j in range(len(y)):
            out.append((x[j], int(y[j]), int(meta["index"][j]), bool(meta["planned"][j]), bool(meta["synthetic"][j])))
    return out


def _run(loader, epochs):
    out = []
    for _ in range(epochs):
        out.extend(loader)
    return out


def check_resume(make_loader, epochs: int, save_after, atol: float = 0.0):
    """Run ``epochs`` epochs, saving ``state_dict()`` after batch ``save_after`` (a global batch count) or
    after epoch ``e``'s loop ends (``("epoch_end", e)``) without disturbing the run; load the state into a
    new loader, finish there, and compare with what the first run yielded after the save point."""
    loader, reference, state = make_loader(), [], None
    for epoch in range(epochs):
        for batch in loader:
            reference.append(batch)
            if len(reference) == save_after:
                state = loader.state_dict()
        if save_after == ("epoch_end", epoch):
            state, save_after = loader.state_dict(), len(reference)
    loader.close()
    assert state is not None
    resumed = make_loader()
    resumed.load_state_dict(state)
    rest = _run(resumed, epochs - state["next_epoch"])
    got, want = _flatten(rest), _flatten(reference[save_after:])
    assert len(got) == len(want) > 0
    for p, (a, b) in enumerate(zip(got, want)):
        assert a[1:] == b[1:], f"position {p}: (label, index, coin, synthetic) differ"
        if b[4] and atol:
            torch.testing.assert_close(a[0], b[0], atol=atol, rtol=0, msg=f"synthetic position {p}")
        else:
            assert torch.equal(a[0], b[0]), f"position {p}: image differs"
    assert resumed.stats()["cumulative"]["samples"] == len(_flatten(reference))  # counts carry over
    resumed.close()
    return _flatten(reference)


SAVE_POINTS = [2, 5, ("epoch_end", 0), 7]  # mid-epoch 0, last batch of epoch 0, between epochs, mid-epoch 1
IDS = ["mid-epoch-0", "last-batch-epoch-0", "epoch-boundary", "mid-epoch-1"]


@pytest.mark.parametrize("save_after", SAVE_POINTS, ids=IDS)
def test_resume_seeded_order(save_after):
    ds = TensorImages(n=20)
    make = lambda: fusion(ds, batch_size=4, shuffle=True, seed=3, return_meta=True, late_policy="wait",  # noqa: E731
                          strengths="randomized", transform=lambda x: x.flip(-1) if torch.rand(()) < 0.5 else x)
    got = check_resume(make, 2, save_after)
    assert any(s for *_, s in got) and not all(s for *_, s in got)


@pytest.mark.parametrize("save_after", SAVE_POINTS, ids=IDS)
def test_resume_user_generator_and_workers(save_after):
    ds = TensorImages(n=20)

    def make():
        g = torch.Generator().manual_seed(9)
        return fusion(ds, batch_size=4, shuffle=True, generator=g, seed=1, num_workers=2, return_meta=True,
                      late_policy="wait")

    check_resume(make, 2, save_after)


def test_resume_custom_sampler_recorded_order():
    ds = TensorImages(n=30)

    def make():
        g = torch.Generator().manual_seed(2)
        return fusion(ds, batch_size=3, sampler=SubsetRandomSampler(list(range(0, 30, 2)), generator=g),
                      return_meta=True, late_policy="wait")

    check_resume(make, 2, 3)


def test_resume_with_real_producers(real_synth):  # noqa: F811
    ds = TensorImages(n=8, size=32 if engine_ready() else 16)
    make = lambda: real_fusion(ds, real_synth, batch_size=4, shuffle=True, seed=5, alpha=0.5,  # noqa: E731
                               late_policy="wait", return_meta=True)
    check_resume(make, 2, 3, atol=1e-4)  # mid-epoch 1
