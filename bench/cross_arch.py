"""Cross-architecture table: synthetic sets distilled with the ConvNet, then trained on
ConvNet, ResNet-18, VGG-11 and AlexNet, with random real images beside them (the MTT and
MCT papers' cross-architecture tables), on the digits recipe at ipc 1.

The experts are trained once (full trajectories kept, so MCT and MTT share them); each
(method, seed) distils with its recipe preset, and at the end its best set (picked by the
ConvNet's evaluations) and the random-real baseline are scored on every architecture
(eval.models with eval.models_at=best: the papers' cross-architecture protocol, and a
quarter of the cost of scoring every evaluation point), eval.num_eval networks each. One process, no Ray. Prints a table (mean +- std over seeds, in percent)
and writes bench/results/cross_arch.parquet; last line cross_arch_mct_resnet18=<mean>.

    python -m bench.cross_arch [--seeds 0 1 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from bench.common import print_table, save_table
from mct_ray.cli import main as cli

MODELS = ("convnet", "resnet18", "vgg11", "alexnet")


def cell(values: list[float]) -> str:
    pct = [100 * v for v in values]
    spread = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{statistics.fmean(pct):.2f} +- {spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*", help="config overrides for every run "
                        "(after --seeds ..., or before it)")
    args, extra = parser.parse_known_args()
    args.overrides = [*args.overrides, *extra]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--local", "distill.ipc=1", f"eval.models=[{','.join(MODELS)}]",
                  "eval.models_at=best",
                  "run.progress=false", *args.overrides]
        if cli(["experts", "--out", f"{tmp}/experts", "expert.keep_full=true",
                *common]) != 0:
            raise SystemExit("experts failed")
        rows = []
        for method in ("mct", "mtt"):
            for seed in args.seeds:
                out = f"{tmp}/{method}-{seed}"
                code = cli(["distill", "--out", out, "--experts", f"{tmp}/experts",
                            f"distill.method={method}", f"seed={seed}", *common])
                if code != 0:
                    raise SystemExit(f"{method} seed {seed}: exit {code}")
                summary = json.load(open(f"{out}/summary.json"))
                for model, m in summary["models"].items():
                    rows.append({"method": method, "seed": seed, "model": model,
                                 "acc_mean": m["acc_mean"], "acc_std": m["acc_std"],
                                 "random_acc_mean": m["random_acc_mean"],
                                 "best_iteration": summary["best_iteration"]})
    save_table("cross_arch", rows)
    table = []
    for model in MODELS:
        pick = lambda method, key: [r[key] for r in rows  # noqa: E731
                                    if r["model"] == model and r["method"] == method]
        table.append({"architecture": model,
                      "random real": cell(pick("mct", "random_acc_mean")),
                      "MTT": cell(pick("mtt", "acc_mean")), "MCT": cell(pick("mct", "acc_mean"))})
    print(f"digits, ipc 1, seeds {args.seeds}, best set of each run (by ConvNet evaluation) "
          f"trained on each architecture; {time.perf_counter() - started:.0f} s, "
          f"{time.strftime('%Y-%m-%d')}")
    print_table(table)
    mct_resnet = statistics.fmean(r["acc_mean"] for r in rows
                                  if r["model"] == "resnet18" and r["method"] == "mct")
    print(f"cross_arch_mct_resnet18={100 * mct_resnet:.2f}")


if __name__ == "__main__":
    main()
