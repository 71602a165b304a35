"""MNIST / Fashion-MNIST IDX files (written here in the published format), grayscale image
folders, and the real Fashion-MNIST files when the Debian package is installed."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mct_ray.config import DataConfig
from mct_ray.data import LOADERS, load_data
from mct_ray.data import idx
from mct_ray.errors import DataError

pytestmark = pytest.mark.core

RNG = np.random.default_rng(1)
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding, written from the format's description: 0, 0, type 0x08, ndim,
    big-endian int32 dimensions, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = False
                  ) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_x": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_y": np.arange(n_train, dtype=np.uint8) % 10,
              "test_x": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_y": (np.arange(n_test, dtype=np.uint8) * 3) % 10}
    for key, stem in idx.FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_pixels_and_labels(tmp_path, name, gz):
    arrays = write_idx_set(tmp_path / name, gz=gz)
    raw = LOADERS[name](DataConfig(name=name, root=str(tmp_path)))
    assert raw.train_x.shape == (20, 1, 28, 28) and raw.test_x.shape == (10, 1, 28, 28)
    assert torch.equal(raw.train_x[:, 0], torch.from_numpy(arrays["train_x"]).float() / 255)
    assert torch.equal(raw.test_x[:, 0], torch.from_numpy(arrays["test_x"]).float() / 255)
    assert raw.train_y.tolist() == arrays["train_y"].tolist()
    assert raw.test_y.tolist() == arrays["test_y"].tolist()
    assert len(raw.class_names) == 10


def test_idx_torchvision_layout(tmp_path):
    write_idx_set(tmp_path / "FashionMNIST" / "raw", gz=True)
    raw = LOADERS["fashion-mnist"](DataConfig(name="fashion-mnist", root=str(tmp_path)))
    assert raw.class_names[0] == "T-shirt/top" and len(raw.train_y) == 20


def test_load_data_normalises_with_the_customary_constants(tmp_path):
    arrays = write_idx_set(tmp_path / "fashion-mnist")
    data = load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)))
    want = (torch.from_numpy(arrays["train_x"]).float() / 255 - 0.2861) / 0.3530
    assert torch.allclose(data.train_x[:, 0], want, atol=1e-6)
    assert data.shape == (1, 28, 28)


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-5], "truncated or corrupt"),
    (lambda b: b"\x01\x02" + b[2:], "bad magic"),
    (lambda b: b[:2] + b"\x0d" + b[3:], "only unsigned bytes"),
    (lambda b: b[:6], "truncated in its IDX header"),
])
def test_idx_damage_names_the_file(tmp_path, damage, message):
    write_idx_set(tmp_path / "mnist")
    path = tmp_path / "mnist" / idx.FILES["train_x"]
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=message) as err:
        LOADERS["mnist"](DataConfig(name="mnist", root=str(tmp_path)))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_idx_corrupt_gzip(tmp_path):
    write_idx_set(tmp_path / "mnist", gz=True)
    path = tmp_path / "mnist" / (idx.FILES["test_y"] + ".gz")
    path.write_bytes(path.read_bytes()[:12])
    with pytest.raises(DataError, match="cannot read") as err:
        LOADERS["mnist"](DataConfig(name="mnist", root=str(tmp_path)))
    assert str(path) in str(err.value)


def test_idx_labels_must_match_images(tmp_path):
    write_idx_set(tmp_path / "mnist")
    (tmp_path / "mnist" / idx.FILES["train_y"]).write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="do not match"):
        LOADERS["mnist"](DataConfig(name="mnist", root=str(tmp_path)))


def test_idx_missing_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "FASHION_MNIST", dataclasses.replace(
        idx.FASHION_MNIST, system_dirs=(str(tmp_path / "nowhere"),)))
    with pytest.raises(DataError) as err:
        LOADERS["fashion-mnist"](DataConfig(name="fashion-mnist", root=str(tmp_path)))
    text = str(err.value)
    assert str(tmp_path / "fashion-mnist") in text and str(tmp_path / "nowhere") in text
    assert "apt-get install dataset-fashion-mnist" in text and "data.download=true" in text
    with pytest.raises(DataError, match="data.download=true") as err:
        LOADERS["mnist"](DataConfig(name="mnist", root=str(tmp_path)))
    assert "apt-get" not in str(err.value)


def test_idx_download_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    class FakeMNIST:  # stands in for torchvision.datasets.MNIST(root, download=True)
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_idx_set(Path(root) / "MNIST" / "raw", gz=True)

    monkeypatch.setattr(tvd, "MNIST", FakeMNIST)
    raw = LOADERS["mnist"](DataConfig(name="mnist", root=str(tmp_path), download=True))
    assert calls == [(str(tmp_path), True, True)] and len(raw.train_y) == 20


def test_idx_failed_download_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd, "MNIST", offline)
    with pytest.raises(DataError, match="could not download"):
        LOADERS["mnist"](DataConfig(name="mnist", root=str(tmp_path), download=True))


@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    raw = LOADERS["fashion-mnist"](DataConfig(name="fashion-mnist", root=str(tmp_path)))
    assert raw.train_x.shape == (60000, 1, 28, 28) and raw.test_x.shape == (10000, 1, 28, 28)
    assert raw.train_y.bincount().tolist() == [6000] * 10
    assert raw.test_y.bincount().tolist() == [1000] * 10
    # the customary constants describe these pixels (to the 3 digits they are quoted with)
    assert raw.train_x.mean().item() == pytest.approx(0.2861, abs=5e-4)
    assert raw.train_x.std().item() == pytest.approx(0.3530, abs=5e-4)


# ---------------------------------------------------------------------------------------
# Image folders keep grayscale as one channel.

def test_grayscale_imagefolder_stays_one_channel(tmp_path):
    pixels = {}
    for split, cls, n in (("train", "a", 2), ("train", "b", 2), ("val", "a", 1), ("val", "b", 1)):
        for i in range(n):
            px = RNG.integers(0, 256, (12, 12), dtype=np.uint8)
            (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(px, mode="L").save(tmp_path / split / cls / f"{i}.png")
            pixels[(split, cls, i)] = px
    raw = LOADERS["imagefolder"](DataConfig(name="imagefolder", root=str(tmp_path)))
    assert raw.train_x.shape == (4, 1, 12, 12) and raw.test_x.shape == (2, 1, 12, 12)
    assert torch.equal(raw.train_x[2, 0], torch.from_numpy(pixels[("train", "b", 0)]) / 255.0)
    # one colour image anywhere makes the whole set RGB (gray copied to three channels)
    Image.fromarray(RNG.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
        tmp_path / "val" / "b" / "c.png")
    raw = LOADERS["imagefolder"](DataConfig(name="imagefolder", root=str(tmp_path)))
    assert raw.train_x.shape == (4, 3, 12, 12)
    assert torch.equal(raw.train_x[0, 0], raw.train_x[0, 2])


def test_bench_fashion_tiny_protocol_runs(tmp_path, capsys):
    """bench/fashion.py end to end at seconds-long sizes on IDX files written here; its
    printed curves, read back with --combine, give the rows it saved."""
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from bench import fashion

    write_idx_set(tmp_path / "data" / "fashion-mnist", n_train=60, n_test=20)
    assert fashion.main(["--protocol", "tiny", "--threads", "1", "--data-root",
                         str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                         "--models", "mlp"]) == 0
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "out" / "fashion_tiny.parquet").to_pylist()
    labels = [v[0] for v in fashion.PROTOCOLS["tiny"]["variants"]]
    assert {r["variant"] for r in rows} == {*labels, fashion.RANDOM_DRAWS}
    assert len([r for r in rows if r["variant"] == fashion.RANDOM_DRAWS]) == \
        fashion.NUM_RANDOM_DRAWS
    assert (tmp_path / "out" / "fashion_tiny.png").stat().st_size > 0
    cross = pq.read_table(tmp_path / "out" / "fashion_tiny_cross.parquet").to_pylist()
    assert {(r["variant"], r["model"]) for r in cross} == {
        (v, "mlp") for v in ("Random real", *labels)}
    assert len(cross) == 2 * 4  # two seeds
    (tmp_path / "run.log").write_text(capsys.readouterr().out)
    curves = [r for r in rows if r["variant"] != fashion.RANDOM_DRAWS]
    back = fashion.read_rows(tmp_path / "run.log")
    key = lambda r: (r["seed"], r["variant"], r["iteration"])  # noqa: E731
    assert sorted(map(key, back)) == sorted(map(key, curves))
    printed = {key(r): round(100 * r["acc_mean"], 2) for r in curves}
    assert all(round(100 * r["acc_mean"], 2) == printed[key(r)] for r in back)
    assert fashion.main(["--protocol", "tiny", "--out", str(tmp_path / "out"), "--combine",
                         str(tmp_path / "run.log")]) == 0
    assert (tmp_path / "out" / "fashion_tiny_combined_summary.parquet").exists()


def test_bench_soft_labels_tiny_protocol_runs(tmp_path, capsys):
    """bench/soft_labels.py end to end at seconds-long sizes: every variant (DATM's run on
    its own and summarised with the others), the hard-label score of each best set, the
    summary and its last line."""
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import pyarrow.parquet as pq

    from bench import soft_labels

    write_idx_set(tmp_path / "data" / "fashion-mnist", n_train=60, n_test=20)
    common = ["--protocol", "tiny", "--threads", "1", "--data-root", str(tmp_path / "data"),
              "--out", str(tmp_path / "out")]
    others = [v[0] for v in soft_labels.VARIANTS if v[0] != "datm"]
    assert soft_labels.main([*common, "--variants", *others]) == 0
    first = tmp_path / "out" / "soft_labels_tiny_hard_teacher_learned_learned-window.parquet"
    assert soft_labels.main([*common, "--variants", "datm", "--with", str(first)]) == 0
    own = pq.read_table(tmp_path / "out" / "soft_labels_tiny_datm.parquet").to_pylist()
    assert {r["variant"] for r in own} == {"datm"}
    rows = pq.read_table(first).to_pylist() + own
    assert {r["variant"] for r in rows} == {v[0] for v in soft_labels.VARIANTS}
    assert {r["seed"] for r in rows} == {0, 1}
    assert all(0 <= r["hard_of_best"] <= 1 for r in rows)
    assert (tmp_path / "out" / "soft_labels_tiny_datm_combined.png").stat().st_size > 0
    summary = pq.read_table(tmp_path / "out" /
                            "soft_labels_tiny_datm_combined_summary.parquet").to_pylist()
    assert [r["variant"] for r in summary] == [v[0] for v in soft_labels.VARIANTS]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("fashion_soft_minus_hard_ipc1=")
    assert float(last.split("=")[1]) == round(soft_labels.soft_minus_hard(rows, 1), 2)
    # --summarise re-prints saved runs (nothing runs): each run's curve and the same last line
    written = sorted((tmp_path / "out").iterdir())
    assert soft_labels.main(["--summarise", str(first),
                             str(tmp_path / "out" / "soft_labels_tiny_datm.parquet")]) == 0
    again = capsys.readouterr().out.strip().splitlines()
    assert again[-1] == last and sorted((tmp_path / "out").iterdir()) == written
    assert sum(line.startswith("ipc 1 seed ") for line in again) == len(
        {(r["seed"], r["variant"]) for r in rows})
