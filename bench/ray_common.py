"""Shared set-up of the Ray benchmarks: a local Ray on loopback, the digits data set in the
object store (through the library's `RayBackend`), and a plot helper."""

from __future__ import annotations

import os
import pathlib
import statistics

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from bench.common import RESULTS  # noqa: E402
from mct_ray.config import Config, load_config  # noqa: E402
from mct_ray.context import Context  # noqa: E402
from mct_ray.pipeline import train_missing_experts  # noqa: E402
from mct_ray.runtime.backend import RayBackend, expert_refs  # noqa: E402
from mct_ray.storage import Storage  # noqa: E402


def start_ray(num_cpus: int = 2) -> None:
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             object_store_memory=300 * 2**20, log_to_driver=False)  # never one already running


def digits(overrides: list[str]) -> tuple[Config, Context, RayBackend]:
    """The digits recipe with `overrides`, and a Ray backend holding its data set in the
    object store (`backend.data_ref`)."""
    cfg = load_config("digits", ["run.progress=false", *overrides])
    ctx = Context.build(cfg)
    return cfg, ctx, RayBackend(ctx)


def train_experts(ctx: Context, backend: RayBackend, out: str) -> list[ray.ObjectRef]:
    """Train the config's experts as Ray tasks, saving each into `out` as it finishes (the
    library's `train_missing_experts`); their trajectories' refs, in id order (put by the
    driver, as the library's Ray backend puts them)."""
    store = Storage.open(out)
    train_missing_experts(ctx, store, backend)
    return expert_refs(store, ctx.spec, ctx.cfg.needs_full)


def median(values: list[float]) -> float:
    return statistics.median(values)


def bar_png(name: str, labels: list[str], values: list[float], ylabel: str,
            title: str) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(labels, values, color=["#777", "#2a6"][: len(labels)] * len(labels))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=9)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
