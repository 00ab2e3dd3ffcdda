"""Quality metrics (fusionloader.pretrained.quality) on constructed cases, against reference computations."""

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the embedded classifier needs scikit-learn (extra 'demo')")
scipy_linalg = pytest.importorskip("scipy.linalg", reason="the Fréchet reference uses scipy.linalg.sqrtm")

from fusionloader.pretrained.quality import QualityJudge, frechet_distance, gaussian_stats, recognisability  # noqa: E402


def _reference_frechet(a, b):
    # pytorch-fid's formula: |mu1-mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)) with scipy's complex sqrtm.
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_matches_reference_on_random_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(loc=0.5, size=(250, 8)) @ rng.normal(size=(8, 8))
    assert frechet_distance(a, b) == pytest.approx(_reference_frechet(a, b), rel=1e-6, abs=1e-6)


def test_frechet_closed_forms():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 5))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)  # identical samples
    # A shift by d moves only the mean term: exactly |d|^2.
    d = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(a, a + d) == pytest.approx(float((d**2).sum()), rel=1e-9)
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2 with the sample statistics.
    x, y = rng.normal(size=(400, 1)), 3.0 * rng.normal(size=(400, 1)) + 2.0
    expect = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x, y) == pytest.approx(expect, rel=1e-9)


def test_frechet_bad_input():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="shape"):
        gaussian_stats(np.zeros((1, 3)))


class _Constant:
    def __init__(self, value):
        self.value = value

    def predict(self, feats):
        return np.full(len(feats), self.value)


def test_recognisability_counts_matches():
    imgs = torch.zeros(10, 3, 32, 32)
    labels = np.array([3] * 7 + [1] * 3)
    assert recognisability(_Constant(3), imgs, labels) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="labels"):
        recognisability(_Constant(3), imgs, labels[:5])


@pytest.fixture(scope="module")
def judge():
    return QualityJudge()


def test_judge_on_real_and_degraded_digits(judge):
    tr = judge.splits.train
    real = judge(tr.images, tr.labels.numpy())  # real, unseen-by-the-test-statistics digits: recognised, near
    assert real["recognisability"] > 0.9
    blank = judge(torch.zeros_like(tr.images), tr.labels.numpy())  # all black: one class at most, far away
    assert blank["recognisability"] < 0.2
    assert blank["frechet"] > 10 * real["frechet"]
    wrong = judge(tr.images, (tr.labels.numpy() + 1) % 10)  # right images, wrong labels: recognisability drops
    assert wrong["recognisability"] < 0.1
    assert wrong["frechet"] == pytest.approx(real["frechet"])  # the distance ignores labels
    with pytest.raises(ValueError, match="NaN"):
        judge(torch.full_like(tr.images[:4], float("nan")), tr.labels.numpy()[:4])
