"""``fusionloader evaluate``: the few-shot grid, one resumable cell per (method, k, seed)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from .methods import METHODS, SYNTHETIC, CellStream, Generation
from .stats import summarize, write_json, write_markdown, write_plot
from .train import PROTOCOLS, Lockstep, affine

__all__ = ["EvalConfig", "QUICK", "run", "run_cell"]


@dataclass
class EvalConfig:
    out: str = "fusionloader-eval"  # cell files, tokens, results.md/json, accuracy.png
    model: str | None = None  # diffusers checkpoint (default: the embedded digits model)
    images: str | None = None  # ImageFolder root (default: the embedded digits)
    backbone: str | None = None  # linear protocol's frozen backbone file (default digits: trained here)
    retrieval_pool: str | None = None  # LAION-layout embedding folder (with --images)
    clip: str | None = None  # CLIP model for retrieval queries (with --images)
    methods: tuple[str, ...] = METHODS
    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
    protocols: tuple[str, ...] = PROTOCOLS
    epochs: int = 20
    epoch_size: int = 160  # positions per epoch (the k-shot set repeated; DA-Fusion: a fixed iteration count)
    batch_size: int = 32
    width: int = 16  # SmallCNN width (backbone and full protocol); the demo's is 32
    val_per_class: int | None = None  # cap on validation images per class (None: every remaining candidate)
    m: int = 10  # da_fusion_fixed_m10's variants per image (the id keeps DA-Fusion's M = 10; tests use fewer)
    lr: float = 1e-3
    steps: int = 10  # scheduler steps (strength s runs int(s * steps); all of them under scheduler "lcm_span")
    scheduler: str | None = None  # the synthesizer's scheduler (None: the checkpoint's; e.g. "lcm_span" for a student)
    guidance_scale: float | None = None  # default: 3.0 for the embedded model, 7.5 otherwise
    inversion_steps: int = 200  # textual inversion steps per class (DA-Fusion: 1000)
    backbone_epochs: int = 15
    image_size: int = 32
    device: str = "cpu"  # generation and training device
    quick: bool = False
    report_only: bool = False  # tables from the finished cells only (an interrupted or running grid); runs nothing
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """What a cell's result depends on (not the grid's extent, the output folder or the progress bar)."""
        keep = {k: v for k, v in asdict(self).items()
                if k not in ("out", "methods", "ks", "seeds", "progress", "quick", "extra", "device", "report_only")}  # fmt: skip
        keep["max_k"] = max(self.ks)
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: ``--quick``: the reduced grid (stated in every output it writes).
QUICK = dict(ks=(1, 2), seeds=(0, 1, 2), epochs=4, epoch_size=40, steps=4, inversion_steps=20, backbone_epochs=6, val_per_class=10)


def _cell_path(cfg: EvalConfig, method: str, k: int, seed: int) -> str:
    return os.path.join(cfg.out, "cells", f"{method}__k{k}__s{seed}.json")


class _Context:
    """What cells share: data, backbone, synthesizer, retrieval variants, learned tokens per (k, seed)."""

    def __init__(self, cfg: EvalConfig):
        from .data import load_data

        self.cfg = cfg
        self.data = load_data(cfg.images, cfg.image_size)
        self.num_classes = len(self.data.classes)
        self._backbone, self._synth, self._retrieval, self._tokens = None, None, None, {}
        self.guidance = cfg.guidance_scale if cfg.guidance_scale is not None else (3.0 if cfg.model is None else 7.5)

    def backbone(self):
        if "linear" not in self.cfg.protocols:
            return None
        if self._backbone is None:
            from .train import load_backbone, train_digits_backbone

            if self.cfg.backbone is not None:
                self._backbone = load_backbone(self.cfg.backbone)
            elif self.cfg.images is None:
                d = self.data
                self._backbone = train_digits_backbone(d.generator_x, d.generator_y, self.num_classes,
                                                       epochs=self.cfg.backbone_epochs, width=self.cfg.width)  # fmt: skip
            else:
                raise ValueError("protocol 'linear' on --images needs --backbone (a TorchScript or pickled nn.Module "
                                 "mapping [0, 1] images to features); or run with --protocols full")  # fmt: skip
        return self._backbone

    def synth(self):
        if self._synth is None:
            from fusionloader import Synthesizer
            from fusionloader.pretrained import default_model_path

            model = self.cfg.model
            if model is None and self.cfg.images is not None:
                raise ValueError("--images needs --model (a Stable Diffusion checkpoint folder) for the generating methods")
            self._synth = Synthesizer.from_pretrained(model or default_model_path(), device=self.cfg.device,
                                                      scheduler=self.cfg.scheduler)  # fmt: skip
        return self._synth

    def retrieval(self):
        if self._retrieval is None:
            from fusionloader import recipes

            if self.cfg.images is None:
                self._retrieval = recipes.retrieval(held_out_images=self.data.test_x)["retrieval"]
            elif self.cfg.retrieval_pool is None or self.cfg.clip is None:
                return None
            else:
                from fusionloader.methods.embedders import ClipEmbedder
                from fusionloader.methods.retrieval import RetrievalPool

                embedder = ClipEmbedder.from_pretrained(self.cfg.clip, device=self.cfg.device)
                pool = RetrievalPool.from_embedding_folder(self.cfg.retrieval_pool)
                self._retrieval = recipes.retrieval(self.data.classes, pool=pool, embedder=embedder,
                                                    held_out_images=self.data.test_x)["retrieval"]  # fmt: skip
        return self._retrieval

    def tokens(self, k: int, seed: int, subset: list[int]) -> list[str]:
        """DA-Fusion's learned token per class, learned on this seed's k-shot images (cached on disk)."""
        if (k, seed) in self._tokens:
            return self._tokens[(k, seed)]
        from fusionloader.methods.inversion import learn_tokens, load_learned_tokens, save_learned_tokens, token_for_class

        synth, d = self.synth(), self.data
        suffix = f"k{k}s{seed}"
        names = [f"{c.replace(' ', '_')}_{suffix}" for c in d.classes]
        folder = os.path.join(self.cfg.out, "tokens", f"{self.cfg.fingerprint()}-{suffix}")
        if not os.path.isdir(folder):
            res = tuple(synth.resolution)
            by_class = {}
            for c, name in enumerate(names):
                x = d.pool_x[[i for i in subset if int(d.pool_y[i]) == c]]
                if tuple(x.shape[-2:]) != res:
                    x = torch.nn.functional.interpolate(x, size=res, mode="bilinear", align_corners=False).clamp(0, 1)
                by_class[name] = x
            learned = learn_tokens(synth, by_class, steps=self.cfg.inversion_steps, seed=seed, progress=False)
            save_learned_tokens(learned, folder + ".tmp")
            os.replace(folder + ".tmp", folder)
        load_learned_tokens(synth, folder)
        self._tokens[(k, seed)] = [token_for_class(n) for n in names]
        return self._tokens[(k, seed)]


def run_cell(ctx: _Context, method: str, k: int, seed: int) -> dict:
    """Train both protocols on one cell; a pure function of (config, method, k, seed)."""
    from .data import few_shot

    cfg, d = ctx.cfg, ctx.data
    started = time.perf_counter()
    subsets, val = few_shot(d.pool_y, cfg.ks, seed, ctx.num_classes)
    subset = subsets[k]
    if cfg.val_per_class is not None:
        val = [i for c in range(ctx.num_classes) for i in [j for j in val if int(d.pool_y[j]) == c][: cfg.val_per_class]]
    gen = None
    if method in SYNTHETIC or method == "retrieval":
        from fusionloader.pretrained import TRAIN_TEMPLATES
        from fusionloader.engine.prompts import CLIP_IMAGENET_TEMPLATES

        gen = Generation(synth=ctx.synth() if method in SYNTHETIC else None, template=d.template, classes=d.classes,
                         templates=TRAIN_TEMPLATES if cfg.images is None else CLIP_IMAGENET_TEMPLATES,
                         guidance_scale=ctx.guidance, steps=cfg.steps, m=cfg.m,
                         retrieval=ctx.retrieval() if method == "retrieval" else None)  # fmt: skip
    tokens = ctx.tokens(k, seed, subset) if method in ("da_fusion", "da_fusion_fixed_m10") else None
    cell_seed = 1_000_003 * seed + 7919 * k + METHODS.index(method)
    stream = CellStream(method, d.pool_x, d.pool_y, subset, cell_seed, cfg.epoch_size, cfg.epochs, gen, tokens)
    backbone = ctx.backbone()
    torch.manual_seed(seed)  # the same initial weights for every method of a seed (paired comparisons)
    models = Lockstep(backbone, ctx.num_classes, d.pool_x.shape[-1], cfg.lr, cfg.device, cfg.width)
    val_x, val_y = d.pool_x[val], d.pool_y[val]
    g = torch.Generator().manual_seed(cell_seed)
    curves = {p: {"val": [], "test": []} for p in models.models}
    for e in range(cfg.epochs):
        x, y, augment = stream.epoch(e)
        if augment:
            x = affine(x, g)
        for i in range(0, len(y), cfg.batch_size):
            models.step(x[i : i + cfg.batch_size], y[i : i + cfg.batch_size])
        for split, (sx, sy) in (("val", (val_x, val_y)), ("test", (d.test_x, d.test_y))):
            for p, acc in models.evaluate(sx, sy).items():
                curves[p][split].append(acc)
    return {"method": method, "k": k, "seed": seed, "fingerprint": cfg.fingerprint(), "curves": curves,
            "train_images": len(subset), "wall_s": time.perf_counter() - started}  # fmt: skip


def _check(cfg: EvalConfig) -> None:
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods: unknown {bad}; choose from {METHODS}")
    bad = [p for p in cfg.protocols if p not in PROTOCOLS]
    if bad or not cfg.protocols:
        raise ValueError(f"protocols: {list(cfg.protocols)} must be a non-empty subset of {PROTOCOLS}")
    if not cfg.ks or any(int(k) < 1 for k in cfg.ks):
        raise ValueError(f"ks must be positive integers, got {cfg.ks}")
    if not cfg.seeds:
        raise ValueError("seeds must name at least one seed")
    for name in ("epochs", "epoch_size", "batch_size", "steps"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)!r}")
    spans = str(cfg.scheduler or "").lower() == "lcm_span"  # every strength runs all steps (engine/schedules.py)
    if any(m in cfg.methods for m in ("da_fusion", "da_fusion_fixed_m10", "discl")) and cfg.steps < 4 and not spans:
        raise ValueError(f"steps={cfg.steps}: randomized intensity's strength 0.25 needs steps >= 4")


def run(cfg: EvalConfig | None = None, json_path: str | None = None, **overrides) -> dict:
    """Run (or resume) the grid; returns the summary (also written to ``out/results.json``/``.md``, ``accuracy.png``)."""
    from dataclasses import replace

    cfg = replace(cfg or EvalConfig(), **overrides)
    if cfg.quick:
        cfg = replace(cfg, **{k: v for k, v in QUICK.items() if k not in overrides})
    cfg.ks, cfg.seeds = tuple(sorted(int(k) for k in cfg.ks)), tuple(int(s) for s in cfg.seeds)
    cfg.methods, cfg.protocols = tuple(cfg.methods), tuple(cfg.protocols)
    _check(cfg)
    os.makedirs(os.path.join(cfg.out, "cells"), exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ctx = _Context(cfg)
    # Small k first, every seed: an interrupted run has whole rows of the table (and small k is where it matters).
    grid = [(m, k, s) for k in cfg.ks for s in cfg.seeds for m in cfg.methods]
    cells, todo = {}, []
    for m, k, s in grid:
        path = _cell_path(cfg, m, k, s)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
            if rec.get("fingerprint") != cfg.fingerprint():
                raise ValueError(f"{path}: a cell of another configuration (fingerprint {rec.get('fingerprint')} != "
                                 f"{cfg.fingerprint()}); use another --out or delete it")  # fmt: skip
            cells[(m, k, s)] = rec
        else:
            todo.append((m, k, s))
    missing = len(todo) if cfg.report_only else 0
    if cfg.report_only:
        todo = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="evaluate cells", disable=not cfg.progress,
               dynamic_ncols=True)  # fmt: skip
    started = time.perf_counter()
    for m, k, s in todo:
        bar.set_postfix_str(f"{m} k={k} seed={s}")
        rec = run_cell(ctx, m, k, s)
        path = _cell_path(cfg, m, k, s)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(rec, f)
        os.replace(path + ".tmp", path)  # a killed run leaves no half-written cell
        cells[(m, k, s)] = rec
        bar.update(1)
    bar.close()
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else (3.0 if cfg.model is None else 7.5)
    grid_note = (f"grid: methods {list(cfg.methods)}, k {list(cfg.ks)}, seeds {list(cfg.seeds)}, {cfg.epochs} epochs of "
                 f"{cfg.epoch_size} positions, {cfg.steps} scheduler steps{f' ({cfg.scheduler})' if cfg.scheduler else ''}, "
                 f"guidance {guidance}, "
                 f"textual inversion {cfg.inversion_steps} steps/class")  # fmt: skip
    if cfg.quick:
        grid_note = "QUICK (reduced) " + grid_note
    if missing:
        grid_note = f"PARTIAL: {len(grid) - missing} of {len(grid)} cells finished; " + grid_note
    summary = summarize(cells, list(cfg.protocols), list(cfg.methods), list(cfg.ks))
    summary |= {"grid": grid_note, "quick": cfg.quick, "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
                "cells_run": len(todo), "cells_total": len(grid), "wall_s": time.perf_counter() - started,
                "cell_wall_s": {f"{m}/k{k}/s{s}": round(c["wall_s"], 2) for (m, k, s), c in cells.items()}}  # fmt: skip
    write_json(summary, os.path.join(cfg.out, "results.json"))
    if json_path:
        write_json(summary, json_path)
    header = f"## fusionloader evaluate\n\n{grid_note}. Data: {'embedded digits' if cfg.images is None else cfg.images}."
    summary["markdown"] = write_markdown(summary, os.path.join(cfg.out, "results.md"), header)
    summary["plot"] = write_plot(summary, os.path.join(cfg.out, "accuracy.png"))
    return summary
