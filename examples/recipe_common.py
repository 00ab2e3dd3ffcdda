"""Shared by the examples/recipe_*.py scripts: few-shot digits, a small CNN, a short training loop.

Each recipe script builds ``FusionLoader(train, **recipe)`` and hands it here; ``--steps`` bounds the run
(a test runs each with a couple of steps), ``--per-class`` sets the few-shot size.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def parse(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=300, help="optimiser steps (a few minutes on a CPU by default)")
    p.add_argument("--per-class", type=int, default=4, help="few-shot training images per class")
    p.add_argument("--sampler-steps", type=int, default=10, help="diffusion scheduler steps (papers: 50)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def few_shot_digits(per_class: int, seed: int):
    """(train dataset of raw [0, 1] images with .classes, test images, test labels) from the embedded digits."""
    from fusionloader.demo import TensorImages, _few_shot
    from fusionloader.pretrained import class_names, load_digits_splits

    s = load_digits_splits()
    keep = _few_shot(s.train.labels, per_class, seed)
    return TensorImages(s.train.images[keep], s.train.labels[keep], class_names), s.test.images, s.test.labels


def train(loader, test_x, test_y, steps: int, seed: int, curriculum=None) -> float:
    """Train a SmallCNN for ``steps`` optimiser steps on ``loader``; returns test accuracy."""
    from fusionloader.demo import SmallCNN

    torch.manual_seed(seed)
    model = SmallCNN(10, width=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    done, epoch, t0 = 0, 0, time.perf_counter()
    while done < steps:
        if curriculum is not None:  # DisCL: this epoch's image-guidance level before iter()
            from fusionloader.methods.curriculum import apply

            apply(loader, curriculum, epoch)
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
        epoch += 1
    model.eval()
    with torch.no_grad():
        acc = (model(test_x).argmax(1) == test_y).float().mean().item()
    print(f"{done} steps, {epoch} epochs, {time.perf_counter() - t0:.0f} s; test accuracy {100 * acc:.1f}%; "
          f"loader stats: {loader.stats()['cumulative']}")
    return acc
