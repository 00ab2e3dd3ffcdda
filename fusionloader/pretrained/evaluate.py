"""Measure how recognisable the embedded model's images are.

    python -m fusionloader.pretrained.evaluate [--model DIR] [--json PATH] [--preview PNG] [--write-card]

A logistic-regression classifier is trained on REAL images of the classifier-train split (grey, pooled
back to 8x8, the digits' native resolution) and then classifies

* text-only generations (``StableDiffusionPipeline`` loaded from the model folder, DDIM, prompt
  ``"a photo of the digit {name}"``, ``--per-class`` images per class) at each ``--guidance`` value;
* img2img variants (``StableDiffusionImg2ImgPipeline``) of held-out classifier-test-split images at each
  ``--strengths`` value, prompted with their true class; the label is the source image's class.

Chance is 10%. For reference the same classifier's accuracy on the real test split is reported too.
``--write-card`` rewrites ``README.md`` in the model folder from ``train_info.json`` and these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from fusionloader.pretrained import (
    PROMPT_TEMPLATE,
    class_names,
    default_model_path,
    load_digits_splits,
    prompts_for,
    recorded_path,
)


def features(images) -> np.ndarray:
    """(N, 3, H, W) or (N, H, W, 3) images in [0, 1] -> (N, 64) grey 8x8 area-pooled, 0..16 like sklearn."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images, dtype=torch.float32)
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    x = x.mean(1, keepdim=True)
    x = torch.nn.functional.adaptive_avg_pool2d(x, 8)
    return (x.flatten(1) * 16.0).numpy()


def train_classifier(splits):
    from fusionloader.extras import require

    LogisticRegression = require("sklearn.linear_model", "fusionloader.pretrained.evaluate", "demo").LogisticRegression
    clf = LogisticRegression(max_iter=5000, C=1.0)
    clf.fit(features(splits.train.images), splits.train.labels.numpy())
    return clf


def _grid(rows: list[np.ndarray], scale: int = 2):
    """rows: list of (K, H, W, 3) float arrays in [0,1] -> PIL image."""
    from PIL import Image

    pad = 2
    k = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + pad) + pad, k * (w + pad) + pad, 3), 0.5, dtype=np.float32)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = im
    img = Image.fromarray((canvas.clip(0, 1) * 255).round().astype(np.uint8))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def evaluate(args) -> dict:
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    t0 = time.time()
    splits = load_digits_splits()
    clf = train_classifier(splits)
    res: dict = {
        "model": recorded_path(args.model),  # no absolute path of this machine in the shipped eval.json
        "classifier": "sklearn LogisticRegression on grey 8x8-pooled real classifier-train split",
        "classifier_train_images": len(splits.train),
        "real_test_accuracy": float(clf.score(features(splits.test.images), splits.test.labels.numpy())),
        "chance": 0.1,
        "steps": args.steps,
        "per_class": args.per_class,
        "prompt_template": PROMPT_TEMPLATE,
        "text_to_image": {},
        "img2img": {},
    }
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    labels = np.repeat(np.arange(10), args.per_class)
    prompts = prompts_for(range(10))
    previews = {}
    for g in args.guidance:
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            out = pipe(prompts, num_images_per_prompt=args.per_class, num_inference_steps=args.steps,
                       guidance_scale=g, generator=gen, output_type="np").images
        assert np.isfinite(out).all()
        pred = clf.predict(features(out))
        per_class = [float((pred[labels == c] == c).mean()) for c in range(10)]
        res["text_to_image"][str(g)] = {"accuracy": float((pred == labels).mean()), "per_class": per_class}
        previews[g] = out
        print(f"text-to-image guidance {g}: accuracy {(pred == labels).mean():.3f} per class {np.round(per_class, 2).tolist()}", flush=True)

    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    # A fixed, class-balanced subset of the held-out test split.
    te = splits.test
    pick = np.concatenate([np.flatnonzero(te.labels.numpy() == c)[: args.img2img_per_class] for c in range(10)])
    src, src_y = te.images[pick], te.labels.numpy()[pick]
    i2i_out = {}
    for s in args.strengths:
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            out = i2i(prompts_for(src_y), image=src, strength=s, num_inference_steps=args.steps,
                      guidance_scale=args.img2img_guidance, generator=gen, output_type="np").images
        assert np.isfinite(out).all()
        acc = float((clf.predict(features(out)) == src_y).mean())
        res["img2img"][str(s)] = {"accuracy": acc, "images": len(src_y), "guidance": args.img2img_guidance}
        i2i_out[s] = out
        print(f"img2img strength {s}: accuracy {acc:.3f} on {len(src_y)} held-out images", flush=True)
    res["seconds"] = time.time() - t0

    if args.preview:
        g = args.guidance[-1] if args.preview_guidance is None else args.preview_guidance
        if g not in previews:
            raise SystemExit(f"--preview-guidance {g} is not among --guidance {args.guidance}")
        k = min(args.per_class, 10)
        rows = [previews[g][c * args.per_class : c * args.per_class + k] for c in range(10)]
        _grid(rows).save(args.preview)
        # Second figure: held-out real image, then its variants at each strength (one row per class).
        src_np = src.permute(0, 2, 3, 1).numpy()
        first = [int(np.flatnonzero(src_y == c)[0]) for c in range(10)]
        rows = [np.stack([src_np[i]] + [i2i_out[s][i] for s in args.strengths]) for i in first]
        root, ext = os.path.splitext(args.preview)
        _grid(rows).save(root + "_img2img" + ext)
        print(f"wrote {args.preview} (rows: classes 0-9, guidance {g}) and {root + '_img2img' + ext} "
              f"(columns: real, strengths {args.strengths})", flush=True)
    return res


def write_card(model: str, res: dict, eval_cmd: str) -> str:
    info_path = os.path.join(model, "train_info.json")
    info = json.load(open(info_path)) if os.path.exists(info_path) else {}
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(model) for f in fs if f != "README.md")
    hp = info.get("hyperparameters", {})
    t2i = "\n".join(f"| text-only, guidance {g} | {v['accuracy'] * 100:.1f}% | {res['per_class'] * 10} generations, "
                    f"{res['steps']} DDIM steps |" for g, v in res["text_to_image"].items())
    i2i = "\n".join(f"| img2img, strength {s} | {v['accuracy'] * 100:.1f}% | {v['images']} held-out test images, "
                    f"guidance {v['guidance']}, {res['steps']} DDIM steps |" for s, v in res["img2img"].items())
    card = f"""# digits-ldm: fusionloader's embedded default model

A tiny class-conditioned latent diffusion model in diffusers format (the `StableDiffusionImg2ImgPipeline`
layout: `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, `model_index.json`; no safety
checker), shaped like Stable Diffusion 1.x so everything that works with SD-1.x works with it: prompts,
class names, templates, classifier-free guidance, learned tokens (textual inversion), img2img (SDEdit).

```python
from diffusers import StableDiffusionImg2ImgPipeline
from fusionloader.pretrained import default_model_path, class_names, load_digits_splits
pipe = StableDiffusionImg2ImgPipeline.from_pretrained(default_model_path())   # float32 on CPU
```

- **Images**: 32x32 RGB (grey), white digit on black; latents 4x8x8 (VAE factor 4), `scaling_factor`
  {info.get('scaling_factor', float('nan')):.4f} (1 / std of the training latents).
- **Prompts**: `"{PROMPT_TEMPLATE}"` with `name` in {', '.join(class_names)} (one token each). Also trained
  with: {', '.join('`' + t + '`' for t in info.get('train_templates', [])[1:])}; 10% of prompts dropped to `""`.
- **Components**: UNet2DConditionModel (channels 64/128/128, cross-attention at 8x8 and 4x4, epsilon
  prediction; stored in fp16, loads as float32 by default), AutoencoderKL (16/32/64), CLIPTextModel (64 wide,
  2 layers, trained jointly with the UNet), CLIPTokenizer (generated vocabulary,
  `fusionloader.pretrained.components.build_clip_tokenizer`), DDIMScheduler with SD-1.x settings (scaled_linear
  0.00085..0.012, 1000 steps, steps_offset 1, set_alpha_to_one False, clip_sample False, leading spacing).
- **Size on disk**: {size / 1e6:.2f} MB.

## Data

scikit-learn's handwritten digits (`sklearn.datasets.load_digits`, 1,797 8x8 images shipped inside
scikit-learn, no download), upscaled bilinearly to 32x32, grey in 3 channels. `load_digits_splits()` makes
a fixed class-stratified partition (seed 0): per class 50% **generator** / 25% **train** / 25% **test**
(898 / 450 / 449 images), pairwise disjoint. This model was trained on the generator split only; the
demo and the evaluation train and test classifiers on the other two, which the generator never saw.

## Training

```bash
python -m fusionloader.pretrained.train --out fusionloader/assets/digits-ldm
```

CPU only, seeded, deterministic algorithms. VAE: {hp.get('vae_steps')} steps, batch {hp.get('vae_batch')}
(MSE + {hp.get('kl_weight')} x KL, +-2 px shifts); held-out reconstruction MSE
{info.get('vae_recon_mse_heldout_test', float('nan')):.4f} (pixels in [-1, 1]). UNet + text encoder:
{hp.get('unet_steps')} steps, batch {hp.get('batch')} (about {hp.get('unet_steps', 0) * hp.get('batch', 0) / max(1, info.get('generator_images', 1)):.0f} epochs), AdamW lr {hp.get('unet_lr')} / {hp.get('text_lr')}
(warm-up + cosine), min-SNR-5 weighting, EMA {hp.get('ema')}. Wall time
**{info.get('wall_seconds', float('nan')) / 60:.1f} min** with torch threads = {info.get('threads')} on a shared
{info.get('cpu_count')}-core CPU (torch {info.get('torch')}). `train_info.json` has the full record.

## Recognisability

A logistic-regression classifier trained on the REAL classifier-train split (grey, pooled to 8x8)
classifies the model's images; chance is 10%, the same classifier scores
**{res['real_test_accuracy'] * 100:.1f}%** on the real test split.

| images | classifier accuracy | setting |
|---|---|---|
{t2i}
{i2i}

Measured with (about {res['seconds'] / 60:.0f} min on CPU):

```bash
{eval_cmd}
```

## Limitations

- A toy: 32 px, 898 training images, about half an hour of CPU training. It exists so fusionloader's
  demo, tests and benchmarks run anywhere without a download; point `--model` at a real SD checkpoint
  for real work.
- High guidance buys recognisability with diversity: at 7.5 the samples of a class look much alike; 3
  keeps more variety (the preview grids are made by `--preview grid.png`).
- img2img variants are prompted with the source image's true class, so they are pulled towards a
  typical member of that class; that is why they can score above the real test images themselves.
"""
    with open(os.path.join(model, "README.md"), "w") as f:
        f.write(card)
    return card


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps (img2img runs strength x steps)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 7.5])
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--img2img-per-class", type=int, default=20)
    ap.add_argument("--img2img-guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--preview", help="PNG grid of text-only generations (rows: classes); *_img2img.png beside it")
    ap.add_argument("--preview-guidance", type=float, help="which --guidance value the preview shows (default: last)")
    ap.add_argument("--write-card", action="store_true", help="rewrite README.md in the model folder")
    args = ap.parse_args(argv)
    res = evaluate(args)
    print(json.dumps({k: v for k, v in res.items()}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if args.write_card:
        cmd = "python -m fusionloader.pretrained.evaluate " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
        write_card(args.model, res, cmd)
        print(f"wrote {os.path.join(args.model, 'README.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
