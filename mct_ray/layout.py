"""The one owner of a run folder's layout: the names of its files, on any storage root
(`mct_ray.storage` reads and writes them).

    <root>/config.json                 resolved config
    <root>/experts/expert-NNNNN.safetensors        convex trajectory (MCT)
    <root>/experts/expert-NNNNN.full.safetensors   every epoch (MTT), when kept
    <root>/synthetic.safetensors       best synthetic set so far (by evaluation)
    <root>/last.safetensors            latest synthetic set that passed a finite update
    <root>/state.safetensors           distillation state for resume
    <root>/metrics.parquet, summary.json, synthetic.png, curve.png
    <root>/eval.json                   the last `mct-ray eval` of the folder
    <root>/tb/                         TensorBoard event files (mct_ray.tensorboard)
    <root>/.lock                       the writer holding the folder (see RunLock)

A grid folder (`mct-ray grid`):

    <root>/grid.json                   the resolved grid (every cell's config)
    <root>/experts/<group>/            each expert group's run folder (config, experts/)
    <root>/cells/<cell>/               a run folder per cell; cell.json (its row) when done
    <root>/grid.parquet, grid.png      a row per finished cell; accuracy against ipc
    <root>/tune/                       Ray Tune's own files (never read back by mct-ray)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mct_ray.storage import Storage

CONFIG = "config.json"
SYNTHETIC = "synthetic.safetensors"
LAST = "last.safetensors"
STATE = "state.safetensors"
METRICS = "metrics.parquet"
SUMMARY = "summary.json"
SYNTHETIC_PNG = "synthetic.png"  # the synthetic images as a picture
CURVE_PNG = "curve.png"
EXPERTS = "experts"
TENSORBOARD = "tb"
EVAL = "eval.json"
LOCK = ".lock"
# What a run's distillation writes: a folder holding any of them has a run to resume.
INIT_INDICES = "init_indices.json"  # the synthetic set's starting images (starting.py)
DISTILL_OUTPUTS = (STATE, SUMMARY, SYNTHETIC, LAST, METRICS, SYNTHETIC_PNG, CURVE_PNG, INIT_INDICES)

GRID_JSON = "grid.json"
GRID_TABLE = "grid.parquet"
GRID_PLOT = "grid.png"
GRID_TUNE = "tune"
CELL_DONE = "cell.json"  # a finished cell's row; written last


def grid_cell(cell_id: str) -> str:
    return f"cells/{cell_id}"


def expert_group(group: str) -> str:
    return f"experts/{group}"


_EXPERT = re.compile(r"expert-(\d{5,})(\.full)?\.safetensors")


def expert_name(expert_id: int, full: bool = False) -> str:
    return f"{EXPERTS}/expert-{expert_id:05d}{'.full' if full else ''}.safetensors"


def expert_ids(store: Storage, full: bool) -> list[int]:
    """The ids of the experts stored in `store` of one kind (convex, or full with `full`)."""
    ids = []
    for name in store.list(EXPERTS, ".safetensors"):
        m = _EXPERT.fullmatch(name.rsplit("/", 1)[-1])
        if m and bool(m.group(2)) == full:
            ids.append(int(m.group(1)))
    return sorted(ids)
