"""TensorBoard event files for a run, on any Storage (local folder, s3://, gs://).

On a local store the events go straight to `<root>/tb/`. On an object store they are written
to a local temporary folder and each event file is uploaded whole on `flush()` / `close()`
(object stores replace whole objects, so a reader never sees a half-written file). Point
TensorBoard at the folder: `tensorboard --logdir <root>/tb` (it reads s3:// itself only with
extra plugins; `aws s3 sync` the folder down otherwise).

    log = TensorBoardLog(store)
    log.scalar("distill/loss", loss, iteration)
    log.image_grid("synthetic", images, iteration)   # (N, C, H, W), any value range
    log.flush()                                      # at each evaluation
    log.close()
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
# At import, not at the first evaluation: importing torchvision takes ~1.5 s, which inside
# the distillation loop would be a pause (tests/test_runtime.py caught it under load).
from torchvision.utils import make_grid

from mct_ray import layout
from mct_ray.storage import Storage


def _as_chw(image: Any) -> torch.Tensor:
    """A float (C, H, W) image in [0, 1] from a tensor/array ((C,H,W) or (H,W)) or PNG bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        from PIL import Image  # Pillow comes with matplotlib and torchvision

        try:
            pixels = np.asarray(Image.open(io.BytesIO(bytes(image))).convert("RGB"))
        except Exception as exc:  # Pillow raises several types for undecodable bytes
            raise ValueError(f"image bytes are not a decodable PNG ({exc})") from None
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0
    t = torch.as_tensor(image).detach().cpu().float()
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"image must be (C, H, W) with C in 1, 3, 4 or (H, W); "
                         f"got shape {tuple(t.shape)}")
    return t.clamp(0.0, 1.0)


class TensorBoardLog:
    """Scalars and images for one run, written as TensorBoard event files under `subdir`."""

    def __init__(self, store: Storage, subdir: str = layout.TENSORBOARD,
                 flush_secs: int = 120) -> None:
        self.store = store.child(subdir)
        self._staging = None if store.is_local else tempfile.mkdtemp(prefix="mct-ray-tb-")
        log_dir = self.store.root if self._staging is None else self._staging
        self._writer = SummaryWriter(log_dir=log_dir, flush_secs=flush_secs)
        self._closed = False

    @property
    def uri(self) -> str:
        """Where the event files end up (give this folder to `tensorboard --logdir`)."""
        return self.store.uri

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.add_scalar(tag, float(value), int(step))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Several scalars at one step, each under its own tag."""
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """One image: a float (C, H, W) or (H, W) tensor/array in [0, 1], or PNG bytes."""
        # Rounded here: SummaryWriter would truncate floats (0.5 -> 127).
        pixels = (_as_chw(image) * 255.0).round().to(torch.uint8)
        self._writer.add_image(tag, pixels, int(step), dataformats="CHW")

    def image_grid(self, tag: str, images: torch.Tensor, step: int, nrow: int = 10) -> None:
        """A batch (N, C, H, W) of any value range as one grid, min-max scaled to [0, 1]
        (the synthetic set is normalised, possibly ZCA-whitened, so raw values are not
        displayable)."""
        batch = torch.as_tensor(images).detach().cpu().float()
        if batch.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W); got shape {tuple(batch.shape)}")
        lo, hi = batch.min(), batch.max()
        batch = (batch - lo) / (hi - lo) if hi > lo else torch.zeros_like(batch)
        self.image(tag, make_grid(batch, nrow=nrow, padding=1, pad_value=1.0), step)

    def flush(self) -> None:
        """Write pending events; on an object store, upload the event files."""
        self._writer.flush()
        self._upload()

    def close(self) -> None:
        if self._closed:
            return
        self._writer.close()
        self._upload()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _upload(self) -> None:
        if self._staging is None:
            return
        for folder, _, files in os.walk(self._staging):
            for name in sorted(files):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    rel = os.path.relpath(path, self._staging).replace(os.sep, "/")
                    self.store.write_bytes(rel, f.read())
