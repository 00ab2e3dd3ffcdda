"""Textual inversion as DA-Fusion trains its class tokens (Trabucco et al., ICLR 2024; METHODS.md section 1).

    tokens = learn_tokens("CompVis/stable-diffusion-v1-4", {"dining_table": images}, device="cuda")
    save_learned_tokens(tokens, "tokens/")               # tokens/dining_table.safetensors, diffusers' format
    synth = Synthesizer.from_pretrained("CompVis/stable-diffusion-v1-4", device="cuda")
    load_learned_tokens(synth, "tokens/")                # prompts may now say "a photo of a <dining_table>"

Per class, on that class's few real images: new token(s) are added to the CLIP tokenizer, and only their rows of
the text encoder's input embedding train (AdamW, weight decay 1e-2); after every optimiser step every other row
is restored exactly, as diffusers' ``textual_inversion.py`` (which DA-Fusion forked) does. UNet, VAE and the rest
of the text encoder are frozen. Loss: MSE between the UNet's prediction and epsilon (or the velocity for a
``v_prediction`` checkpoint) on VAE latents times the VAE's scaling factor, timesteps uniform over the checkpoint's
training schedule, one random "imagenet_templates_small" prompt per sample, random horizontal flip.

Defaults are DA-Fusion's first published setting (1 vector from "the", 1000 steps, batch 4, lr 5e-4 scaled by the
batch size to 2e-3). The camera-ready one: ``num_vectors=4, init="class_name", batch_size=8, steps=2000``.
With ``num_vectors=k``, ``"<t>"`` stands for ``"<t> <t>_1 ... <t>_{k-1}"`` (diffusers' multi-vector convention)
and all k vectors train -- the authors' multi-token script only ever updated the first one (METHODS.md).

The caller's pipeline is never modified: training runs on private copies of the tokenizer and text encoder.

Differences from the original: each image's VAE posterior (and its mirror image's) is encoded once and sampled
every step instead of re-encoding the image (the same distribution, a fraction of the VAE work); tensors are
resized with antialiased bicubic interpolation rather than PIL's (the CLI loads files with PIL's bicubic).
Stable Diffusion 1.x/2.x only (one text encoder; SDXL's two are not handled).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..engine.prompts import IMAGENET_TEMPLATES_SMALL

__all__ = ["invert_main", "learn_tokens", "load_learned_tokens", "save_learned_tokens", "token_for_class"]


def token_for_class(name: str) -> str:
    """DA-Fusion's placeholder for a class: ``"dining table"`` -> ``"<dining_table>"``."""
    return "<" + "_".join(str(name).split()) + ">"


def _vector_tokens(token: str, k: int) -> list[str]:
    # diffusers' multi-vector names: the first vector keeps the token, the rest get _1 .. _{k-1}.
    return [token] + [f"{token}_{i}" for i in range(1, k)]


def _parts(pipe_or_path, device):
    """(tokenizer, text_encoder, unet, vae, scheduler, device) from a pipeline, a Synthesizer or Components, or a path."""
    if isinstance(pipe_or_path, (str, os.PathLike)):
        from ..engine.models import load_components

        pipe_or_path = load_components(os.fspath(pipe_or_path), device or "cpu")
    parts = getattr(pipe_or_path, "components", None)
    if parts is None or isinstance(parts, dict):  # diffusers pipelines have a dict .components
        parts = pipe_or_path
    names = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
    missing = [n for n in names if getattr(parts, n, None) is None]
    if missing:
        raise ValueError(f"textual inversion needs {', '.join(names)}; {type(pipe_or_path).__name__} has no {', '.join(missing)}")
    here = parts.unet.device
    device = torch.device(device) if device is not None else here
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if here != device or parts.vae.device != device:
        raise ValueError(f"the pipeline's UNet/VAE are on {here}/{parts.vae.device}, not {device}: move it, or pass device={str(here)!r}")
    return [getattr(parts, n) for n in names] + [device]


def _init_ids(tokenizer, init: str, class_name: str) -> list[int]:
    """Token ids whose mean embedding initialises every vector (``init="class_name"`` may split into pieces)."""
    text = " ".join(class_name.replace("_", " ").split()) if init == "class_name" else init
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"init {init!r} for class {class_name!r} gives no tokens")
    if init != "class_name" and len(ids) != 1:
        # diffusers' rule for an initializer word: it must be one token of the vocabulary.
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"init word {init!r} is not a single token of the tokenizer's vocabulary (it splits into {pieces}); "
                         "use a vocabulary word such as 'the', or init='class_name'")  # fmt: skip
    return ids


def _check_images(images_by_class: Mapping[str, torch.Tensor]) -> None:
    if not images_by_class:
        raise ValueError("images_by_class is empty: give {class name: (N, 3, H, W) float images in [0, 1]}")
    for name, images in images_by_class.items():
        if not str(name).strip():
            raise ValueError("class names must be non-empty")
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"class {name!r}: images must be a (N, 3, H, W) tensor, got {shape}")
        if images.shape[0] == 0:
            raise ValueError(f"class {name!r} has no images")
        if not images.is_floating_point():
            raise ValueError(f"class {name!r}: images must be float in [0, 1], got {images.dtype}")


@torch.no_grad()
def _posteriors(vae, images: torch.Tensor, resolution: tuple[int, int], device, flip: bool, batch: int = 8):
    """(mean, std) of the VAE posterior of every image and, with ``flip``, of its mirror image (rows N..2N-1)."""
    x = images.to(device=device, dtype=torch.float32)
    if tuple(x.shape[-2:]) != tuple(resolution):
        x = F.interpolate(x, size=resolution, mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 1)
    if flip:
        x = torch.cat([x, x.flip(-1)])
    means, stds = [], []
    for i in range(0, x.shape[0], batch):
        dist = vae.encode((x[i : i + batch] * 2 - 1).to(vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


class _Frozen:
    """Context: ``requires_grad=False`` on modules' parameters, the caller's flags restored afterwards."""

    def __init__(self, *modules):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, f in zip(self.params, self.flags):
            p.requires_grad_(f)


def _train_class(
    tokenizer, text_encoder, unet, scheduler, posterior, token_ids: list[int], placeholder: str, *, steps, batch_size,
    lr, weight_decay, templates, flip, seed, device, callback, class_name, progress, scaling,
) -> torch.Tensor:  # fmt: skip
    """Train the rows ``token_ids`` of ``text_encoder``'s input embedding in place; return them (k, hidden)."""
    embedding = text_encoder.get_input_embeddings()
    weight = embedding.weight
    weight.requires_grad_(True)
    original = weight.detach().clone()
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[token_ids] = False
    optimizer = torch.optim.AdamW([weight], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)

    mean, std = posterior
    n = mean.shape[0] // (2 if flip else 1)
    rng = random.Random(seed)  # order, flips, templates
    gen = torch.Generator(device=device).manual_seed(seed)  # latent samples, noise, timesteps
    T = scheduler.config.num_train_timesteps
    order: list[int] = []

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"textual inversion {placeholder}", leave=False)
    for step in range(steps):
        idx = []
        for _ in range(batch_size):  # shuffled passes over the images, as a DataLoader(shuffle=True) would
            if not order:
                order = list(range(n))
                rng.shuffle(order)
            i = order.pop()
            idx.append(i + n if flip and rng.random() < 0.5 else i)
        prompts = [rng.choice(templates).format(placeholder) for _ in idx]
        rows = torch.tensor(idx, device=device)
        eps0 = torch.randn(mean[rows].shape, generator=gen, device=device)
        latents = (mean[rows] + std[rows] * eps0) * scaling
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(0, T, (len(idx),), generator=gen, device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, t)
        else:
            target = noise

        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)  # fmt: skip
        hidden = text_encoder(ids)[0]
        pred = unet(noisy.to(unet.dtype), t, hidden.to(unet.dtype)).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # only the new rows train: put every other row back exactly
            weight[keep] = original[keep]
        if callback is None and bar is None:
            continue
        loss = float(loss.detach())  # a host sync: only when someone reads it
        if callback is not None:
            callback({"class": class_name, "token": placeholder.split()[0], "step": step, "loss": loss,
                      "text_encoder": text_encoder, "tokenizer": tokenizer, "token_ids": list(token_ids)})  # fmt: skip
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    if bar is not None:
        bar.close()
    weight.requires_grad_(False)
    return weight.detach()[token_ids].clone().cpu()


def learn_tokens(
    pipe_or_path,
    images_by_class: Mapping[str, torch.Tensor],
    *,
    num_vectors: int = 1,
    init: str = "the",
    steps: int = 1000,
    batch_size: int = 4,
    lr: float = 5e-4,
    scale_lr: bool = True,
    weight_decay: float = 1e-2,
    templates: Sequence[str] = IMAGENET_TEMPLATES_SMALL,
    flip: bool = True,
    seed: int = 0,
    device=None,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Learn one placeholder token per class; returns ``{"<class>": (num_vectors, hidden) float32 CPU tensor}``.

    ``pipe_or_path``: a diffusers Stable-Diffusion pipeline, a ``Synthesizer``, engine ``Components`` or a
    checkpoint path (loaded on ``device``). ``images_by_class``: ``{class name: (N, 3, H, W) float in [0, 1]}``,
    resized to the model's resolution. ``init``: a single vocabulary word (``"the"``) or ``"class_name"`` (the
    mean embedding of the class name's tokens; this partly undoes DA-Fusion's leakage prevention). ``lr`` is
    multiplied by ``batch_size`` when ``scale_lr`` (DA-Fusion: 5e-4 -> 2e-3). ``device``: where training runs
    (default: the pipeline's device, CPU for a path). ``callback(info)`` is called after every step with a dict
    of ``class``, ``token``, ``step``, ``loss`` and the private ``text_encoder``/``tokenizer``/``token_ids``.
    Classes train one after the other, each from its own seed (``seed`` + the class's position).
    """
    if int(num_vectors) < 1:
        raise ValueError(f"num_vectors must be >= 1, got {num_vectors}")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    templates = tuple(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates must be non-empty and each contain '{}' for the placeholder")
    _check_images(images_by_class)
    tokenizer, text_encoder, unet, vae, scheduler, device = _parts(pipe_or_path, device)
    if type(vae).__name__ == "AutoencoderTiny":
        raise ValueError("textual inversion needs the KL VAE's encoder, not a tiny decoder")
    from ..engine.schedules import training_scheduler

    train_scheduler = training_scheduler(scheduler)  # the checkpoint's training noise schedule
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size
    resolution = (size * factor, size * factor) if isinstance(size, int) else (size[0] * factor, size[1] * factor)

    # Private copies: the caller's tokenizer and text encoder stay as they were.
    tokenizer = copy.deepcopy(tokenizer)
    text_encoder = copy.deepcopy(text_encoder).to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    names = [str(n) for n in images_by_class]
    placeholders = {n: _vector_tokens(token_for_class(n), int(num_vectors)) for n in names}
    vocab = tokenizer.get_vocab()
    for n, toks in placeholders.items():
        clash = [t for t in toks if t in vocab]
        if clash:
            raise ValueError(f"class {n!r}: token(s) {clash} already in the tokenizer's vocabulary")
    init_ids = {n: _init_ids(tokenizer, init, n) for n in names}
    if len({t for toks in placeholders.values() for t in toks}) != sum(len(t) for t in placeholders.values()):
        raise ValueError(f"class names {names} map to duplicate tokens")
    for toks in placeholders.values():
        tokenizer.add_tokens(toks)
    try:  # rows are set from the init word below; skip transformers' mean-resizing (and its log line)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    except TypeError:  # transformers < 4.46
        text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    token_ids = {n: tokenizer.convert_tokens_to_ids(toks) for n, toks in placeholders.items()}
    with torch.no_grad():
        for n in names:
            weight[token_ids[n]] = weight[init_ids[n]].mean(0, keepdim=True)
    lr = lr * batch_size if scale_lr else lr

    learned = {}
    with _Frozen(unet, vae):
        for k, n in enumerate(names):
            posterior = _posteriors(vae, images_by_class[n], resolution, device, flip)
            learned[placeholders[n][0]] = _train_class(
                tokenizer, text_encoder, unet, train_scheduler, posterior, token_ids[n], " ".join(placeholders[n]),
                steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, templates=templates, flip=flip,
                seed=int(seed) + k, device=device, callback=callback, class_name=n, progress=progress,
                scaling=float(vae.config.scaling_factor),
            )  # fmt: skip
    return learned


# --- files: diffusers' textual-inversion format ------------------------------------------------------------------


def _file_name(token: str) -> str:
    stem = token.strip("<>") or "token"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) + ".safetensors"


def save_learned_tokens(tokens: Mapping[str, torch.Tensor], path: str | os.PathLike) -> list[str]:
    """Write learned tokens in diffusers' format; returns the files written.

    diffusers' ``load_textual_inversion`` reads one token per file (a single key ``{token: (k, hidden)}``), so
    ``path`` ending in ``.safetensors`` takes exactly one token; any other ``path`` is a folder that receives one
    ``<name>.safetensors`` per token (``"<dining_table>"`` -> ``dining_table.safetensors``). Each file loads with
    ``pipe.load_textual_inversion(file)`` (or ``(file, token=...)`` to rename); :func:`load_learned_tokens` loads
    a file or a whole folder.
    """
    from safetensors.torch import save_file

    if not tokens:
        raise ValueError("no tokens to save")
    path = os.fspath(path)
    items = [(str(t), torch.as_tensor(e).detach().to("cpu", torch.float32).reshape(-1, torch.as_tensor(e).shape[-1]))
             for t, e in tokens.items()]  # fmt: skip
    if path.endswith(".safetensors"):
        if len(items) != 1:
            raise ValueError(f"a .safetensors file holds one token for diffusers; got {len(items)}: save to a folder instead")
        targets = [(path, items[0])]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)
        targets = [(os.path.join(path, _file_name(t)), (t, e)) for t, e in items]
        if len({f for f, _ in targets}) != len(targets):
            raise ValueError(f"tokens {[t for t, _ in items]} map to clashing file names")
    for file, (token, emb) in targets:
        # Written beside and renamed over: ranks saving to one path, or a producer loading it meanwhile,
        # never see a torn file (issue 13's audit).
        tmp = f"{file}.{os.getpid()}.tmp"
        save_file({token: emb.contiguous()}, tmp, metadata={"format": "pt", "num_vectors": str(emb.shape[0])})
        os.replace(tmp, file)
    return [f for f, _ in targets]


def load_learned_tokens(pipe_or_synthesizer, path: str | os.PathLike) -> list[str]:
    """Load tokens saved by :func:`save_learned_tokens` (a file, or a folder of them); returns the tokens.

    ``pipe_or_synthesizer``: anything with diffusers' ``load_textual_inversion`` -- a diffusers pipeline or a
    ``fusionloader.Synthesizer`` (which records the files in its load spec, so producers load them too).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors token files in {path!r}")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"no token file or folder at {path!r}")
    loaded = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
            if len(keys) == 1:  # diffusers' format: pass the file, so a Synthesizer's load spec names it
                pipe_or_synthesizer.load_textual_inversion(file, token=keys[0])
            else:  # several tokens in one file (not what we write): one {token: tensor} at a time
                for key in keys:
                    pipe_or_synthesizer.load_textual_inversion({key: f.get_tensor(key)}, token=key)
        loaded += keys
    return loaded


# --- command line: `fusionloader invert` --------------------------------------------------------------------------


def _load_folder(root: str, resolution: tuple[int, int]) -> dict[str, torch.Tensor]:
    import numpy as np

    from ..sources.folder import ImageFolder

    folder = ImageFolder(root)
    by_class: dict[str, list[torch.Tensor]] = {name: [] for name in folder.classes}
    for path, label in folder.samples:
        image = folder.loader(path).resize((resolution[1], resolution[0]), resample=3)  # PIL bicubic, as the original
        by_class[folder.classes[label]].append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    empty = [name for name, images in by_class.items() if not images]
    if empty:
        raise ValueError(f"class folder(s) {empty} under {root!r} have no images")
    return {name: torch.stack(images) for name, images in by_class.items()}


def invert_main(argv: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``fusionloader invert --model M --images ROOT --out DIR``: one learned token per class folder of ROOT."""
    parser = argparse.ArgumentParser(prog="fusionloader invert", description=learn_tokens.__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers checkpoint folder or hub id")
    parser.add_argument("--images", required=True, help="ImageFolder root: root/<class>/<image>")
    parser.add_argument("--out", required=True, help="folder for <class>.safetensors (or one .safetensors file)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--num-vectors", type=int, default=1)
    parser.add_argument("--init", default="the", help="a single vocabulary word, or 'class_name'")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4, help="before scaling by the batch size")
    parser.add_argument("--no-scale-lr", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from ..engine.models import load_components

    parts = load_components(args.model, args.device)
    images = _load_folder(args.images, parts.resolution)
    tokens = learn_tokens(
        parts, images, num_vectors=args.num_vectors, init=args.init, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, scale_lr=not args.no_scale_lr, seed=args.seed, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    for file in save_learned_tokens(tokens, args.out):
        print(file)
    return tokens
