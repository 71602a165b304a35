"""MNIST and Fashion-MNIST from their original IDX files (gzipped or not).

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one
big-endian int32 per dimension, then the values. Only unsigned bytes (type 0x08) occur in
these data sets. Fashion-MNIST is also read from Debian's `dataset-fashion-mnist` package
when `data.root` holds no copy.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mct_ray.config import DataConfig
from mct_ray.data import RawSplits, register
from mct_ray.errors import DataError

log = logging.getLogger(__name__)

FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
         "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


@dataclass(frozen=True)
class IdxDataset:
    name: str
    torchvision_class: str  # its folder under root after a torchvision download: <class>/raw
    class_names: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()  # where a distribution package puts the files


MNIST = IdxDataset("mnist", "MNIST", tuple(str(i) for i in range(10)))
FASHION_MNIST = IdxDataset(
    "fashion-mnist", "FashionMNIST",
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
     "Bag", "Ankle boot"),
    system_dirs=("/usr/share/datasets/fashion-mnist",))


def read_idx(path: Path) -> np.ndarray:
    """One IDX file of unsigned bytes as a numpy array of its declared shape."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, truncated or corrupt gzip
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise DataError(f"{path} holds IDX type 0x{data[2]:02x}; only unsigned bytes (0x08) "
                        "occur in MNIST and Fashion-MNIST")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path} is truncated in its IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", ndim, 4))
    if len(data) - header != int(np.prod(shape)):
        raise DataError(f"{path} declares shape {shape} ({int(np.prod(shape))} bytes) but "
                        f"holds {len(data) - header}: the file is truncated or corrupt")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def locate(cfg: DataConfig, ds: IdxDataset) -> dict[str, Path]:
    """The four files, from the first folder that holds all of them (downloading if allowed)."""
    root = Path(cfg.root)
    folders = [root / ds.torchvision_class / "raw", root / ds.name, root,
               *map(Path, ds.system_dirs)]
    for folder in folders:
        found = {key: _find(folder, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return found
    if cfg.download:
        # Imported here: torchvision is only needed for the one-off download.
        import torchvision.datasets as tvd

        log.info("downloading %s to %s", ds.name, root)
        try:
            getattr(tvd, ds.torchvision_class)(str(root), train=True, download=True)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{ds.name}: could not download ({exc})") from None
        return locate(DataConfig(name=cfg.name, root=cfg.root), ds)
    hint = ("apt-get install dataset-fashion-mnist, " if ds.system_dirs else "")
    raise DataError(f"{ds.name} not found: looked for {FILES['train_x']}[.gz] and the other "
                    f"three IDX files in {', '.join(map(str, folders))}; {hint}set "
                    f"data.download=true (needs internet) or copy them to {root / ds.name}")


def load_idx(cfg: DataConfig, ds: IdxDataset) -> RawSplits:
    paths = locate(cfg, ds)
    log.info("loading %s from %s", ds.name, paths["train_x"].parent)
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{ds.name} {split} split: images {x.shape} and labels {y.shape} "
                            f"in {paths[f'{split}_x'].parent} do not match")
    images = {k: torch.from_numpy(arrays[k].copy())[:, None].float().div_(255.0)
              for k in ("train_x", "test_x")}  # (N, 1, 28, 28) in [0, 1]
    labels = {k: torch.from_numpy(arrays[k].astype(np.int64)) for k in ("train_y", "test_y")}
    return RawSplits(images["train_x"], labels["train_y"], images["test_x"], labels["test_y"],
                     ds.class_names)


@register("mnist")
def load_mnist(cfg: DataConfig) -> RawSplits:
    """MNIST: 60,000 train and 10,000 test 28x28 grayscale digits."""
    return load_idx(cfg, MNIST)


@register("fashion-mnist")
def load_fashion_mnist(cfg: DataConfig) -> RawSplits:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train and 10,000 test 28x28 grayscale images."""
    return load_idx(cfg, FASHION_MNIST)
