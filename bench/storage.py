"""Bytes per expert: MCT (endpoints + beta) against MTT (every epoch), at the real shapes.

Trains one expert per shape for 50 epochs on `random` data of that shape (a few images, so
it is quick: the byte counts depend on the parameter count and K, not on the data) and
serialises it both ways: MCT as the paper's single line (eqs. 8-10), with theta(0) stored as
its seed, and with the recipe's two interior anchors (the paper's waypoints: 4 of 51 points).

    python bench/storage.py     # last line: storage_ratio_seed_cifar10=<value>
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bench.common import RESULTS, print_table, save_table  # noqa: E402
from mct_ray import formats  # noqa: E402
from mct_ray.config import load_config  # noqa: E402
from mct_ray.context import Context  # noqa: E402

SHAPES = {  # name: (recipe, classes, resolution)
    "cifar10": ("cifar10-ipc10", 10, 32),
    "cifar100": ("cifar100-ipc10", 100, 32),
    "tinyimagenet": ("tinyimagenet-ipc10", 200, 64),
}


def measure(name: str, recipe: str, classes: int, resolution: int) -> dict:
    from mct_ray.experts import train_expert

    cfg = load_config(recipe, [
        "data.name=random", f"data.num_classes={classes}", f"data.resolution={resolution}",
        f"data.num_train={classes}", "data.num_test=10", "data.zca=false",
        "expert.keep_full=true", "expert.epochs=50", "run.progress=false"])
    line = cfg.replace(**{"expert.anchors": [], "expert.smooth_anchors": False})
    ctx = Context.build(line)
    result = train_expert(ctx.net, ctx.data, line.expert, ctx.aug, 0, 0)
    anchored = train_expert(ctx.net, ctx.data, cfg.expert, ctx.aug, 0, 0)
    mct = len(formats.save_trajectory(result.convex))
    mct_seed = len(formats.save_trajectory(result.convex, init_seed=result.init_seed))
    mct_anchors = len(formats.save_trajectory(anchored.convex))
    mtt = len(formats.save_trajectory(result.full))
    return {"shape": name, "params": ctx.spec.num_params, "epochs": cfg.expert.epochs,
            "anchors": str(list(cfg.expert.anchors)), "mtt_bytes": mtt, "mct_bytes": mct,
            "mct_seed_bytes": mct_seed, "mct_anchors_bytes": mct_anchors,
            "ratio": mct / mtt, "ratio_seed": mct_seed / mtt, "ratio_anchors": mct_anchors / mtt}


def plot(rows: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["shape"] for r in rows]
    x = range(len(rows))
    for off, key, label in ((-0.3, "mtt_bytes", "MTT (51 checkpoints)"),
                            (-0.1, "mct_bytes", "MCT (endpoints + beta)"),
                            (0.1, "mct_seed_bytes", "MCT, theta(0) as seed"),
                            (0.3, "mct_anchors_bytes", "MCT, two anchors")):
        ax.bar([i + off for i in x], [r[key] / 2**20 for r in rows], 0.2, label=label)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("MiB per expert")
    ax.set_yscale("log")
    ax.legend()
    fig.savefig(RESULTS / "storage.png", dpi=100, bbox_inches="tight")


def main() -> None:
    torch.set_num_threads(2)
    only = sys.argv[1:] or list(SHAPES)
    rows = [measure(n, *SHAPES[n]) for n in only]
    save_table("storage", rows)
    plot(rows)
    print_table(rows)
    cifar = next(r for r in rows if r["shape"] == rows[0]["shape"])
    print(f"storage_ratio_{cifar['shape']}={cifar['ratio']:.5f}")
    print(f"storage_ratio_anchors_{cifar['shape']}={cifar['ratio_anchors']:.5f}")
    print(f"storage_ratio_seed_{cifar['shape']}={cifar['ratio_seed']:.5f}")


if __name__ == "__main__":
    main()
