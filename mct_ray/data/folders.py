"""Image-file data sets: Tiny ImageNet (its extracted zip as published) and any image folder.

Both decode with PIL into one preallocated uint8 array, so tens of thousands of small images
load in a simple loop without building a Python list of arrays first. Every bad input (a
missing folder, an empty class, an unlisted or unreadable image) raises a DataError that
names the path, because a half-loaded data set would silently change what is distilled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from mct_ray.config import DataConfig
from mct_ray.data import RawSplits, register
from mct_ray.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})

TINY_FOLDER = "tiny-imagenet-200"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def locate_or_download(cfg: DataConfig, folder: str, url: str, md5: str | None) -> Path:
    """The extracted `folder` under cfg.root, downloaded first when allowed and absent.

    Shared by every loader that reads a published archive, so they all fail the same way:
    one line naming where we looked and how to get the data there.
    """
    path = Path(cfg.root) / folder
    if path.is_dir():
        return path
    archive = url.rsplit("/", 1)[-1]
    if not cfg.download:
        raise DataError(f"{cfg.name} not found: looked for {path}; set data.download=true "
                        f"(needs internet) or extract {archive} there")
    # Imported here: torchvision is only needed for the one-off download.
    from torchvision.datasets.utils import download_and_extract_archive

    log.info("downloading %s to %s", url, cfg.root)
    try:
        download_and_extract_archive(url, download_root=cfg.root, md5=md5)
    except (OSError, RuntimeError) as exc:  # no network, HTTP error, checksum mismatch
        raise DataError(f"{cfg.name}: could not download {url} ({exc}); download {archive} "
                        f"by hand and extract it in {cfg.root}") from None
    if not path.is_dir():
        raise DataError(f"{cfg.name}: {archive} was extracted in {cfg.root} but {path} "
                        f"is still missing")
    return path


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted so the order (and the labels) never vary."""
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        kinds = " ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"no images in {folder} (looked for files ending {kinds})")
    return files


GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def channels_of(paths: Sequence[Path]) -> int:
    """1 when every image is grayscale, else 3 (from the file headers; nothing decoded)."""
    for path in paths:
        with _open(path) as img:
            if img.mode not in GRAY_MODES:
                return 3
    return 1


def _eight_bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit integer grayscale (PIL's I;16* and I modes, e.g. a 16-bit PNG) scaled
    to 8 bits: PIL's own convert("L") clips every value above 255 to white."""
    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return img
    pixels = np.asarray(img, dtype=np.float64)
    if pixels.min() < 0 or pixels.max() > 65535:
        raise ValueError(f"{img.mode} pixels outside [0, 65535]")
    return Image.fromarray(np.rint(pixels / 257.0).astype(np.uint8), "L")


def _decode(path: Path, size: int | None, channels: int) -> np.ndarray:
    """One image as (channels, H, W) uint8 (gray or RGB), resized to size x size if given."""
    try:
        with _open(path) as img:
            img = _eight_bit(img).convert("L" if channels == 1 else "RGB")
            if size and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img).reshape(img.size[1], img.size[0], channels).transpose(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def load_images(paths: Sequence[Path], size: int | None, fix: str, channels: int = 3
                 ) -> torch.Tensor:
    """Decode `paths` into (N, channels, H, W) float32 in [0, 1].

    With size None every image must share the first one's size; `fix` tells the user how
    to make them agree.
    """
    first = _decode(paths[0], size, channels)
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    out[0] = first
    for i, path in enumerate(paths[1:], start=1):
        img = _decode(path, size, channels)
        if img.shape != first.shape:
            raise DataError(f"image {path} is {img.shape[2]}x{img.shape[1]} but {paths[0]} "
                            f"is {first.shape[2]}x{first.shape[1]}; {fix}")
        out[i] = img
    return torch.from_numpy(out).float().div_(255.0)


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a text file, stripped (published files end in blank lines)."""
    if not path.is_file():
        raise DataError(f"missing file {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# Tiny ImageNet: train/<wnid>/images/*.JPEG for training, val/ (with labels) for testing.

def _tiny_class_names(root: Path, wnids: list[str]) -> tuple[str, ...]:
    """Human-readable names from words.txt when present, else the wnids themselves."""
    words = root / "words.txt"
    if not words.is_file():
        return tuple(wnids)
    names = dict(line.split("\t", 1) for line in read_lines(words) if "\t" in line)
    return tuple(names.get(w, w).strip() for w in wnids)


def _tiny_val_labels(root: Path, index: dict[str, int]) -> dict[str, int]:
    """Validation file name -> class index, from val/val_annotations.txt."""
    ann = root / "val" / "val_annotations.txt"
    labels = {}
    for n, line in enumerate(read_lines(ann), start=1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"{ann} line {n} is not 'file<TAB>wnid<TAB>...': {line!r}")
        if fields[1] not in index:
            raise DataError(f"{ann} line {n} names wnid {fields[1]!r}, "
                            f"which is not in {root / 'wnids.txt'}")
        labels[fields[0]] = index[fields[1]]
    return labels


def _tiny_val_files(root: Path, labels: dict[str, int]) -> list[Path]:
    """The val images, each checked to be annotated, and each annotation to have its image."""
    files = _image_files(root / "val" / "images")
    unlisted = [p for p in files if p.name not in labels]
    if unlisted:
        raise DataError(f"val image {unlisted[0]} is not listed in "
                        f"{root / 'val' / 'val_annotations.txt'}")
    missing = sorted(set(labels) - {p.name for p in files})
    if missing:
        raise DataError(f"{root / 'val' / 'val_annotations.txt'} lists {missing[0]}, but "
                        f"{root / 'val' / 'images' / missing[0]} does not exist")
    return files


@register("tinyimagenet")
def load_tinyimagenet(cfg: DataConfig) -> RawSplits:
    """Tiny ImageNet (200 classes, 64x64): train/ is the training split, val/ the test split."""
    root = locate_or_download(cfg, TINY_FOLDER, TINY_URL, TINY_MD5)
    wnids = read_lines(root / "wnids.txt")
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{root / 'wnids.txt'} must list each class wnid once, one per line")
    index = {w: c for c, w in enumerate(wnids)}
    train_files, train_y = [], []
    for c, wnid in enumerate(wnids):
        files = _image_files(root / "train" / wnid / "images")
        train_files += files
        train_y += [c] * len(files)
    val_labels = _tiny_val_labels(root, index)
    test_files = _tiny_val_files(root, val_labels)
    fix = f"Tiny ImageNet images are all 64x64; re-extract {TINY_URL.rsplit('/', 1)[-1]}"
    log.info("loading Tiny ImageNet from %s (%d train, %d test images)", root,
             len(train_files), len(test_files))
    return RawSplits(load_images(train_files, None, fix),
                     torch.tensor(train_y, dtype=torch.int64),
                     load_images(test_files, None, fix),
                     torch.tensor([val_labels[p.name] for p in test_files], dtype=torch.int64),
                     _tiny_class_names(root, wnids))


# ---------------------------------------------------------------------------------------
# Any image folder: <root>/train/<class>/* and <root>/val/<class>/*.

def _class_folders(split: Path) -> list[str]:
    if not split.is_dir():
        raise DataError(f"imagefolder not found: looked for {split}; put images in "
                        f"{split}/<class>/ (.png, .jpg, ...)")
    classes = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"imagefolder: no class folders in {split}; put images in "
                        f"{split}/<class>/")
    return classes


def folder_split(split: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for c, name in enumerate(classes):
        found = _image_files(split / name)
        files += found
        labels += [c] * len(found)
    return files, labels


@register("imagefolder")
def load_imagefolder(cfg: DataConfig) -> RawSplits:
    """Class-per-folder images; class names and order come from the train folder. A set of
    grayscale images stays one channel; any colour image makes every image RGB."""
    root = Path(cfg.root)
    classes = _class_folders(root / "train")
    val_classes = _class_folders(root / "val")
    if val_classes != classes:
        odd = sorted(set(classes) ^ set(val_classes))
        raise DataError(f"imagefolder: {root / 'val'} must have the same class folders as "
                        f"{root / 'train'}; they differ in: {', '.join(odd)}")
    size = cfg.resolution or None
    fix = "set data.resolution=<n> to resize every image to n x n"
    train_files, train_y = folder_split(root / "train", classes)
    test_files, test_y = folder_split(root / "val", classes)
    channels = channels_of(train_files + test_files)
    log.info("loading image folder %s (%d classes, %d train, %d test images, %d channel%s)",
             root, len(classes), len(train_files), len(test_files), channels,
             "s" if channels > 1 else "")
    return RawSplits(load_images(train_files, size, fix, channels),
                     torch.tensor(train_y, dtype=torch.int64),
                     load_images(test_files, size, fix, channels),
                     torch.tensor(test_y, dtype=torch.int64),
                     tuple(classes))
