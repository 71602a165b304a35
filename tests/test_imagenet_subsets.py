"""MTT's ImageNet subsets: read from a generated ImageNet folder (JPEGs of odd sizes, extra
classes beside the subset's), labels in MTT's class order, squashed to 128x128 as MTT's
Resize((128, 128)); a missing class folder named; the recipes resolve and run end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mct_ray.cli import main
from mct_ray.config import DataConfig, load_config
from mct_ray.data import load_data
from mct_ray.data.imagenet import SUBSETS
from mct_ray.errors import DataError

pytestmark = pytest.mark.core

RNG = np.random.default_rng(0)


def make_imagenet(root: Path, subset: str = "imagenette", per_class: int = 2) -> None:
    """train/<wnid>/ and val/<wnid>/ JPEGs for the subset's classes and one other class."""
    for split, count in (("train", per_class), ("val", 1)):
        for wnid in (*SUBSETS[subset], "n09999999"):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = RNG.integers(100, 200, size=2)
                Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    folder / f"{wnid}_{i}.JPEG")


def test_a_subset_is_read_in_mtts_class_order_at_128(tmp_path):
    make_imagenet(tmp_path)
    data = load_data(DataConfig(name="imagenet-subset", subset="imagenette", root=str(tmp_path)))
    assert data.train_x.shape == (20, 3, 128, 128) and data.test_x.shape == (10, 3, 128, 128)
    assert data.class_names == SUBSETS["imagenette"] and data.class_names[0] == "n01440764"
    assert data.train_y.tolist() == [c for c in range(10) for _ in range(2)]
    assert data.test_y.tolist() == list(range(10))
    assert data.mean == pytest.approx((0.485, 0.456, 0.406))


def test_every_subset_has_ten_distinct_classes_and_a_config_choice():
    choices = next(f for f in dataclasses.fields(DataConfig)
                   if f.name == "subset").metadata["choices"]
    assert set(choices) - {""} == set(SUBSETS)
    for wnids in SUBSETS.values():
        assert len(set(wnids)) == 10 and all(w.startswith("n") and len(w) == 9 for w in wnids)


def test_a_missing_class_folder_is_named(tmp_path):
    make_imagenet(tmp_path)
    (tmp_path / "val" / SUBSETS["imagenette"][3]).rename(tmp_path / "val" / "elsewhere")
    with pytest.raises(DataError, match=f"missing from {tmp_path / 'val'} "
                                        f"\\({SUBSETS['imagenette'][3]}\\)"):
        load_data(DataConfig(name="imagenet-subset", subset="imagenette", root=str(tmp_path)))


def test_no_subset_named_is_one_line(tmp_path):
    with pytest.raises(DataError, match="needs data.subset, one of imagenette, imagewoof"):
        load_data(DataConfig(name="imagenet-subset", root=str(tmp_path)))


@pytest.mark.parametrize("recipe", ["imagenet-subset-ipc1", "imagenet-subset-ipc10"])
def test_the_recipes_are_mtts_shape(recipe):
    cfg = load_config(recipe, ["distill.method=mtt"])
    assert (cfg.data.name, cfg.data.resolution, cfg.net.depth, cfg.net.width) == \
        ("imagenet-subset", 128, 5, 128)
    assert (cfg.distill.syn_steps, cfg.distill.expert_epochs, cfg.distill.max_start_epoch) == \
        (20, 2, 10)


def test_a_subset_recipe_runs_end_to_end(tmp_path):
    make_imagenet(tmp_path / "imagenet", "imagewoof")
    assert main(["run", "--local", "--recipe", "imagenet-subset-ipc1", "--out",
                 str(tmp_path / "run"), f"data.root={tmp_path / 'imagenet'}",
                 "data.subset=imagewoof", "net.width=8", "expert.num_experts=1",
                 "expert.epochs=3", "expert.anchors=[1]", "distill.iterations=2",
                 "distill.syn_steps=2", "distill.max_start_epoch=1", "distill.expert_epochs=1",
                 "eval.every=2", "eval.num_eval=1", "eval.epochs=2", "run.progress=false"]) == 0
    assert (tmp_path / "run" / "synthetic.safetensors").exists()
