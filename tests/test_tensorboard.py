"""TensorBoard event files, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mct_ray.storage import Storage
from mct_ray.tensorboard import TensorBoardLog

pytestmark = pytest.mark.core


def _read(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _pixels(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def _write_run(log: TensorBoardLog) -> torch.Tensor:
    """Loss and step size at iterations 0..4, accuracy at 0 and 4, two images at 4."""
    for it in range(5):
        log.scalars({"distill/loss": 1.0 / (it + 1), "distill/step_size": 0.01 * it}, it)
    log.scalar("eval/acc_mean", 0.25, 0)
    log.scalar("eval/acc_mean", 0.5, 4)
    image = torch.zeros(3, 4, 6)
    image[0, :, :3] = 1.0  # left half red
    log.image("synthetic/first", image, 4)
    log.image_grid("synthetic/grid", torch.randn(20, 3, 8, 8) * 5, 4, nrow=10)
    return image


def _check_run(acc: EventAccumulator, image: torch.Tensor) -> None:
    tags = acc.Tags()
    assert {"distill/loss", "distill/step_size", "eval/acc_mean"} <= set(tags["scalars"])
    loss = acc.Scalars("distill/loss")
    assert [e.step for e in loss] == [0, 1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert [(e.step, e.value) for e in acc.Scalars("eval/acc_mean")] == [(0, 0.25), (4, 0.5)]
    assert acc.Scalars("distill/step_size")[3].value == pytest.approx(0.03)

    assert set(tags["images"]) == {"synthetic/first", "synthetic/grid"}
    (first,) = acc.Images("synthetic/first")
    assert (first.step, first.width, first.height) == (4, 6, 4)
    expected = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(_pixels(first.encoded_image_string), expected)
    (grid,) = acc.Images("synthetic/grid")
    # 10 x 2 tiles of 8x8 with 1-pixel padding around each tile.
    assert (grid.step, grid.width, grid.height) == (4, 10 * 9 + 1, 2 * 9 + 1)


def test_local_store_gets_event_files_directly(tmp_path):
    store = Storage.open(str(tmp_path / "run"))
    with TensorBoardLog(store) as log:
        image = _write_run(log)
        log.flush()
        assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    _check_run(_read(str(tmp_path / "run" / "tb")), image)
    assert log.uri == f"{tmp_path}/run/tb"


def test_remote_store_gets_event_files_on_flush(tmp_path):
    # A non-local pyarrow filesystem (as s3:// or gs:// are): events are staged and uploaded.
    remote = tmp_path / "bucket"
    remote.mkdir()
    store = Storage(pafs.SubTreeFileSystem(str(remote), pafs.LocalFileSystem()), "run",
                    "mock://bucket/run", kind="other")
    assert not store.is_local
    log = TensorBoardLog(store, subdir="tensorboard")
    image = _write_run(log)
    assert not (remote / "run").exists()  # nothing uploaded before a flush
    log.flush()
    (event_file,) = store.list("tensorboard")
    _check_run(_read(str(remote / "run" / "tensorboard")), image)
    log.scalar("distill/loss", 0.1, 5)
    staging = log._staging
    log.close()
    assert _read(str(remote / "run" / "tensorboard")).Scalars("distill/loss")[-1].step == 5
    assert store.list("tensorboard") == [event_file]  # the same file, replaced whole
    assert staging is not None and not os.path.exists(staging)


def test_images_of_every_accepted_kind(tmp_path):
    png = io.BytesIO()
    Image.fromarray(np.full((3, 5, 3), 200, np.uint8)).save(png, format="PNG")
    with TensorBoardLog(Storage.open(str(tmp_path))) as log:
        log.image("png", png.getvalue(), 1)
        log.image("gray", np.full((3, 5), 0.5, np.float32), 2)
        with pytest.raises(ValueError, match=r"must be \(C, H, W\)"):
            log.image("bad", torch.zeros(2, 3, 4, 5), 0)
        with pytest.raises(ValueError, match="not a decodable PNG"):
            log.image("bad", b"not a png", 0)
        with pytest.raises(ValueError, match=r"must be \(N, C, H, W\)"):
            log.image_grid("bad", torch.zeros(3, 4, 5), 0)
    acc = _read(str(tmp_path / "tb"))
    (png_event,) = acc.Images("png")
    assert png_event.step == 1 and (_pixels(png_event.encoded_image_string) == 200).all()
    (gray,) = acc.Images("gray")
    assert (gray.width, gray.height) == (5, 3)
    assert (_pixels(gray.encoded_image_string) == 128).all()  # round(0.5 * 255)
