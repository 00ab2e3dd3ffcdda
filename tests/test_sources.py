"""ImageSource: raw images from ImageFolder-style, VisionDataset-style and plain datasets; conversions;
errors naming index and path (through ImageSource and through the loader's workers)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from fusionloader.loader import FusionLoader
from fusionloader.sources import DatasetError, ImageSource, describe, from_float, to_float


def pil_loader(path):
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class Folder(Dataset):
    """The ImageFolder contract: ``samples``, ``targets``, ``classes``, ``loader``, ``transform``."""

    def __init__(self, root, transform=None, target_transform=None):
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [(str(f), c) for c, name in enumerate(self.classes) for f in sorted((root / name).iterdir())]
        self.targets = [c for _, c in self.samples]
        self.loader, self.transform, self.target_transform = pil_loader, transform, target_transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        img = self.loader(path)
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (20 + k, 24, 3), dtype=np.uint8)).save(tmp_path / c / f"{k}.png")
    return tmp_path


def to_tensor(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def test_image_folder_source(folder):
    ds = Folder(folder, transform=to_tensor, target_transform=lambda t: t + 10)
    src = ImageSource(ds)
    assert len(src) == 6 and src.transform is ds.transform
    image, label = src.raw(4)
    assert image.shape == (3, 21, 24) and image.dtype == torch.float32 and label == 1
    assert torch.allclose(image, ds[4][0])
    assert src.label(4) == 1 and src.path(4).endswith("dog/1.png")
    info = src.info(4)
    assert (info.kind, info.height, info.width) == ("pil", 21, 24)


class Vision(Dataset):
    """VisionDataset-style (CIFAR): arrays in memory, ``transform`` applied in __getitem__."""

    def __init__(self, transform):
        self.data = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
        self.targets = [0, 1, 0, 1]
        self.transform = transform

    def __len__(self):
        return 4

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


def test_vision_dataset_source_reads_around_the_transform():
    ds = Vision(transform=lambda img: "transformed")
    src = ImageSource(ds)
    image, label = src.raw(2)
    assert torch.equal(image, torch.from_numpy(ds.data[2]).permute(2, 0, 1).float() / 255) and label == 0
    assert ds[2][0] == "transformed" and ds.transform is not None  # the user's dataset is untouched


def test_plain_dataset_source_and_labels_without_targets():
    class Plain(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": torch.full((1, 5, 5), 100, dtype=torch.uint8), "label": torch.tensor(i)}

    src = ImageSource(Plain())
    image, label = src.raw(1)
    assert image.shape == (3, 5, 5) and torch.allclose(image, torch.full_like(image, 100 / 255))
    assert src.label(2) == 2


@pytest.mark.parametrize(
    "raw",
    [
        Image.new("RGB", (10, 7)),
        Image.new("L", (10, 7)),
        np.zeros((7, 10, 3), np.uint8),
        np.zeros((7, 10), np.float32),
        torch.zeros(3, 7, 10),
        torch.zeros(1, 7, 10, dtype=torch.uint8),
        torch.zeros(7, 10, dtype=torch.uint8),
    ],
    ids=["pil-rgb", "pil-l", "np-hwc-u8", "np-hw-f32", "t-chw-f32", "t-1hw-u8", "t-hw-u8"],
)
def test_synthetic_images_come_back_in_the_raw_form(raw):
    info = describe(raw)
    x = torch.rand(3, 16, 16)
    out = from_float(x, info)
    assert type(out) is type(raw)
    assert describe(out) == info
    back = to_float(out)
    assert back.shape == (3, 7, 10) and 0 <= back.min() and back.max() <= 1


def test_corrupt_image_error_names_index_and_path(folder):
    bad = folder / "dog" / "1.png"
    bad.write_bytes(b"not a png")
    ds = Folder(folder, transform=lambda img: to_tensor(img.resize((16, 16))))
    with pytest.raises(DatasetError, match=r"index 4 .*dog/1\.png"):
        ImageSource(ds).raw(4)
    for workers in (0, 2):
        loader = FusionLoader(ds, batch_size=2, num_workers=workers, alpha=0)
        with pytest.raises(Exception, match=r"dataset index 4 \(path '.*dog/1\.png'\)"):
            list(loader)


def test_image_folder_end_to_end_synthetic_gets_the_folder_transform(folder):
    from test_loader import inline

    seen = []

    def transform(img):
        seen.append(img.size)
        return to_tensor(img.resize((16, 16)))

    ds = Folder(folder, transform=transform)
    loader = FusionLoader(ds, batch_size=3, alpha=1.0, late_policy="wait", return_meta=True, seed=0,
                          synthesizer="stand-in", pool_factory=inline())
    batches = list(loader)
    assert all(m["synthetic"].all() for _, m in batches)
    assert sorted(seen) == sorted(Image.open(p).size for p, _ in ds.samples for _ in range(2))  # real + synthetic
    assert torch.cat([y for (_, y), _ in batches]).tolist() == ds.targets
    assert loader.prompt(4, 0.0) == "a photo of a dog"


def test_dali_image_folder(folder):
    from fusionloader.sources.dali import DaliImageFolder, dali_available

    if not dali_available():
        pytest.skip("nvidia-dali not installed")
    ds = DaliImageFolder(str(folder), transform=lambda img: to_tensor(img.resize((16, 16))))
    ref = Folder(folder, transform=lambda img: to_tensor(img.resize((16, 16))))
    assert ds.samples == ref.samples and ds.classes == ref.classes
    for i in range(len(ds)):
        assert torch.equal(ds[i][0], ref[i][0]) and ds[i][1] == ref[i][1]
    image, label = ImageSource(ds).raw(3)
    assert torch.equal(image, ImageSource(ref).raw(3)[0]) and label == 1
    for workers in (0, 2):
        a = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers))
        b = list(FusionLoader(ds, batch_size=4, num_workers=workers, alpha=0))
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    (folder / "dog" / "2.png").write_bytes(b"broken")
    with pytest.raises(Exception, match=r"dataset index 5 \(path '.*dog/2\.png'\)"):
        list(FusionLoader(ds, batch_size=3, alpha=0))


def to_tensor_16(img):
    return to_tensor(img.resize((16, 16)))


def test_eight_bit_images_travel_in_uint8_slots_float_images_in_float32(folder, tiny_sd1_path):
    # Issue 14: the ring holds what the train transform will see. PIL images are quantised to 8 bits on the
    # way back (from_float) anyway, so their slots are uint8 (4x less /dev/shm); float tensors keep float32.
    ds = Folder(folder, transform=to_tensor_16)
    with FusionLoader(ds, batch_size=3, alpha=1.0, late_policy="wait", return_meta=True, seed=0,
                      synthesizer=tiny_sd1_path, num_inference_steps=2, producer_devices=["cpu"]) as loader:
        batches = list(loader)
        assert loader._pool.config.slot_dtype == torch.uint8
    assert all(m["fresh"].all() for _, m in batches)
    for (x, _), m in batches:  # every synthetic sample is a variant at the real image's size, in [0, 1]
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    floats = [(torch.rand(3, 16, 16), 0) for _ in range(2)]
    with FusionLoader(floats, batch_size=2, alpha=0.0, synthesizer=tiny_sd1_path, producer_devices=["cpu"]) as loader:
        assert loader._slot_dtype() == torch.float32
