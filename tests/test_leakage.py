"""Data-centric leakage guard: class names never reach the text encoder (checked on the encoded token ids)."""

import pytest

from fusionloader.engine.leakage import LeakageError, LeakageGuard, check_prompts, class_token_sequences, find_leaks
from fusionloader.testing import build_clip_tokenizer

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return build_clip_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def digits_tok():
    from transformers import CLIPTokenizer

    from fusionloader.pretrained import default_model_path

    return CLIPTokenizer.from_pretrained(default_model_path(), subfolder="tokenizer")


@pytest.fixture(params=["tiny", "digits"])
def tok(request, tiny_tok, digits_tok):
    return tiny_tok if request.param == "tiny" else digits_tok


def test_rejects_class_name_naming_prompt_and_class(tok):
    with pytest.raises(ValueError) as e:
        check_prompts(tok, ["a photo of a digit", "a photo of a seven"], DIGITS)
    assert isinstance(e.value, LeakageError)
    assert e.value.class_name == "seven" and e.value.prompt == "a photo of a seven"
    assert "'seven'" in str(e.value) and "'a photo of a seven'" in str(e.value)


@pytest.mark.parametrize("prompt", ["A Photo of a SEVEN.", "a photo of a seven!", "seven", "  a   photo of a  seven  "])
def test_case_and_space_variants_as_the_tokenizer_sees_them(tok, prompt):
    with pytest.raises(LeakageError, match="seven"):
        check_prompts(tok, [prompt], DIGITS)


def test_multi_token_class_name(tok):
    names = ("dining table", "leafy_spurge")
    # Neither is a whole-word token in these vocabularies: they tokenize into several pieces.
    seqs = class_token_sequences(tok, names)
    assert all(len(s) > 1 for s in seqs["dining table"]) and all(len(s) > 2 for s in seqs["leafy_spurge"])
    with pytest.raises(LeakageError) as e:
        check_prompts(tok, ["a photo of a dining table"], names)
    assert e.value.class_name == "dining table" and len(e.value.token_ids) > 1
    # The folder-style name with an underscore is caught when written with a space, and vice versa.
    with pytest.raises(LeakageError, match="leafy_spurge"):
        check_prompts(tok, ["a photo of leafy spurge in a field"], names)
    # Only part of the name is not the name.
    check_prompts(tok, ["a photo of a table", "a dining room", "a leafy plant"], names)


def test_learned_tokens_pass(tiny_tok, tmp_path):
    tok = build_clip_tokenizer(str(tmp_path))
    tok.add_tokens(["<seven>", "<seven>_1", "<dining_table>"])
    check_prompts(tok, ["a photo of a <seven>", "a photo of a <dining_table>", "", "a photo"], DIGITS + ("dining table",))
    # A token that was never learned is just text: "<three>" tokenizes to "<", "three", ">".
    with pytest.raises(LeakageError, match="three"):
        check_prompts(tok, ["a photo of a <three>"], DIGITS)
    # ... and the name itself next to a learned token still leaks.
    with pytest.raises(LeakageError, match="seven"):
        check_prompts(tok, ["a photo of a <seven> seven"], DIGITS)


def test_truncated_name_never_reaches_the_encoder(tmp_path):
    tok = build_clip_tokenizer(str(tmp_path), model_max_length=8)
    check_prompts(tok, ["a photo of the photo of the seven"], DIGITS)  # "seven" is cut off at 8 ids
    with pytest.raises(LeakageError):
        check_prompts(tok, ["a photo of the seven"], DIGITS)


def test_template_word_equal_to_a_class_name_is_reported(tok):
    leaks = find_leaks(tok, ["a photo of one <dog>", "a photo of a cat"], DIGITS)
    assert [(p, c) for p, c, _, _ in leaks] == [("a photo of one <dog>", "one")]


def test_no_false_positive_on_word_pieces(tok):
    # "sevenths" contains the letters of a class name but not its whole-word token ("seven" + "ths</w>").
    check_prompts(tok, ["a photo of sevenths", "a drawing of the digit", "a photo of eighty"], DIGITS)


def test_token_level_semantics(tiny_tok):
    # The check is on ids, not letters: in this generated vocabulary "someone" has no token of its own and
    # BPE ends it with the class token "one</w>", which then does reach the encoder.
    assert tiny_tok.tokenize("someone")[-1] == "one</w>"
    with pytest.raises(LeakageError, match="'one'"):
        check_prompts(tiny_tok, ["a photo of someone"], DIGITS)


def test_guard_object_and_bad_arguments(tok):
    guard = LeakageGuard(tok, DIGITS)
    guard(["a photo of the digit <x>"])
    assert len(guard.leaks(["two", "two", "nine"])) == 2  # deduplicated prompts
    with pytest.raises(ValueError, match="class_names is empty"):
        LeakageGuard(tok, [])
    with pytest.raises(ValueError, match=r"class_names\[1\]"):
        LeakageGuard(tok, ["cat", ""])
    with pytest.raises(TypeError, match="prompts"):
        guard.check([3])


# -- FusionLoader(..., leakage_guard=True): refused at construction, before anything starts -----------------


class _Digits:
    """A tiny labelled dataset whose class names are digit words (the embedded model's classes)."""

    classes = list(DIGITS)

    def __len__(self):
        return 10

    def __getitem__(self, i):
        import torch

        return torch.zeros(3, 32, 32), i


def test_loader_refuses_a_template_that_encodes_a_class_name():
    from fusionloader import FusionLoader
    from fusionloader.pretrained import default_model_path

    with pytest.raises(ValueError, match=r"prompt 'a photo of a zero' encodes the class name 'zero'") as e:
        FusionLoader(_Digits(), batch_size=2, synthesizer=default_model_path(), prompts="a photo of a {}",
                     leakage_guard=True)
    assert isinstance(e.value, LeakageError) and e.value.class_name == "zero"
    # A multi-token class name in a per-class mapping is caught too.
    ds = _Digits()
    ds.classes = ["dining table"] + list(DIGITS[1:])
    with pytest.raises(LeakageError) as e:
        FusionLoader(ds, batch_size=2, synthesizer=default_model_path(), leakage_guard=True,
                     prompts={i: ["a photo", f"a photo of a {name}"] for i, name in enumerate(ds.classes)})
    assert e.value.class_name == "dining table" and len(e.value.token_ids) > 1


def test_loader_accepts_learned_tokens_and_checks_callable_prompts_as_made():
    import torch

    from fusionloader import FusionLoader, Synthesizer
    from fusionloader.pretrained import default_model_path

    synth = Synthesizer.from_pretrained(default_model_path())
    width = synth.components.text_encoder.get_input_embeddings().weight.shape[1]
    for d in DIGITS:
        synth.load_textual_inversion({f"<{d}>": torch.randn(width)})
    names = [f"a photo of a <{d}>" for d in DIGITS]
    loader = FusionLoader(_Digits(), batch_size=2, synthesizer=synth, prompts=names, leakage_guard=True)
    loader.close()
    # A callable's prompts cannot be listed up front: each is checked as it is made.
    loader = FusionLoader(_Digits(), batch_size=2, synthesizer=synth, leakage_guard=True,
                          prompts=lambda index, label: f"a photo of a {DIGITS[label]}")
    with pytest.raises(LeakageError):
        loader.prompt(3, 0.0)
    loader.close()


def test_loader_guard_needs_class_names():
    import torch

    from fusionloader import FusionLoader
    from fusionloader.pretrained import default_model_path

    data = [(torch.zeros(3, 8, 8), 0)] * 4
    with pytest.raises(ValueError, match="leakage_guard=True needs dataset.classes"):
        FusionLoader(data, batch_size=2, synthesizer=default_model_path(), leakage_guard=True)


# -- Synthesizer(..., leakage_guard=True, class_names=...): every prompt checked before the text encoder --------


@pytest.fixture(scope="module")
def guarded():
    import torch

    from fusionloader.engine.synthesizer import Synthesizer
    from fusionloader.pretrained import default_model_path

    synth = Synthesizer.from_pretrained(default_model_path(), leakage_guard=True, class_names=DIGITS + ("dining table",))
    hidden = synth.components.text_encoder.config.hidden_size
    synth.load_textual_inversion({"<seven>": torch.randn(hidden, generator=torch.Generator().manual_seed(0))})
    return synth


def test_synthesizer_refuses_class_names_on_every_path(guarded):
    from fusionloader.engine.sampler import Request

    with pytest.raises(ValueError) as e:
        guarded.generate(["a photo of a seven"], num_inference_steps=2, seeds=[1])
    assert isinstance(e.value, LeakageError) and e.value.class_name == "seven" and e.value.prompt == "a photo of a seven"
    with pytest.raises(LeakageError, match="'dining table'"):  # a multi-token class name
        guarded.generate(["a photo of a dining table"], num_inference_steps=2, seeds=[1])
    with pytest.raises(LeakageError, match="'three'"):  # the sampler path producers use
        guarded.sampler(capacity=1).submit(Request(0, "the digit three", None, 2.0, 2, seed=1))
    with pytest.raises(LeakageError, match="negative|'two'"):  # the negative prompt is encoded too
        guarded.generate(["a photo"], num_inference_steps=2, seeds=[1], negative_prompt="two")
    for p in ("a photo of a seven", "a photo of a dining table", "the digit three", "two"):
        assert p not in guarded.prompt_cache  # never encoded


def test_synthesizer_guard_passes_learned_tokens_and_travels(guarded):
    import pickle

    out = guarded.generate(["a photo of a <seven>", "a photo of a digit"], guidance_scale=2.0, num_inference_steps=2,
                           seeds=[1, 2])  # fmt: skip
    assert out.shape == (2, 3, *guarded.resolution)
    spec = guarded.load_spec()
    assert spec["leakage_guard"] is True and "seven" in spec["class_names"]
    clone = pickle.loads(pickle.dumps(guarded))  # as a producer rebuilds it
    with pytest.raises(LeakageError, match="'nine'"):
        clone.generate(["nine"], num_inference_steps=2, seeds=[1])


def test_synthesizer_guard_arguments():
    from fusionloader.engine.synthesizer import Synthesizer
    from fusionloader.pretrained import default_model_path

    with pytest.raises(ValueError, match="class_names"):
        Synthesizer.from_pretrained(default_model_path(), leakage_guard=True)
    with pytest.raises(ValueError, match=r"class_names\[1\]"):
        Synthesizer.from_pretrained(default_model_path(), leakage_guard=True, class_names=["one", " "])
    with pytest.raises(TypeError, match="leakage_guard"):
        Synthesizer.from_pretrained(default_model_path(), leakage_guard="yes", class_names=["one"])
    plain = Synthesizer.from_pretrained(default_model_path())
    assert "leakage_guard" not in plain.load_spec()  # off: the spec and the engine are as before
    plain.generate(["a photo of a seven"], num_inference_steps=2, seeds=[1])
