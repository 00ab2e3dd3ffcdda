"""Quality of generated digits without the internet: recognisability and a Fréchet distance.

    python -m fusionloader.pretrained.quality --model fusionloader/assets/digits-lcm --steps 1 2 4 --json out/lcm_quality.json

Both figures use the embedded classifier of :mod:`fusionloader.pretrained.evaluate` (logistic regression on
REAL classifier-train-split digits, features = grey 8x8 area-pooled pixels, 0..16 as sklearn's digits):

* **recognisability**: the classifier's accuracy on generated images against the class they were asked for
  (chance 10%);
* **Fréchet distance** (FID-style): between Gaussians fitted to the classifier's features of the generated
  images and of the REAL held-out test split (449 digits the generator never saw),
  ``|mu_g - mu_r|^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))``; 0 for identical distributions. Computed as
  ``Tr((S_r^(1/2) S_g S_r^(1/2))^(1/2))`` by symmetric eigendecompositions (no complex ``sqrtm``).
  Comparable only between runs with the same number of generated images (the estimate is biased upwards
  for small samples, as FID is).

The command line measures a diffusers folder (the teacher ``digits-ldm`` or the LCM student ``digits-lcm``)
with diffusers' own pipelines: text-only generations and img2img of held-out images at each strength of
DA-Fusion's {0.25, 0.5, 0.75, 1.0}. An ``LCMScheduler`` checkpoint runs in diffusers' LCM pipelines
(``LatentConsistencyModel[Img2Img]Pipeline``), ``--steps`` LCM steps at every strength.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

__all__ = ["QualityJudge", "frechet_distance", "gaussian_stats", "measure_pipeline", "recognisability"]

STRENGTHS = (0.25, 0.5, 0.75, 1.0)  # DA-Fusion's randomized intensity


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of an (N, D) feature array, float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))  # D = 1: np.cov gives a scalar


def _sym_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussians fitted to feature arrays ``a`` and ``b`` ((N, D), (M, D))."""
    mu1, s1 = gaussian_stats(a)
    mu2, s2 = gaussian_stats(b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    r = _sym_sqrt(s2)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s1 @ r), 0, None)).sum()  # Tr((S1 S2)^(1/2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def recognisability(classifier, images, labels) -> float:
    """Accuracy of ``classifier`` (sklearn-like, on :func:`evaluate.features`) on ``images`` against ``labels``."""
    from fusionloader.pretrained.evaluate import features

    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return float((classifier.predict(features(images)) == labels).mean())


class QualityJudge:
    """The embedded classifier (trained once on the real train split) and the real test split's features.

    ``judge(images, labels)`` -> ``{"recognisability", "frechet", "images"}``; images (N, 3, H, W) or (N, H, W, 3)
    in [0, 1]."""

    def __init__(self, splits=None, classifier=None):
        from fusionloader.pretrained import load_digits_splits
        from fusionloader.pretrained.evaluate import features, train_classifier

        self.splits = splits if splits is not None else load_digits_splits()
        self.classifier = classifier if classifier is not None else train_classifier(self.splits)
        self.real_features = features(self.splits.test.images)
        self.real_test_accuracy = recognisability(self.classifier, self.splits.test.images, self.splits.test.labels)

    def __call__(self, images, labels) -> dict:
        from fusionloader.pretrained.evaluate import features

        images = images.detach().float().cpu() if torch.is_tensor(images) else np.asarray(images, dtype=np.float32)
        if not np.isfinite(np.asarray(images)).all():
            raise ValueError("generated images contain NaN/inf")
        return {
            "recognisability": recognisability(self.classifier, images, labels),
            "frechet": frechet_distance(features(images), self.real_features),
            "images": len(labels),
        }


def measure_pipeline(model: str, judge: QualityJudge, steps: int, guidance: float = 3.0, per_class: int = 10,
                     img2img_per_class: int = 10, strengths=STRENGTHS, seed: int = 0) -> dict:  # fmt: skip
    """Text-only and per-strength img2img quality of a diffusers folder, run by diffusers' pipelines."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from fusionloader.pretrained import prompts_for

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    if isinstance(pipe.scheduler, LCMScheduler):
        # diffusers' LCM pipelines: img2img picks its k steps inside the strength's span of the distillation
        # grid (LCMScheduler.set_timesteps(k, strength=s)); the SD img2img pipeline would run int(k * s) steps,
        # none at all for k = 1, s < 1.
        from diffusers import LatentConsistencyModelImg2ImgPipeline as I2I
        from diffusers import LatentConsistencyModelPipeline as T2I

        pipe = T2I(**pipe.components)
    else:
        from diffusers import StableDiffusionImg2ImgPipeline as I2I
    pipe.set_progress_bar_config(disable=True)
    res: dict = {"steps": steps, "guidance": guidance, "scheduler": type(pipe.scheduler).__name__}
    labels = np.repeat(np.arange(10), per_class)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = pipe(prompts_for(range(10)), num_images_per_prompt=per_class, num_inference_steps=steps,
                   guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="np").images  # fmt: skip
    res["text_to_image"] = {**judge(out, labels), "seconds": time.perf_counter() - t0}
    i2i = I2I(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    te = judge.splits.test
    pick = np.concatenate([np.flatnonzero(te.labels.numpy() == c)[:img2img_per_class] for c in range(10)])
    src, src_y = te.images[pick], te.labels.numpy()[pick]
    res["img2img"] = {}
    for s in strengths:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = i2i(prompts_for(src_y), image=src, strength=s, num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images  # fmt: skip
        res["img2img"][str(s)] = {**judge(out, src_y), "seconds": time.perf_counter() - t0}
    return res


def main(argv=None) -> int:
    from fusionloader.pretrained import default_model_path, recorded_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--img2img-per-class", type=int, default=10)
    ap.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    judge = QualityJudge()
    res = {"model": recorded_path(args.model), "real_test_accuracy": judge.real_test_accuracy,
           "command": "python -m fusionloader.pretrained.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
           "runs": {}}  # fmt: skip
    for k in args.steps:
        r = measure_pipeline(args.model, judge, k, args.guidance, args.per_class, args.img2img_per_class, args.strengths, args.seed)
        res["runs"][str(k)] = r
        print(f"{k} steps: text-only {r['text_to_image']['recognisability']:.3f} (FD {r['text_to_image']['frechet']:.1f}); "
              + "; ".join(f"img2img {s}: {v['recognisability']:.3f} (FD {v['frechet']:.1f})" for s, v in r["img2img"].items()),
              flush=True)  # fmt: skip
    if args.json:
        from fusionloader.benchmarks.common import write_json

        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
