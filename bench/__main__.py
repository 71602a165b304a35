"""python -m bench: every benchmark that fits on a CPU in under 20 minutes, one summary.

Each benchmark runs in its own process (`python -m bench.<name> <suite args>`), one after
the other so that they do not compete for the cores; every `name=value` line it prints is
collected (its last line is its headline). The suite runs some of them at a reduced setting
to fit the budget: the `setting` column says which, and `--full` runs each at its own
defaults instead. Missing scripts are listed as such (the Ray benchmarks live beside these).
Logs go to bench/results/logs/, the summary to bench/results/summary.{parquet,png}.

    python -m bench                    # the whole suite (CPU, under 20 minutes)
    python -m bench --only unroll_speed storage
"""

from __future__ import annotations

import argparse
import dataclasses
import operator
import pathlib
import re
import subprocess
import sys
import time

from bench.common import RESULTS, print_table, save_table

HERE = pathlib.Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Bench:
    name: str
    suite_args: tuple[str, ...] = ()
    setting: str = "defaults"


# In running order. The reduced settings keep what each target is about and shrink repeats.
SUITE = (
    Bench("storage"),
    # A full warm-up round stays: the first touch of ~9 GB of fresh pages would otherwise
    # land on whichever mode runs first (a 2-step warm-up gave 2.4x against 1.8x).
    Bench("unroll_speed", ("--repeats", "1", "--modes", "unroll", "checkpoint", "tesla",
                           "--memory", "rss", "--memory-modes", "unroll", "checkpoint", "tesla"),
          "CIFAR-10 shape, ipc 10, N=30; 1 timed round after a warm-up round, no "
          "checkpoint-sqrt, resident-set memory only (default: 5 rounds, every mode, rss+alloc)"),
    Bench("convergence", ("--iterations", "30", "--every", "5"),
          "digits, ipc 1 and 10, 3 seeds, 30 iterations, eval every 5 (default 150 / 10)"),
    Bench("expert_scaling"),
    Bench("eval_overlap", ("--rounds", "2"), "2 rounds of off/on (default 3)"),
    Bench("distiller_memory", ("--rounds", "2"), "2 rounds (default 3)"),
)

# metric: (comparison, target, issue)
TARGETS = {
    "storage_ratio_seed_cifar10": ("<=", 0.021, 5),
    "unroll_speedup_vs_reference": (">=", 1.5, 5),
    "checkpoint_rss_vs_unroll": ("<=", 0.35, 5),
    "checkpoint_alloc_vs_unroll": ("<=", 0.35, 5),
    "tesla_rss_vs_unroll": ("<=", 0.15, 5),
    "tesla_alloc_vs_unroll": ("<=", 0.15, 5),
    "convergence_iters_ratio_mct_over_mtt": ("<=", 0.5, 5),
    "expert_scaling_2v1": (">=", 1.7, 3),
    "eval_overlap_ratio": (">=", 0.9, 3),
    "distiller_rss_32v8": ("<=", 1.10, 3),
}
_OPS = {"<=": operator.le, ">=": operator.ge}
_METRIC = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(-?[0-9.eE+-]+|inf|nan)$")


def run_one(bench: Bench, full: bool, timeout: float) -> tuple[dict[str, float], str, float]:
    """Run one benchmark; returns (metrics it printed, status, seconds)."""
    if not (HERE / f"{bench.name}.py").exists():
        return {}, "missing", 0.0
    cmd = [sys.executable, "-m", f"bench.{bench.name}", *(() if full else bench.suite_args)]
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(logs / f"{bench.name}.log", "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=HERE.parent, stdout=subprocess.PIPE, stderr=log,
                                  text=True, timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            return {}, f"timeout ({timeout:.0f} s left)", time.perf_counter() - t0
        log.write(proc.stdout)
    seconds = time.perf_counter() - t0
    print(proc.stdout, end="", flush=True)
    metrics = {}
    for line in proc.stdout.splitlines():
        match = _METRIC.match(line.strip())
        if match:
            metrics[match.group(1)] = float(match.group(2))
    status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    return metrics, status, seconds


def summarise(results: list[tuple[Bench, dict, str, float]], full: bool) -> list[dict]:
    rows = []
    for bench, metrics, status, seconds in results:
        names = [m for m in metrics if m in TARGETS] or list(metrics)[-1:] or [None]
        for name in names:
            value = metrics.get(name, float("nan"))
            op, target, issue = TARGETS.get(name, ("", float("nan"), 0))
            verdict = ("pass" if _OPS[op](value, target) else "FAIL") if op and \
                status == "ok" else ("-" if status == "ok" else status)
            rows.append({"bench": bench.name, "metric": name or "-", "value": value,
                         "target": f"{op} {target:g}" if op else "-", "result": verdict,
                         "issue": issue, "seconds": round(seconds, 1),
                         "setting": "defaults" if full else bench.setting})
    return rows


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["target"] != "-" and r["value"] == r["value"]]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(shown) + 1))
    # Each value as a fraction of its target (<= targets inverted): 1 is the line to meet.
    def score(r: dict) -> float:
        op, target, _ = TARGETS[r["metric"]]
        if op == ">=":
            return r["value"] / target
        return target / r["value"] if r["value"] else float("inf")
    colours = ["#2a6" if r["result"] == "pass" else "#c33" for r in shown]
    ax.barh([r["metric"] for r in shown], [score(r) for r in shown], color=colours)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("value relative to target (>= 1 meets it)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(RESULTS / "summary.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[b.name for b in SUITE])
    parser.add_argument("--full", action="store_true", help="each benchmark's own defaults")
    parser.add_argument("--budget-min", type=float, default=20.0)
    args = parser.parse_args()
    start = time.perf_counter()
    results = []
    for bench in SUITE:
        if args.only and bench.name not in args.only:
            continue
        left = args.budget_min * 60 - (time.perf_counter() - start)
        print(f"== {bench.name} ({left / 60:.1f} min of the budget left)", flush=True)
        results.append((bench, *run_one(bench, args.full, left)))
    rows = summarise(results, args.full)
    save_table("summary", rows)
    plot(rows)
    total = time.perf_counter() - start
    print(f"\n== summary ({total / 60:.1f} min; GPU figures: not measured by this suite)")
    print_table([{k: r[k] for k in ("bench", "metric", "value", "target", "result",
                                    "seconds")} for r in rows])
    for bench, setting in dict.fromkeys((r["bench"], r["setting"]) for r in rows):
        if setting != "defaults":
            print(f"  {bench}: {setting}")
    passed = sum(r["result"] == "pass" for r in rows)
    judged = sum(r["result"] in ("pass", "FAIL") for r in rows)
    print(f"bench_targets_met={passed}/{judged}")


if __name__ == "__main__":
    main()
