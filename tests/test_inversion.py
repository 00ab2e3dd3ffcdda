"""Textual inversion (fusionloader.methods.inversion) on the tiny SD-shaped models: what trains, what is saved."""

import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fusionloader import Synthesizer
from fusionloader.methods.inversion import invert_main, learn_tokens, load_learned_tokens, save_learned_tokens
from fusionloader.testing import build_tiny_pipeline


def _images(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _init_row(pipe, word="the"):
    (i,) = pipe.tokenizer.encode(word, add_special_tokens=False)
    return pipe.text_encoder.get_input_embeddings().weight[i].detach().clone()


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


def test_only_new_rows_train_and_the_pipeline_is_untouched(pipe):
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    vocab_before = len(pipe.tokenizer)
    seen = {}

    def callback(info):  # the private encoder after the last step of each class
        seen[info["class"]] = (info["text_encoder"], list(info["token_ids"]))

    tokens = learn_tokens(pipe, {"cat": _images(), "dog": _images(seed=1)}, steps=4, progress=False, callback=callback)
    assert set(tokens) == {"<cat>", "<dog>"}
    encoder, cat_ids = seen["cat"]
    _, dog_ids = seen["dog"]
    weight = encoder.get_input_embeddings().weight.detach()
    n = before.shape[0]
    assert weight.shape[0] == n + 2 and sorted(cat_ids + dog_ids) == [n, n + 1]
    assert torch.equal(weight[:n], before)  # bit-identical: restored after every step
    assert torch.equal(weight[cat_ids], tokens["<cat>"]) and torch.equal(weight[dog_ids], tokens["<dog>"])
    init = _init_row(pipe)
    assert not torch.allclose(tokens["<cat>"][0], init) and not torch.allclose(tokens["<dog>"][0], init)
    # the caller's tokenizer and text encoder never see the new tokens
    assert len(pipe.tokenizer) == vocab_before
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before)


class _TextSensitiveUNet(torch.nn.Module):
    """The tiny UNet plus a prompt-dependent bias per channel.

    A randomly initialised UNet barely depends on its prompt (CLIP's final layer norm and near-uniform cross-
    attention over 77 positions), so no token could lower its loss measurably; this bias gives the token a
    clear job (cancel it), which makes "the loss goes down" a robust test of the training loop.
    """

    def __init__(self, unet, hidden, scale=0.5):
        super().__init__()
        self.unet, self.config = unet, unet.config
        self.proj = torch.nn.Linear(hidden, unet.config.out_channels)
        with torch.no_grad():
            self.proj.weight.normal_(0, scale, generator=torch.Generator().manual_seed(0))
            self.proj.bias.zero_()

    device = property(lambda self: self.unet.device)
    dtype = property(lambda self: self.unet.dtype)

    def forward(self, x, t, hidden):
        return types.SimpleNamespace(sample=self.unet(x, t, hidden).sample + self.proj(hidden.mean(1))[:, :, None, None])


def test_loss_decreases(pipe):
    toy = types.SimpleNamespace(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                scheduler=pipe.scheduler, unet=_TextSensitiveUNet(pipe.unet, 32))  # fmt: skip
    losses = []
    # DA-Fusion's defaults (lr 5e-4 x batch 4); over seeds 0-4 the ratio below is 0.74-0.79.
    learn_tokens(toy, {"cat": _images()}, steps=30, seed=0, progress=False, callback=lambda i: losses.append(i["loss"]))
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])


def test_multi_vector_trains_every_vector(pipe):
    names = []
    tokens = learn_tokens(pipe, {"cat": _images()}, num_vectors=3, init="class_name", steps=3, progress=False,
                          callback=lambda i: names.append(i["tokenizer"].convert_ids_to_tokens(i["token_ids"])))  # fmt: skip
    emb = tokens["<cat>"]
    assert emb.shape == (3, 32)
    assert names[-1] == ["<cat>", "<cat>_1", "<cat>_2"]
    init = _init_row(pipe, "cat")  # "cat" is one token of the tiny vocabulary
    for k in range(3):  # the authors' script updated only vector 0
        assert not torch.allclose(emb[k], init), k
    assert not torch.allclose(emb[1], emb[2])  # each vector gets its own gradient


def test_v_prediction_checkpoint(tiny_sd2_path):
    losses = []
    tokens = learn_tokens(tiny_sd2_path, {"cat": _images(2)}, steps=2, batch_size=2, progress=False,
                          callback=lambda i: losses.append(i["loss"]))  # fmt: skip
    assert tokens["<cat>"].shape == (1, 32) and all(np.isfinite(losses))


def test_saved_file_loads_with_diffusers(pipe, tmp_path):
    tokens = learn_tokens(pipe, {"cat": _images(), "dining table": _images(seed=2)}, num_vectors=2, steps=2, progress=False)
    assert set(tokens) == {"<cat>", "<dining_table>"}
    files = save_learned_tokens(tokens, tmp_path / "tokens")
    assert sorted(os.path.basename(f) for f in files) == ["cat.safetensors", "dining_table.safetensors"]

    fresh = build_tiny_pipeline()
    fresh.load_textual_inversion(str(tmp_path / "tokens" / "dining_table.safetensors"))
    fresh.load_textual_inversion(str(tmp_path / "tokens" / "cat.safetensors"), token="<kitty>")  # renamed on load
    tok, weight = fresh.tokenizer, fresh.text_encoder.get_input_embeddings().weight
    for name, learned in (("<dining_table>", tokens["<dining_table>"]), ("<kitty>", tokens["<cat>"])):
        prompt = fresh.maybe_convert_prompt(f"a photo of a {name}", tok)
        assert prompt == f"a photo of a {name} {name}_1"
        ids = tok(prompt).input_ids
        new = tok.convert_tokens_to_ids([name, f"{name}_1"])
        assert ids[-3:-1] == new  # the prompt tokenizes to the new ids (before the end token)
        assert torch.equal(weight[new].detach(), learned)
    with torch.no_grad():  # and the text encoder runs on it
        out = fresh.text_encoder(torch.tensor([tok(fresh.maybe_convert_prompt("a <kitty>", tok)).input_ids]))[0]
    assert torch.isfinite(out).all()

    single = save_learned_tokens({"<cat>": tokens["<cat>"][0]}, tmp_path / "one.safetensors")
    other = build_tiny_pipeline()
    assert load_learned_tokens(other, single[0]) == ["<cat>"]
    assert torch.equal(other.text_encoder.get_input_embeddings().weight[-1].detach(), tokens["<cat>"][0])
    with pytest.raises(ValueError, match="folder"):
        save_learned_tokens(tokens, tmp_path / "two.safetensors")


def test_learned_tokens_in_synthesizer_prompts(tiny_sd1_path, tmp_path):
    tokens = learn_tokens(tiny_sd1_path, {"cat": _images()}, steps=2, progress=False)
    save_learned_tokens(tokens, tmp_path / "tokens")
    synth = Synthesizer.from_pretrained(tiny_sd1_path)
    assert load_learned_tokens(synth, tmp_path / "tokens") == ["<cat>"]
    assert [t for _, t in synth.load_spec()["textual_inversion"]] == ["<cat>"]  # producers reload it
    out = synth.augment(_images(2), ["a photo of a <cat>"] * 2, strengths=0.5, num_inference_steps=2, seeds=[1, 2])
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    emb = synth.prompt_cache["a photo of a <cat>"]
    assert not torch.equal(emb, synth.prompt_cache["a photo of a the"])


def test_bad_input(pipe):
    with pytest.raises(ValueError, match="single token"):
        learn_tokens(pipe, {"cat": _images()}, init="xyzzyq", steps=1, progress=False)
    with pytest.raises(ValueError, match="no images"):
        learn_tokens(pipe, {"cat": torch.zeros(0, 3, 32, 32)}, steps=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        learn_tokens(pipe, {}, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        learn_tokens(pipe, {"cat": torch.zeros(3, 32, 32)}, steps=1, progress=False)
    with pytest.raises(ValueError, match="num_vectors"):
        learn_tokens(pipe, {"cat": _images()}, num_vectors=0, progress=False)


def test_invert_cli(tiny_sd1_path, tmp_path, capsys):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / name / f"{k}.png")
    tokens = invert_main(["--model", tiny_sd1_path, "--images", str(root), "--out", str(tmp_path / "out"),
                          "--steps", "2", "--batch-size", "2", "--no-progress"])  # fmt: skip
    assert set(tokens) == {"<cat>", "<dog>"}
    assert sorted(os.listdir(tmp_path / "out")) == ["cat.safetensors", "dog.safetensors"]
    assert "cat.safetensors" in capsys.readouterr().out
