"""The file-format loaders, on tiny data sets written here in the exact published layouts.

No test downloads anything: the download path is exercised with a stand-in for torchvision's
download_and_extract_archive that writes the extracted folder (or fails like no network).
"""

from __future__ import annotations

import ast
import inspect
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mct_ray.config import DataConfig
from mct_ray.data import LOADERS, load_data
from mct_ray.data import cifar
from mct_ray.errors import DataError

pytestmark = pytest.mark.core

RNG = np.random.default_rng(0)
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]


def cfg(name: str, root: Path, **kw) -> DataConfig:
    return DataConfig(name=name, root=str(root), **kw)


def as_float(pixels: np.ndarray) -> torch.Tensor:
    """What a loader must return for these uint8 pixels: the same values / 255."""
    return torch.from_numpy(np.array(pixels)).float() / 255.0


# ---------------------------------------------------------------------------------------
# CIFAR binary records.

def write_records(path: Path, labels: np.ndarray, pixels: np.ndarray) -> None:
    """labels (N, k) uint8 label bytes, pixels (N, 3, 32, 32) uint8 -> N records."""
    flat = pixels.reshape(len(pixels), -1)
    path.write_bytes(np.concatenate([labels, flat], axis=1).astype(np.uint8).tobytes())


def make_cifar10(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Five 2-record train batches and a 3-record test batch; returns what was written."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    written = {}
    for name, n in [(f"data_batch_{i}.bin", 2) for i in range(1, 6)] + [("test_batch.bin", 3)]:
        labels = RNG.integers(0, 10, size=(n, 1), dtype=np.uint8)
        pixels = RNG.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        write_records(folder / name, labels, pixels)
        written[name] = (labels[:, 0].astype(np.int64), pixels)
    # The published file ends in a blank line; the loader must not count it as a class.
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    return written


def make_cifar100(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    written = {}
    for name, n in (("train.bin", 4), ("test.bin", 2)):
        fine = np.array([0, 99, 42, 7][:n], dtype=np.uint8)
        coarse = np.array([19, 0, 3, 5][:n], dtype=np.uint8)  # must be ignored
        pixels = RNG.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        write_records(folder / name, np.stack([coarse, fine], axis=1), pixels)
        written[name] = (fine.astype(np.int64), pixels)
    (folder / "fine_label_names.txt").write_text("\n".join(f"fine{i}" for i in range(100)))
    (folder / "coarse_label_names.txt").write_text("\n".join(f"coarse{i}" for i in range(20)))
    return written


def test_cifar10_reads_records_exactly(tmp_path):
    written = make_cifar10(tmp_path)
    raw = LOADERS["cifar10"](cfg("cifar10", tmp_path))
    train = [written[f"data_batch_{i}.bin"] for i in range(1, 6)]
    assert raw.train_x.shape == (10, 3, 32, 32) and raw.train_x.dtype == torch.float32
    assert raw.train_y.dtype == torch.int64 and raw.test_y.dtype == torch.int64
    assert torch.equal(raw.train_y, torch.from_numpy(np.concatenate([y for y, _ in train])))
    assert torch.equal(raw.train_x, as_float(np.concatenate([x for _, x in train])))
    test_y, test_px = written["test_batch.bin"]
    assert torch.equal(raw.test_y, torch.from_numpy(test_y))
    assert torch.equal(raw.test_x, as_float(test_px))
    assert raw.class_names == tuple(CIFAR10_NAMES)


def test_cifar100_uses_fine_labels(tmp_path):
    written = make_cifar100(tmp_path)
    raw = LOADERS["cifar100"](cfg("cifar100", tmp_path))
    assert raw.train_y.tolist() == [0, 99, 42, 7]
    assert raw.test_y.tolist() == [0, 99]
    assert torch.equal(raw.train_x, as_float(written["train.bin"][1]))
    assert torch.equal(raw.test_x, as_float(written["test.bin"][1]))
    assert raw.class_names == tuple(f"fine{i}" for i in range(100))


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DataError) as err:
        LOADERS["cifar10"](cfg("cifar10", tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-bin") in msg
    assert "data.download=true" in msg and "cifar-10-binary.tar.gz" in msg


def test_cifar_download_uses_official_binary_archive(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url, download_root, md5=None, **kw):
        calls.append((url, md5))
        make_cifar100(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    raw = LOADERS["cifar100"](cfg("cifar100", tmp_path, download=True))
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                      "03b5dce01913d631647c71ecec9e9cb8")]
    assert len(raw.train_y) == 4


def test_failed_download_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kw):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)
    with pytest.raises(DataError, match="cifar-10-binary.tar.gz"):
        LOADERS["cifar10"](cfg("cifar10", tmp_path, download=True))


def test_cifar_truncated_file(tmp_path):
    make_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(DataError, match="data_batch_3.bin"):
        LOADERS["cifar10"](cfg("cifar10", tmp_path))


def test_cifar_missing_batch(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").unlink()
    with pytest.raises(DataError, match="test_batch.bin"):
        LOADERS["cifar10"](cfg("cifar10", tmp_path))


@pytest.mark.parametrize("name,file,label_bytes", [
    ("cifar10", "cifar-10-batches-bin/data_batch_2.bin", [10]),
    ("cifar100", "cifar-100-binary/train.bin", [0, 100]),
])
def test_cifar_label_out_of_range(tmp_path, name, file, label_bytes):
    (make_cifar10 if name == "cifar10" else make_cifar100)(tmp_path)
    labels = np.array([label_bytes], dtype=np.uint8)
    write_records(tmp_path / file, labels, np.zeros((1, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        LOADERS[name](cfg(name, tmp_path))
    assert str(tmp_path / file) in str(err.value)


def test_cifar_wrong_class_names(tmp_path):
    make_cifar10(tmp_path)
    names = tmp_path / "cifar-10-batches-bin" / "batches.meta.txt"
    names.write_text("airplane\n")
    with pytest.raises(DataError, match="batches.meta.txt"):
        LOADERS["cifar10"](cfg("cifar10", tmp_path))


def test_cifar_module_never_unpickles():
    source = inspect.getsource(cifar)
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"pickle", "cPickle", "_pickle", "dill", "joblib"}
    assert "torch.load" not in source and "allow_pickle" not in source


# ---------------------------------------------------------------------------------------
# Tiny ImageNet.

WNIDS = ["n01443537", "n01629819"]


def save_png(path: Path, pixels: np.ndarray) -> None:
    """(3, H, W) uint8 -> lossless file, so decoded pixels can be compared exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.transpose(1, 2, 0)).save(path, format="PNG")


def make_tiny(root: Path, words: bool = True) -> dict[str, np.ndarray]:
    """2 classes x 3 train images and 3 val images. The files are named .JPEG as in the real
    archive but hold PNG data (PIL goes by content), so the pixels are exact."""
    base = root / "tiny-imagenet-200"
    images = {}
    for wnid in WNIDS:
        for i in range(3):
            px = RNG.integers(0, 256, size=(3, 64, 64), dtype=np.uint8)
            save_png(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", px)
            images[f"{wnid}_{i}"] = px
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    ann = []
    for i, wnid in enumerate([WNIDS[1], WNIDS[0], WNIDS[1]]):
        px = RNG.integers(0, 256, size=(3, 64, 64), dtype=np.uint8)
        save_png(base / "val" / "images" / f"val_{i}.JPEG", px)
        images[f"val_{i}"] = px
        ann.append(f"val_{i}.JPEG\t{wnid}\t0\t1\t62\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    if words:
        (base / "words.txt").write_text("n00001740\tentity\n"
                                        "n01443537\tgoldfish, Carassius auratus\n"
                                        "n01629819\tEuropean fire salamander\n")
    return images


def test_tiny_layout_and_pixels(tmp_path):
    images = make_tiny(tmp_path)
    raw = LOADERS["tinyimagenet"](cfg("tinyimagenet", tmp_path))
    assert raw.train_x.shape == (6, 3, 64, 64) and raw.train_x.dtype == torch.float32
    assert raw.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    want = np.stack([images[f"{w}_{i}"] for w in WNIDS for i in range(3)])
    assert torch.equal(raw.train_x, as_float(want))
    assert raw.test_x.shape == (3, 3, 64, 64)
    assert raw.test_y.tolist() == [1, 0, 1]  # from val_annotations.txt, not the folder
    assert torch.equal(raw.test_x, as_float(np.stack([images[f"val_{i}"] for i in range(3)])))
    assert raw.class_names == ("goldfish, Carassius auratus", "European fire salamander")


def test_tiny_class_names_fall_back_to_wnids(tmp_path):
    make_tiny(tmp_path, words=False)
    assert LOADERS["tinyimagenet"](cfg("tinyimagenet", tmp_path)).class_names == tuple(WNIDS)


def test_tiny_grayscale_becomes_rgb(tmp_path):
    make_tiny(tmp_path)
    gray = RNG.integers(0, 256, size=(64, 64), dtype=np.uint8)
    path = tmp_path / "tiny-imagenet-200" / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_0.JPEG"
    Image.fromarray(gray, mode="L").save(path, format="PNG")
    raw = LOADERS["tinyimagenet"](cfg("tinyimagenet", tmp_path))
    assert torch.equal(raw.train_x[0], as_float(np.stack([gray] * 3)))


def test_tiny_missing_without_download(tmp_path):
    with pytest.raises(DataError) as err:
        LOADERS["tinyimagenet"](cfg("tinyimagenet", tmp_path))
    assert str(tmp_path / "tiny-imagenet-200") in str(err.value)
    assert "tiny-imagenet-200.zip" in str(err.value)


def test_tiny_download(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url, download_root, md5=None, **kw):
        calls.append(url)
        make_tiny(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    raw = LOADERS["tinyimagenet"](cfg("tinyimagenet", tmp_path, download=True))
    assert calls == ["http://cs231n.stanford.edu/tiny-imagenet-200.zip"]
    assert len(raw.train_y) == 6


def _unlisted_val_image(base: Path) -> Path:
    save_png(base / "val" / "images" / "val_9.JPEG", np.zeros((3, 64, 64), np.uint8))
    return base / "val" / "images" / "val_9.JPEG"


def _unknown_wnid(base: Path) -> Path:
    ann = base / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text().replace(WNIDS[0], "n99999999"))
    return ann


def _annotated_image_missing(base: Path) -> Path:
    (base / "val" / "images" / "val_1.JPEG").unlink()
    return base / "val" / "images" / "val_1.JPEG"


def _empty_class(base: Path) -> Path:
    folder = base / "train" / WNIDS[1] / "images"
    for p in folder.iterdir():
        p.unlink()
    return folder


def _missing_class_folder(base: Path) -> Path:
    folder = base / "train" / WNIDS[1] / "images"
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return folder


def _unreadable_image(base: Path) -> Path:
    path = base / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_2.JPEG"
    path.write_bytes(b"not an image")
    return path


def _missing_wnids(base: Path) -> Path:
    (base / "wnids.txt").unlink()
    return base / "wnids.txt"


def _wrong_size(base: Path) -> Path:
    path = base / "val" / "images" / "val_2.JPEG"
    save_png(path, np.zeros((3, 32, 32), np.uint8))
    return path


@pytest.mark.parametrize("damage", [
    _unlisted_val_image, _unknown_wnid, _annotated_image_missing, _empty_class,
    _missing_class_folder, _unreadable_image, _missing_wnids, _wrong_size,
])
def test_tiny_damage_names_the_path(tmp_path, damage):
    make_tiny(tmp_path)
    path = damage(tmp_path / "tiny-imagenet-200")
    with pytest.raises(DataError) as err:
        LOADERS["tinyimagenet"](cfg("tinyimagenet", tmp_path))
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------
# Image folder.

def make_folder(root: Path, sizes: dict[str, list[tuple[int, int]]] | None = None
                ) -> dict[str, np.ndarray]:
    """train/{cat,dog} and val/{cat,dog}; sizes maps 'split/class' to image (W, H) sizes."""
    sizes = sizes or {}
    images = {}
    for key, default in (("train/cat", 2), ("train/dog", 3), ("val/cat", 1), ("val/dog", 1)):
        for i, (w, h) in enumerate(sizes.get(key, [(16, 16)] * default)):
            px = RNG.integers(0, 256, size=(3, h, w), dtype=np.uint8)
            save_png(root / key / f"img{i}.png", px)
            images[f"{key}/img{i}.png"] = px
    return images


def test_imagefolder_layout_and_pixels(tmp_path):
    images = make_folder(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image, skipped")
    raw = LOADERS["imagefolder"](cfg("imagefolder", tmp_path))
    assert raw.class_names == ("cat", "dog")
    assert raw.train_x.shape == (5, 3, 16, 16) and raw.train_x.dtype == torch.float32
    assert raw.train_y.tolist() == [0, 0, 1, 1, 1]
    assert raw.test_y.tolist() == [0, 1]
    want = np.stack([images[k] for k in sorted(images) if k.startswith("train/")])
    assert torch.equal(raw.train_x, as_float(want))


def test_imagefolder_extensions_case_insensitive(tmp_path):
    make_folder(tmp_path)
    px = np.full((16, 16, 3), 7, np.uint8)
    Image.fromarray(px).save(tmp_path / "train" / "dog" / "extra.JPG", format="JPEG")
    Image.fromarray(px).save(tmp_path / "train" / "dog" / "extra2.Bmp", format="BMP")
    raw = LOADERS["imagefolder"](cfg("imagefolder", tmp_path))
    assert raw.train_y.tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_imagefolder_mixed_sizes_need_resolution(tmp_path):
    make_folder(tmp_path, {"train/dog": [(16, 16), (20, 12)]})
    with pytest.raises(DataError) as err:
        LOADERS["imagefolder"](cfg("imagefolder", tmp_path))
    assert "data.resolution" in str(err.value)
    assert str(tmp_path / "train" / "dog" / "img1.png") in str(err.value)


def test_imagefolder_resizes_while_loading(tmp_path):
    images = make_folder(tmp_path, {"train/dog": [(16, 16), (20, 12)]})
    raw = LOADERS["imagefolder"](cfg("imagefolder", tmp_path, resolution=8))
    assert raw.train_x.shape == (4, 3, 8, 8) and raw.test_x.shape == (2, 3, 8, 8)
    src = Image.fromarray(images["train/dog/img1.png"].transpose(1, 2, 0))
    want = np.asarray(src.resize((8, 8), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert torch.equal(raw.train_x[3], as_float(want))


def test_imagefolder_val_classes_must_match(tmp_path):
    make_folder(tmp_path)
    save_png(tmp_path / "val" / "bird" / "b.png", np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(DataError) as err:
        LOADERS["imagefolder"](cfg("imagefolder", tmp_path))
    assert str(tmp_path / "val") in str(err.value) and "bird" in str(err.value)


def test_imagefolder_missing_split(tmp_path):
    make_folder(tmp_path)
    for p in (tmp_path / "val" / "cat").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no images in"):
        LOADERS["imagefolder"](cfg("imagefolder", tmp_path))
    with pytest.raises(DataError) as err:
        LOADERS["imagefolder"](cfg("imagefolder", tmp_path / "elsewhere"))
    assert str(tmp_path / "elsewhere" / "train") in str(err.value)


def test_imagefolder_unreadable_image(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / "val" / "dog" / "img0.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError) as err:
        LOADERS["imagefolder"](cfg("imagefolder", tmp_path))
    assert str(bad) in str(err.value)


# ---------------------------------------------------------------------------------------
# End to end through load_data (which normalises, so only shapes and labels are checked).

@pytest.mark.parametrize("name,make,shape,n_train,n_test", [
    ("cifar10", make_cifar10, (3, 32, 32), 10, 3),
    ("cifar100", make_cifar100, (3, 32, 32), 4, 2),
    ("tinyimagenet", make_tiny, (3, 64, 64), 6, 3),
    ("imagefolder", make_folder, (3, 16, 16), 5, 2),
])
def test_load_data_end_to_end(tmp_path, name, make, shape, n_train, n_test):
    make(tmp_path)
    data = load_data(DataConfig(name=name, root=str(tmp_path)))
    assert data.shape == shape
    assert len(data.train_y) == n_train and len(data.test_y) == n_test
    assert data.train_y.dtype == torch.int64
    assert torch.isfinite(data.train_x).all() and torch.isfinite(data.test_x).all()
    raw = LOADERS[name](DataConfig(name=name, root=str(tmp_path)))
    assert torch.equal(data.train_y, raw.train_y) and data.class_names == raw.class_names


def test_load_data_resizes_tiny(tmp_path):
    make_tiny(tmp_path)
    data = load_data(DataConfig(name="tinyimagenet", root=str(tmp_path), resolution=32))
    assert data.shape == (3, 32, 32) and data.num_classes == 2



def test_sixteen_bit_grayscale_pngs_keep_their_values(tmp_path):
    """16-bit PNGs decode as PIL's I;16: each pixel v becomes v / 65535 (to 8 bits), not
    white, as PIL's own convert("L") would make it."""
    gen = np.random.default_rng(0)
    values = {}
    for key in ("train/cat", "train/dog", "val/cat", "val/dog"):
        px = gen.integers(0, 65536, size=(8, 8), dtype=np.uint16)
        (tmp_path / key).mkdir(parents=True)
        Image.fromarray(px).save(tmp_path / key / "a.png", format="PNG")
        assert Image.open(tmp_path / key / "a.png").mode.startswith("I")
        values[key] = px
    raw = LOADERS["imagefolder"](cfg("imagefolder", tmp_path))
    assert raw.train_x.shape == (2, 1, 8, 8)
    want = torch.from_numpy(np.stack([values["train/cat"], values["train/dog"]])[:, None]
                            .astype(np.float64) / 65535)
    assert float((raw.train_x.double() - want).abs().max()) <= 0.5 / 255 + 1e-6
    assert float(raw.train_x.std()) > 0.2  # spread over [0, 1], not all white
