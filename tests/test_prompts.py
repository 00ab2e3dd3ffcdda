"""Prompt templates, the class-id policy, and the embedding cache (== diffusers' encode_prompt, encoded once)."""

import pytest
import torch

from fusionloader.engine import CLIP_IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_SMALL, PromptCache, PromptPolicy


@pytest.fixture(scope="module")
def pipe(tiny_sd1_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd1_path, safety_checker=None)


def test_templates():
    assert len(IMAGENET_TEMPLATES_SMALL) == 27 and len(set(IMAGENET_TEMPLATES_SMALL)) == 27
    assert len(CLIP_IMAGENET_TEMPLATES) == 80 and len(set(CLIP_IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES_SMALL[0] == "a photo of a {}"
    assert CLIP_IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and CLIP_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES_SMALL + CLIP_IMAGENET_TEMPLATES)


def test_policy():
    policy = PromptPolicy(["<cat>", "dog"])
    assert policy(0) == "a photo of a <cat>" and policy(1, draw=123) == "a photo of a dog"
    diverse = PromptPolicy.clip_templates(["cat", "dog"])
    assert diverse(1, draw=2) == "a sculpture of a dog." and diverse(1, draw=82) == diverse(1, draw=2)
    assert len(diverse.prompts()) == 160 and len(policy) == 2
    agnostic = PromptPolicy([""], "a photo")  # class-agnostic control: no class text at all
    assert agnostic(0) == "a photo"
    with pytest.raises(ValueError, match="class id 2"):
        policy(2)


def test_cache_equals_encode_prompt_and_encodes_once(pipe):
    cache = PromptCache(pipe.tokenizer, pipe.text_encoder)
    prompts = ["a photo of a cat", "a dog", "a photo of a cat"]
    with torch.no_grad():
        ref, neg = pipe.encode_prompt(prompts, "cpu", 1, True, None)
    got = cache.get(prompts)
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-5
    assert (cache.get([""] * 3) - neg).abs().max().item() <= 1e-5
    calls = cache.encoder_calls
    cache.get(prompts + [""])
    assert cache.encoder_calls == calls and len(cache) == 3


def test_prefill_in_batches_and_long_prompts(pipe):
    cache = PromptCache(pipe.tokenizer, pipe.text_encoder, batch_size=4)
    policy = PromptPolicy(["cat", "dog", "bird"], IMAGENET_TEMPLATES_SMALL[:3])
    cache.add(policy.prompts())
    assert len(cache) == 9 and cache.encoder_calls == 3
    long = " ".join(["cat"] * 200)  # truncated to model_max_length like the pipeline
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(long, "cpu", 1, False)
    assert (cache[long] - ref[0]).abs().max().item() <= 1e-5


def test_multivector_learned_tokens_expand(pipe):
    import copy

    tok = copy.deepcopy(pipe.tokenizer)
    tok.add_tokens(["<cat>", "<cat>_1", "<cat>_2"])
    from fusionloader.engine.prompts import _convert_multivector

    assert _convert_multivector("a photo of a <cat>", tok) == "a photo of a <cat> <cat>_1 <cat>_2"
    assert _convert_multivector("a photo of a dog", tok) == "a photo of a dog"


def test_textual_inversion_tokens_match_diffusers(tiny_sd1_path):
    import pickle

    from diffusers import StableDiffusionImg2ImgPipeline

    from fusionloader.engine import Synthesizer

    learned = {"<cat>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}  # 2 vectors, DA-Fusion-style
    synth = Synthesizer.from_pretrained(tiny_sd1_path, textual_inversion=[(learned, None)])
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd1_path, safety_checker=None)
    pipe.load_textual_inversion(learned)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt("a photo of a <cat>", "cpu", 1, False)
    got = synth.prompt_cache["a photo of a <cat>"]
    assert (got - ref[0]).abs().max().item() <= 1e-5
    plain = synth.prompt_cache["a photo of a cat"]
    assert (got - plain).abs().max().item() > 1e-3
    clone = pickle.loads(pickle.dumps(synth))  # the learned tokens travel with the load spec
    assert (clone.prompt_cache["a photo of a <cat>"] - got).abs().max().item() <= 1e-6


def test_cache_is_lru_bounded(pipe):
    cache = PromptCache(pipe.tokenizer, pipe.text_encoder, max_size=3)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(["a cat", "a dog", "a bird", "a frog", "a horse"], "cpu", 1, False)
    cache.add(["a cat", "a dog", "a bird"])
    cache.get(["a cat"])  # touched: now the most recent
    got = cache.get(["a frog", "a horse"])  # evicts the two least recent: "a dog", then "a bird"
    assert len(cache) == 3 and "a cat" in cache and "a dog" not in cache and "a bird" not in cache
    assert (got - ref[3:]).abs().max().item() <= 1e-5
    # One call needing more prompts than the bound still returns all of them, right.
    many = cache.get(["a cat", "a dog", "a bird", "a frog", "a horse"])
    assert len(cache) == 3 and (many - ref).abs().max().item() <= 1e-5
    calls = cache.encoder_calls
    cache.get(["a horse"])
    assert cache.encoder_calls == calls  # a hit
    assert cache.entry_bytes() == 77 * pipe.text_encoder.config.hidden_size * 4
    with pytest.raises(ValueError, match="max_size"):
        PromptCache(pipe.tokenizer, pipe.text_encoder, max_size=0)
