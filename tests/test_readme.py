"""The README's swap-in examples are the files under examples/, included verbatim, and each one runs: the
plain loop and accelerate in one process, torchrun with 2 ranks, Lightning DDP with 2 devices through its
own launcher -- on CPU with the tiny model, through the examples' own arguments (--model, --producers, ...)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ("plain_loop.py", "lightning_ddp.py", "accelerate_loop.py", "torchrun_ddp.py")
INCLUDE = re.compile(r"<!-- include: (examples/[\w.]+) -->\n```python\n(.*?)```\n", re.S)


def readme_includes() -> dict[str, str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return {path: body for path, body in INCLUDE.findall(f.read())}


def test_readme_includes_every_example_verbatim():
    included = readme_includes()
    assert sorted(included) == sorted(f"examples/{e}" for e in EXAMPLES)
    for path, body in included.items():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            assert body == f.read(), f"README's copy of {path} differs from the file: paste the file again"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/<class>/<image>: 8 small PNGs of two classes, sizes the tiny model does not generate at."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(root / c)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


def run(cmd, tmp_path, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRITON_INTERPRET="1",
               TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}"
    return proc.stdout


def tiny_args(image_folder, model):
    return ["--data", image_folder, "--model", model, "--producers", "cpu", "--steps", "4", "--epochs", "1"]


def samples_printed(stdout):
    """``samples`` of each ``loader.stats()["cumulative"]`` an example printed (one per rank), sorted. Not by line:
    torchrun's per-rank prefixes interleave (``rank 1:rank 0: {...}`` then rank 1's dict on the next line)."""
    return sorted(int(n) for n in re.findall(r"\{'samples': (\d+)", stdout))


def test_plain_loop_example(image_folder, tiny_sd1_path, tmp_path):
    stdout = run([sys.executable, os.path.join(ROOT, "examples", "plain_loop.py"),
                  *tiny_args(image_folder, tiny_sd1_path)], tmp_path)
    assert samples_printed(stdout) == [8]


def test_accelerate_example(image_folder, tiny_sd1_path, tmp_path):
    pytest.importorskip("accelerate")
    stdout = run([sys.executable, os.path.join(ROOT, "examples", "accelerate_loop.py"),
                  *tiny_args(image_folder, tiny_sd1_path)], tmp_path)
    assert samples_printed(stdout) == [8]


def test_torchrun_example(image_folder, tiny_sd1_path, tmp_path):
    stdout = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                  os.path.join(ROOT, "examples", "torchrun_ddp.py"), *tiny_args(image_folder, tiny_sd1_path)], tmp_path)
    assert samples_printed(stdout) == [4, 4], stdout  # each rank its half of the 8 images


def test_lightning_example(image_folder, tiny_sd1_path, tmp_path):
    pytest.importorskip("lightning")
    run([sys.executable, os.path.join(ROOT, "examples", "lightning_ddp.py"), *tiny_args(image_folder, tiny_sd1_path),
         "--accelerator", "cpu", "--devices", "2"], tmp_path)
