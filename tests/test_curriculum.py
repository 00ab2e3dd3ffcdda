"""Curricula (fusionloader.methods.curriculum): per-epoch values, pickling, and a FusionLoader following one."""

import math
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from fusionloader.loader import FusionLoader
from fusionloader.methods.curriculum import Constant, Curriculum, DiverseToSpecific, RandomizedIntensity, apply
from fusionloader.plan import RANDOMIZED_INTENSITY


def test_diverse_to_specific_schedule():
    c = DiverseToSpecific(epochs_per_level=2, alpha=0.4, real_epochs_after=3)
    assert isinstance(c, Curriculum)
    assert c.num_epochs == 10 * 2 + 3
    # lambda 0.1 .. 0.9 ascending = strength 0.9 .. 0.1 descending, two epochs each
    for k, lam in enumerate((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)):
        for epoch in (2 * k, 2 * k + 1):
            assert c.level(epoch) == lam
            assert c.strengths(epoch) == pytest.approx(1 - lam)
            assert c.alpha(epoch) == 0.4
    assert [c.strengths(e) for e in (0, 8, 16)] == [0.9, 0.5, 0.1]  # exact decimals, not 0.30000000000000004
    # lambda = 1 (the real image) and everything after: real only
    for epoch in (18, 19, 20, 22, 100):
        assert c.level(epoch) == 1.0 and c.alpha(epoch) == 0.0
        assert c.strengths(epoch) == 0.1  # a valid value the loader never uses at alpha 0


def test_diverse_to_specific_custom_levels():
    c = DiverseToSpecific(levels=(0.0, 0.5), alpha=1.0)  # lambda 0: strength 1.0 (DisCL's text-only end)
    assert [c.strengths(e) for e in range(3)] == [1.0, 0.5, 0.5]
    assert [c.alpha(e) for e in range(3)] == [1.0, 1.0, 0.0]
    for bad in ((0.5, 0.2), (), (1.0,), (0.2, 1.5)):
        with pytest.raises(ValueError):
            DiverseToSpecific(levels=bad)
    with pytest.raises(ValueError):
        DiverseToSpecific(epochs_per_level=0)
    with pytest.raises(ValueError):
        DiverseToSpecific(alpha=1.5)
    with pytest.raises(ValueError):
        c.alpha(-1)


def test_constant_and_randomized():
    assert Constant(0.5, 0.3).strengths(7) == 0.5 and Constant(0.5, 0.3).alpha(7) == 0.3
    assert Constant((0.25, 0.75)).strengths(0) == (0.25, 0.75)
    assert Constant(None).strengths(0) is None  # text-only
    assert Constant("randomized").strengths(0) == RANDOMIZED_INTENSITY
    r = RandomizedIntensity()
    assert [r.strengths(e) for e in range(3)] == [(0.25, 0.5, 0.75, 1.0)] * 3 and r.alpha(5) == 0.5
    for bad in (0.0, 1.2, "sometimes", ()):
        with pytest.raises(ValueError):
            Constant(bad)


@pytest.mark.parametrize("c", [DiverseToSpecific(epochs_per_level=3, alpha=0.7), Constant((0.2, 0.4), 0.1),
                               RandomizedIntensity(0.9)])  # fmt: skip
def test_picklable(c):
    back = pickle.loads(pickle.dumps(c))
    assert back == c and hash(back) == hash(c) and repr(back) == repr(c)
    assert [(back.strengths(e), back.alpha(e)) for e in range(40)] == [(c.strengths(e), c.alpha(e)) for e in range(40)]


# -- with a FusionLoader ---------------------------------------------------------------------------


class Images(Dataset):
    classes = ["cat", "dog"]

    def __init__(self, n=16, size=16):
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 2


class EchoPool:
    """In-process ProducerPool stand-in: every job is ready at once; the image encodes the job's strength."""

    def __init__(self, synthesizer, source, devices=("cpu",), **kwargs):
        self.source, self.jobs, self.strengths = source, {}, []

    def start(self):
        pass

    def submit(self, jobs):
        for j in jobs:
            self.jobs[j.key] = j
            self.strengths.append(j.strength)

    def take(self, key, timeout=0.0):
        job = self.jobs.pop(key, None)
        if job is None:
            return None
        return torch.full(self.source.raw(job.index)[0].shape, float(job.strength))

    def cancel(self, keys):
        for k in keys:
            self.jobs.pop(k, None)

    def check(self):
        pass

    def stats(self):
        return {}

    def close(self):
        pass


class EchoFactory:  # picklable, like the loader's other arguments
    def __call__(self, synthesizer, source, devices=("cpu",), **kwargs):
        return EchoPool(synthesizer, source, devices, **kwargs)


def _epoch_meta(loader):
    strengths, synthetic, images = [], [], []
    for (x, _), meta in loader:
        strengths.append(meta["strength"])
        synthetic.append(meta["synthetic"])
        images.append(x)
    return torch.cat(strengths), torch.cat(synthetic), torch.cat(images)


def test_loader_follows_curriculum():
    curriculum = DiverseToSpecific(levels=(0.25, 0.5, 1.0), epochs_per_level=1, alpha=0.75)
    loader = FusionLoader(Images(), batch_size=4, shuffle=True, seed=0, alpha=0.0, synthesizer="stand-in",
                          pool_factory=EchoFactory(), late_policy="wait", return_meta=True)  # fmt: skip
    for epoch in range(4):
        alpha, strength = apply(loader, curriculum, epoch)
        loader.set_epoch(epoch)
        assert loader.alpha == alpha and loader.strengths == strength
        s, synthetic, x = _epoch_meta(loader)
        if epoch < 2:  # lambda 0.25, 0.5 -> strength 0.75, 0.5
            expected = 1 - curriculum.levels[epoch]
            assert synthetic.any() and torch.isnan(s[~synthetic]).all()
            assert torch.all(s[synthetic] == expected)
            assert torch.all(x[synthetic] == expected)  # the pool was asked for that strength
        else:  # lambda 1.0, then after the schedule: real only
            assert alpha == 0.0 and not synthetic.any() and torch.isnan(s).all()
    loader.close()


def test_randomized_intensity_in_loader():
    loader = FusionLoader(Images(n=64), batch_size=8, shuffle=True, seed=1, synthesizer="stand-in",
                          pool_factory=EchoFactory(), late_policy="wait", return_meta=True)  # fmt: skip
    apply(loader, RandomizedIntensity(alpha=1.0), 0)
    s, synthetic, _ = _epoch_meta(loader)
    assert synthetic.all()
    assert set(np.round(s.numpy(), 4).tolist()) == set(RANDOMIZED_INTENSITY)
    loader.close()


def test_apply_validates():
    loader = FusionLoader(Images(), batch_size=4, alpha=0.0)  # no synthesizer
    with pytest.raises(ValueError, match="synthesizer"):
        apply(loader, Constant(0.5, 0.5), 0)
    assert apply(loader, DiverseToSpecific(levels=(1.0 - 1e-12, 1.0)), 1) == (0.0, pytest.approx(1e-12))
    assert loader.alpha == 0.0 and math.isfinite(loader.strengths)


def test_real_producers_follow_curriculum(tiny_sd1_path):
    """The tiny checkpoint in spawned producers (4 steps): fresh samples carry the stage's strength."""
    curriculum = DiverseToSpecific(levels=(0.25, 0.75, 1.0), alpha=0.5)
    loader = FusionLoader(Images(n=8, size=32), batch_size=4, shuffle=True, seed=0, synthesizer=tiny_sd1_path,
                          late_policy="wait", return_meta=True, num_inference_steps=4, guidance_scale=2.0,
                          producer_timeout=120.0, producer_capacity=4)  # fmt: skip
    try:
        for epoch in range(3):
            apply(loader, curriculum, epoch)
            s, synthetic, x = _epoch_meta(loader)
            if epoch < 2:
                assert synthetic.any() and torch.all(s[synthetic] == 1 - curriculum.levels[epoch])
                assert torch.isfinite(x).all()
            else:
                assert not synthetic.any()
    finally:
        loader.close()


# -- DisCL's adaptive curriculum ------------------------------------------------------------------------------

from fusionloader.methods.curriculum import AdaptiveCurriculum, lambda_to_strength  # noqa: E402


class GuidanceStandIn:
    """A generator whose output at each guidance level is known by construction (centred pixel space, x - 0.5):

    lambda 0.5 (strength 0.5) draws the true class's pattern strongly; lambda 1 is the real (weak) image; lambda
    0 (text-only) draws nothing class-specific (grey); lambda 0.1 (strength 0.9) drifts to the *other* class's
    pattern. Training on lambda 0.5's data provably raises the true-class probability of the hard images most
    (for a linear model the eval margin moves by x'.x per example: 0.4*0.05 vs 0.05^2 vs 0 vs negative)."""

    resolution = (8, 8)

    def __init__(self):
        self.calls = []

    def augment(self, images, prompts, strengths, guidance_scale, num_inference_steps, seeds):
        self.calls.append((strengths, list(seeds)))
        out = []
        for img, prompt in zip(images, prompts):
            c = int(prompt.split()[-1])
            if strengths is None:
                out.append(torch.full_like(img, 0.5))
            elif abs(strengths - 0.5) < 1e-9:
                out.append(0.5 + 0.4 * PATTERN[c])
            elif abs(strengths - 0.9) < 1e-9:
                out.append(0.5 + 0.4 * PATTERN[1 - c])
            else:
                raise AssertionError(strengths)
        return torch.stack(out)


PATTERN = torch.zeros(2, 3, 8, 8)
PATTERN[0, :, :, :4], PATTERN[0, :, :, 4:] = 1.0, -1.0
PATTERN[1] = -PATTERN[0]


def _hard_set(n=8):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = 0.5 + 0.05 * PATTERN[labels] + 0.02 * torch.randn(n, 3, 8, 8, generator=g)
    return images.clamp(0, 1), labels


def _linear():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    torch.nn.init.zeros_(model[1].weight)
    torch.nn.init.zeros_(model[1].bias)
    return model


def test_adaptive_picks_the_lambda_that_provably_helps_most():
    images, labels = _hard_set()
    model = _linear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synth = GuidanceStandIn()
    ac = AdaptiveCurriculum((0.0, 0.1, 0.5, 1.0), synth, model, images, labels, prompts=lambda y: f"class {y}",
                            probe_steps=5, probe_lr=0.5, transform=lambda x: x - 0.5, variants=2)  # fmt: skip
    assert ac.choose() == 0.5
    entry = ac.log[-1]
    g = entry["gains"]
    assert entry["base_prob"] == pytest.approx(0.5) and entry["chosen"] == 0.5 and entry["stage"] == 0
    assert g[0.5] > g[1.0] > 0 and g[0.1] < 0 and abs(g[0.0]) < 1e-6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the trainer's model untouched
    # The same seeds for every lambda of a stage (only lambda differs), new ones at the next stage.
    assert [c[0] for c in synth.calls] == [None, 0.9, 0.5] and len({tuple(c[1]) for c in synth.calls}) == 1
    assert len(synth.calls[0][1]) == 2 * len(images)
    ac.choose()
    assert len(ac.log) == 2 and synth.calls[-1][1] != synth.calls[0][1]


def test_adaptive_follows_the_model_and_feeds_the_loader():
    images, labels = _hard_set()
    model = _linear()
    with torch.no_grad():  # a trained (here: confidently wrong) model, not a zero one
        model[1].weight.copy_(torch.stack([-PATTERN[0].flatten(), PATTERN[0].flatten()]) * 5)
    ac = AdaptiveCurriculum((0.1, 1.0), GuidanceStandIn(), model, images, labels, prompts=[f"class {int(y)}" for y in labels],
                            probe_steps=3, probe_lr=0.5, transform=lambda x: x - 0.5, alpha=0.25)  # fmt: skip
    assert ac.log == []
    with pytest.raises(RuntimeError, match="choose"):
        ac.strengths(0)
    lam = ac.choose()  # whichever measured gain is larger wins
    g = ac.log[-1]["gains"]
    assert lam == max(g, key=g.get)

    class Loader:
        synthesizes = True

        def set_synthesis(self, alpha, strengths):
            self.got = (alpha, strengths)

    loader = Loader()
    ac.current = 0.1
    assert apply(loader, ac, 3) == (0.25, pytest.approx(0.9)) and loader.got == (0.25, pytest.approx(0.9))
    ac.current = 1.0
    assert apply(loader, ac, 4)[0] == 0.0  # lambda 1: real only
    ac.current = 0.0
    assert apply(loader, ac, 5) == (0.25, None)  # lambda 0: text-only
    assert lambda_to_strength(0.7) == 0.3 and lambda_to_strength(0.0) is None


@pytest.mark.parametrize("lambdas, match", [((0.2, 1.5), r"lambdas\[1\]"), ((-0.1,), r"lambdas\[0\]"), ((), "lambdas is empty"),
                                            ((0.5, 0.5), "repeated"), ((float("nan"),), r"lambdas\[0\]")])
def test_adaptive_rejects_invalid_lambdas(lambdas, match):
    images, labels = _hard_set()
    with pytest.raises(ValueError, match=match):
        AdaptiveCurriculum(lambdas, GuidanceStandIn(), _linear(), images, labels, prompts="class 0")


def test_adaptive_checks_its_sets():
    images, labels = _hard_set()
    with pytest.raises(ValueError, match="hard_labels"):
        AdaptiveCurriculum((0.5,), GuidanceStandIn(), _linear(), images, labels[:3], prompts="class 0")
    with pytest.raises(ValueError, match="hard_images"):
        AdaptiveCurriculum((0.5,), GuidanceStandIn(), _linear(), images * 3, labels, prompts="class 0")
    with pytest.raises(ValueError, match="variants"):
        AdaptiveCurriculum((0.5,), GuidanceStandIn(), _linear(), images, labels, prompts="class 0", variants=0)
    ac = AdaptiveCurriculum((0.5,), GuidanceStandIn(), _linear(), images, labels, prompts=["class 0"])
    with pytest.raises(ValueError, match="prompts"):
        ac.choose()


def test_adaptive_on_the_embedded_model():
    """End to end with the real engine: the embedded digits generator, a small classifier, 4 denoising steps."""
    pytest.importorskip("sklearn", reason="the embedded digits need scikit-learn")
    from fusionloader.engine.synthesizer import Synthesizer
    from fusionloader.pretrained import PROMPT_TEMPLATE, class_names, default_model_path, load_digits_splits

    test = load_digits_splits().test
    images, labels = test.images[:6], test.labels[:6]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.LazyLinear(10))  # fmt: skip
    model(images)  # materialise the lazy layer
    synth = Synthesizer.from_pretrained(default_model_path())
    kw = dict(prompts=lambda y: PROMPT_TEMPLATE.format(class_names[y]), num_inference_steps=4, guidance_scale=3.0,
              probe_steps=2, probe_lr=0.05, seed=3)  # fmt: skip
    ac = AdaptiveCurriculum((0.0, 0.5, 1.0), synth, model, images, labels, **kw)
    lam = ac.choose()
    g = ac.log[0]["gains"]
    assert set(g) == {0.0, 0.5, 1.0} and lam == max(g, key=g.get) and len(set(g.values())) == 3
    again = AdaptiveCurriculum((0.0, 0.5, 1.0), synth, model, images, labels, **kw)
    again.choose()
    assert again.log[0]["gains"] == g  # reproducible from the seed
