"""fusionloader.recipes: each paper's defaults, and each recipe through FusionLoader on the embedded digits."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn.datasets", reason="the embedded digits need scikit-learn (extra [demo])")

from fusionloader import FusionLoader, Synthesizer, recipes  # noqa: E402
from fusionloader.pretrained import PROMPT_TEMPLATE, class_names, default_model_path  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _few_shot(per_class=2):
    from fusionloader.demo import TensorImages
    from fusionloader.pretrained import load_digits_splits

    s = load_digits_splits().train
    keep = torch.cat([(s.labels == c).nonzero().flatten()[:per_class] for c in range(10)])
    return TensorImages(s.images[keep], s.labels[keep], class_names)


def _epoch(recipe, **kwargs):
    ds = _few_shot()
    loader = FusionLoader(ds, batch_size=10, shuffle=True, seed=0, late_policy="wait", return_meta=True, **(recipe | kwargs))
    with loader:
        batches = list(loader)
        stats = loader.stats()
    return batches, stats


def test_real_guidance_defaults():
    r = recipes.real_guidance()
    assert r["alpha"] == 0.5 and r["strengths"] == 0.5 and r["guidance_scale"] == 7.5 and r["num_inference_steps"] == 50
    assert r["prompts"][7] == "a photo of a seven" and r["synthesizer"] == default_model_path()
    assert r.curriculum is None


def test_da_fusion_defaults_with_tokens():
    synth = Synthesizer.from_pretrained(default_model_path())
    tokens = {f"<{n}>": torch.randn(1, 64) * 0.01 for n in class_names}
    r = recipes.da_fusion(tokens=tokens, synthesizer=synth)
    assert r["strengths"] == "randomized" and r["alpha"] == 0.5 and r["variants_per_index"] == 10
    assert r["leakage_guard"] is True and r["prompts"][3] == "a photo of a <three>" and r["synthesizer"] is synth
    with pytest.raises(ValueError, match="no learned token"):
        recipes.da_fusion(tokens={"<zero>": torch.zeros(1, 64)}, synthesizer=Synthesizer.from_pretrained(default_model_path()))


def test_bad_recipe_arguments_are_named():
    with pytest.raises(ValueError, match="leakage_guard=True needs learned tokens"):
        recipes.da_fusion()
    with pytest.raises(ValueError, match="template"):
        recipes.real_guidance(template="a photo")
    with pytest.raises(ValueError, match="strength"):
        recipes.class_label_templates(strength=1.5)
    with pytest.raises(ValueError, match="levels"):
        recipes.discl(levels=(0.5, 0.2), clip_threshold=None)


def test_class_label_templates_defaults():
    from fusionloader.engine.prompts import CLIP_IMAGENET_TEMPLATES

    r = recipes.class_label_templates()
    assert r["mixing"] == "concat" and r["strengths"] is None and "alpha" not in r
    assert r["prompts"][2] == [t.format("two") for t in CLIP_IMAGENET_TEMPLATES] and len(r["prompts"]) == 10


def test_retrieval_defaults_retrieve_from_the_generator_split():
    pytest.importorskip("faiss", reason="retrieval needs faiss (extra [retrieval])")
    r = recipes.retrieval()
    v = r["retrieval"]
    assert r["alpha"] == 0.5 and r["synthesizer"] is None
    assert all(0 < c <= 50 for c in v.counts())
    image, pool_id = v.choose(0, 3, seed=1)
    assert image.shape == (3, 32, 32) and v.choose(0, 3, seed=1)[1] == pool_id


def test_discl_curriculum_and_kwargs():
    r = recipes.discl(clip_threshold=None)
    assert r.curriculum.strengths(0) == pytest.approx(0.9) and r.curriculum.alpha(9) == 0.0
    assert r["strengths"] == pytest.approx(0.9) and r["guidance_scale"] == 10.0
    assert r["mixing"] == "hard" or type(r["mixing"]).__name__ == "HardWeighted"


def test_discl_default_has_the_clip_filter():
    r = recipes.discl()
    assert r["clip_filter"].threshold == 0.30


def test_real_guidance_runs_through_fusionloader():
    r = recipes.real_guidance(template=PROMPT_TEMPLATE, guidance_scale=3.0, num_inference_steps=4)
    batches, stats = _epoch(r)
    metas = [m for _, m in batches]
    synthetic = int(sum(m["synthetic"].sum() for m in metas))
    assert synthetic > 0 and stats["cumulative"]["fresh"] == synthetic


def test_da_fusion_runs_through_fusionloader_with_learned_tokens():
    ds = _few_shot(1)
    by_class = {n: ds.images[ds.labels == c] for c, n in enumerate(class_names)}
    r = recipes.da_fusion(images_by_class=by_class, inversion_steps=1, template=PROMPT_TEMPLATE, guidance_scale=3.0,
                          num_inference_steps=4)  # fmt: skip
    batches, stats = _epoch(r)
    assert stats["cumulative"]["fresh"] == int(sum(m["synthetic"].sum() for _, m in batches)) > 0


def test_class_label_templates_runs_through_fusionloader():
    from fusionloader.pretrained import TRAIN_TEMPLATES

    r = recipes.class_label_templates(templates=TRAIN_TEMPLATES, guidance_scale=3.0, num_inference_steps=4)
    batches, _ = _epoch(r)
    assert sum(len(b[0][1]) for b in batches) == 2 * 20  # every real image plus one generated each


def test_retrieval_runs_through_fusionloader():
    pytest.importorskip("faiss", reason="retrieval needs faiss (extra [retrieval])")
    _, stats = _epoch(recipes.retrieval())
    assert stats["retrieved"] > 0


def test_discl_runs_through_fusionloader():
    r = recipes.discl(template=PROMPT_TEMPLATE, guidance_scale=3.0, num_inference_steps=10, clip_threshold=None)
    batches, stats = _epoch(r)
    assert stats["cumulative"]["fresh"] > 0


def _example(name: str, *args: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([EXAMPLES, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, os.path.join(EXAMPLES, f"recipe_{name}.py"), "--steps", "2", "--per-class", "1",
           "--sampler-steps", "4", *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test accuracy" in done.stdout


@pytest.mark.parametrize("name", [
    "real_guidance",
    "da_fusion",
    "class_label_templates",
    "retrieval",
    "discl",
])  # fmt: skip
def test_examples_run(name):
    _example(name, *(("--inversion-steps", "1") if name == "da_fusion" else ()))
