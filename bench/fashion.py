"""Fashion-MNIST: MCT (the preset's exact gradient, the authors' TESLA-style one) against MTT
and random real images.

One set of experts (every epoch kept) serves every method; for each (ipc, seed) the synthetic
set starts from the same real images (its iteration-0 evaluation is the "random real images"
baseline) and the same evaluation networks score every method at the same iteration.

The reduced protocol fits in about an hour on a 2-core CPU; `PROTOCOLS["reduced"]` lists
every way it differs from the recipe (`fashion-mnist-ipc*`), and the table and the README quote it. The
full protocol (`--protocol full`) runs the recipes unchanged: for a GPU.

    python bench/fashion.py                        # reduced protocol, CPU, ~1 hour
    python bench/fashion.py --protocol full --device cuda --threads 8
    python bench/fashion.py --protocol long        # 10-epoch experts, smoothed anchors, N=20
    python bench/fashion.py --protocol tiny        # a seconds-long smoke run (the tests)
    python bench/fashion.py --ipc 10 --iterations 150 --variants mct-tesla   # one part, longer
    python bench/fashion.py --ipc 1 --models resnet18 vgg11 alexnet   # cross-architecture
    python bench/fashion.py --protocol long --combine seed0.log seed1-2.parquet  # pieces
With --models, each run's best set (by the ConvNet's evaluations) and the initial random real
images are also trained on each listed architecture (eval.num_eval networks of the
protocol); the table is written to <name>_cross.parquet.
Writes bench/results/fashion_<protocol>.parquet (one row per evaluation) and .png; last line
fashion_mct_ipc1_best=<mean over seeds of the MCT preset's best, percent>.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script

import torch  # noqa: E402

from bench.common import RESULTS, print_table, save_table  # noqa: E402
from mct_ray import zoo  # noqa: E402
from mct_ray.augment import Augmenter  # noqa: E402
from mct_ray.config import load_config  # noqa: E402
from mct_ray.data import ImageData, load_data  # noqa: E402
from mct_ray.distill import Distiller  # noqa: E402
from mct_ray.evaluate import evaluate  # noqa: E402
from mct_ray.experts import train_expert  # noqa: E402
from mct_ray.nets import Network, make_spec  # noqa: E402
from mct_ray.records import iterations_to_within, second_half_spread  # noqa: E402
from mct_ray.rng import generator  # noqa: E402
from mct_ray.synthetic import SyntheticSet, init_synthetic  # noqa: E402

# (label, distill.method, distill.grad_mode or None for the recipe's own, overrides...).
# The MCT preset for Fashion-MNIST takes the exact gradient of the matching loss (it
# reproduces the authors' accuracy here); the authors' own gradient (TESLA-style, half the
# image gradient) and MTT with its exact unroll beside it.
PRESET = ("MCT (preset: exact grad.)", "mct", None)
AUTHORS = ("MCT (TESLA grad.)", "mct", "tesla", "distill.image_grad_scale=0.5")
MTT = ("MTT", "mtt", "unroll")
# Not run by default: the exact gradient as an unroll (the preset's value, without
# checkpoints), and the TESLA-style gradient with the images' full gradient (the factor 2
# the authors' code drops kept), as the MCT presets ran it before they followed the code.
UNROLL = ("MCT (exact)", "mct", "unroll", "distill.image_grad_scale=1")
FULL_IMAGE_GRAD = ("MCT (TESLA, x2 image grad.)", "mct", "tesla", "distill.image_grad_scale=1")
SHORT = {"mct": PRESET, "mct-tesla": AUTHORS, "mtt": MTT, "mct-exact": UNROLL,
         "mct-tesla-x2": FULL_IMAGE_GRAD}

# What each protocol changes from the recipes. Both methods use the same segment settings
# (N, M, max start) in the reduced protocols, so the comparison is of the method alone.
PROTOCOLS = {
    "reduced": {
        "train_per_class": 300,  # 3,000 training images (of 60,000)
        "test_per_class": 200,  # curves scored on 2,000 test images (of 10,000)
        # the paper's waypoints 6 and 25 of 50 epochs, scaled to 5 epochs and rounded
        "experts": ["expert.num_experts=4", "expert.epochs=5", "expert.batch=64",
                    "expert.anchors=[1,3]"],
        "segment": ["distill.syn_steps=10", "distill.expert_epochs=2",
                    "distill.max_start_epoch=3"],
        "ipc": {1: {"seeds": [0, 1, 2], "iterations": 100, "every": 20,
                    "over": ["eval.epochs=300", "eval.num_eval=1"]},
                10: {"seeds": [0], "iterations": 50, "every": 25,
                     "over": ["eval.epochs=200", "eval.num_eval=1", "distill.batch_syn=20"]}},
        "variants": (PRESET, AUTHORS, MTT),
    },
    "long": {  # the check of the authors' code against ours: longer experts, smoothed
        # anchors every 3 epochs (their compression script's 4 waypoints of 10 epochs)
        "train_per_class": 600,  # 6,000 training images
        "test_per_class": 0,  # the full test set
        "experts": ["expert.num_experts=3", "expert.epochs=10", "expert.anchors=[3,6,9]",
                    "expert.smooth_anchors=true"],
        "segment": ["distill.syn_steps=20", "distill.expert_epochs=2",
                    "distill.max_start_epoch=5", "distill.lr_img=100", "distill.lr_lr=1e-5"],
        "ipc": {1: {"seeds": [0, 1, 2], "iterations": 200, "every": 25,
                    "over": ["eval.epochs=300", "eval.num_eval=2"]}},
        # the preset (the exact gradient) and MTT: 90 minutes on 2 cores; the authors'
        # gradient beside them with --variants mct mct-tesla mtt (2 hours)
        "variants": (PRESET, MTT),
    },
    "full": {
        "train_per_class": 0, "test_per_class": 0, "experts": [], "segment": [],
        "ipc": {ipc: {"seeds": [0, 1, 2], "iterations": 5000, "every": 100, "over": []}
                for ipc in (1, 10, 50)},
        "variants": (PRESET, AUTHORS, MTT),
    },
    "tiny": {  # a smoke run for the tests: every code path, seconds
        "train_per_class": 5, "test_per_class": 5,
        "experts": ["expert.num_experts=1", "expert.epochs=3", "expert.batch=16",
                    "expert.anchors=[1]", "net.width=8"],
        "segment": ["distill.syn_steps=2", "distill.expert_epochs=1",
                    "distill.max_start_epoch=2"],
        "ipc": {1: {"seeds": [0, 1], "iterations": 2, "every": 1,
                    "over": ["eval.epochs=2", "eval.num_eval=1"]}},
        "variants": (PRESET, AUTHORS, MTT),
    },
}


RANDOM_DRAWS = "Random real (draws)"
NUM_RANDOM_DRAWS = 10


def per_class(x: torch.Tensor, y: torch.Tensor, n: int, gen: torch.Generator):
    """n random examples of every class (all of them when n is 0)."""
    if not n:
        return x, y
    idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()),
                                                                     generator=gen)[:n]]
                     for c in range(int(y.max()) + 1)])
    return x[idx], y[idx]


def subset(data: ImageData, proto: dict) -> ImageData:
    tx, ty = per_class(data.train_x, data.train_y, proto["train_per_class"],
                       generator(0, "bench-train-subset"))
    vx, vy = per_class(data.test_x, data.test_y, proto["test_per_class"],
                       generator(0, "bench-test-subset"))
    return dataclasses.replace(data, train_x=tx, train_y=ty, test_x=vx, test_y=vy)


def distill_curve(cfg, spec, data, experts, images, labels, aug, seed, every, init_acc,
                  device) -> list[dict]:
    cfg = cfg.replace(seed=seed)  # the distillation's draws and the evaluation networks
    trajectories = [e.full if cfg.needs_full else e.convex for e in experts]
    net = Network(spec, device)
    distiller = Distiller(net, trajectories, images, labels, cfg.distill, aug, seed)
    rows = [{"iteration": 0, "acc_mean": init_acc, "seconds": 0.0}]
    best, best_acc = None, init_acc  # the best set by the ConvNet (None: the initial one)
    started = time.perf_counter()
    for it in range(1, cfg.distill.iterations + 1):
        distiller.step()
        if it % every == 0:
            seconds = time.perf_counter() - started
            syn = distiller.snapshot()  # its iteration is `it`: seeds the evaluation
            res = evaluate(cfg, net, data, syn)
            lr = syn.step_size
            rows.append({"iteration": it, "acc_mean": res.mean, "seconds": seconds,
                         "step_size": lr})
            if res.mean > best_acc:
                best, best_acc = syn, res.mean
            print(f"  it {it}: {100 * res.mean:.2f} %  step {lr:.4g}", flush=True)
            started = time.perf_counter() - seconds  # evaluation time is not distillation's
    return rows, best


def prepare(protocol: str, device: str, data_root: str | None):
    """The protocol's shared part: its common overrides, the data subset, the network, the
    augmentation and the experts (every epoch kept), which every method distils from."""
    proto = PROTOCOLS[protocol]
    common = ["run.progress=false", "expert.keep_full=true", *proto["experts"],
              *proto["segment"]] + ([f"data.root={data_root}"] if data_root else [])
    cfg0 = load_config("fashion-mnist", common)  # data, network and experts: shared by all
    t0 = time.perf_counter()
    data = subset(load_data(cfg0.data), proto)
    spec = make_spec(cfg0.net, data.shape, data.num_classes)
    aug = Augmenter(cfg0.augment)
    experts = [train_expert(Network(spec, device), data, cfg0.expert, aug, 0, i)
               for i in range(cfg0.expert.num_experts)]
    print(f"{len(experts)} experts in {time.perf_counter() - t0:.0f} s, test accuracy "
          f"{[round(100 * e.test_acc, 1) for e in experts]} %", flush=True)
    return common, data, spec, aug, experts


def run(protocol: str, device: str, data_root: str | None, only_ipc: list[int] | None = None,
        iterations: int | None = None, variants: tuple | None = None, models: tuple = (),
        seeds: list[int] | None = None) -> tuple[list[dict], list[dict]]:
    proto = PROTOCOLS[protocol]
    variants = variants or proto["variants"]
    common, data, spec, aug, experts = prepare(protocol, device, data_root)
    rows: list[dict] = []
    cross: list[dict] = []  # with `models`: the best sets on other architectures
    for ipc, plan in proto["ipc"].items():
        if only_ipc and ipc not in only_ipc:
            continue
        base = [*common, f"distill.iterations={iterations or plan['iterations']}",
                *plan["over"]]
        recipe = f"fashion-mnist-ipc{ipc}"
        ipc_cfg = load_config(recipe, base)  # evaluation settings of this ipc
        for draw in range(NUM_RANDOM_DRAWS):  # the baseline's spread: one draw moves a lot
            images, labels = init_synthetic(data.train_x, data.train_y, data.num_classes, ipc,
                                            generator(draw, "random-real-draw"))
            syn = SyntheticSet(images, labels, ipc_cfg.distill.lr_teacher, {"iteration": 0})
            acc = evaluate(ipc_cfg.replace(seed=draw), Network(spec, device), data, syn).mean
            rows.append({"ipc": ipc, "seed": draw, "variant": RANDOM_DRAWS, "iteration": 0,
                         "acc_mean": acc, "seconds": 0.0})
        for seed in (seeds or plan["seeds"]):
            images, labels = init_synthetic(data.train_x, data.train_y, data.num_classes, ipc,
                                            generator(seed, "synthetic-init"))
            start = SyntheticSet(images, labels, ipc_cfg.distill.lr_teacher, {"iteration": 0})
            init = evaluate(ipc_cfg.replace(seed=seed), Network(spec, device), data, start).mean
            print(f"ipc {ipc} seed {seed}: random real images {100 * init:.2f} %", flush=True)
            cross += score_on(models, ipc_cfg.replace(seed=seed), spec, data, start, device,
                              ipc=ipc, seed=seed, variant="Random real")
            for label, method, mode, *extra in variants:
                cfg = load_config(recipe, [*base, f"distill.method={method}", *extra] +
                                  ([f"distill.grad_mode={mode}"] if mode else []))
                print(f"ipc {ipc} seed {seed}: {label}", flush=True)
                curve, best = distill_curve(cfg, spec, data, experts, images, labels, aug,
                                            seed, plan["every"], init, device)
                rows += [{"ipc": ipc, "seed": seed, "variant": label, **r} for r in curve]
                cross += score_on(models, cfg.replace(seed=seed), spec, data, best or start,
                                  device, ipc=ipc, seed=seed, variant=label)
    return rows, cross


def score_on(models: tuple, cfg, spec, data, syn, device, **row) -> list[dict]:
    """`syn` trained on each architecture of `models` (eval.num_eval networks each)."""
    out = []
    for model in models:
        res = evaluate(cfg, Network(spec, device), data, syn, "final", model=model)
        print(f"  {row['variant']} (iteration {syn.iteration}) on {model}: "
              f"{100 * res.mean:.2f} %", flush=True)
        out.append({**row, "model": model, "iteration": syn.iteration, "acc_mean": res.mean})
    return out


def cross_table(cross: list[dict]) -> list[dict]:
    """A row per (ipc, architecture); a column per variant: mean +- std over seeds (%)."""
    out = []
    for ipc, model in dict.fromkeys((r["ipc"], r["model"]) for r in cross):
        row = {"ipc": ipc, "architecture": model}
        for variant in dict.fromkeys(r["variant"] for r in cross):
            accs = [100 * r["acc_mean"] for r in cross
                    if (r["ipc"], r["model"], r["variant"]) == (ipc, model, variant)]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            row[variant] = f"{statistics.fmean(accs):.2f} +- {spread:.2f}"
        out.append(row)
    return out


def pairs(curve: list[dict]) -> list[tuple[int, float]]:
    return [(r["iteration"], r["acc_mean"]) for r in curve]


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["ipc"], r["variant"]) for r in rows if r["variant"] != RANDOM_DRAWS},
                  key=lambda k: (k[0], k[1]))
    for ipc, variant in keys:
        runs = {}
        for r in rows:
            if (r["ipc"], r["variant"]) == (ipc, variant):
                runs.setdefault(r["seed"], []).append(r)
        best = [max(r["acc_mean"] for r in curve) for curve in runs.values()]
        at100 = [r["acc_mean"] for curve in runs.values() for r in curve
                 if r["iteration"] == 100]
        out.append({
            "ipc": ipc, "variant": variant, "seeds": len(runs),
            "random_real": 100 * statistics.fmean(c[0]["acc_mean"] for c in runs.values()),
            "best": 100 * statistics.fmean(best),
            "best_std": 100 * statistics.pstdev(best) if len(best) > 1 else 0.0,
            "at_100": 100 * statistics.fmean(at100) if at100 else float("nan"),
            "iters_within_2": statistics.fmean(iterations_to_within(pairs(c))
                                               for c in runs.values()),
            "spread_2nd_half": 100 * statistics.fmean(second_half_spread(pairs(c))
                                                      for c in runs.values()),
            "s_per_iter": statistics.fmean(max(r["seconds"] for r in c) / c[-1]["iteration"]
                                           for c in runs.values()),
        })
    return out


def mct_minus_mtt(rows: list[dict], ipc: int, variant: str) -> tuple[float, float]:
    """Per-seed difference of the best accuracy (points): mean and std over seeds."""
    best = {}
    for r in rows:
        if r["ipc"] == ipc:
            key = (r["variant"], r["seed"])
            best[key] = max(best.get(key, 0.0), r["acc_mean"])
    diffs = [100 * (best[(variant, s)] - best[("MTT", s)])
             for (v, s) in best if v == variant]
    return statistics.fmean(diffs), (statistics.pstdev(diffs) if len(diffs) > 1 else 0.0)


def plot(rows: list[dict], path: pathlib.Path, labels: list[str] | None = None) -> None:
    """Accuracy against iteration, a panel per ipc, a curve per variant (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ipcs = sorted({r["ipc"] for r in rows})
    fig, axes = plt.subplots(1, len(ipcs), figsize=(6 * len(ipcs), 4), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        for label in labels or [v[0] for v in SHORT.values()]:
            curves = {}
            for r in rows:
                if r["ipc"] == ipc and r["variant"] == label:
                    curves.setdefault(r["iteration"], []).append(100 * r["acc_mean"])
            its = sorted(curves)
            ax.plot(its, [statistics.fmean(curves[i]) for i in its], marker="o", label=label)
        ax.set_title(f"Fashion-MNIST, ipc {ipc} (mean over seeds; iteration 0 = the initial "
                     "random real images)", fontsize=8)
        ax.set_xlabel("distillation iteration")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="reduced")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", default=None, help="where the IDX files are "
                        "(default: data/, then Debian's /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--out", default=None, help="results folder (default: bench/results)")
    parser.add_argument("--ipc", type=int, nargs="*", help="only these ipc of the protocol")
    parser.add_argument("--iterations", type=int, help="instead of the protocol's")
    parser.add_argument("--variants", nargs="*", choices=sorted(SHORT), help="only these")
    parser.add_argument("--seeds", type=int, nargs="*", help="instead of the protocol's")
    parser.add_argument("--models", nargs="*", default=[],
                        help="also train each best set on these architectures (mct_ray.zoo)")
    parser.add_argument("--combine", nargs="+", metavar="FILE", help="run nothing: report "
                        "earlier runs of the protocol together (their .parquet rows, or the "
                        "curves this script printed), e.g. seeds run on different days")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    variants = tuple(SHORT[v] for v in args.variants) if args.variants else None
    zoo.check_models(args.models, "--models")
    if args.combine:
        rows, cross = [r for f in args.combine for r in read_rows(pathlib.Path(f))], []
    else:
        rows, cross = run(args.protocol, args.device, args.data_root, args.ipc,
                          args.iterations, variants, tuple(args.models), args.seeds)
    out = pathlib.Path(args.out) if args.out else RESULTS
    parts = ([f"ipc{'-'.join(map(str, args.ipc))}"] if args.ipc else []) + \
        ([f"{args.iterations}it"] if args.iterations else []) + (args.variants or []) + \
        ([f"seed{'-'.join(map(str, args.seeds))}"] if args.seeds else []) + \
        (["combined"] if args.combine else [])
    name = "_".join([f"fashion_{args.protocol}", *parts])
    save_table(name, rows, out)
    table = summarise(rows)
    save_table(f"{name}_summary", table, out)
    plot(rows, out / f"{name}.png")
    print_table(table)
    if cross:
        save_table(f"{name}_cross", cross, out)
        print("\nthe best set of each run (by the ConvNet) on other architectures, test "
              "accuracy (%), mean +- std over seeds:")
        print_table(cross_table(cross))
    labels = {r["variant"] for r in rows if r["ipc"] == 1}
    for label in (PRESET[0], AUTHORS[0], UNROLL[0], FULL_IMAGE_GRAD[0]):
        if {label, "MTT"} <= labels:
            mean, std = mct_minus_mtt(rows, 1, label)
            print(f"ipc 1, {label} best minus MTT best: {mean:+.2f} +- {std:.2f} points")
    for ipc, accs in sorted(random_draws(rows).items()):
        print(f"ipc {ipc}, random real images over {len(accs)} draws: "
              f"{statistics.fmean(accs):.2f} +- {statistics.pstdev(accs):.2f} %")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.protocol == "long" and {PRESET[0], "MTT"} <= labels:
        print(f"fashion_mct_minus_mtt_long={mct_minus_mtt(rows, 1, PRESET[0])[0]:.2f}")
    for t in table:
        if t["ipc"] == 1 and t["variant"] == PRESET[0] and args.protocol != "long":
            print(f"fashion_mct_ipc1_best={t['best']:.2f}")
    return 0


def read_rows(path: pathlib.Path) -> list[dict]:
    """Rows of an earlier run: its .parquet, or the log this script printed (the curves of
    each (ipc, seed, variant), their iteration 0 the random real images they start from)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows, key, init = [], None, {}
    for line in path.read_text().splitlines():
        if m := re.match(r"ipc (\d+) seed (\d+): random real images ([\d.]+) %", line):
            init[(int(m[1]), int(m[2]))] = float(m[3]) / 100
        elif m := re.match(r"ipc (\d+) seed (\d+): (.+)$", line):
            key = (int(m[1]), int(m[2]), m[3])
            rows.append({"ipc": key[0], "seed": key[1], "variant": key[2], "iteration": 0,
                         "acc_mean": init[key[:2]], "seconds": float("nan")})
        elif (m := re.match(r"\s+it (\d+): ([\d.]+) %\s+step ([\d.e-]+)", line)) and key:
            rows.append({"ipc": key[0], "seed": key[1], "variant": key[2],
                         "iteration": int(m[1]), "acc_mean": float(m[2]) / 100,
                         "seconds": float("nan"), "step_size": float(m[3])})
    return rows


def random_draws(rows: list[dict]) -> dict[int, list[float]]:
    """ipc -> accuracy (%) of each random draw of real images (the baseline's spread)."""
    out: dict[int, list[float]] = {}
    for r in rows:
        if r["variant"] == RANDOM_DRAWS:
            out.setdefault(r["ipc"], []).append(100 * r["acc_mean"])
    return out


if __name__ == "__main__":
    sys.exit(main())
