"""What each method feeds the classifier in one epoch: the training images of a (method, k, seed) cell.

The mixing is DA-Fusion's and the loader's (plan.py): an epoch is the k-shot subset repeated to at least
``epoch_size`` positions and shuffled; each position is synthetic with probability alpha (one coin per position)
and then gets a variant of *its own* image, labelled with its label; real and synthetic images go through the
same standard augmentation. Synthetic images are made here, in process, by the same
:class:`~fusionloader.Synthesizer` FusionLoader's producers run, with the settings of
:mod:`fusionloader.recipes` (prompts, strengths, guidance), so a cell is a pure function of its seed and cheap
to rerun; under ``late_policy="wait"`` FusionLoader gives every synthetic position such a fresh image too.

Methods (ids of issue 9): ``real`` (no augmentation), ``standard`` (rotation + shift), ``real_guidance``
(class name, strength 0.5, fresh), ``da_fusion`` (learned tokens, randomized intensity, fresh),
``da_fusion_fixed_m10`` (the same generator, M = 10 variants per image made once per cell, held in memory, one
drawn uniformly per synthetic position), ``templates`` (Bansal & Grover: text-only, one template drawn per
image, real and generated concatenated 1:1: the epoch holds every real position plus one generated image each),
``retrieval`` (Burg & Wenzel: neighbours of the class prompt from the generator's training pool), ``discl``
(diverse -> specific: strength 1 - lambda with lambda ascending over the epochs, then real only). DisCL's hard-
sample weighting is moot here: with k <= 16 < 20 images per class every class is a tail class, so every sample
is hard and the weighting is uniform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CellStream", "Generation", "METHODS", "SYNTHETIC", "discl_levels"]

METHODS = ("real", "standard", "real_guidance", "da_fusion", "da_fusion_fixed_m10", "templates", "retrieval", "discl")
SYNTHETIC = ("real_guidance", "da_fusion", "da_fusion_fixed_m10", "templates", "discl")  # need the diffusion model
RANDOMIZED = (0.25, 0.5, 0.75, 1.0)


@dataclass
class Generation:
    """Shared generation settings and objects of a run."""

    synth: object  # a fusionloader.Synthesizer (None when no method generates)
    template: str
    classes: list[str]
    templates: tuple[str, ...]  # Bansal & Grover's prompt templates
    guidance_scale: float
    steps: int
    alpha: float = 0.5
    m: int = 10  # fixed variants per image
    chunk: int = 64
    retrieval: object = None  # RetrievedVariants (the retrieval method)


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


def discl_levels(epochs: int, steps: int) -> tuple[float, ...]:
    """DisCL's synthetic lambdas 0.1 ... 0.9 (those whose strength 1 - lambda leaves a denoising step at ``steps``)
    thinned to about 3/4 of ``epochs`` (one epoch each), then 1.0 (real only)."""
    synthetic = [round(0.1 * i, 1) for i in range(1, 10) if int(steps * round(1 - 0.1 * i, 1)) >= 1]
    n = min(9, max(1, (3 * epochs) // 4))
    picks = [synthetic[round(i * (len(synthetic) - 1) / max(1, n - 1))] for i in range(n)] if n > 1 else [0.5]
    return tuple(sorted(set(picks))) + (1.0,)


class CellStream:
    """The epochs of one (method, k, seed) cell: ``epoch(e) -> (images, labels, augment)``."""

    def __init__(self, method: str, x: torch.Tensor, y: torch.Tensor, indices: list[int], seed: int,
                 epoch_size: int, epochs: int, gen: Generation | None, tokens: list[str] | None = None):  # fmt: skip
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.x, self.y, self.seed, self.gen = method, x[indices], y[indices], int(seed), gen
        self.indices = list(indices)
        self.repeats = max(1, math.ceil(epoch_size / len(indices)))
        self.tokens = tokens
        if method in SYNTHETIC and (gen is None or gen.synth is None):
            raise ValueError(f"method {method!r} needs a diffusion model (Generation.synth)")
        if method in ("da_fusion", "da_fusion_fixed_m10") and not tokens:
            raise ValueError(f"method {method!r} needs learned tokens")
        if method == "retrieval" and (gen is None or gen.retrieval is None):
            raise ValueError("method 'retrieval' needs a retrieval pool: the embedded default builds one; for --images "
                             "give --retrieval-pool DIR (LAION embedding-folder layout) and --clip MODEL")  # fmt: skip
        self.curriculum = None
        if method == "discl":
            from fusionloader.methods.curriculum import DiverseToSpecific

            self.curriculum = DiverseToSpecific(discl_levels(epochs, gen.steps), epochs_per_level=1, alpha=gen.alpha)
        self.fixed = self._fixed_variants() if method == "da_fusion_fixed_m10" else None

    # -- generation ---------------------------------------------------------------------------------------
    def _prompts(self, local: list[int], g: torch.Generator | None = None) -> list[str]:
        gen = self.gen
        if self.method in ("da_fusion", "da_fusion_fixed_m10"):
            return [gen.template.format(self.tokens[int(self.y[i])]) for i in local]
        if self.method == "templates":
            picks = torch.randint(len(gen.templates), (len(local),), generator=g).tolist()
            return [gen.templates[t].format(gen.classes[int(self.y[i])]) for i, t in zip(local, picks)]
        return [gen.template.format(gen.classes[int(self.y[i])]) for i in local]

    def _synthesize(self, local: list[int], strengths: list[float | None], seeds: list[int], prompts: list[str]) -> torch.Tensor:
        gen, synth = self.gen, self.gen.synth
        res = tuple(synth.resolution)
        out = []
        for s in range(0, len(local), gen.chunk):
            part = slice(s, s + gen.chunk)
            images = self.x[local[part]]
            if tuple(images.shape[-2:]) != res:
                images = F.interpolate(images, size=res, mode="bilinear", align_corners=False).clamp(0, 1)
            st = strengths[part]
            if all(v is None for v in st):
                made = synth.generate(prompts[part], guidance_scale=gen.guidance_scale, num_inference_steps=gen.steps,
                                      seeds=seeds[part])  # fmt: skip
            else:
                made = synth.augment(images, prompts[part], strengths=st, guidance_scale=gen.guidance_scale,
                                     num_inference_steps=gen.steps, seeds=seeds[part])  # fmt: skip
            out.append(made.float().cpu())
        made = torch.cat(out) if out else self.x[:0]
        if tuple(made.shape[-2:]) != tuple(self.x.shape[-2:]):  # back to the real image's size (as the loader does)
            made = F.interpolate(made, size=tuple(self.x.shape[-2:]), mode="bilinear", align_corners=False)
        return made.clamp(0, 1)

    def _fixed_variants(self) -> torch.Tensor:
        """(N, M, 3, H, W): DA-Fusion's offline set, M variants per image, randomized intensity, made once."""
        g = torch.Generator().manual_seed(_seed(self.seed, 77))
        local = [i for i in range(len(self.y)) for _ in range(self.gen.m)]
        strengths = [RANDOMIZED[j] for j in torch.randint(4, (len(local),), generator=g).tolist()]
        seeds = [_seed(self.seed, 78, n) for n in range(len(local))]
        made = self._synthesize(local, strengths, seeds, self._prompts(local))
        return made.view(len(self.y), self.gen.m, *made.shape[1:])

    # -- epochs -------------------------------------------------------------------------------------------
    def epoch(self, e: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Epoch ``e``'s training images (before augmentation), labels, and whether to augment them."""
        g = torch.Generator().manual_seed(_seed(self.seed, 1000 + e))
        n = len(self.y)
        positions = torch.arange(n).repeat(self.repeats)
        positions = positions[torch.randperm(len(positions), generator=g)]
        x, y = self.x[positions].clone(), self.y[positions].clone()
        method = self.method
        if method in ("real", "standard"):
            return x, y, method == "standard"
        if method == "templates":  # 1:1 concatenation: every position plus one text-only image of its class
            local = positions.tolist()
            seeds = [_seed(self.seed, 2000 + e, p) for p in range(len(local))]
            made = self._synthesize(local, [None] * len(local), seeds, self._prompts(local, g))
            x, y = torch.cat([x, made]), torch.cat([y, y])
            order = torch.randperm(len(y), generator=g)
            return x[order], y[order], True
        alpha = self.curriculum.alpha(e) if self.curriculum is not None else self.gen.alpha
        coins = (torch.rand(len(positions), generator=g) < alpha).nonzero().flatten().tolist()
        if not coins:
            return x, y, True
        local = positions[coins].tolist()
        seeds = [_seed(self.seed, 3000 + e, p) for p in coins]
        if method == "da_fusion_fixed_m10":
            picks = torch.randint(self.gen.m, (len(coins),), generator=g)
            x[coins] = self.fixed[positions[coins], picks]
        elif method == "retrieval":
            for p, i, s in zip(coins, local, seeds):
                got = self.gen.retrieval.choose(self.indices[i], int(self.y[i]), s)
                if got is None:  # nothing retrieved for this class: the real sample (as the loader falls back)
                    continue
                image = got[0].float()
                if tuple(image.shape[-2:]) != tuple(x.shape[-2:]):
                    image = F.interpolate(image[None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0]
                x[p] = image
        else:
            if method == "da_fusion":
                strengths = [RANDOMIZED[j] for j in torch.randint(4, (len(coins),), generator=g).tolist()]
            elif method == "discl":
                strengths = [float(self.curriculum.strengths(e))] * len(coins)
            else:  # real_guidance
                strengths = [0.5] * len(coins)
            x[coins] = self._synthesize(local, strengths, seeds, self._prompts(local))
        return x, y, True
