"""Train the embedded CLIP-style encoder pair (``fusionloader/assets/digits-clip``).

    python -m fusionloader.pretrained.train_clip --out fusionloader/assets/digits-clip

CPU only, seeded (``torch.use_deterministic_algorithms``), a few minutes on two shared cores. It trains on the
embedded diffusion model's *generator* split only (``load_digits_splits().generator``, 898 images): the pool a
retrieval baseline searches is the generator's own training data (Burg & Wenzel), and the train/test splits
stay unseen by every shipped model.

- Model: :func:`fusionloader.pretrained.clip_model.build_clip_model` (ViT 4x4 patches on 32x32, width 64,
  2 layers per tower, 64-d projection), tokenizer = the embedded diffusion model's (class names are one token).
- Captions: one of ``ZERO_SHOT_TEMPLATES`` filled with the class name, drawn per image per step.
- Loss: CLIP's symmetric cross-entropy over image-text logits with a learned temperature, except that the
  targets are *all* same-class pairs in the batch (uniform over them): with ten classes a batch holds many
  images of a class, and CLIP's one-hot diagonal would push apart captions that are in fact identical.
- Augmentation: random +-2 px shifts (background-padded).
- Output: ``CLIPModel.save_pretrained`` (safetensors), the tokenizer, a ``preprocessor_config.json`` (32 px,
  mean/std 0.5), ``train_info.json`` and ``eval.json`` (zero-shot accuracy, templates averaged as CLIP does, on
  the generator, train and held-out test splits). No absolute paths are written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from fusionloader.pretrained import class_names, default_model_path, load_digits_splits, write_train_info
from fusionloader.pretrained.clip_model import ZERO_SHOT_TEMPLATES, build_clip_model

MEAN = STD = (0.5, 0.5, 0.5)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=0.0)
    d = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([pad[i, :, d[i, 0] : d[i, 0] + h, d[i, 1] : d[i, 1] + w] for i in range(n)])


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


def zero_shot_accuracy(embedder, images: torch.Tensor, labels: torch.Tensor) -> float:
    from fusionloader.methods.embedders import prompt_embeddings

    q = prompt_embeddings(embedder, class_names, ZERO_SHOT_TEMPLATES)
    pred = (embedder.encode_images(images) @ q.T).argmax(1)
    return float((pred == labels.numpy()).mean())


def retrieval_precision(embedder, splits, k: int = 50) -> dict:
    """Share of retrieved generator-split images whose (hidden) label is the querying class: per class the
    ``k`` nearest by class prompt (templates averaged), and the ``k // 10`` nearest per held-out test image."""
    from fusionloader.methods.embedders import prompt_embeddings
    from fusionloader.methods.retrieval import RetrievalPool

    pool = RetrievalPool(embedder.encode_images(splits.generator.images))
    pool_labels = splits.generator.labels.numpy()
    _, ids = pool.search(prompt_embeddings(embedder, class_names, ZERO_SHOT_TEMPLATES), k)
    text = float((pool_labels[ids] == np.arange(len(class_names))[:, None]).mean())
    _, ids = pool.search(embedder.encode_images(splits.test.images), k // 10)
    image = float((pool_labels[ids] == splits.test.labels.numpy()[:, None]).mean())
    return {f"class_prompt_top{k}": text, f"test_image_top{k // 10}": image}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (e.g. fusionloader/assets/digits-clip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    args = ap.parse_args(argv)

    from transformers import CLIPTokenizer

    from fusionloader.methods.embedders import ClipEmbedder

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    splits = load_digits_splits()
    x, y = splits.generator.images, splits.generator.labels
    tokenizer = CLIPTokenizer.from_pretrained(default_model_path(), subfolder="tokenizer")
    model = build_clip_model(tokenizer, seed=args.seed).train()
    captions = [t.format(c) for c in class_names for t in ZERO_SHOT_TEMPLATES]  # row = class * T + template
    tok = tokenizer(captions, padding=True, return_tensors="pt")
    n_t = len(ZERO_SHOT_TEMPLATES)
    _log(f"generator split {len(y)} images; {model.num_parameters()} parameters; threads {torch.get_num_threads()}")

    gen = torch.Generator().manual_seed(args.seed + 1)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "logit_scale" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm)))
    )
    loss_avg = 0.0
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(y), (args.batch,), generator=gen)
        xb, yb = _shift(x[idx], gen, 2), y[idx]
        row = yb * n_t + torch.randint(0, n_t, (args.batch,), generator=gen)
        uniq, inv = torch.unique(row, return_inverse=True)
        img = F.normalize(model.get_image_features(pixel_values=_pixels(xb)).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=tok.input_ids[uniq], attention_mask=tok.attention_mask[uniq]).pooler_output, dim=-1)[inv]
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        target = (yb[:, None] == yb[None, :]).float()
        target = target / target.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean() + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_avg = 0.98 * loss_avg + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            el = time.time() - t0
            _log(f"step {step}/{args.steps} loss {loss_avg:.4f} scale {model.logit_scale.exp().item():.1f} ({el:.0f}s, eta {el / (step + 1) * (args.steps - step - 1):.0f}s)")
    train_seconds = time.time() - t0

    model.eval()
    tokenizer.model_max_length = model.config.text_config.max_position_embeddings  # longer prompts are truncated
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    with open(os.path.join(args.out, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
                   "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD),
                   "do_convert_rgb": True, "resample": 3}, f, indent=2)

    emb = ClipEmbedder.from_pretrained(args.out)
    ev = {
        "zero_shot_accuracy": {name: zero_shot_accuracy(emb, s.images, s.labels) for name, s in zip(("generator", "train", "test"), splits)},
        "retrieval_precision": retrieval_precision(emb, splits),
        "split_sizes": {name: len(s) for name, s in zip(("generator", "train", "test"), splits)},
        "templates": list(ZERO_SHOT_TEMPLATES),
        "protocol": "argmax over classes of cosine(image, mean of L2-normalised template embeddings); "
        "test = held-out digits never seen by any shipped model; chance 0.1",
        "command": "python -m fusionloader.pretrained.train_clip --out <dir> "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
    }
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(ev, f, indent=2)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    info = {
        "command": ev["command"],
        "hyperparameters": {k: v for k, v in vars(args).items() if k != "out"},
        "parameters": model.num_parameters(),
        "final_loss": loss_avg,
        "logit_scale": model.logit_scale.exp().item(),
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - t_start,
        "generator_images": len(y),
        "size_bytes": size,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    info = write_train_info(args.out, info, t_start)
    _log(f"saved to {args.out} ({size / 1e6:.2f} MB); zero-shot {ev['zero_shot_accuracy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
