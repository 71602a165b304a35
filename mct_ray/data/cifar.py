"""CIFAR-10 and CIFAR-100 from the official *binary* archives.

The "python version" archives are pickles, and unpickling a downloaded file can run arbitrary
code, so only the fixed-length binary records are read, straight into numpy. Each record is
its label byte(s) followed by 3,072 pixel bytes: the 32x32 red plane, then green, then blue,
which is already the (C, H, W) layout the library uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mct_ray.config import DataConfig
from mct_ray.data import RawSplits, register
from mct_ray.data.folders import locate_or_download, read_lines
from mct_ray.errors import DataError

log = logging.getLogger(__name__)

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarFormat:
    """Where one CIFAR variant lives and how its records are laid out."""

    folder: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    names_file: str
    label_bytes: int  # bytes before the pixels in each record
    label_at: int  # which of them is the label we use
    num_classes: int


CIFAR10 = CifarFormat(
    folder="cifar-10-batches-bin",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    md5="c32a1d4ab5d03f1284b67883e8d87530",
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_files=("test_batch.bin",),
    names_file="batches.meta.txt",
    label_bytes=1, label_at=0, num_classes=10)

CIFAR100 = CifarFormat(  # records hold the coarse (20) then the fine (100) label
    folder="cifar-100-binary",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    md5="03b5dce01913d631647c71ecec9e9cb8",
    train_files=("train.bin",),
    test_files=("test.bin",),
    names_file="fine_label_names.txt",
    label_bytes=2, label_at=1, num_classes=100)


def read_records(path: Path, fmt: CifarFormat) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch file as ((N, 3, 32, 32) uint8 images, (N,) int64 labels)."""
    if not path.is_file():
        raise DataError(f"missing file {path}; re-extract {fmt.url.rsplit('/', 1)[-1]}")
    record = fmt.label_bytes + PIXELS
    size = path.stat().st_size
    if size == 0 or size % record:
        raise DataError(f"{path} is {size} bytes, not a whole number of {record}-byte "
                        f"records; the file is truncated or not a CIFAR binary batch")
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
    labels = raw[:, fmt.label_at].astype(np.int64)
    bad = np.flatnonzero(labels >= fmt.num_classes)
    if bad.size:
        raise DataError(f"{path} record {bad[0]} has label {labels[bad[0]]}, outside "
                        f"0..{fmt.num_classes - 1}")
    return raw[:, fmt.label_bytes:].reshape(-1, 3, 32, 32), labels


def _read_split(root: Path, files: tuple[str, ...], fmt: CifarFormat
                ) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_records(root / name, fmt) for name in files]
    images = np.concatenate([x for x, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    return torch.from_numpy(images).float().div_(255.0), torch.from_numpy(labels)


def _class_names(root: Path, fmt: CifarFormat) -> tuple[str, ...]:
    path = root / fmt.names_file
    names = read_lines(path)
    if len(names) != fmt.num_classes:
        raise DataError(f"{path} lists {len(names)} class names, expected {fmt.num_classes}")
    return tuple(names)


def load_cifar(cfg: DataConfig, fmt: CifarFormat) -> RawSplits:
    root = locate_or_download(cfg, fmt.folder, fmt.url, fmt.md5)
    log.info("loading %s from %s", cfg.name, root)
    train_x, train_y = _read_split(root, fmt.train_files, fmt)
    test_x, test_y = _read_split(root, fmt.test_files, fmt)
    return RawSplits(train_x, train_y, test_x, test_y, _class_names(root, fmt))


@register("cifar10")
def load_cifar10(cfg: DataConfig) -> RawSplits:
    """CIFAR-10: 50,000 train and 10,000 test 32x32 images, 10 classes."""
    return load_cifar(cfg, CIFAR10)


@register("cifar100")
def load_cifar100(cfg: DataConfig) -> RawSplits:
    """CIFAR-100 with its 100 fine labels (the 20 coarse ones are not used)."""
    return load_cifar(cfg, CIFAR100)
