"""Data set registry and the common pipeline (resize, then normalise or ZCA-whiten).

Each loader turns a DataConfig into `RawSplits` (float images in [0, 1]); `load_data` applies
the shared pipeline and returns `ImageData`, everything the rest of the library needs.

Pixels as the authors' code prepares them (MTT's and MCT's utils.get_dataset):
  - ZCA: kornia's ZCAWhitening (eps 0.1) fitted on the raw [0, 1] training pixels and applied
    to both splits, with nothing before it;
  - otherwise (x - mean) / std per channel with the data set's customary constants
    (`NORMS`); computed statistics only where none exist (digits, image folders, random).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mct_ray.config import DataConfig
from mct_ray.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawSplits:
    train_x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class ImageData:
    name: str
    train_x: torch.Tensor  # (N, C, H, W) float32, normalised (or ZCA-whitened)
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of the [0, 1] training images
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # (C, H, W)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.train_x, self.train_y, self.test_x, self.test_y))

    def to(self, device: str) -> "ImageData":
        """The same data set with its tensors on `device` (minibatches are then drawn and
        augmented there, with no host copies)."""
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in
                                            ("train_x", "train_y", "test_x", "test_y")})


LOADERS: dict[str, Callable[[DataConfig], RawSplits]] = {}

# Customary per-channel (mean, std) of the [0, 1] training pixels, as the benchmark family's
# code normalises each data set (DC/DSA/MTT utils.get_dataset). CIFAR-100 uses CIFAR-10's
# constants there (MTT's and MCT's code), and so do we.
CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2861,), (0.3530,)),
    "cifar10": CIFAR10_NORM,
    "cifar100": CIFAR10_NORM,
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet-subset": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def register(name: str):
    def wrap(fn: Callable[[DataConfig], RawSplits]):
        LOADERS[name] = fn
        return fn
    return wrap


def load_data(cfg: DataConfig) -> ImageData:
    """Load, resize, normalise and (optionally) ZCA-whiten the data set named by cfg."""
    _import_loaders()
    if cfg.name not in LOADERS:
        raise DataError(f"unknown data set '{cfg.name}' (known: {', '.join(sorted(LOADERS))})")
    raw = LOADERS[cfg.name](cfg)
    _check_raw(cfg.name, raw)
    train_x, test_x = raw.train_x, raw.test_x
    if cfg.resolution and train_x.shape[-1] != cfg.resolution:
        train_x, test_x = (_resize(x, cfg.resolution) for x in (train_x, test_x))
    if cfg.zca:  # raw pixels in, whitened pixels out: no normalisation before or after
        mean, std = torch.zeros(train_x.shape[1]), torch.ones(train_x.shape[1])
        train_x, test_x = zca_whiten(train_x, test_x, cfg.zca_eps)
    else:
        mean, std = normalisation(cfg.name, train_x)
        train_x = (train_x - mean[:, None, None]) / std[:, None, None]
        test_x = (test_x - mean[:, None, None]) / std[:, None, None]
    return ImageData(cfg.name, train_x.contiguous(), raw.train_y, test_x.contiguous(),
                     raw.test_y, raw.class_names, tuple(mean.tolist()), tuple(std.tolist()))


def normalisation(name: str, train_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std): the data set's customary constants, else computed on train_x."""
    if name in NORMS:
        return tuple(torch.tensor(v) for v in NORMS[name])
    return train_x.mean(dim=(0, 2, 3)), train_x.std(dim=(0, 2, 3)).clamp_min(1e-6)


def zca_whiten(train_x: torch.Tensor, test_x: torch.Tensor, eps: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """ZCA fitted on the training images and applied to both splits (kornia, as MTT does)."""
    import kornia

    zca = kornia.enhance.ZCAWhitening(eps=eps, compute_inv=False)
    zca.fit(train_x)
    return zca(train_x), zca(test_x)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


def _check_raw(name: str, raw: RawSplits) -> None:
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if x.ndim != 4 or len(x) != len(y) or len(x) == 0:
            raise DataError(f"data set '{name}' {split} split is malformed: images "
                            f"{tuple(x.shape)}, labels {tuple(y.shape)}")
        if not torch.isfinite(x).all():
            raise DataError(f"data set '{name}' {split} split has non-finite pixel values")
        if y.min() < 0 or y.max() >= len(raw.class_names):
            raise DataError(f"data set '{name}' {split} split has labels outside "
                            f"0..{len(raw.class_names) - 1}")


@register("digits")
def load_digits(cfg: DataConfig) -> RawSplits:
    """scikit-learn's bundled digits (1,797 8x8 images), stratified deterministic split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=cfg.test_fraction, stratify=y.numpy(), random_state=0)
    idx_train, idx_test = torch.tensor(idx_train), torch.tensor(idx_test)
    return RawSplits(x[idx_train], y[idx_train], x[idx_test], y[idx_test],
                     tuple(str(i) for i in range(10)))


def random_splits(cfg: DataConfig) -> RawSplits:
    """Random images of a given shape and class count (for benchmarks only); like any data
    set, the same images for every run seed."""
    gen = torch.Generator().manual_seed(0)
    size = cfg.resolution or 32
    shape = (cfg.channels, size, size)
    n_tr, n_te, k = cfg.num_train, cfg.num_test, cfg.num_classes
    return RawSplits(torch.rand((n_tr, *shape), generator=gen),
                     torch.arange(n_tr) % k,
                     torch.rand((n_te, *shape), generator=gen),
                     torch.arange(n_te) % k,
                     tuple(str(i) for i in range(k)))


LOADERS["random"] = random_splits


def _import_loaders() -> None:
    # The file-format loaders register themselves on import.
    from mct_ray.data import cifar, folders, idx, imagenet  # noqa: F401
