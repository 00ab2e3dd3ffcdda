"""Untrained Stable-Diffusion-1.x components built from configs: a CLIP tokenizer generated for a word
list, a CLIP text encoder sized for it, and SD-1.x's DDIM scheduler.

The shipped model's trainer (``fusionloader.pretrained.train``) builds its tokenizer, text encoder and
scheduler from these, and so do the tiny test pipelines (``fusionloader.testing`` re-exports them):
shipped code never imports the test helpers. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import os

__all__ = ["DEFAULT_WORDS", "build_clip_text_encoder", "build_clip_tokenizer", "sd1_scheduler"]

# Words that get whole-word BPE tokens in the generated vocabulary; every other word still tokenizes
# (byte-level fallback), just into more pieces.
DEFAULT_WORDS = (
    "a photo of the an image picture zero one two three four five six seven eight nine digit "
    "cat dog bird car plane ship truck horse frog deer bad good sculpture drawing"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table of GPT-2/CLIP byte-level BPE (openai/CLIP simple_tokenizer).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_clip_tokenizer(directory: str, words=DEFAULT_WORDS, model_max_length: int = 77):
    """Write a CLIP vocabulary/merges pair for ``words`` into ``directory`` and load a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen = set(vocab)
    for word in words:
        # Merge left to right: "cat" -> "c a", "ca t</w>" so the whole word becomes one token.
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if merged not in seen:
                merges.append(f"{pair[0]} {pair[1]}")
                vocab.append(merged)
                seen.add(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        os.path.join(directory, "vocab.json"),
        os.path.join(directory, "merges.txt"),
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )


def build_clip_text_encoder(tokenizer, hidden: int, layers: int, intermediate_size: int, heads: int = 4):
    """A randomly initialised ``CLIPTextModel`` sized for ``tokenizer`` (its special ids and vocabulary)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=hidden,
            intermediate_size=intermediate_size,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            max_position_embeddings=tokenizer.model_max_length,
            vocab_size=len(tokenizer),
            projection_dim=hidden,
        )
    )


def sd1_scheduler(prediction_type: str = "epsilon"):
    """A ``DDIMScheduler`` with Stable Diffusion 1.x's settings (scaled-linear betas, steps_offset 1, leading)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )
