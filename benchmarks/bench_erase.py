"""ESD on the embedded digits model: how specific is the erasure?  (JSON; no timing claims beyond wall time)

    python benchmarks/bench_erase.py --concept seven --json out/bench_erase.json

Trains one ESD delta (``fusionloader.methods.erase.erase_concept``) and reports, for every digit's prompt
``"a photo of the digit {d}"``:

- ``relative_change``: ``||eps_erased - eps_base|| / ||eps_base||`` on one fixed set of ``(x_t, t)`` -- the test
  split's VAE latents (``--per-class`` images of every digit) noised with seeded noise at evenly spaced timesteps --
  identical for every prompt (``erasure_effect``);
- ``recognised``: the share of text-to-image samples (guidance 3, 20 DDIM steps, the same seeds for base and
  erased) that the logistic-regression classifier of ``pretrained/evaluate.py`` (trained on the REAL train split)
  assigns to that digit, with the base UNet and with the erased one (switched by ``ClassAdapters``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = ["main", "run"]


def _recognised(synth, adapters, names, n, seed, clf, features) -> dict:
    import numpy as np

    from fusionloader.engine.sampler import Request

    sampler = synth.sampler(capacity=max(8, n))
    sampler.adapters = adapters
    out = {}
    for which in ("base", "erased"):
        for d, name in enumerate(names):
            key = "erased" if which == "erased" else None
            for i in range(n):
                sampler.submit(Request(key=(which, d, i), prompt=f"a photo of the digit {name}", strength=None,
                                       guidance_scale=3.0, num_inference_steps=20, seed=seed + 1000 * d + i,
                                       adapter=key))  # fmt: skip
        images = {f.key: f.image for f in sampler.drain()}
        for d, name in enumerate(names):
            batch = torch.stack([images[(which, d, i)] for i in range(n)])
            pred = clf.predict(features(batch))
            out.setdefault(name, {})[which] = float(np.mean(pred == d))
    return out


def run(concept="seven", method="esd-x", iterations=300, lr=1e-4, rank=4, steps=10, per_class=2, samples=16,
        template="a photo of the digit {}", seed=0, out_dir=None) -> dict:  # fmt: skip
    from fusionloader.engine.adapters import ClassAdapters
    from fusionloader.engine.latents import encode_posterior
    from fusionloader.engine.synthesizer import Synthesizer
    from fusionloader.methods.erase import erase_concept, erasure_effect
    from fusionloader.pretrained import class_names, default_model_path, load_digits_splits
    from fusionloader.pretrained.evaluate import features, train_classifier

    torch.manual_seed(seed)
    synth = Synthesizer.from_pretrained(default_model_path())
    t0 = time.perf_counter()
    erased = erase_concept(synth, concept, method=method, iterations=iterations, lr=lr, rank=rank,
                           num_inference_steps=steps, prompt=template.format(concept), seed=seed)  # fmt: skip
    train_s = time.perf_counter() - t0
    file = erased.save(out_dir) if out_dir else None

    splits = load_digits_splits()
    rows = torch.cat([torch.nonzero(splits.test.labels == d)[:per_class, 0] for d in range(10)])
    mean, _ = encode_posterior(synth.components.vae, splits.test.images[rows], synth.resolution)
    latents = mean * synth.components.scaling_factor
    prompts = {name: template.format(name) for name in class_names}
    effect = erasure_effect(synth, erased, prompts, latents=latents, seed=seed)
    rel = effect["relative_change"]
    others = [v for k, v in rel.items() if k != concept]

    clf = train_classifier(splits)
    adapters = ClassAdapters({"erased": erased}).attach(synth.components.unet)
    recognised = _recognised(synth, adapters, class_names, samples, seed, clf, features)
    return {
        "settings": dict(concept=concept, method=method, iterations=iterations, lr=lr, rank=rank,
                         num_inference_steps=steps, prompt=template.format(concept), seed=seed,
                         start_guidance=3.0, negative_guidance=1.0, measured_latents=len(rows),
                         samples_per_digit=samples),  # fmt: skip
        "train_s": round(train_s, 2),
        "loss_first_10_mean": sum(erased.losses[:10]) / min(10, len(erased.losses)),
        "loss_last_10_mean": sum(erased.losses[-10:]) / min(10, len(erased.losses)),
        "relative_change": rel,
        "erased_relative_change": rel[concept],
        "others_mean": sum(others) / len(others),
        "others_max": max(others),
        "erased_over_others_mean": rel[concept] / (sum(others) / len(others)),
        "recognised": recognised,
        "file": file,
        "delta_bytes": os.path.getsize(file) if file else sum(t.numel() * 4 for t in erased.tensors.values()),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="seven")
    p.add_argument("--method", default="esd-x", choices=("esd-x", "esd-u", "esd-x-strict"))
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=4, help="0: full weights")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--json", default="out/bench_erase.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    res = run(a.concept, a.method, a.iterations, a.lr, a.rank or None, a.steps, a.per_class, a.samples, seed=a.seed,
              out_dir=a.out_dir)  # fmt: skip
    res["command"] = "python benchmarks/bench_erase.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if k not in ("relative_change", "recognised")}, indent=2))
    print(json.dumps(res["recognised"]))
    return res


if __name__ == "__main__":
    main()
