"""MTT's 10-class ImageNet subsets (ImageNette, ImageWoof, ImageFruit, ImageMeow, ImageSquawk,
ImageYellow), read from the standard ImageNet folder layout:

    <data.root>/train/<wnid>/*.JPEG     (ILSVRC2012 train, one folder per class)
    <data.root>/val/<wnid>/*.JPEG       (the 50,000 validation images sorted into class
                                         folders, as PyTorch's ImageNet examples expect)

Only the subset's ten folders are read; the labels follow MTT's class order (its
utils.Config lists, ImageNet class indices mapped to wnids here), and every image is squashed
to data.resolution x data.resolution (128 by default), as MTT's `Resize((128, 128))` does.
MTT trains on the original train split and tests on the original validation images of the
ten classes (not fastai's Imagenette splits).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mct_ray.config import DataConfig
from mct_ray.data import RawSplits, register
from mct_ray.data.folders import folder_split, load_images
from mct_ray.errors import DataError

log = logging.getLogger(__name__)

# subset -> its classes' wnids in MTT's label order (mtt-distillation utils.py, class Config:
# img_net_classes and its siblings give ImageNet class indices; these are their wnids).
SUBSETS: dict[str, tuple[str, ...]] = {
    "imagenette": ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                   "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"),
    "imagewoof": ("n02096294", "n02093754", "n02111889", "n02088364", "n02086240",
                  "n02089973", "n02087394", "n02115641", "n02099601", "n02105641"),
    "imagemeow": ("n02123045", "n02123159", "n02123394", "n02123597", "n02124075",
                  "n02129165", "n02129604", "n02128925", "n02128757", "n02127052"),
    "imagesquawk": ("n01806143", "n02007558", "n01818515", "n02051845", "n02056570",
                    "n01614925", "n01843383", "n01518878", "n01860187", "n01819313"),
    "imagefruit": ("n07753275", "n07753592", "n07745940", "n07747607", "n07749582",
                   "n07768694", "n07753113", "n07720875", "n07718472", "n07742313"),
    "imageyellow": ("n02206856", "n12057211", "n07753592", "n07749582", "n12144580",
                    "n04146614", "n03530642", "n02129165", "n01773157", "n01531178"),
}
RESOLUTION = 128  # MTT's ImageNet subsets, when data.resolution is 0


@register("imagenet-subset")
def load_imagenet_subset(cfg: DataConfig) -> RawSplits:
    if cfg.subset not in SUBSETS:
        raise DataError(f"data.name=imagenet-subset needs data.subset, one of "
                        f"{', '.join(SUBSETS)} (got '{cfg.subset}')")
    root, wnids = Path(cfg.root), list(SUBSETS[cfg.subset])
    for split in ("train", "val"):
        missing = [w for w in wnids if not (root / split / w).is_dir()]
        if missing:
            raise DataError(f"{cfg.subset}: {len(missing)} of its class folders are missing "
                            f"from {root / split} ({', '.join(missing[:3])}"
                            f"{', ...' if len(missing) > 3 else ''}); data.root must be an "
                            "ImageNet root with train/<wnid>/ and val/<wnid>/ folders")
    size = cfg.resolution or RESOLUTION
    fix = "set data.resolution=<n>"
    train_files, train_y = folder_split(root / "train", wnids)
    test_files, test_y = folder_split(root / "val", wnids)
    log.info("loading %s from %s (%d train, %d test images at %dx%d)", cfg.subset, root,
             len(train_files), len(test_files), size, size)
    return RawSplits(load_images(train_files, size, fix), torch.tensor(train_y),
                     load_images(test_files, size, fix), torch.tensor(test_y), tuple(wnids))
