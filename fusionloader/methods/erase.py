"""Concept erasure, ESD (Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023; METHODS.md section 1).

    delta = erase_concept("CompVis/stable-diffusion-v1-4", "dining table", device="cuda", out="esd/dining_table.safetensors")
    adapters = ClassAdapters({3: "esd/dining_table.safetensors"})    # engine/adapters.py: swapped per class in producers

DA-Fusion's model-centric leakage prevention: for every class a UNet that no longer draws that class, so img2img
variants cannot leak the generator's own knowledge of it into the training set.

One ESD iteration (the authors' ``esd_sd.py``; their CompVis ``train-esd.py`` is the same up to the points below):

1. ``k`` uniform in ``0 .. num_inference_steps - 1``; from fresh seeded noise, run ``k`` steps of the checkpoint's
   scheduler with classifier-free guidance ``start_guidance`` on the concept's prompt -> ``x_t`` at ``t =
   timesteps[k]`` (an image of the concept, partly denoised);
2. the frozen model gives ``e_0 = eps*(x_t, "", t)`` and ``e_c = eps*(x_t, concept, t)``;
3. the model being erased regresses ``eps(x_t, concept, t)`` onto ``e_0 - negative_guidance * (e_c - e_0)`` (MSE,
   Adam): the concept's prediction is pushed away from the concept by negative guidance.

Parameters trained: ``"esd-x"`` the Linear/Conv2d modules of the cross-attention blocks (``attn2``; the prompt-specific
variant), ``"esd-u"`` every Linear/Conv2d module outside them (the unconditional variant, for concepts that should
vanish whatever the prompt), as the authors select them; also their ``"esd-x-strict"`` (``attn2.to_k``/``to_v`` only).

Output: ``rank=int`` (default 4) trains a peft LoRA of that rank on those modules and writes only the low-rank
factors -- kilobytes to a few MB per class instead of a UNet (3.4 GB for SD-1.x), and producers keep every class's
delta resident on one UNet and switch with ``set_adapter`` (no reload; engine/adapters.py). ``rank=None`` trains
the selected weights in full, as the paper does, and writes those tensors (ESD-x: the cross-attention weights only,
about 80 MB for SD-1.x; ESD-u: most of the UNet); producers swap them by copying tensors in place.
Both files are safetensors whose keys are ``"unet." + <module or parameter name>`` (the LoRA keys are diffusers'
PEFT format, so ``pipe.load_lora_weights(file)`` also reads them) with the settings in the header metadata.

Deviations, and why: ``x_t`` is sampled with the frozen model (the authors' current diffusers code; their CompVis
code sampled with the model being trained -- ``sample_from="erased"`` does that). The target is the paper's
``e_0 - eta (e_c - e_0)``; the authors' diffusers script writes ``e_c - eta (e_c - e_0)`` with eta 2 by default,
the same target as the paper's eta 1. A LoRA starts at the base model (its B factor is zero), so with the paper's
lr 1e-5 it moves slowly; LoRA usually wants ~1e-4 (the measurement in docs/CONTRACTS.md says what was used).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "ESD_METHODS", "Erased", "check_concept", "erase_concept", "erase_main", "erasure_effect", "esd_module_names",
    "lora_config_of", "read_erased", "require_peft",
]

ESD_METHODS = ("esd-x", "esd-u", "esd-x-strict")
_FORMAT = "fusionloader-esd"
_TRAINABLE = ("Linear", "Conv2d", "LoRACompatibleLinear", "LoRACompatibleConv")


def esd_module_names(unet: torch.nn.Module, method: str) -> list[str]:
    """Names of the Linear/Conv2d modules ESD trains: inside cross-attention (``esd-x``), outside it (``esd-u``), or
    only cross-attention's key and value projections (``esd-x-strict``, in the authors' code: the text's path only)."""
    _check_method(method)
    names = []
    for name, module in unet.named_modules():
        if type(module).__name__ not in _TRAINABLE or not name:
            continue
        parts = name.split(".")
        cross = "attn2" in parts
        if method == "esd-x-strict":
            if cross and parts[-1] in ("to_k", "to_v"):
                names.append(name)
        elif cross == (method == "esd-x"):
            names.append(name)
    if not names:
        raise ValueError(f"method {method!r}: the UNet has no Linear/Conv2d modules of that kind to train")
    return names


def _check_method(method) -> None:
    if method not in ESD_METHODS:
        raise ValueError(f"method must be one of {ESD_METHODS}, got {method!r}")


def check_concept(tokenizer, concept, allow_subwords: bool = False) -> list[int]:
    """The concept's token ids; ValueError when it is empty or a word is not one token of the vocabulary.

    A word the tokenizer splits into pieces was never seen whole in training, so erasing that piece sequence
    erases something other than the concept (and leaves the concept as the model knows it); ``allow_subwords``
    accepts it anyway (real class names such as "leafy spurge" can need it).
    """
    if not isinstance(concept, str) or not concept.strip():
        raise ValueError(f"concept must be a non-empty string, got {concept!r}")
    ids = tokenizer.encode(concept, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    vocab_size = len(tokenizer)
    if not ids or any(i is None or i >= vocab_size for i in ids) or (unk is not None and unk in ids and
                                                                    tokenizer.unk_token not in concept):  # fmt: skip
        raise ValueError(f"concept {concept!r} is not in the tokenizer's vocabulary (token ids {ids})")
    if not allow_subwords:
        for word in concept.split():
            pieces = tokenizer.encode(word, add_special_tokens=False)
            if len(pieces) != 1:
                raise ValueError(
                    f"concept {concept!r}: word {word!r} is not in the tokenizer's vocabulary (it splits into "
                    f"{tokenizer.convert_ids_to_tokens(pieces)}); pass allow_subwords=True to erase that piece sequence"
                )
    return ids


def _check_number(name: str, value, *, low=None, integer=False, allow_zero=True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low or (allow_zero and value == low)
    if not ok:
        bound = "" if low is None else (f" >= {low}" if allow_zero else f" > {low}")
        raise ValueError(f"{name} must be a finite {'integer' if integer else 'number'}{bound}, got {value!r}")


def _components(model, device):
    """(Components, path or None) from a Synthesizer, engine Components, a diffusers pipeline, or a checkpoint path."""
    from ..engine.models import Components, components_from_pipe, load_components

    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        return load_components(path, device or "cpu"), path
    comps = getattr(model, "components", None)
    if isinstance(comps, Components):  # a Synthesizer
        model = comps
    if isinstance(model, Components):
        if device is not None and torch.device(device).type != model.device.type:
            raise ValueError(f"device {device!r} differs from the model's {model.device}: move it, or omit device")
        return model, None
    if all(getattr(model, n, None) is not None for n in ("unet", "text_encoder", "tokenizer", "scheduler")):
        return components_from_pipe(model, device), None
    raise TypeError(f"model must be a checkpoint path, a Synthesizer, engine Components or a diffusers pipeline, "
                    f"got {type(model).__name__}")  # fmt: skip


@torch.no_grad()
def _embed(tokenizer, text_encoder, prompts: Sequence[str], device) -> torch.Tensor:
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)  # fmt: skip
    return text_encoder(ids)[0].float()


@dataclass
class Erased:
    """An erased concept: ``tensors`` (safetensors keys -> CPU tensors), ``metadata`` (settings, strings), ``losses``."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    losses: list[float] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    def save(self, path: str | os.PathLike) -> str:
        """Write one ``.safetensors`` file (a folder path gets ``<concept>.safetensors``); returns the file."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.metadata["concept"].strip())
            path = os.path.join(path, f"{stem}.safetensors")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, path, metadata=self.metadata)
        return path


def read_erased(path: str | os.PathLike) -> Erased:
    """Load a file written by :meth:`Erased.save`; ValueError naming the file when it is not one."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no erased-concept file at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a file of another format
        raise ValueError(f"{path!r} is not a safetensors file: {e}") from e
    if meta.get("format_name") != _FORMAT or meta.get("kind") not in ("lora", "full"):
        raise ValueError(f"{path!r} was not written by fusionloader erase (metadata {sorted(meta)})")
    if not tensors or any(not k.startswith("unet.") for k in tensors):
        raise ValueError(f"{path!r}: expected keys 'unet.<name>', got {sorted(tensors)[:3]}")
    return Erased(tensors, meta)


def require_peft():
    """Import peft, or say which extra brings it (LoRA deltas need it; full-weight ones do not)."""
    try:
        import peft
    except ModuleNotFoundError as e:
        if e.name != "peft":
            raise
        raise ModuleNotFoundError("ESD LoRA deltas need peft: pip install 'fusionloader[erase]' (or rank=None for "
                                  "full weights)", name="peft") from e  # fmt: skip
    return peft


def _lora_config(rank: int, alpha: float, targets: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights=True, target_modules=list(targets))


def lora_config_of(erased: Erased):
    """The peft ``LoraConfig`` an erased LoRA file was trained with."""
    m = erased.metadata
    return _lora_config(int(m["rank"]), float(m["alpha"]), json.loads(m["target_modules"]))


def _sample_partway(unet, scheduler, cond, uncond, guidance, steps: int, k: int, shape, gen, device):
    """``k`` guided denoising steps from seeded noise; returns (x_t, t) with t the timestep the next step would use."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=gen, device=device) * float(sched.init_noise_sigma)
    for t in sched.timesteps[:k]:
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        out = unet(xin.to(unet.dtype), t, encoder_hidden_states=torch.cat([cond, uncond]).to(unet.dtype)).sample.float()
        c, u = out.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x, return_dict=False)[0].float()
    t = sched.timesteps[k]
    return sched.scale_model_input(x, t), t


def erase_concept(
    model,
    concept: str,
    *,
    method: str = "esd-x",
    iterations: int = 1000,
    lr: float = 1e-5,
    start_guidance: float = 3.0,
    negative_guidance: float = 1.0,
    rank: int | None = 4,
    alpha: float | None = None,
    num_inference_steps: int = 50,
    batch_size: int = 1,
    prompt: str | None = None,
    sample_from: str = "frozen",
    allow_subwords: bool = False,
    seed: int = 0,
    device=None,
    out: str | os.PathLike | None = None,
    progress: bool = False,
) -> Erased:
    """Erase ``concept`` from the UNet with ESD (see the module docstring); returns the delta (saved to ``out`` if given).

    ``model``: a checkpoint path (loaded on ``device``, default CPU), a ``Synthesizer``, engine ``Components`` or a
    diffusers pipeline -- never modified (training runs on a copy). ``method``: ``"esd-x"`` or ``"esd-u"``.
    Paper defaults: 1000 iterations, Adam lr 1e-5, start guidance 3, negative guidance 1, 50 sampling steps,
    batch 1. ``rank``: LoRA rank (``alpha`` default = rank, scale 1) or None for full weights. ``prompt``: the
    text whose prediction is erased (default: the concept itself, as ESD does). ``seed`` fixes every draw.
    """
    _check_method(method)
    _check_number("iterations", iterations, low=1, integer=True)
    _check_number("lr", lr, low=0, allow_zero=False)
    _check_number("start_guidance", start_guidance, low=0)
    _check_number("negative_guidance", negative_guidance, low=0)
    _check_number("num_inference_steps", num_inference_steps, low=1, integer=True)
    _check_number("batch_size", batch_size, low=1, integer=True)
    _check_number("seed", seed, integer=True)
    if rank is not None:
        _check_number("rank", rank, low=1, integer=True)
        if alpha is not None:
            _check_number("alpha", alpha, low=0, allow_zero=False)
    if sample_from not in ("frozen", "erased"):
        raise ValueError(f"sample_from must be 'frozen' or 'erased', got {sample_from!r}")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError(f"prompt must be a non-empty string or None, got {prompt!r}")
    if rank is not None:
        require_peft()
    comps, path = _components(model, device)
    check_concept(comps.tokenizer, concept, allow_subwords)
    dev = comps.device
    targets = esd_module_names(comps.unet, method)

    cond = _embed(comps.tokenizer, comps.text_encoder, [prompt or concept], dev).expand(batch_size, -1, -1)
    uncond = _embed(comps.tokenizer, comps.text_encoder, [""], dev).expand(batch_size, -1, -1)
    unet = copy.deepcopy(comps.unet).train(False)  # the caller's UNet stays as it is
    if unet.dtype != torch.float32:  # Adam on half weights loses the small ESD updates
        unet = unet.to(torch.float32)
    unet.requires_grad_(False)
    if rank is not None:
        alpha = float(alpha if alpha is not None else rank)
        cuda = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # peft draws A's init from the global RNG: seed it, leave it as it was
            torch.manual_seed(int(seed))
            unet.add_adapter(_lora_config(int(rank), alpha, targets), adapter_name="esd")
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        frozen = unet  # with the adapter disabled it is exactly the base UNet: no second copy

        class _Frozen:
            def __enter__(self):
                unet.disable_adapters()

            def __exit__(self, *exc):
                unet.enable_adapters()

        frozen_ctx = _Frozen
    else:
        names = set(targets)
        params = [p for n, p in unet.named_parameters() if n.rsplit(".", 1)[0] in names]
        for p in params:
            p.requires_grad_(True)
        frozen = comps.unet

        class _Nothing:
            def __enter__(self):
                pass

            def __exit__(self, *exc):
                pass

        frozen_ctx = _Nothing
    optimizer = torch.optim.Adam(params, lr=float(lr))
    rng = random.Random(int(seed))
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    shape = (batch_size, comps.latent_channels, *(s // comps.vae_scale_factor for s in comps.resolution))
    steps = int(num_inference_steps)
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(iterations), desc=f"ESD {method} {concept!r}", leave=False)
    for _ in range(int(iterations)):
        k = rng.randrange(steps)
        with torch.no_grad():
            if sample_from == "frozen":
                with frozen_ctx():
                    x_t, t = _sample_partway(frozen, comps.scheduler, cond, uncond, float(start_guidance), steps, k,
                                             shape, gen, dev)  # fmt: skip
            else:
                x_t, t = _sample_partway(unet, comps.scheduler, cond, uncond, float(start_guidance), steps, k, shape,
                                         gen, dev)  # fmt: skip
            with frozen_ctx():
                both = frozen(torch.cat([x_t, x_t]).to(frozen.dtype), t,
                              encoder_hidden_states=torch.cat([cond, uncond]).to(frozen.dtype)).sample.float()  # fmt: skip
            e_c, e_0 = both.chunk(2)
            target = e_0 - float(negative_guidance) * (e_c - e_0)
        pred = unet(x_t, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", t=int(t), refresh=False)
    if bar is not None:
        bar.close()

    if rank is not None:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(unet, adapter_name="esd")
        tensors = {"unet." + k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}
    else:
        names = set(targets)
        tensors = {"unet." + n: p.detach().to("cpu", torch.float32).clone() for n, p in unet.named_parameters()
                   if n.rsplit(".", 1)[0] in names}  # fmt: skip
    metadata = {
        "format": "pt", "format_name": _FORMAT, "kind": "lora" if rank is not None else "full", "concept": concept,
        "prompt": prompt or concept, "method": method, "iterations": str(int(iterations)), "lr": repr(float(lr)),
        "start_guidance": repr(float(start_guidance)), "negative_guidance": repr(float(negative_guidance)),
        "num_inference_steps": str(steps), "batch_size": str(int(batch_size)), "sample_from": sample_from,
        "seed": str(int(seed)), "target_modules": json.dumps(targets), "base_model": path or "",
        "final_loss": repr(losses[-1]) if losses else "",
    }  # fmt: skip
    if rank is not None:
        metadata.update(rank=str(int(rank)), alpha=repr(float(alpha)))
    erased = Erased(tensors, metadata, losses)
    if out is not None:
        erased.save(out)
    return erased


# --- measurement: how much the erased UNet moves each class's prediction ----------------------------------------


@torch.no_grad()
def erasure_effect(model, erased: Erased | str | os.PathLike, prompts: dict, *, latents: torch.Tensor | None = None,
                   n: int = 16, seed: int = 0, timesteps: Sequence[int] | None = None) -> dict:  # fmt: skip
    """Relative change of the noise prediction per prompt: ``||eps_erased - eps_base|| / ||eps_base||``.

    On one fixed set of ``(x_t, t)`` (``n`` of them: ``latents`` -- scaled clean latents, default standard normal
    -- noised with seeded noise at ``timesteps``, default evenly spaced over the schedule), the same for every
    prompt. ``prompts``: ``{name: prompt}``. Returns ``{"relative_change": {name: mean over the set}, ...}``.
    """
    from ..engine.adapters import ClassAdapters

    comps, _ = _components(model, None)
    dev = comps.device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    shape = (comps.latent_channels, *(s // comps.vae_scale_factor for s in comps.resolution))
    if latents is None:
        latents = torch.randn((n, *shape), generator=gen)
    latents = latents.float().cpu()
    n = latents.shape[0]
    T = int(comps.scheduler.config.num_train_timesteps)
    ts = torch.tensor(list(timesteps) if timesteps is not None else
                      [int((i + 0.5) * T / n) for i in range(n)], dtype=torch.long)  # fmt: skip
    if ts.shape[0] != n:
        raise ValueError(f"timesteps: {ts.shape[0]} values for {n} latents")
    noise = torch.randn(latents.shape, generator=gen)
    from ..engine.schedules import training_scheduler

    x_t = training_scheduler(comps.scheduler).add_noise(latents, noise, ts).to(dev)
    ts = ts.to(dev)
    unet = copy.deepcopy(comps.unet)
    adapters = ClassAdapters({"erased": erased})
    adapters.attach(unet)
    result = {}
    for name, text in prompts.items():
        emb = _embed(comps.tokenizer, comps.text_encoder, [text], dev).expand(n, -1, -1).to(unet.dtype)
        adapters.activate(None)
        base = unet(x_t.to(unet.dtype), ts, encoder_hidden_states=emb).sample.float()
        adapters.activate("erased")
        new = unet(x_t.to(unet.dtype), ts, encoder_hidden_states=emb).sample.float()
        rel = (new - base).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1).clamp_min(1e-12)
        result[name] = float(rel.mean())
    return {"relative_change": result, "n": n, "seed": int(seed), "timesteps": ts.tolist()}


# --- command line: `fusionloader erase` -----------------------------------------------------------------------------


def erase_main(argv: Sequence[str] | None = None) -> str:
    """``fusionloader erase --model M --concept NAME --out DIR``: one ESD delta, written to DIR/<concept>.safetensors."""
    parser = argparse.ArgumentParser(prog="fusionloader erase", description=erase_concept.__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers checkpoint folder or hub id")
    parser.add_argument("--concept", required=True, help="the concept (class name) to erase")
    parser.add_argument("--out", required=True, help="folder for <concept>.safetensors (or a .safetensors file)")
    parser.add_argument("--method", default="esd-x", choices=ESD_METHODS)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--start-guidance", type=float, default=3.0)
    parser.add_argument("--negative-guidance", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank; 0 trains and writes full weights")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps for x_t (num_inference_steps)")
    parser.add_argument("--prompt", default=None, help="prompt whose prediction is erased (default: the concept)")
    parser.add_argument("--allow-subwords", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.rank < 0:
        parser.error(f"--rank must be >= 0 (0 = full weights), got {args.rank}")
    erased = erase_concept(
        args.model, args.concept, method=args.method, iterations=args.iterations, lr=args.lr,
        start_guidance=args.start_guidance, negative_guidance=args.negative_guidance, rank=args.rank or None,
        num_inference_steps=args.steps, prompt=args.prompt, allow_subwords=args.allow_subwords, seed=args.seed,
        device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    file = erased.save(args.out)
    print(file)
    return file
