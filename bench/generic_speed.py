"""The generic student path (torch.func.functional_call over a module, what every network
but the ConvNet runs) against the fast ConvNet path, and a ResNet-18 student.

1. The CIFAR-10 ConvNet shape (ConvNet-128-3, 3x32x32, ipc 10, N=30, minibatch 100, DSA):
   one iteration of `distill.grad_mode` through each path, interleaved in one process
   (fast, generic, fast, generic, ...), with the gradients compared. Prints seconds per
   iteration for each and the ratio generic / fast.
2. A ResNet-18 student (instance norm; `--resnet resnet18-bn` for batch norm) at ipc 1 on
   the same shape, the CIFAR-10 ipc 1 recipe's N (60), in checkpoint mode (unroll would
   hold 60 ResNet-18 graphs): seconds per iteration, and the ConvNet's beside it.

Writes bench/results/generic_speed.parquet; last lines generic_over_fast=<ratio> and
resnet18_seconds_per_iteration=<s>.

    python -m bench.generic_speed [--repeats 3] [--threads 2] [--grad-mode unroll]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import print_table, save_table
from bench.unroll_speed import setup
from mct_ray.config import DistillConfig
from mct_ray.distill import GRAD_MODES, Segment, Student, plan_unroll
from mct_ray.nets import NetSpec, Network


def one_iteration(student: Student, images: torch.Tensor, seg: Segment, plans: list,
                  grad_mode: str) -> tuple[float, torch.Tensor]:
    """Seconds of one iteration, and the image gradient."""
    x = images.detach().clone().requires_grad_()
    lr = torch.tensor(0.01, requires_grad=True)
    started = time.perf_counter()
    GRAD_MODES[grad_mode](student, x, lr, seg, plans, DistillConfig())
    return time.perf_counter() - started, x.grad


def convnet_against_generic(args) -> list[dict]:
    p = setup("cifar10", args.ipc, args.steps, args.batch_syn, "cpu")
    students = {k: Student(Network(p.spec, kernels=k), p.labels, p.aug)
                for k in ("fast", "generic")}
    one_iteration(students["fast"], p.images, p.seg, p.plans[:2], args.grad_mode)  # warm-up
    one_iteration(students["generic"], p.images, p.seg, p.plans[:2], args.grad_mode)
    times: dict[str, list[float]] = {k: [] for k in students}
    grads = {}
    for _ in range(args.repeats):
        for kernels, student in students.items():
            seconds, grads[kernels] = one_iteration(student, p.images, p.seg, p.plans,
                                                    args.grad_mode)
            times[kernels].append(seconds)
    rel = float((grads["generic"] - grads["fast"]).abs().max() / grads["fast"].abs().max())
    return [{"case": f"ConvNet-128-3, ipc {args.ipc}, N={args.steps}", "path": k,
             "seconds_per_iteration": statistics.median(times[k]),
             "all_seconds": [round(t, 3) for t in times[k]],
             "grad_rel_diff_to_fast": rel if k == "generic" else 0.0} for k in students]


def resnet_student(args) -> list[dict]:
    rows = []
    for name in (args.resnet, "convnet"):
        spec = NetSpec(name, 3, 32, 10, 128, 3, "instancenorm")
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(10, 3, 32, 32, generator=gen)  # ipc 1
        labels = torch.arange(10)
        start = spec.init_params(gen)
        target = [t + 0.01 * torch.randn(t.shape, generator=gen) for t in start]
        base = setup("cifar10", 1, 1, 10, "cpu")  # the same augmentation as every bench
        plans = plan_unroll(10, 10, args.resnet_steps, 32, base.aug, gen)
        student = Student(Network(spec), labels, base.aug)
        seg = Segment(0, 0.0, 2.0, start, target)
        one_iteration(student, images, seg, plans[:1], args.resnet_grad_mode)  # warm-up
        seconds = [one_iteration(student, images, seg, plans, args.resnet_grad_mode)[0]
                   for _ in range(args.resnet_repeats)]
        rows.append({"case": f"student, ipc 1, N={args.resnet_steps}, "
                             f"{args.resnet_grad_mode}", "path": name,
                     "seconds_per_iteration": statistics.median(seconds),
                     "all_seconds": [round(t, 3) for t in seconds],
                     "grad_rel_diff_to_fast": None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-syn", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grad-mode", choices=tuple(GRAD_MODES), default="unroll")
    parser.add_argument("--resnet", default="resnet18")
    parser.add_argument("--resnet-steps", type=int, default=60)
    parser.add_argument("--resnet-repeats", type=int, default=2)
    parser.add_argument("--resnet-grad-mode", choices=tuple(GRAD_MODES), default="checkpoint",
                        help="checkpoint by default: unroll keeps N ResNet-18 graphs (about "
                             "0.25 GB each at this shape)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = convnet_against_generic(args) + resnet_student(args)
    for r in rows:
        r.update(threads=torch.get_num_threads(), grad_mode=args.grad_mode,
                 date=time.strftime("%Y-%m-%d"))
    save_table("generic_speed", rows)
    print_table([{k: r[k] for k in ("case", "path", "seconds_per_iteration",
                                    "grad_rel_diff_to_fast")} for r in rows])
    by = {(r["case"].split(",")[0], r["path"]): r["seconds_per_iteration"] for r in rows}
    ratio = by[("ConvNet-128-3", "generic")] / by[("ConvNet-128-3", "fast")]
    print(f"generic_over_fast={ratio:.3f}")
    print(f"{args.resnet}_seconds_per_iteration={by[('student', args.resnet)]:.2f}")


if __name__ == "__main__":
    main()
