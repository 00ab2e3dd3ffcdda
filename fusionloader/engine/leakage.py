"""Data-centric leakage guard: no class name reaches the text encoder (DA-Fusion's data-centric prevention).

The check runs on the token ids that are actually encoded -- each prompt goes through the same steps as
:class:`fusionloader.engine.prompts.PromptCache` (multi-vector learned tokens expanded, tokenized with padding
and truncation at ``model_max_length``) -- and looks for every class name's token-id sequence in them. So a
class name split into several tokens ("leafy spurge" -> ``leafy</w> sp urge</w>``) counts, a class name cut
off by truncation does not (it never reaches the encoder), and a learned token (``<seven>``, an added token
of the tokenizer) passes: it is one new id, not the name's ids. Spelling variants are covered as the
tokenizer sees them: the name as given, lower/upper/title case, ``_``/``-`` read as spaces, with and
without a leading space (byte-level BPE and SentencePiece tokenize a word differently after a space); a
case-folding tokenizer such as CLIP's maps them to the same ids.

A template word that *is* a class name also leaks (``"a photo of one {}"`` with a class ``one``): the
class's token reaches the encoder all the same, so it is reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from .prompts import PromptCache, _convert_multivector

__all__ = [
    "GuardedPromptCache", "LeakageError", "LeakageGuard", "check_prompts", "class_token_sequences", "find_leaks",
    "tokenizer_of",
]


class LeakageError(ValueError):
    """A prompt would encode a class name. ``prompt``, ``class_name``, ``token_ids`` (the matched sequence)
    and ``position`` (its start in the encoded ids) say where."""

    def __init__(self, prompt: str, class_name: str, token_ids: tuple[int, ...], position: int, tokens: list[str]):
        self.prompt, self.class_name, self.token_ids, self.position = prompt, class_name, token_ids, position
        super().__init__(
            f"leakage_guard: prompt {prompt!r} encodes the class name {class_name!r} (token ids {list(token_ids)} "
            f"= {tokens} at position {position} of the encoded ids); use a learned token (textual inversion) or a "
            "class-agnostic prompt instead"
        )


def _variants(name: str) -> list[str]:
    base = {name, name.replace("_", " "), name.replace("-", " "), name.replace("_", " ").replace("-", " ")}
    out: list[str] = []
    for b in sorted(base):
        for v in (b, b.lower(), b.upper(), b.title(), b.capitalize()):
            for s in (v, " " + v):
                if s not in out:
                    out.append(s)
    return out


def _added_ids(tokenizer) -> set[int]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_encoder", {}) or {}
    return {int(i) for i in added.values()} - special


def class_token_sequences(tokenizer, class_names: Sequence[str]) -> dict[str, list[tuple[int, ...]]]:
    """For each class name, the distinct token-id sequences its spelling variants tokenize to (no special
    tokens; sequences containing a learned/added token are left out: learned tokens are allowed)."""
    if isinstance(class_names, str):
        raise TypeError("class_names must be a sequence of names, not one string")
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty")
    learned = _added_ids(tokenizer)
    out: dict[str, list[tuple[int, ...]]] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class_names[{i}] must be a non-empty string, got {name!r}")
        seqs: list[tuple[int, ...]] = []
        for v in _variants(name):
            ids = tuple(int(t) for t in tokenizer(v, add_special_tokens=False).input_ids)
            if ids and not learned.intersection(ids) and ids not in seqs:
                seqs.append(ids)
        out[name] = seqs
    return out


def _encoded_ids(tokenizer, prompt: str) -> list[int]:
    # Exactly what PromptCache encodes (padding does not matter for a match: pad ids are special).
    text = _convert_multivector(prompt, tokenizer)
    return [int(t) for t in tokenizer(text, max_length=tokenizer.model_max_length, truncation=True).input_ids]


def _find(hay: list[int], needle: tuple[int, ...]) -> int:
    n = len(needle)
    first = needle[0]
    for i in range(len(hay) - n + 1):
        if hay[i] == first and tuple(hay[i : i + n]) == needle:
            return i
    return -1


class LeakageGuard:
    """Checks prompts against ``class_names`` for one tokenizer. Build it once (class names tokenized up
    front), then ``check(prompts)`` raises :class:`LeakageError` on the first leak; ``leaks(prompts)`` lists
    them all as ``(prompt, class_name, position)``. Rebuild it after adding learned tokens."""

    def __init__(self, tokenizer, class_names: Sequence[str]):
        self.tokenizer = tokenizer
        self.sequences = class_token_sequences(tokenizer, class_names)

    def leaks(self, prompts: Iterable[str]) -> list[tuple[str, str, int, tuple[int, ...]]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        found = []
        for j, prompt in enumerate(dict.fromkeys(prompts)):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{j}] must be a string, got {type(prompt).__name__}: {prompt!r}")
            ids = _encoded_ids(self.tokenizer, prompt)
            for name, seqs in self.sequences.items():
                for seq in seqs:
                    pos = _find(ids, seq)
                    if pos >= 0:
                        found.append((prompt, name, pos, seq))
                        break
        return found

    def check(self, prompts: Iterable[str]) -> None:
        for prompt, name, pos, seq in self.leaks(prompts):
            raise LeakageError(prompt, name, seq, pos, self.tokenizer.convert_ids_to_tokens(list(seq)))

    __call__ = check


def tokenizer_of(synthesizer):
    """The tokenizer whose ids reach ``synthesizer``'s text encoder: a ``Synthesizer``'s own (learned tokens
    included), or a checkpoint folder's ``tokenizer/`` loaded as the engine loads it (nothing else is read)."""
    components = getattr(synthesizer, "components", None)
    if components is not None:
        return components.tokenizer
    if isinstance(synthesizer, (str, os.PathLike)):
        from .models import load_tokenizer

        return load_tokenizer(os.fspath(synthesizer))
    raise TypeError(f"leakage_guard needs the synthesizer's tokenizer: give a Synthesizer or a checkpoint path, "
                    f"got {type(synthesizer).__name__}")


def find_leaks(tokenizer, prompts: Iterable[str], class_names: Sequence[str]):
    """Every ``(prompt, class_name, position, token_ids)`` where a prompt's encoded ids contain a class name."""
    return LeakageGuard(tokenizer, class_names).leaks(prompts)


def check_prompts(tokenizer, prompts: Iterable[str], class_names: Sequence[str]) -> None:
    """Raise :class:`LeakageError` (a ``ValueError`` naming the prompt and the class) if any prompt's encoded
    token ids contain a class name's token sequence; learned tokens pass."""
    LeakageGuard(tokenizer, class_names).check(prompts)


class GuardedPromptCache(PromptCache):
    """A :class:`~fusionloader.engine.prompts.PromptCache` that checks every prompt before the text encoder sees it
    (``Synthesizer(leakage_guard=True, class_names=...)``): the one place prompts are tokenized for encoding, so
    ``augment``, ``generate``, samplers and producers are all covered, and each distinct prompt is checked once
    (when first encoded, or again after an eviction). ``clear()`` (called after loading a textual inversion)
    rebuilds the guard, so newly learned tokens pass."""

    def __init__(self, tokenizer, text_encoder, device=None, batch_size: int = 64, max_size=None, *,
                 class_names: Sequence[str]):  # fmt: skip
        super().__init__(tokenizer, text_encoder, device, batch_size, max_size)
        self.class_names = list(class_names)
        self.guard = LeakageGuard(tokenizer, self.class_names)

    def clear(self) -> None:
        super().clear()
        self.guard = LeakageGuard(self.tokenizer, self.class_names)  # the tokenizer may have new learned tokens

    def _encode(self, prompts: list[str]):
        self.guard.check(prompts)
        return super()._encode(prompts)
