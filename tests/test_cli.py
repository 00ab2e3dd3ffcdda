"""The ``fusionloader`` command (preview, cache), the ImageFolder it reads, and the plot writers."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fusionloader import ImageFolder
from fusionloader.cli import _parser, main
from fusionloader.plots import bar_chart, image_grid, save_loader_plot


def _write_folder(root, classes=("cat", "dog"), per_class=2, size=20):
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, name, f"{i}.png"))
    return root


def test_image_folder_layout(tmp_path):
    root = _write_folder(str(tmp_path / "data"))
    open(os.path.join(root, "cat", "notes.txt"), "w").write("not an image")
    ds = ImageFolder(root)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    assert len(ds) == 4 and ds.targets == [0, 0, 1, 1]
    image, label = ds[2]
    assert image.size == (23, 20) and label == 1


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolder(str(tmp_path / "empty"))
    root = _write_folder(str(tmp_path / "data"), per_class=1)
    bad = os.path.join(root, "cat", "broken.png")
    open(bad, "wb").write(b"not a png")
    ds = ImageFolder(root)
    with pytest.raises(OSError, match="broken.png"):
        ds[ds.samples.index((bad, 0))]


def test_preview_writes_a_grid(tiny_sd1_path, tmp_path):
    root = _write_folder(str(tmp_path / "data"))
    out = str(tmp_path / "grid.png")
    main(["preview", "--model", tiny_sd1_path, "--images", root, "--out", out, "--steps", "2",
          "--strengths", "0.5,1.0", "--prompts", "a photo of a {}", "a drawing of a {}", "--n", "3", "--cell", "32"])
    grid = Image.open(out)
    # 3 rows of 32 px plus a 16 px header; 1 real + 2 prompts x 2 strengths columns
    assert grid.size == (5 * 32, 3 * 32 + 16)


def test_cache_command_builds_a_cache(tiny_sd1_path, tmp_path, capsys):
    root = _write_folder(str(tmp_path / "data"))
    path = str(tmp_path / "latents.cache")
    main(["cache", "--model", tiny_sd1_path, "--images", root, "--path", path, "--batch-size", "3"])
    assert "4 images cached" in capsys.readouterr().out
    assert any(name.startswith("latents.cache") for name in os.listdir(tmp_path))


def test_a_cache_built_by_the_command_is_hit_by_producers_of_the_same_folder(tiny_sd1_path, tmp_path, capsys):
    # The command keys and computes entries as producers do (file digest; the image as loaded, resized by the
    # cache): a SourceLatents bound to the same ImageFolder -- what a producer's cache is -- encodes nothing.
    from fusionloader import Synthesizer
    from fusionloader.sources.dataset import ImageSource

    root = _write_folder(str(tmp_path / "data"))  # 20 x 23 px: not the model's 32 px, so resizing matters
    path = str(tmp_path / "latents")
    main(["cache", "--model", tiny_sd1_path, "--images", root, "--path", path, "--batch-size", "3"])
    assert f"4 images cached in {path}" in capsys.readouterr().out
    source = ImageSource(ImageFolder(root))
    with Synthesizer.from_pretrained(tiny_sd1_path).latent_cache(path=path) as cache:
        latents = cache.bind(source)
        assert latents.ensure(range(4)) == 0
        mean, std = latents.get(range(4))
        assert cache.encoded == 0
        expected_mean, expected_std = cache.encode([source.raw(i)[0] for i in range(4)])
    torch.testing.assert_close(mean, expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, expected_std, atol=1e-5, rtol=1e-5)


def test_parser_rejects_unknown_command():
    with pytest.raises(SystemExit):
        _parser().parse_args(["train"])


def test_plots(tmp_path):
    images = [[torch.rand(3, 8, 8), torch.rand(3, 8, 8)], [torch.rand(3, 8, 8), torch.rand(3, 8, 8)]]
    grid = Image.open(image_grid(images, str(tmp_path / "g.png"), cell=10, labels=["a", "b"]))
    assert grid.size == (20, 36)
    per_epoch = {e: {"real": 10, "fresh": 4, "reused": 1, "fallback": 1, "stall_fraction": 0.01} for e in range(3)}
    assert os.path.getsize(save_loader_plot(per_epoch, {"x": [0.1, 0.5, 0.7]}, str(tmp_path / "s.png"))) > 0
    assert os.path.getsize(bar_chart({"p": {"a": 1.0, "b": 2.0}}, str(tmp_path / "b.png"))) > 0


# -- optional dependencies: a missing one names the extra that installs it ----------------------------------


def _block(monkeypatch, *modules):
    import sys

    for name in modules:  # a None entry makes `import name` raise ModuleNotFoundError, as if not installed
        monkeypatch.setitem(sys.modules, name, None)


def test_demo_without_scikit_learn_says_which_extra(monkeypatch, tmp_path, capsys):
    _block(monkeypatch, "sklearn", "sklearn.datasets")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--no-progress"])
    assert str(e.value.code) == "fusionloader: fusionloader demo needs scikit-learn: pip install 'fusionloader[demo]'"
    assert not (tmp_path / "demo").exists()  # refused before any work


def test_bench_without_matplotlib_says_which_extra(monkeypatch, tmp_path):
    _block(monkeypatch, "matplotlib", "matplotlib.pyplot")
    with pytest.raises(SystemExit, match=r"fusionloader bench needs matplotlib: pip install 'fusionloader\[bench\]'"):
        main(["bench", "--quick", "--json", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()


def test_require_translates_only_the_missing_module_itself(tmp_path, monkeypatch):
    from fusionloader.extras import MissingExtraError, require

    assert require("json", "x", "demo").dumps([1]) == "[1]"
    with pytest.raises(MissingExtraError, match=r"fusionloader\[retrieval\]") as e:
        require("faiss_not_installed_here", "retrieval", "retrieval")
    assert isinstance(e.value, ModuleNotFoundError) and e.value.name == "faiss_not_installed_here"
    # An installed module whose own import fails is a real error: it propagates unchanged.
    (tmp_path / "fl_broken_mod.py").write_text("import fl_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as e:
        require("fl_broken_mod", "x", "demo")
    assert not isinstance(e.value, MissingExtraError) and e.value.name == "fl_no_such_dependency"
