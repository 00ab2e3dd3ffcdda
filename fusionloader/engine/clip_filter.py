"""DisCL's CLIP-score filter, run by a producer on the batch it just decoded (METHODS.md section 4).

    pool = ProducerPool(synth, source, clip_filter=ClipFilter(threshold=0.30))   # or FusionLoader(clip_filter=...)

Each decoded image is scored against ``template.format(class name)`` ("a photo of a {}" by default, DisCL's text)
as CLIP's cosine similarity between the L2-normalised image and text embeddings, on the device the batch was
decoded on (one image forward per decoded batch, text embeddings computed once per class and kept there). An
image scoring below ``threshold`` is *rejected*: the producer regenerates it with the next seed -- the job's seed
+ 1, then + 2, ... (deterministic from the job) -- up to ``max_tries`` generations in all. Every rejected
generation is counted (``clip_rejected`` in ``ProducerPool.stats()``). When all ``max_tries`` are rejected,
``on_exhausted`` decides: ``"real"`` (default, DisCL's filter keeps only passing images) drops the job -- its
position falls back to the real image, counted as ``clip_dropped``; ``"keep"`` keeps the last generation, counted
as ``clip_kept_below``.

Threshold semantics. DisCL keeps images with a CLIP cosine >= 0.30 (0.25 for iWildCam) with OpenAI's CLIP, where a
matching image/caption pair scores about 0.25-0.35. The embedded digits CLIP (``model=None``,
``fusionloader/assets/digits-clip``) is a tiny model trained contrastively on 10 captions' worth of classes, and
its cosines spread much wider: measured on the 449 held-out test digits with "a photo of a {}", the true class
scores 0.77 / 0.80 / 0.81 (5th / 50th / 95th percentile) and the nine wrong classes 0.02 (median), 0.18 (95th),
0.29 (99th), 0.56 (max). So on it 0.30 means "at least as close to its class as all but 1% of real digits are to
a wrong class": it rejects generations that look like no digit or like another digit, and passes any real digit.
The embedded generator's own images score 0.78-0.81 too (98.5% of text-only and 100% of img2img generations pass
0.30; :func:`calibrate`, docs/CONTRACTS.md section "CLIP filter"): the tiny CLIP saturates near 0.8, and a DisCL-like
~45% pass rate on the embedded pair needs a threshold near 0.795.

``model``: None (the embedded digits CLIP), a CLIP checkpoint folder (transformers ``CLIPModel`` layout, loaded
offline), or a :class:`~fusionloader.methods.embedders.ClipEmbedder` (pickled whole to each producer: prefer a
path). The filter pickles as its settings; each producer loads the model onto its own device at first use.
``class_names``: a sequence indexed by integer label or a ``{label: name}`` mapping; None takes the source
dataset's ``classes`` (``ProducerPool`` resolves it at construction, see :func:`class_names_of`), and string labels
are their own names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["ClipFilter", "calibrate", "class_names_of"]

ON_EXHAUSTED = ("real", "keep")


def class_names_of(source) -> dict | None:
    """``{label: name}`` from a source's dataset ``classes`` (torchvision convention: label i is ``classes[i]``),
    or None when it has none. ``source``: a fusionloader ImageSource (``.dataset``) or a dataset itself."""
    for obj in (source, getattr(source, "dataset", None)):
        classes = getattr(obj, "classes", None)
        if classes is not None and not isinstance(classes, str) and len(classes) > 0:
            return {i: str(c) for i, c in enumerate(classes)}
    return None


def _names_mapping(class_names) -> dict | None:
    if class_names is None:
        return None
    if isinstance(class_names, Mapping):
        names = dict(class_names)
    elif isinstance(class_names, Sequence) and not isinstance(class_names, str):
        names = dict(enumerate(class_names))
    else:
        raise TypeError(f"class_names must be a sequence (indexed by label) or a {{label: name}} mapping, got "
                        f"{type(class_names).__name__}")
    for label, name in names.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class_names[{label!r}] must be a non-empty string, got {name!r}")
    if not names:
        raise ValueError("class_names is empty")
    return names


class ClipFilter:
    """Rejects decoded images whose CLIP score against ``template.format(class name)`` is below ``threshold``
    (see the module docstring for the semantics, regeneration and counting)."""

    def __init__(self, threshold: float = 0.30, model=None, *, class_names=None, template: str = "a photo of a {}",
                 max_tries: int = 4, on_exhausted: str = "real"):  # fmt: skip
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or not -1.0 <= float(threshold) <= 1.0:  # fmt: skip
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold!r}")
        if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
            raise ValueError(f"max_tries must be an int >= 1 (generations per job, the first included), got {max_tries!r}")
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"template must be a string with one '{{}}' for the class name, got {template!r}")
        if model is not None and not isinstance(model, (str, os.PathLike)) and not hasattr(model, "model"):
            raise TypeError(f"model must be None (the embedded digits CLIP), a CLIP checkpoint folder or a "
                            f"ClipEmbedder, got {type(model).__name__}")
        if isinstance(model, (str, os.PathLike)):
            model = os.fspath(model)
            if not os.path.isdir(model):
                raise ValueError(f"model: {model!r} is not a CLIP checkpoint folder")
        self.threshold = float(threshold)
        self.model = model
        self.class_names = _names_mapping(class_names)
        self.template = template
        self.max_tries = max_tries
        self.on_exhausted = on_exhausted
        self._embedder = None
        self._text: dict = {}  # (device, label) -> text embedding (dim,)

    def __getstate__(self):  # settings only: each producer loads the model on its own device
        state = dict(vars(self))
        state["_embedder"], state["_text"] = None, {}
        return state

    def __repr__(self) -> str:
        model = "embedded digits-clip" if self.model is None else (self.model if isinstance(self.model, str) else
                                                                    type(self.model).__name__)  # fmt: skip
        return (f"ClipFilter(threshold={self.threshold}, model={model!r}, template={self.template!r}, "
                f"max_tries={self.max_tries}, on_exhausted={self.on_exhausted!r})")

    def with_class_names(self, class_names) -> ClipFilter:
        """A copy with ``class_names`` (``ProducerPool`` fills them from the dataset when not given)."""
        clone = ClipFilter(self.threshold, self.model, class_names=class_names, template=self.template,
                           max_tries=self.max_tries, on_exhausted=self.on_exhausted)  # fmt: skip
        return clone

    # -- scoring ---------------------------------------------------------------------------------------------

    def name_of(self, label) -> str:
        """The class name filled into the template for ``label``."""
        if self.class_names is not None:
            key = label.item() if isinstance(label, torch.Tensor) and label.numel() == 1 else label
            if key in self.class_names:
                return self.class_names[key]
            raise ValueError(f"clip_filter: label {label!r} has no class name (class_names has {sorted(self.class_names, key=str)[:10]})")
        if isinstance(label, str) and label.strip():
            return label
        raise ValueError(f"clip_filter: label {label!r} is not a class name and no class_names were given "
                         "(give ClipFilter(class_names=...) or a dataset with .classes)")

    def embedder(self, device):
        """The CLIP model (a ClipEmbedder) on ``device``, loaded at first use."""
        device = torch.device(device)
        if self._embedder is None:
            from ..methods.embedders import ClipEmbedder

            if self.model is None:
                from ..pretrained.clip_model import load_default_embedder

                self._embedder = load_default_embedder(device=device)
            elif isinstance(self.model, str):
                self._embedder = ClipEmbedder.from_pretrained(self.model, device=device)
            else:
                self._embedder = self.model
        e = self._embedder
        if torch.device(e.device) != device:
            e.model.to(device)
            e.device = device
        return e

    @torch.no_grad()
    def _text_embedding(self, labels, device) -> torch.Tensor:
        e = self.embedder(device)
        keys = [label.item() if isinstance(label, torch.Tensor) else label for label in labels]
        missing = [k for k in dict.fromkeys(keys) if (str(device), k) not in self._text]
        if missing:
            prompts = [self.template.format(self.name_of(k)) for k in missing]
            rows = torch.as_tensor(e.encode_text(prompts), device=device)  # L2-normalised, once per class
            for k, row in zip(missing, rows):
                self._text[(str(device), k)] = row
        return torch.stack([self._text[(str(device), k)] for k in keys])

    @torch.no_grad()
    def scores(self, images: torch.Tensor, labels: Sequence) -> torch.Tensor:
        """CLIP cosine of each image (N, 3, H, W) -- float in [0, 1] or uint8 0..255 -- with its class's text,
        computed on ``images.device``; a float32 (N,) tensor there (no host sync)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a (N, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        if len(labels) != images.shape[0]:
            raise ValueError(f"got {len(labels)} labels for {images.shape[0]} images")
        device = images.device
        e = self.embedder(device)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        size = (e.image_size, e.image_size)
        if tuple(x.shape[-2:]) != size:  # as CLIP's processor: bicubic resize of the whole image
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - e.mean.to(device)) / e.std.to(device)
        dtype = next(e.model.parameters()).dtype
        feats = e.model.get_image_features(pixel_values=x.to(dtype))
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output  # transformers >= 5: an output
        img = F.normalize(feats.float(), dim=-1)
        return (img * self._text_embedding(labels, device)).sum(-1)

    def accept(self, images: torch.Tensor, labels: Sequence) -> torch.Tensor:
        """Bool (N,) on the images' device: score >= threshold."""
        return self.scores(images, labels) >= self.threshold


def calibrate(synthesizer=None, clip: ClipFilter | None = None, *, n: int = 200, strengths=(None, 1.0, 0.75, 0.5, 0.25),
              guidance_scale: float = 3.0, num_inference_steps: int = 10, seed: int = 0) -> dict:
    """What a threshold means for the embedded models: score quantiles of the held-out test digits (true and wrong
    class) and of the embedded generator's variants of them per strength, with each one's pass rate at the
    filter's threshold. ``python -m fusionloader.engine.clip_filter`` prints it as JSON (docs/CONTRACTS.md)."""
    import numpy as np

    from ..pretrained import class_names, default_model_path, load_digits_splits, prompts_for

    clip = clip or ClipFilter(class_names=class_names)
    if synthesizer is None:
        from .synthesizer import Synthesizer

        synthesizer = Synthesizer.from_pretrained(default_model_path())
    test = load_digits_splits().test
    images, labels = test.images[:n], test.labels[:n].tolist()
    q = (0.05, 0.25, 0.5, 0.75, 0.95)

    def summary(s):
        s = s.cpu().numpy()
        return {"quantiles": dict(zip([str(v) for v in q], np.quantile(s, q).round(4).tolist())),
                "pass_rate": float((s >= clip.threshold).mean())}

    out = {"threshold": clip.threshold, "template": clip.template, "images": len(labels),
           "real_true_class": summary(clip.scores(images, labels)),
           "real_wrong_class": summary(clip.scores(images, [(y + 1) % 10 for y in labels])), "generated": {}}
    prompts = prompts_for(labels)
    for s in strengths:
        gen = synthesizer.augment(images, prompts, strengths=s, guidance_scale=guidance_scale,
                                  num_inference_steps=num_inference_steps, seeds=[seed + i for i in range(len(labels))])
        out["generated"]["text-only" if s is None else f"strength {s}"] = summary(clip.scores(gen, labels))
    out["settings"] = {"guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps, "seed": seed,
                       "prompt": "a photo of the digit {} (the embedded model's template)"}
    return out


if __name__ == "__main__":  # python -m fusionloader.engine.clip_filter
    import json

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    print(json.dumps(calibrate(), indent=1))
