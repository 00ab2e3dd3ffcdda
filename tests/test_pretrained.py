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
