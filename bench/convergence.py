"""MCT against MTT on digits: accuracy against iteration on the same experts, seeds and budget.

For each seed, experts are trained once (keeping every epoch) and both methods distill from
them: MCT from the convex trajectories, MTT from the full ones (with MTT's M=2). Reports per
(method, ipc): best accuracy, iterations to come within 2 points of the run's best, and the
spread (std) of the accuracy over the second half of the run, each averaged over the seeds.

    python bench/convergence.py                 # ipc 1 and 10, seeds 0 1 2
    python bench/convergence.py --ipc 1 --seeds 0 --iterations 100
Last line: convergence_iters_ratio_mct_over_mtt=<mean MCT iterations / mean MTT iterations>.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import RESULTS, print_table, save_table  # noqa: E402

MTT_M = 2


def cell(args: tuple) -> list[dict]:
    """One (ipc, seed): train experts once, then distill with both methods."""
    ipc, seed, iterations, every, workdir = args
    import time

    import torch

    from mct_ray.config import load_config
    from mct_ray.context import Context
    from mct_ray.loop import run_distillation
    from mct_ray.context import Launch
    from mct_ray.experts import load_experts
    from mct_ray.pipeline import LocalBackend, make_distiller, train_missing_experts
    from mct_ray.records import iterations_to_within, second_half_spread
    from mct_ray.storage import Storage

    torch.set_num_threads(1)
    base = [f"distill.ipc={ipc}", f"seed={seed}", f"distill.iterations={iterations}",
            f"eval.every={every}", "expert.keep_full=true", "run.progress=false",
            "run.num_threads=1"]
    experts = Storage.open(f"{workdir}/experts-{ipc}-{seed}")
    ctx = Context.build(load_config("digits", base))
    train_missing_experts(ctx, experts, LocalBackend(ctx))
    rows = []
    for method in ("mct", "mtt"):
        over = base + [f"distill.method={method}"] + (
            [f"distill.expert_epochs={MTT_M}"] if method == "mtt" else [])
        mctx = Context.build(load_config("digits", over))
        store = Storage.open(f"{workdir}/{method}-{ipc}-{seed}")
        trajs = load_experts(experts, mctx.spec, full=method == "mtt")
        outcome = run_distillation(mctx, store, make_distiller(mctx, trajs),
                                   LocalBackend(mctx).submit_eval,
                                   Launch(experts, False, "", time.time()))
        curve = [(r.iteration, r.acc_mean) for r in outcome.rows]
        rows.append({"method": method, "ipc": ipc, "seed": seed,
                     "best_acc": max(acc for _, acc in curve),
                     "iters_to_2pts": iterations_to_within(curve),
                     "second_half_std": second_half_spread(curve),
                     "curve": curve})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for ipc in sorted({r["ipc"] for r in rows}):
        for method in ("mct", "mtt"):
            sel = [r for r in rows if r["ipc"] == ipc and r["method"] == method]
            mean = lambda k: statistics.fmean(r[k] for r in sel)
            out.append({"ipc": ipc, "method": method, "seeds": len(sel),
                        "best_acc_%": 100 * mean("best_acc"),
                        "best_acc_std_%": 100 * statistics.pstdev(r["best_acc"] for r in sel),
                        "iters_to_2pts": mean("iters_to_2pts"),
                        "second_half_std_%": 100 * mean("second_half_std")})
    return out


def plot(rows: list[dict]) -> None:
    ipcs = sorted({r["ipc"] for r in rows})
    fig, axes = plt.subplots(1, len(ipcs), figsize=(6 * len(ipcs), 4), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        for method in ("mct", "mtt"):
            curves = [r["curve"] for r in rows if r["ipc"] == ipc and r["method"] == method]
            its = [i for i, _ in curves[0]]
            mean = [100 * statistics.fmean(c[k][1] for c in curves) for k in range(len(its))]
            ax.plot(its, mean, marker=".", label=method.upper())
        ax.set_title(f"digits, ipc {ipc} (mean over seeds)")
        ax.set_xlabel("distillation iteration")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(RESULTS / "convergence.png", dpi=100, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        jobs = [(ipc, s, args.iterations, args.every, workdir)
                for ipc in args.ipc for s in args.seeds]
        with ProcessPoolExecutor(args.workers) as pool:
            rows = [r for cell_rows in pool.map(cell, jobs) for r in cell_rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    flat = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    save_table("convergence_runs", flat)
    save_table("convergence_curves", [
        {"method": r["method"], "ipc": r["ipc"], "seed": r["seed"], "iteration": i, "acc": a}
        for r in rows for i, a in r["curve"]])
    table = summarise(rows)
    save_table("convergence", table)
    plot(rows)
    print_table(flat)
    print()
    print_table(table)
    mct = statistics.fmean(r["iters_to_2pts"] for r in rows if r["method"] == "mct")
    mtt = statistics.fmean(r["iters_to_2pts"] for r in rows if r["method"] == "mtt")
    print(f"convergence_iters_ratio_mct_over_mtt={mct / mtt if mtt else float('inf'):.4f}")


if __name__ == "__main__":
    main()
