"""The embedded default model: loads from the package path with plain diffusers, is small, generates."""

import json
import os

import numpy as np
import pytest
import torch

from fusionloader.pretrained import class_names, default_model_path, load_digits_splits, prompts_for

MODEL = default_model_path()
needs_model = pytest.mark.skipif(
    not os.path.exists(os.path.join(MODEL, "model_index.json")), reason="embedded model not built yet"
)


def _folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_splits_disjoint_and_deterministic():
    s = load_digits_splits()
    sets = [set(x.indices.tolist()) for x in s]
    assert all(len(a & b) == 0 for i, a in enumerate(sets) for b in sets[i + 1 :])
    assert sum(len(x) for x in sets) == 1797
    assert [len(x) for x in s] == [898, 450, 449]
    for split in s:
        assert split.images.shape[1:] == (3, 32, 32) and split.images.dtype == torch.float32
        assert 0.0 <= split.images.min() and split.images.max() <= 1.0
        assert set(split.labels.tolist()) == set(range(10))  # stratified: every class in every split
    again = load_digits_splits()
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(s, again))


def test_class_names_and_prompts():
    assert len(class_names) == 10 and class_names[7] == "seven"
    assert prompts_for([7]) == ["a photo of the digit seven"]


@needs_model
def test_model_folder_layout_and_size():
    index = json.load(open(os.path.join(MODEL, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionImg2ImgPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(MODEL, sub)), sub
    assert _folder_bytes(MODEL) <= 20 * 1024 * 1024
    sched = json.load(open(os.path.join(MODEL, "scheduler", "scheduler_config.json")))
    assert sched["_class_name"] == "DDIMScheduler"
    assert sched["steps_offset"] == 1 and sched["set_alpha_to_one"] is False and sched["clip_sample"] is False
    assert sched["beta_schedule"] == "scaled_linear" and sched["prediction_type"] == "epsilon"


@needs_model
def test_loads_with_diffusers_and_generates():
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32
    # Every class name is a single token, so templates and learned tokens work as with SD.
    for name in class_names:
        assert len(pipe.tokenizer(name, add_special_tokens=False).input_ids) == 1, name

    t2i = StableDiffusionPipeline(**pipe.components)
    t2i.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    out = t2i(prompts_for([3, 8]), num_inference_steps=2, guidance_scale=3.0, generator=g, output_type="np").images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()

    src = load_digits_splits().test.images[:2]
    g = torch.Generator().manual_seed(0)
    out = pipe(prompts_for([0, 1]), image=src, strength=0.5, num_inference_steps=4, guidance_scale=3.0,
               generator=g, output_type="np").images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()


# -- shipped code stands on its own; shipped files record no path of the machine that built them ---------


def test_shipped_trainer_builds_its_components_without_the_test_helpers(monkeypatch):
    import sys

    from fusionloader.pretrained import train

    monkeypatch.setitem(sys.modules, "fusionloader.testing", None)  # importing it now raises ImportError
    vae, unet, text_encoder, tokenizer, scheduler = train.build_components(seed=0)
    assert all(len(tokenizer(name, add_special_tokens=False).input_ids) == 1 for name in class_names)
    assert scheduler.config.steps_offset == 1 and text_encoder.config.hidden_size == unet.config.cross_attention_dim


def test_testing_re_exports_the_component_builders():
    from fusionloader import testing
    from fusionloader.pretrained import components

    assert testing.build_clip_tokenizer is components.build_clip_tokenizer
    assert testing.sd1_scheduler is components.sd1_scheduler


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@needs_model
@pytest.mark.parametrize("name", ["eval.json", "train_info.json"])
def test_shipped_records_have_no_absolute_paths(name):
    record = json.load(open(os.path.join(MODEL, name)))
    for text in _strings(record):
        for word in text.split():
            assert not os.path.isabs(word), (name, text)
    if name == "eval.json":
        assert record["model"] == os.path.join("fusionloader", "assets", "digits-ldm")


def test_recorded_path(tmp_path):
    from fusionloader.pretrained import recorded_path
    from fusionloader.pretrained.train import _command

    assert recorded_path(MODEL) == os.path.join("fusionloader", "assets", "digits-ldm")
    assert recorded_path(str(tmp_path / "run" / "digits-ldm")) == str(tmp_path / "run" / "digits-ldm")  # not there: as given
    (tmp_path / "out").mkdir()
    assert recorded_path(str(tmp_path / "out") + "/") == "out"
    assert recorded_path("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    cmd = _command(["--out", MODEL, "--threads", "1"], MODEL)
    assert cmd == "python -m fusionloader.pretrained.train --out fusionloader/assets/digits-ldm --threads 1"


@needs_model
def test_evaluate_writes_no_absolute_model_path(tmp_path):
    from fusionloader.pretrained import evaluate

    out = tmp_path / "eval.json"
    evaluate.main(["--per-class", "1", "--steps", "2", "--guidance", "3.0", "--strengths", "0.5",
                   "--img2img-per-class", "1", "--threads", "1", "--json", str(out)])  # fmt: skip
    assert json.load(open(out))["model"] == os.path.join("fusionloader", "assets", "digits-ldm")


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    import sys

    from fusionloader.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(MissingExtraError, match=r"needs scikit-learn: pip install 'fusionloader\[demo\]'"):
        load_digits_splits()
