"""One function per paper: the FusionLoader keyword arguments that reproduce its setting (METHODS.md).

    loader = FusionLoader(dataset, batch_size=32, shuffle=True, **recipes.da_fusion(class_names=names))

Each returns a :class:`Recipe` (a ``dict`` of FusionLoader keyword arguments, plus a ``curriculum`` attribute
that the training loop applies per epoch with :func:`fusionloader.methods.curriculum.apply`, None when the
method has no schedule). Defaults are the papers' (METHODS.md); every one can be overridden by keyword, and
``**overrides`` are merged in last (e.g. ``num_inference_steps=10`` on a CPU). ``synthesizer`` defaults to
the embedded digits model (``fusionloader.pretrained``), ``class_names`` to its digit names.

Keyword arguments another part of the loader owns: ``mixing="concat"`` / ``"hard"`` (mixing policies),
``retrieval=`` (retrieved pool images), ``clip_filter=`` (DisCL's CLIP-score filter). A FusionLoader without
them rejects them at construction (``TypeError: unexpected keyword``), which is the right failure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["Recipe", "class_label_templates", "da_fusion", "discl", "real_guidance", "retrieval"]


class Recipe(dict):
    """FusionLoader keyword arguments (``FusionLoader(ds, **recipe)``) plus the per-epoch ``curriculum``."""

    def __init__(self, kwargs: Mapping, curriculum=None, paper: str = ""):
        super().__init__(kwargs)
        self.curriculum = curriculum
        self.paper = paper

    def __repr__(self) -> str:
        return f"Recipe({self.paper!r}, {dict.__repr__(self)}, curriculum={self.curriculum!r})"


def _defaults(synthesizer, class_names):
    if synthesizer is None:
        from fusionloader.pretrained import default_model_path

        synthesizer = default_model_path()
    if class_names is None:
        from fusionloader.pretrained import class_names as digits

        class_names = digits
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError("class_names must name at least one class, got an empty sequence")
    return synthesizer, names


def _finish(kwargs: dict, overrides: dict, curriculum=None, paper: str = "") -> Recipe:
    kwargs.update(overrides)
    return Recipe(kwargs, curriculum, paper)


def _check_template(template: str, name: str = "template") -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"{name} must be a string with exactly one '{{}}' for the class, got {template!r}")
    return template


def real_guidance(class_names: Sequence[str] | None = None, *, synthesizer=None, template: str = "a photo of a {}",
                  alpha: float = 0.5, strength: float = 0.5, guidance_scale: float = 7.5,
                  num_inference_steps: int = 50, **overrides) -> Recipe:  # fmt: skip
    """Real Guidance (He et al., DA-Fusion's baseline): img2img at strength 0.5 prompted with the literal class
    name, per-index replacement at alpha 0.5; fresh variants (the original kept M = 10 per image)."""
    synthesizer, names = _defaults(synthesizer, class_names)
    template = _check_template(template)
    kwargs = dict(synthesizer=synthesizer, alpha=alpha, strengths=float(strength), prompts=[template.format(n) for n in names],
                  guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)  # fmt: skip
    return _finish(kwargs, overrides, paper="real_guidance")


def da_fusion(class_names: Sequence[str] | None = None, *, synthesizer=None, tokens=None, images_by_class=None,
              template: str = "a photo of a {}", alpha: float = 0.5, strengths="randomized",
              guidance_scale: float = 7.5, num_inference_steps: int = 50, inversion_steps: int = 1000,
              leakage_guard: bool = True, seed: int = 0, device=None, **overrides) -> Recipe:  # fmt: skip
    """DA-Fusion: img2img with randomized intensity {0.25, 0.5, 0.75, 1.0}, prompt ``template`` around a learned
    token per class (``<name>``), per-index replacement at alpha 0.5, the data-centric leakage guard on.

    ``tokens``: learned tokens (a folder/file from :func:`~fusionloader.methods.inversion.save_learned_tokens`, or
    ``{"<name>": tensor}``). ``images_by_class``: ``{class name: (N, 3, H, W) images}`` to learn them here by
    textual inversion (DA-Fusion's first setting: 1 vector from "the", ``inversion_steps`` = 1000, batch 4,
    lr 2e-3). With neither, the class name is used (that is Real Guidance with randomized intensity, and
    ``leakage_guard`` must then be False). The tokens are loaded into a :class:`~fusionloader.Synthesizer`
    (built from ``synthesizer`` when it is a path), which the producers rebuild with them."""
    from fusionloader.methods.inversion import learn_tokens, load_learned_tokens, token_for_class

    synthesizer, names = _defaults(synthesizer, class_names)
    template = _check_template(template)
    if tokens is not None and images_by_class is not None:
        raise ValueError("da_fusion: give tokens (already learned) or images_by_class (learn them), not both")
    if tokens is None and images_by_class is None:
        if leakage_guard:
            raise ValueError("da_fusion: leakage_guard=True needs learned tokens (tokens= or images_by_class=); "
                             "pass leakage_guard=False to prompt with the class names")  # fmt: skip
        words = list(names)
    else:
        from fusionloader import Synthesizer

        synth = synthesizer if isinstance(synthesizer, Synthesizer) else Synthesizer.from_pretrained(synthesizer, device=device or "cpu")
        if images_by_class is not None:
            missing = [n for n in names if n not in images_by_class]
            if missing:
                raise ValueError(f"images_by_class has no images for classes {missing}")
            tokens = learn_tokens(synth, {n: images_by_class[n] for n in names}, steps=inversion_steps, seed=seed,
                                  device=device, progress=False)  # fmt: skip
        if isinstance(tokens, Mapping):
            have = set(tokens)
            for token, emb in tokens.items():
                synth.load_textual_inversion({token: emb}, token=token)
        else:
            have = set(load_learned_tokens(synth, tokens))
        words = [token_for_class(n) for n in names]
        missing = [w for w in words if w not in have]
        if missing:
            raise ValueError(f"tokens: no learned token for {missing} (have {sorted(have)})")
        synthesizer = synth
    kwargs = dict(synthesizer=synthesizer, alpha=alpha, strengths=strengths, prompts=[template.format(w) for w in words],
                  guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, variants_per_index=10,
                  leakage_guard=leakage_guard)  # fmt: skip
    return _finish(kwargs, overrides, paper="da_fusion")


def class_label_templates(class_names: Sequence[str] | None = None, *, synthesizer=None, templates=None,
                          strength: float | None = None, guidance_scale: float = 7.5, num_inference_steps: int = 50,
                          **overrides) -> Recipe:  # fmt: skip
    """Bansal & Grover: text-to-image from the class label, one of the 80 CLIP ImageNet templates drawn per
    image (``templates``), real and generated concatenated 1:1 (``mixing="concat"``; alpha is left at its
    default and ignored by that policy). ``strength=1.0`` is their img2img variant."""
    from fusionloader.engine.prompts import CLIP_IMAGENET_TEMPLATES

    synthesizer, names = _defaults(synthesizer, class_names)
    templates = tuple(CLIP_IMAGENET_TEMPLATES if templates is None else templates)
    if not templates:
        raise ValueError("templates must hold at least one template")
    for t in templates:
        _check_template(t, "templates")
    if strength is not None and not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must be in (0, 1] or None (text-only), got {strength!r}")
    prompts = {label: [t.format(n) for t in templates] for label, n in enumerate(names)}  # a list = uniform choice
    kwargs = dict(synthesizer=synthesizer, mixing="concat", strengths=strength, prompts=prompts,
                  guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)  # fmt: skip
    return _finish(kwargs, overrides, paper="class_label_templates")


def retrieval(class_names: Sequence[str] | None = None, *, variants=None, pool=None, embedder=None, templates=None,
              k: int = 50, alpha: float = 0.5, dedup: float | None = 0.98, per_class: int | None = None,
              min_score: float | None = None, held_out_images=None, **overrides) -> Recipe:  # fmt: skip
    """Burg & Wenzel: nearest neighbours of each class prompt (templates averaged) from the generator's own
    training pool, labelled with that class, served where synthetic images go (per-index replacement at alpha).

    ``variants``: a ready :class:`~fusionloader.methods.retrieval.RetrievedVariants`; otherwise retrieved from
    ``pool`` (default: :func:`~fusionloader.methods.retrieval.default_pool`, the digits generator split) with
    ``embedder`` (default: the embedded digits CLIP) and the filters given. No synthesizer."""
    from fusionloader.methods.retrieval import default_pool, retrieved_variants

    _, names = _defaults("unused", class_names)
    if variants is None:
        if embedder is None:
            from fusionloader.pretrained.clip_model import load_default_embedder

            embedder = load_default_embedder()
        if templates is None:
            from fusionloader.pretrained import TRAIN_TEMPLATES

            templates = TRAIN_TEMPLATES if class_names is None else ("a photo of a {}.",)
        pool = default_pool(embedder) if pool is None else pool
        filters = {key: v for key, v in (("dedup", dedup), ("per_class", per_class), ("min_score", min_score)) if v is not None}
        variants = retrieved_variants(pool, embedder, names, templates=templates, k=k, held_out_images=held_out_images, **filters)
    kwargs = dict(retrieval=variants, alpha=alpha, synthesizer=None)
    return _finish(kwargs, overrides, paper="retrieval")


def discl(class_names: Sequence[str] | None = None, *, synthesizer=None, template: str = "a photo of a {}",
          levels=None, epochs_per_level: int = 1, alpha: float = 0.5, guidance_scale: float = 10.0,
          num_inference_steps: int = 50, clip_threshold: float | None = 0.30, hard_share: float = 0.5,
          **overrides) -> Recipe:  # fmt: skip
    """DisCL: the diverse -> specific curriculum (image guidance lambda ascending, strength = 1 - lambda, equal
    epochs per level, then real only; ``recipe.curriculum``, applied per epoch), hard samples weighted
    (``mixing="hard"``: tail classes < 20 images and low true-class probability from ``loader.report``), and
    the CLIP-score filter against "a photo of a {class}" at 0.30 (``clip_threshold=None``: off). Text guidance
    10 as the paper's SDXL-refiner setting. The first epoch's alpha/strengths are in the kwargs."""
    from fusionloader.engine.clip_filter import ClipFilter
    from fusionloader.methods.curriculum import DISCL_LEVELS, DiverseToSpecific
    from fusionloader.policies import HardWeighted

    synthesizer, names = _defaults(synthesizer, class_names)
    template = _check_template(template)
    curriculum = DiverseToSpecific(DISCL_LEVELS if levels is None else levels, epochs_per_level=epochs_per_level, alpha=alpha)
    kwargs = dict(synthesizer=synthesizer, alpha=curriculum.alpha(0), strengths=curriculum.strengths(0),
                  prompts=[template.format(n) for n in names], guidance_scale=guidance_scale,
                  num_inference_steps=num_inference_steps)  # fmt: skip
    kwargs["mixing"] = HardWeighted(share=hard_share)
    if clip_threshold is not None:
        kwargs["clip_filter"] = ClipFilter(threshold=clip_threshold)
    return _finish(kwargs, overrides, curriculum, paper="discl")
