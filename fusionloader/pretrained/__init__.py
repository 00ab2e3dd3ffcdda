"""The embedded default model and the data it was trained on.

``fusionloader/assets/digits-ldm/`` is a small latent diffusion model in diffusers format (the
``StableDiffusionImg2ImgPipeline`` layout: ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, ``model_index.json``), class-conditioned through its CLIP text encoder on prompts such
as ``"a photo of the digit seven"``. It was trained by ``python -m fusionloader.pretrained.train`` on
scikit-learn's handwritten digits (8x8, upscaled bilinearly to 32x32, grey in 3 channels), and only
on the *generator* split below, so the demo and the evaluation train and test on images the generator
never saw.

The splits are a fixed, seeded, class-stratified partition of ``sklearn.datasets.load_digits()``
(1,797 images): per class, a seeded permutation gives the first 50% to ``generator``, the next 25%
to ``train`` (classifier training) and the rest to ``test`` (classifier evaluation). They are
pairwise disjoint and identical on every machine (``numpy.random.default_rng(seed)``).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "PROMPT_TEMPLATE",
    "TRAIN_TEMPLATES",
    "DigitsSplit",
    "DigitsSplits",
    "class_names",
    "default_model_path",
    "load_digits_splits",
    "prompts_for",
    "recorded_command",
    "recorded_path",
    "write_train_info",
]

#: Class names, indexed by label; each is one whole-word token of the model's tokenizer.
class_names: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: The prompt template the model was mainly trained with (other templates were seen too, see train.py).
PROMPT_TEMPLATE = "a photo of the digit {}"

#: Every prompt template seen in training (train.py draws PROMPT_TEMPLATE half of the time); the embedded
#: CLIP's zero-shot queries average them.
TRAIN_TEMPLATES = (
    PROMPT_TEMPLATE,
    "a photo of a {}",
    "an image of the digit {}",
    "a picture of the digit {}",
    "a drawing of the digit {}",
    "the digit {}",
    "{}",
)

SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.5, 0.25)  # generator, train; test gets the rest


def default_model_path() -> str:
    """Path of the shipped model folder (``fusionloader/assets/digits-ldm``), loadable by diffusers."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits-ldm")


def recorded_command(module: str, argv: list[str], out: str) -> str:
    """The command line as train_info.json records it: ``python -m module argv``, ``--out`` as
    :func:`recorded_path` gives it."""
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            argv[i + 1] = recorded_path(out)
        elif a.startswith("--out="):
            argv[i] = "--out=" + recorded_path(out)
    return " ".join(["python -m " + module, *argv])


def write_train_info(out: str, info: dict, t_start: float) -> dict:
    """Write ``out/train_info.json``: ``info`` plus the wall time since ``t_start`` and the machine it ran on
    (what the shipped models' cards quote)."""
    import json
    import platform
    import time

    info = {**info, "wall_seconds": time.time() - t_start, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count()}  # fmt: skip
    with open(os.path.join(out, "train_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def recorded_path(path: str) -> str:
    """``path`` as shipped files record it: never an absolute path of the machine that wrote them.

    Inside the installed package: relative to the package's parent (``fusionloader/assets/digits-ldm``);
    a hub id (no such folder): unchanged; any other folder: its name."""
    if not os.path.exists(path):
        return path
    full = os.path.realpath(path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # parent of fusionloader/
    if full.startswith(os.path.join(root, "fusionloader") + os.sep):
        return os.path.relpath(full, root)
    return os.path.basename(full.rstrip(os.sep)) or full


class DigitsSplit(NamedTuple):
    """One split: ``images`` float32 (N, 3, size, size) in [0, 1] (white digit on black), ``labels``
    int64 (N,), ``indices`` positions in ``sklearn.datasets.load_digits()`` (for disjointness checks)."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


class DigitsSplits(NamedTuple):
    generator: DigitsSplit  # the diffusion model was trained on these only
    train: DigitsSplit  # for the demo / evaluation classifier's training
    test: DigitsSplit  # for the demo / evaluation classifier's testing


def _split_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gen, train, test = [], [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_gen = int(round(SPLIT_FRACTIONS[0] * len(idx)))
        n_train = int(round(SPLIT_FRACTIONS[1] * len(idx)))
        gen.append(idx[:n_gen])
        train.append(idx[n_gen : n_gen + n_train])
        test.append(idx[n_gen + n_train :])
    return tuple(np.sort(np.concatenate(s)) for s in (gen, train, test))  # type: ignore[return-value]


def load_digits_splits(size: int = 32, seed: int = SPLIT_SEED) -> DigitsSplits:
    """scikit-learn's digits, upscaled to ``size`` px (bilinear), as three disjoint seeded splits.

    With the defaults: 898 generator, 450 train, 449 test images (class-stratified).
    """
    from fusionloader.extras import require

    digits = require("sklearn.datasets", "the embedded digits data (fusionloader.pretrained)", "demo").load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    x = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0)[:, None]  # (N,1,8,8) in [0,1]
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(labels)
    splits = [DigitsSplit(x[i], y[i], i) for i in _split_indices(labels, seed)]
    return DigitsSplits(*splits)


def prompts_for(labels, template: str = PROMPT_TEMPLATE) -> list[str]:
    """Prompts for integer labels, e.g. ``[7] -> ["a photo of the digit seven"]``."""
    return [template.format(class_names[int(c)]) for c in labels]
