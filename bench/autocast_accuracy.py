"""The accuracy effect of `distill.autocast=bf16`: the digits main job distilled with the
student's forward in float32 and under bf16 autocast, from the same experts, per seed.

The option is meant for GPUs; on this CPU PyTorch's autocast runs the convolutions and
matmuls in bfloat16 with float32 accumulation, as on a GPU's tensor cores. The figure is the
effect of bf16 rounding in the unroll on the distilled set's accuracy (evaluation is float32
either way); it is not a GPU measurement, and its seconds are this CPU's. Last line:
bf16_best_acc_delta_points=<mean over seeds of (bf16 best - float32 best), in points>.

    python -m bench.autocast_accuracy [--seeds 0 1] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile

from bench.common import RESULTS, print_table, save_table
from mct_ray.cli import main as cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        experts = f"{tmp}/experts"
        if cli(["experts", "--local", "--out", experts, *args.overrides]):
            raise SystemExit("expert training failed")
        for seed in args.seeds:
            for autocast in ("none", "bf16"):
                out = f"{tmp}/{autocast}-{seed}"
                code = cli(["distill", "--local", "--out", out, "--experts", experts,
                            f"seed={seed}", f"distill.autocast={autocast}", *args.overrides])
                if code:
                    raise SystemExit(f"distill seed {seed} autocast {autocast}: exit {code}")
                s = json.loads(pathlib.Path(out, "summary.json").read_text())
                rows.append({"seed": seed, "autocast": autocast,
                             "best_acc_%": 100 * s["best_acc_mean"],
                             "final_acc_%": 100 * s["final_acc_mean"],
                             "best_iteration": s["best_iteration"],
                             "wall_s": s["wall_seconds"]})
    print_table(rows)
    save_table("autocast_accuracy", rows)
    plot(rows)
    delta = [b["best_acc_%"] - a["best_acc_%"] for a, b in zip(rows[::2], rows[1::2])]
    print(f"bf16 - float32 best accuracy per seed (points): "
          + ", ".join(f"{d:+.2f}" for d in delta))
    print(f"bf16_best_acc_delta_points={statistics.mean(delta):.3f}")


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in rows})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k, autocast in enumerate(("none", "bf16")):
        acc = [next(r["best_acc_%"] for r in rows if r["seed"] == s and r["autocast"] ==
                    autocast) for s in seeds]
        ax.bar([i + 0.4 * k for i in range(len(seeds))], acc, 0.4,
               label="float32" if autocast == "none" else "bf16 autocast")
    ax.set_xticks([i + 0.2 for i in range(len(seeds))], [f"seed {s}" for s in seeds])
    ax.set_ylabel("best test accuracy (%)")
    ax.set_ylim(min(r["best_acc_%"] for r in rows) - 5, 100)
    ax.set_title("digits, ipc 1: student unroll in float32 vs bf16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "autocast_accuracy.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
