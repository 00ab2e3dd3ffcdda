"""Producers are spawned: datasets defined where a spawned child cannot re-import them still work.

A Jupyter notebook (a dataset class in a cell), a script read from stdin (``python - <<EOF``), and
``fusionloader.portable`` on its own (classes of a ``__main__`` that is not a file, classes local to a
function, and what cannot be pickled at all).
"""

import multiprocessing as mp
import operator
import os
import subprocess
import sys
import textwrap
import threading
import types

import pytest

from fusionloader.portable import SpawnPicklingError, main_is_importable, portable, spawning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared by the notebook and the stdin script: a dataset class defined right there (module __main__),
# FusionLoader with the tiny model and one CPU producer, late_policy="wait" so every synthetic position
# gets its own fresh variant, checked through return_meta and against the real images.
DATASET = """
import torch
from torch.utils.data import Dataset

class CellImages(Dataset):
    classes = ["cat", "dog"]

    def __init__(self, n=8):
        self.images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        self.targets = [i % 2 for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]
"""

TRAIN = """
from fusionloader import FusionLoader

ds = CellImages()
with FusionLoader(ds, batch_size=4, alpha=0.5, synthesizer=MODEL, strengths=0.5, num_inference_steps=2,
                  producer_devices=("cpu",), late_policy="wait", seed=0, return_meta=True) as loader:
    synthetic = fresh = 0
    for (x, y), meta in loader:
        s = meta["synthetic"]
        synthetic += int(s.sum())
        fresh += int(meta["fresh"][s].sum())
        real = ds.images[meta["index"][s]]
        if s.any():  # (allclose of two empty tensors is True)
            assert x[s].shape == real.shape and not torch.allclose(x[s], real, atol=1e-3), "variants equal the real images"
        assert torch.equal(x[~s], ds.images[meta["index"][~s]])
assert synthetic > 0 and fresh == synthetic, (synthetic, fresh)
print("ALL FRESH", fresh, "OF", synthetic)
"""


def _child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)  # producers run the torch reference kernels, as CPU producers do
    return env


def test_dataset_class_defined_in_a_notebook_cell(tiny_sd1_path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="needs the [notebook] extra (nbformat)")
    nbclient = pytest.importorskip("nbclient", reason="needs the [notebook] extra (nbclient)")
    pytest.importorskip("ipykernel", reason="needs the [notebook] extra (ipykernel)")
    for k, v in _child_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(f"MODEL = {tiny_sd1_path!r}\nimport sys\nassert getattr(sys.modules['__main__'], '__file__', None) is None"),
        nbformat.v4.new_code_cell(DATASET),
        nbformat.v4.new_code_cell(TRAIN),
    ]
    path = tmp_path / "train.ipynb"
    nbformat.write(nb, str(path))
    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the cell's traceback if anything fails
    out = "".join(o.get("text", "") for o in nb.cells[2].outputs)
    assert "ALL FRESH" in out, out


def test_training_script_read_from_stdin(tiny_sd1_path, tmp_path):
    unpicklable = textwrap.dedent("""
        import threading
        from fusionloader.portable import SpawnPicklingError

        class Locked(CellImages):
            def __init__(self):
                super().__init__()
                self.lock = threading.Lock()

        try:
            with FusionLoader(Locked(), batch_size=4, alpha=0.5, synthesizer=MODEL, num_inference_steps=2,
                              producer_devices=("cpu",), late_policy="wait", seed=0) as bad:
                next(iter(bad))
        except SpawnPicklingError as e:
            print("REFUSED", e)
        else:
            raise AssertionError("an unpicklable dataset was accepted")
        """)  # fmt: skip
    script = f"MODEL = {tiny_sd1_path!r}\n" + DATASET + "\nfrom fusionloader import FusionLoader\n" + unpicklable + TRAIN
    proc = subprocess.run([sys.executable, "-"], input=script, text=True, capture_output=True, cwd=str(tmp_path),
                          env=_child_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ALL FRESH" in proc.stdout, proc.stdout
    refused = next(line for line in proc.stdout.splitlines() if line.startswith("REFUSED"))
    assert "cannot be sent to the producer processes" in refused and "_thread.lock" in refused
    assert "open them lazily" in refused


# -- fusionloader.portable on its own: a spawned child receives the object, whatever its class's home ----


class _Probe:
    """Target of the spawned child: puts ``obj.answer()`` (a plain value) on a queue."""


def _spawn_answer(obj, wrap=True):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=operator.methodcaller("answer", q), args=(portable(obj) if wrap else obj,), daemon=True)
    with spawning():
        p.start()
    try:
        return q.get(timeout=60)
    finally:
        p.join(30)


def _fake_main(monkeypatch, **attrs):
    """Replace ``__main__`` with a module like a notebook's (no file, no spec) or stdin's (``'<stdin>'``)."""
    main = types.ModuleType("__main__")
    main.__spec__ = None
    for k, v in attrs.items():
        setattr(main, k, v)
    monkeypatch.setitem(sys.modules, "__main__", main)
    code = "class Answer:\n    def __init__(self, v): self.v = v\n    def answer(self, q): q.put(('answered', self.v))\n"
    exec(compile(code, "<cell>", "exec"), main.__dict__)
    return main


def test_main_is_importable(monkeypatch, tmp_path):
    assert main_is_importable()  # pytest's own __main__ (python -m pytest: a module spec)
    _fake_main(monkeypatch)
    assert not main_is_importable()  # a notebook: no file, no spec
    _fake_main(monkeypatch, __file__="<stdin>")
    assert not main_is_importable()
    script = tmp_path / "train.py"
    script.write_text("")
    _fake_main(monkeypatch, __file__=str(script))
    assert main_is_importable()


def test_spawning_hides_a_main_file_that_is_not_there_and_restores_it(monkeypatch):
    main = _fake_main(monkeypatch, __file__="<stdin>")
    with spawning():
        assert not hasattr(main, "__file__")
    assert main.__file__ == "<stdin>"


def test_a_class_of_a_notebook_main_reaches_the_child_by_value(monkeypatch):
    main = _fake_main(monkeypatch)
    assert _spawn_answer(main.Answer(7)) == ("answered", 7)


def test_without_portable_the_child_cannot_find_the_class(monkeypatch):
    # What producers did before: the spawned child dies unpickling (the class is not in its __main__).
    main = _fake_main(monkeypatch)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=operator.methodcaller("answer", q), args=(main.Answer(7),), daemon=True)
    p.start()
    p.join(60)
    assert p.exitcode != 0 and q.empty()


def test_a_stdin_main_is_not_re_run_in_the_child(monkeypatch):
    main = _fake_main(monkeypatch, __file__="<stdin>")
    assert _spawn_answer(main.Answer("x")) == ("answered", "x")


def test_a_class_local_to_a_function_travels_by_value():
    class Local:
        def answer(self, q):
            q.put(("local", os.getpid() != PARENT))

    assert _spawn_answer(Local()) == ("local", True)


PARENT = os.getpid()


def test_what_cannot_be_pickled_is_refused_with_what_to_do(monkeypatch):
    main = _fake_main(monkeypatch)
    obj = main.Answer(threading.Lock())
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=operator.methodcaller("answer", None), args=(portable(obj, "the dataset"),), daemon=True)
    with pytest.raises(SpawnPicklingError, match=r"the dataset cannot be sent .*_thread\.lock.*importable \.py module"):
        with spawning():
            p.start()
    assert isinstance(SpawnPicklingError("x"), TypeError)
