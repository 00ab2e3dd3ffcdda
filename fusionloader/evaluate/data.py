"""The evaluation's data: a pool of training candidates, validation and test images, nested few-shot subsets.

Embedded default: the digits *train* split is the candidate pool and the *test* split the test set (the
generator never saw either; ``fusionloader.pretrained``). An ImageFolder: a fixed, seeded, per-class quarter
is the test set, the rest the candidate pool. Per seed, each class's candidates are permuted once; the first
``k`` are the k-shot subset (so the k = 1 image is inside the k = 2 set, ...), and the candidates after the
first ``max(ks)`` are that seed's validation set (disjoint from every subset of the seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["EvalData", "few_shot", "load_data"]


@dataclass
class EvalData:
    """Float (N, 3, H, W) images in [0, 1] with int64 labels."""

    pool_x: torch.Tensor
    pool_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]  # prompt names (folder names with "_" -> " ")
    template: str  # prompt template for the class names
    generator_x: torch.Tensor | None = None  # the generator's training split (embedded default only)
    generator_y: torch.Tensor | None = None


def few_shot(labels: torch.Tensor, ks, seed: int, num_classes: int) -> tuple[dict[int, list[int]], list[int]]:
    """``({k: sorted indices of the k-shot subset}, validation indices)``; subsets nested in k."""
    ks = sorted(int(k) for k in ks)
    g = torch.Generator().manual_seed(10_007 * int(seed) + 1)
    order = {}
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) <= ks[-1]:
            raise ValueError(f"class {c} has {len(idx)} training candidates; k={ks[-1]} needs at least {ks[-1] + 1} "
                             f"(k for training plus one for validation)")  # fmt: skip
        order[c] = idx[torch.randperm(len(idx), generator=g)].tolist()
    subsets = {k: sorted(i for c in range(num_classes) for i in order[c][:k]) for k in ks}
    val = sorted(i for c in range(num_classes) for i in order[c][ks[-1]:])
    return subsets, val


def _digits() -> EvalData:
    from fusionloader.pretrained import PROMPT_TEMPLATE, class_names, load_digits_splits

    s = load_digits_splits()
    return EvalData(s.train.images, s.train.labels, s.test.images, s.test.labels, list(class_names), PROMPT_TEMPLATE,
                    s.generator.images, s.generator.labels)  # fmt: skip


def _folder(root: str, size: int, test_fraction: float = 0.25) -> EvalData:
    import numpy as np

    from fusionloader.sources.folder import ImageFolder

    folder = ImageFolder(root)

    def load(path):
        image = folder.loader(path).convert("RGB").resize((size, size))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    labels = torch.tensor(folder.targets)
    g = torch.Generator().manual_seed(0)  # the test split is fixed, whatever the seeds
    test = set()
    for c in range(len(folder.classes)):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 3:
            raise ValueError(f"--images: class {folder.classes[c]!r} has {len(idx)} images; the evaluation needs at "
                             f"least 3 (test, validation, training)")  # fmt: skip
        n_test = max(1, int(round(test_fraction * len(idx))))
        test.update(idx[torch.randperm(len(idx), generator=g)[:n_test]].tolist())
    pool = [i for i in range(len(labels)) if i not in test]
    test = sorted(test)
    x = [load(folder.samples[i][0]) for i in range(len(labels))]
    stack = lambda ids: torch.stack([x[i] for i in ids])  # noqa: E731
    names = [c.replace("_", " ") for c in folder.classes]
    return EvalData(stack(pool), labels[pool], stack(test), labels[test], names, "a photo of a {}")


def load_data(images: str | None, size: int = 32) -> EvalData:
    return _digits() if images is None else _folder(images, size)
