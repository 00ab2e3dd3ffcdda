"""The ``fusionloader`` command: ``demo``, ``preview``, ``bench`` and ``cache``.

    fusionloader demo                      # embedded model and data, CPU, a few minutes
    fusionloader demo --model runwayml/stable-diffusion-v1-5 --images ~/data/train --devices cuda:1 cuda:2
    fusionloader preview --model M --images DIR --out grid.png
    fusionloader bench --quick --json out/bench.json
    fusionloader evaluate --quick --json out/eval.json
    fusionloader cache --model M --images DIR --path latents.cache
    fusionloader invert --model M --images DIR --out tokens/      # DA-Fusion textual inversion
    fusionloader erase --model M --concept NAME --out esd/        # ESD concept erasure (per-class UNet delta)
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def _strengths(text: str):
    if text in ("randomized", "none"):
        return None if text == "none" else text
    values = [float(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def _demo(args) -> None:
    from fusionloader.demo import DemoConfig, format_summary, run_demo

    cfg = DemoConfig(
        model=args.model, images=args.images, out=args.out, devices=tuple(args.devices), train_device=args.train_device,
        epochs=args.epochs, per_class=args.per_class, batch_size=args.batch_size, alpha=args.alpha,
        strengths=_strengths(args.strengths), guidance_scale=args.guidance, steps=args.steps, prompt=args.prompt,
        late_policy=args.late_policy, image_size=args.image_size, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    print(format_summary(run_demo(cfg)))


def _image_paths(root: str) -> list[tuple[str, str | None]]:
    """(path, class name or None) for an ImageFolder tree, or for a flat folder of images."""
    from fusionloader.sources.folder import IMG_EXTENSIONS, ImageFolder

    flat = sorted(f for f in os.listdir(root) if f.lower().endswith(IMG_EXTENSIONS))
    if flat:
        return [(os.path.join(root, f), None) for f in flat]
    folder = ImageFolder(root)
    return [(p, folder.classes[c]) for p, c in folder.samples]


def _load_images(paths, resolution):
    import numpy as np
    import torch

    from fusionloader.sources.folder import pil_loader

    out = []
    for p in paths:
        image = pil_loader(p).resize((resolution[1], resolution[0]))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def _preview(args) -> None:
    from fusionloader import Synthesizer
    from fusionloader.plots import image_grid

    synth = Synthesizer.from_pretrained(args.model, device=args.device, scheduler=args.scheduler)
    items = _image_paths(args.images)[: args.n]
    images = _load_images([p for p, _ in items], synth.resolution)
    strengths = [float(s) for s in args.strengths.split(",")]
    columns, labels = [images], ["real"]
    for template in args.prompts:
        prompts = [template.format((name or "").replace("_", " ")) if "{}" in template else template for _, name in items]
        for k, s in enumerate(strengths):
            seeds = [args.seed + 1000 * k + i for i in range(len(items))]
            columns.append(synth.augment(images, prompts, strengths=s, guidance_scale=args.guidance,
                                         num_inference_steps=args.steps, seeds=seeds))  # fmt: skip
            labels.append(f"s={s}" if len(args.prompts) == 1 else f"p{args.prompts.index(template)} s={s}")
    rows = [[col[r] for col in columns] for r in range(len(items))]
    print(image_grid(rows, args.out, cell=args.cell, labels=labels))


def _bench(args) -> None:
    from fusionloader.benchmarks.run_all import run_all

    result = run_all(quick=args.quick, json_path=args.json, plots_dir=args.plots, model=args.model, device=args.device,
                     sections=args.sections)  # fmt: skip
    print(f"wrote {args.json}" + "".join(f"\n      {p}" for p in result.get("plots", [])))


def _evaluate(args) -> None:
    from fusionloader.evaluate import EvalConfig, run

    fields = dict(out=args.out, model=args.model, images=args.images, backbone=args.backbone,
                  retrieval_pool=args.retrieval_pool, clip=args.clip, device=args.device, quick=args.quick,
                  progress=not args.no_progress, image_size=args.image_size, report_only=args.report_only,
                  scheduler=args.scheduler)  # fmt: skip
    given = {name: getattr(args, name) for name in ("methods", "ks", "seeds", "protocols", "epochs", "epoch_size",
             "batch_size", "steps", "guidance_scale", "inversion_steps") if getattr(args, name) is not None}  # fmt: skip
    summary = run(EvalConfig(**fields), json_path=args.json, **given)
    print(summary["markdown"])
    print(f"wrote {os.path.join(args.out, 'results.md')}, {os.path.join(args.out, 'results.json')}"
          + (f", {args.json}" if args.json else "") + (f", {summary['plot']}" if summary.get("plot") else ""))


def _cache(args) -> None:
    from fusionloader import Synthesizer
    from fusionloader.engine.latents import file_digest
    from fusionloader.sources.dataset import to_float
    from fusionloader.sources.folder import pil_loader

    synth = Synthesizer.from_pretrained(args.model, device=args.device)
    paths = [p for p, _ in _image_paths(args.images)]
    cache = synth.latent_cache(path=args.path)
    # Entries as producers key and compute them (engine.latents.source_digest): a file's digest, and the image
    # as loaded (resized by the cache, not here), so a pool over the same ImageFolder hits every one of them.
    cache.build(len(paths), lambda i: to_float(pil_loader(paths[i])), batch_size=args.batch_size,
                digest=lambda i: file_digest(paths[i]))
    cache.close()
    print(f"{len(paths)} images cached in {cache.path} (fingerprint {cache.fingerprint})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionloader", description="On-the-fly diffusion augmentation for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small classifier with and without FusionLoader")
    demo.add_argument("--model", help="diffusers checkpoint folder or hub id (default: the embedded digits model)")
    demo.add_argument("--images", help="ImageFolder root root/<class>/<image> (default: the embedded digits)")
    demo.add_argument("--devices", nargs="+", default=["cpu"], help="producer devices, e.g. cuda:1 cuda:2")
    demo.add_argument("--train-device", default="cpu")
    demo.add_argument("--out", default="fusionloader-demo")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--per-class", type=int, default=10, help="few-shot training images per class")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--alpha", type=float, default=0.5)
    demo.add_argument("--strengths", default="randomized", help="'randomized', a float, or comma-separated floats")
    demo.add_argument("--guidance", type=float, default=3.0)
    demo.add_argument("--steps", type=int, default=10)
    demo.add_argument("--prompt", help="prompt template with {} for the class name")
    demo.add_argument("--late-policy", default="wait", choices=("reuse", "real", "wait"))
    demo.add_argument("--image-size", type=int, default=32, help="classifier input size with --images")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(fn=_demo)

    preview = sub.add_parser("preview", help="variants of given images at several strengths and prompts")
    preview.add_argument("--model", required=True)
    preview.add_argument("--images", required=True, help="a folder of images, or an ImageFolder tree")
    preview.add_argument("--out", default="grid.png")
    preview.add_argument("--prompts", nargs="+", default=["a photo of a {}"], help="templates; {} = class folder name")
    preview.add_argument("--strengths", default="0.25,0.5,0.75,1.0")
    preview.add_argument("--steps", type=int, default=50)
    preview.add_argument("--guidance", type=float, default=7.5)
    preview.add_argument("--scheduler", default=None, help="ddim, euler, dpmpp_2m (default: the checkpoint's)")
    preview.add_argument("--n", type=int, default=8, help="number of images")
    preview.add_argument("--cell", type=int, default=128, help="grid cell size in px")
    preview.add_argument("--device", default="cpu")
    preview.add_argument("--seed", type=int, default=0)
    preview.set_defaults(fn=_preview)

    bench = sub.add_parser("bench", help="engine, loader and kernel benchmarks -> one JSON + PNG plots")
    bench.add_argument("--quick", action="store_true", help="small sizes (about 4 minutes on 2 CPU cores)")
    bench.add_argument("--json", default="out/bench.json")
    bench.add_argument("--plots", default=None, help="folder for PNG plots (default: beside the JSON)")
    bench.add_argument("--model", default=None, help="diffusers folder (default: a tiny random SD-shaped model)")
    bench.add_argument("--device", default=None)
    bench.add_argument("--sections", nargs="+", default=None, choices=("engine", "loader", "transforms", "kernels", "speed"),
                       help="which benchmarks (default: all; 'speed': producer speed options with quality, issue 12)")
    bench.set_defaults(fn=_bench)

    ev = sub.add_parser("evaluate", help="does it help? the few-shot grid for every method, with intervals")
    ev.add_argument("--quick", action="store_true", help="the reduced grid (k 1,2; 3 seeds; 4 epochs of 40; 4 steps)")
    ev.add_argument("--json", default=None, help="also write the summary JSON here")
    ev.add_argument("--out", default="fusionloader-eval", help="cell files (resumable), results.md/json, accuracy.png")
    ev.add_argument("--model", help="diffusers checkpoint (default: the embedded digits model)")
    ev.add_argument("--images", help="ImageFolder root (default: the embedded digits)")
    ev.add_argument("--backbone", help="linear protocol: TorchScript/pickled nn.Module taking [0,1] images")
    ev.add_argument("--retrieval-pool", help="with --images: LAION-layout embedding folder for 'retrieval'")
    ev.add_argument("--clip", help="with --retrieval-pool: a transformers CLIPModel folder for the queries")
    ev.add_argument("--methods", nargs="+", default=None)
    ev.add_argument("--ks", nargs="+", type=int, default=None)
    ev.add_argument("--seeds", nargs="+", type=int, default=None)
    ev.add_argument("--protocols", nargs="+", default=None, help="linear full")
    ev.add_argument("--epochs", type=int, default=None)
    ev.add_argument("--epoch-size", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--steps", type=int, default=None, help="scheduler steps")
    ev.add_argument("--scheduler", default=None, help="the synthesizer's scheduler (default: the checkpoint's; "
                    "e.g. lcm_span with --model fusionloader/assets/digits-lcm --steps 1)")  # fmt: skip
    ev.add_argument("--guidance-scale", type=float, default=None)
    ev.add_argument("--inversion-steps", type=int, default=None, help="textual inversion steps per class")
    ev.add_argument("--image-size", type=int, default=32, help="classifier input size with --images")
    ev.add_argument("--device", default="cpu", help="generation and training device, e.g. cuda:0")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--report-only", action="store_true", help="tables from the finished cells only; runs nothing")
    ev.set_defaults(fn=_evaluate)

    cache = sub.add_parser("cache", help="VAE-encode an image folder into a latent cache file")
    cache.add_argument("--model", required=True)
    cache.add_argument("--images", required=True)
    cache.add_argument("--path", required=True)
    cache.add_argument("--device", default="cpu")
    cache.add_argument("--batch-size", type=int, default=16)
    cache.set_defaults(fn=_cache)

    sub.add_parser("invert", help="learn one token per class by textual inversion (see --help)", add_help=False)
    sub.add_parser("erase", help="erase a concept from the UNet with ESD (see --help)", add_help=False)
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["invert"]:  # textual inversion parses its own (long) argument list
        from fusionloader.methods.inversion import invert_main

        return invert_main(argv[1:])
    if argv[:1] == ["erase"]:  # ESD concept erasure parses its own arguments (methods/erase.py)
        from fusionloader.methods.erase import erase_main

        return erase_main(argv[1:])
    from fusionloader.extras import MissingExtraError

    args = _parser().parse_args(argv)
    try:
        args.fn(args)
    except MissingExtraError as e:  # a one-line message (what to install), not a traceback
        sys.exit(f"fusionloader: {e}")


if __name__ == "__main__":
    sys.exit(main())
