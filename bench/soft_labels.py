"""Fashion-MNIST: what soft labels add to MCT, apart from what the images add.

Hard labels against the MCT authors' teacher labels and DATM's learned labels (with and
without DATM's window of start epochs), from the same experts and the same starting images
(the seed's draw, unfiltered, so the labels alone differ), and DATM's whole recipe
(`datm`: learned labels, the window, starting images the experts get right), 3 seeds, on
`bench.fashion`'s reduced protocol (its data subset, experts and segment settings). Each
run's best set (by its evaluations) is also trained with hard labels on the same networks:
the images' own score.

    python -m bench.soft_labels                    # reduced protocol, ipc 10 and 1
    python -m bench.soft_labels --ipc 10           # one part
    python -m bench.soft_labels --ipc 10 --variants datm \\
        --with bench/results/soft_labels_reduced_ipc10.parquet   # one more variant, summarised
    python -m bench.soft_labels --protocol tiny    # seconds (the tests)
    python -m bench.soft_labels --summarise bench/results/soft_labels_reduced_ipc1.parquet
                                                   # a saved run's curves and table, re-printed

Writes bench/results/soft_labels_<protocol>.parquet (a row per evaluation), .png and
_summary.parquet; last line fashion_soft_minus_hard_ipc10=<points: per seed, the best
soft-label variant minus hard, best accuracy, mean over seeds>.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bench import fashion  # noqa: E402
from bench.common import RESULTS, print_table, save_table  # noqa: E402
from mct_ray.config import load_config  # noqa: E402
from mct_ray.distill import teacher_labels  # noqa: E402
from mct_ray.evaluate import evaluate  # noqa: E402
from mct_ray.nets import Network  # noqa: E402
from mct_ray.rng import generator  # noqa: E402
from mct_ray.starting import final_network  # noqa: E402
from mct_ray.synthetic import SyntheticSet, draw_correct_indices, init_synthetic  # noqa: E402

# (label, overrides); the window grows from the first start epoch to the protocol's max
# over half the iterations (DATM grows it over a fifth to a third of theirs). `datm` is
# DATM's whole recipe: learned labels, the window, and starting images the experts' final
# networks classify correctly (the seed's draw in the same order, each image an expert gets
# wrong replaced by the next it gets right), so its labels never start against the class.
VARIANTS = (("hard", []), ("teacher", ["distill.labels=teacher"]),
            ("learned", ["distill.labels=learned"]),
            ("learned + window", ["distill.labels=learned", "WINDOW"]),
            ("datm", ["distill.labels=learned", "WINDOW", "distill.init_filter=correct"]))

# What each protocol adds to bench.fashion's protocol of the same name, per ipc.
PLANS = {
    "reduced": {10: {"seeds": [0, 1, 2], "iterations": 50, "every": 25,
                     "over": ["eval.epochs=200", "eval.num_eval=1", "distill.batch_syn=20"]},
                1: {"seeds": [0, 1, 2], "iterations": 100, "every": 20,
                    "over": ["eval.epochs=300", "eval.num_eval=1"]}},
    "tiny": {1: {"seeds": [0, 1], "iterations": 2, "every": 1,
                 "over": ["eval.epochs=2", "eval.num_eval=1"]}},
}


def teacher_accuracy(cfg, spec, data, experts, images, labels
                     ) -> tuple[list[float], float, torch.Tensor]:
    """What the soft labels can know: each expert's network at max_start_epoch (the
    teacher of `teacher` labels) scored on the test set, how often the teachers' labels
    (mean softmax) name the class of the starting images, and those labels."""
    accs, probs = [], 0
    for e in experts:
        on_test = teacher_labels(Network(spec), e.convex, cfg.distill.max_start_epoch,
                                 data.test_x)
        accs.append(float((on_test.argmax(1) == data.test_y).float().mean()))
        probs = probs + teacher_labels(Network(spec), e.convex,
                                       cfg.distill.max_start_epoch, images)
    probs = probs / len(experts)
    return accs, float((probs.argmax(1) == labels).float().mean()), probs


def correct_images(cfg, spec, data, experts, seed, device):
    """The seed's starting images through DATM's filter (`distill.init_filter=correct`, as
    `mct_ray.starting` applies it), drawn in the same order as the unfiltered ones."""
    ctx = types.SimpleNamespace(spec=spec, data=data, device=device,
                                net=Network(spec, device))
    idx = draw_correct_indices(data.train_y, data.num_classes, cfg.distill.ipc,
                               generator(seed, "synthetic-init"),
                               [final_network(ctx, e.convex) for e in experts])
    return data.train_x[idx].clone(), data.train_y[idx].clone()


def window(iterations: int) -> str:
    return f"distill.start_window=[0,1,{max(1, iterations // 2)}]"


def run(protocol: str, device: str, data_root: str | None, only_ipc: list[int] | None,
        variants: tuple) -> list[dict]:
    common, data, spec, aug, experts = fashion.prepare(protocol, device, data_root)
    rows = []
    for ipc, plan in PLANS[protocol].items():
        if only_ipc and ipc not in only_ipc:
            continue
        base = [*common, f"distill.iterations={plan['iterations']}", *plan["over"],
                "distill.method=mct"]
        recipe = f"fashion-mnist-ipc{ipc}"
        ipc_cfg = load_config(recipe, base)
        for seed in plan["seeds"]:
            images, labels = init_synthetic(data.train_x, data.train_y, data.num_classes, ipc,
                                            generator(seed, "synthetic-init"))
            start = SyntheticSet(images, labels, ipc_cfg.distill.lr_teacher, {"iteration": 0})
            init = evaluate(ipc_cfg.replace(seed=seed), Network(spec, device), data, start).mean
            print(f"ipc {ipc} seed {seed}: random real images {100 * init:.2f} %", flush=True)
            accs, agree, soft = teacher_accuracy(ipc_cfg, spec, data, experts, images, labels)
            taught = evaluate(ipc_cfg.replace(seed=seed), Network(spec, device), data,
                              SyntheticSet(images, soft, ipc_cfg.distill.lr_teacher,
                                           {"iteration": 0}, labels)).mean
            print(f"  the teachers (experts at epoch {ipc_cfg.distill.max_start_epoch:g}): "
                  f"test accuracy {[round(100 * a, 1) for a in accs]} %, their labels name the "
                  f"class of {100 * agree:.1f} % of the starting images, which score "
                  f"{100 * taught:.2f} % with those labels", flush=True)
            for label, over in variants:
                over = [window(plan["iterations"]) if o == "WINDOW" else o
                        for o in over]
                cfg = load_config(recipe, [*base, *over]).replace(seed=seed)
                print(f"ipc {ipc} seed {seed}: {label}", flush=True)
                x, y, first, acc0 = images, labels, start, init
                if cfg.distill.init_filter == "correct":
                    x, y = correct_images(cfg, spec, data, experts, seed, device)
                    first = SyntheticSet(x, y, cfg.distill.lr_teacher, {"iteration": 0})
                    acc0 = evaluate(cfg, Network(spec, device), data, first).mean
                    kept = sum(any(torch.equal(a, b) for b in images) for a in x)
                    print(f"  {len(x) - kept} of the starting images replaced by images the "
                          f"experts get right: {100 * acc0:.2f} %", flush=True)
                curve, best = fashion.distill_curve(cfg, spec, data, experts, x, y, aug, seed,
                                                    plan["every"], acc0, device)
                best = best or first
                hard = evaluate(cfg, Network(spec, device), data, best.hard()).mean
                print(f"  best (iteration {best.iteration}) with hard labels: "
                      f"{100 * hard:.2f} %", flush=True)
                rows += [{"ipc": ipc, "seed": seed, "variant": label, "hard_of_best": hard,
                          **r} for r in curve]
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (ipc, variant): best accuracy (mean +- std over seeds), the best images' score with
    hard labels, and best minus hard's best per seed."""
    best: dict = {}  # (ipc, variant, seed) -> the run's best row (the first, on ties)
    for r in rows:
        key = (r["ipc"], r["variant"], r["seed"])
        if key not in best or r["acc_mean"] > best[key]["acc_mean"]:
            best[key] = r
    out = []
    for ipc, variant in dict.fromkeys((k[0], k[1]) for k in best):
        seeds = [k[2] for k in best if k[:2] == (ipc, variant)]
        accs = [100 * best[(ipc, variant, s)]["acc_mean"] for s in seeds]
        hard = [100 * best[(ipc, variant, s)]["hard_of_best"] for s in seeds]
        diff = [100 * (best[(ipc, variant, s)]["acc_mean"] - best[(ipc, "hard", s)]["acc_mean"])
                for s in seeds if (ipc, "hard", s) in best]
        sd = lambda v: statistics.pstdev(v) if len(v) > 1 else 0.0  # noqa: E731
        out.append({"ipc": ipc, "variant": variant, "seeds": len(seeds),
                    "best": statistics.fmean(accs), "best_std": sd(accs),
                    "best_images_with_hard_labels": statistics.fmean(hard),
                    "minus_hard": statistics.fmean(diff) if diff else float("nan"),
                    "minus_hard_std": sd(diff)})
    return out


def soft_minus_hard(rows: list[dict], ipc: int) -> float:
    """Per seed, the best soft-label variant's best accuracy minus hard's; mean."""
    best: dict = {}
    for r in rows:
        if r["ipc"] == ipc:
            key = (r["variant"], r["seed"])
            best[key] = max(best.get(key, 0.0), r["acc_mean"])
    seeds = sorted({s for (v, s) in best if v == "hard"})
    return statistics.fmean(
        100 * (max(a for (v, t), a in best.items() if t == s and v != "hard") - best[("hard", s)])
        for s in seeds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=sorted(PLANS), default="reduced")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=None, help="results folder (default: bench/results)")
    parser.add_argument("--ipc", type=int, nargs="*", help="only these ipc of the protocol")
    parser.add_argument("--variants", nargs="*", choices=[v[0] for v in VARIANTS])
    parser.add_argument("--with", dest="earlier", nargs="*", default=[], metavar="PARQUET",
                        help="rows of earlier runs of this protocol (other variants: the "
                        "experts and starting images are the same) summarised with this run's")
    parser.add_argument("--summarise", nargs="*", default=[], metavar="PARQUET",
                        help="print the curves, table and last line of saved runs' rows; "
                        "nothing runs, nothing is written")
    args = parser.parse_args(argv)
    if args.summarise:
        rows = [r for f in args.summarise for r in pq.read_table(f).to_pylist()]
        print_curves(rows)
        report(rows)
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    variants = tuple(v for v in VARIANTS if not args.variants or v[0] in args.variants)
    rows = run(args.protocol, args.device, args.data_root, args.ipc, variants)
    out = pathlib.Path(args.out) if args.out else RESULTS
    name = f"soft_labels_{args.protocol}" + (f"_ipc{'-'.join(map(str, args.ipc))}"
                                              if args.ipc else "") + \
        ("".join(f"_{v[0]}" for v in variants).replace(" + ", "-") if args.variants else "")
    save_table(name, rows, out)  # this run's own rows
    if args.earlier:
        rows = [r for f in args.earlier for r in pq.read_table(f).to_pylist()] + rows
        name += "_combined"
    save_table(f"{name}_summary", summarise(rows), out)
    drawn = {r["variant"] for r in rows}
    fashion.plot(rows, out / f"{name}.png", [v[0] for v in VARIANTS if v[0] in drawn])
    print(f"wall time {time.perf_counter() - started:.0f} s")
    report(rows)
    return 0


def report(rows: list[dict]) -> None:
    """The summary table and the last line."""
    print_table(summarise(rows))
    ipcs = sorted({r["ipc"] for r in rows})
    labels = {r["variant"] for r in rows}
    if {"hard"} < labels:
        ipc = 10 if 10 in ipcs else ipcs[0]
        print(f"fashion_soft_minus_hard_ipc{ipc}={soft_minus_hard(rows, ipc):.2f}")


def print_curves(rows: list[dict]) -> None:
    """Each run's evaluations as the run prints them, from its rows."""
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["ipc"], r["seed"], r["variant"]), []).append(r)
    for (ipc, seed, variant), curve in runs.items():
        print(f"ipc {ipc} seed {seed}: {variant}")
        for r in sorted(curve, key=lambda r: r["iteration"]):
            print(f"  it {r['iteration']}: {100 * r['acc_mean']:.2f} %")
        best = max(curve, key=lambda r: (r["acc_mean"], -r["iteration"]))
        print(f"  best (iteration {best['iteration']}) with hard labels: "
              f"{100 * best['hard_of_best']:.2f} %")


if __name__ == "__main__":
    sys.exit(main())
