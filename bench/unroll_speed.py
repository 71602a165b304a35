"""One distillation iteration per gradient mode against a reference unroll written the way
the original MTT code does it: one flat parameter vector, a functional forward that views
it as the network's tensors, `torch.autograd.grad(create_graph=True)` each step.

Timing: every mode and the reference run interleaved in one process on the same inputs
(segment, minibatches, DSA parameters), median seconds per iteration.
Memory: each mode runs in a fresh subprocess; CPU: peak RSS minus RSS after set-up (the
model and the data); GPU: torch.cuda.max_memory_allocated minus the allocation after set-up.

    python bench/unroll_speed.py                       # CIFAR-10 shape, ipc 10, N 30
    python bench/unroll_speed.py --shape tinyimagenet  # ConvNetD4, 64x64, 200 classes
Last line: unroll_speedup_vs_reference=<reference seconds / fastest exact mode's seconds>.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import RESULTS, print_table, save_table  # noqa: E402
from mct_ray.augment import Augmenter  # noqa: E402
from mct_ray.config import AugmentConfig, NetConfig  # noqa: E402
from mct_ray.distill import (Segment, Student, grad_checkpoint, grad_tesla,  # noqa: E402
                             grad_unroll, plan_unroll)
from mct_ray.nets import make_spec  # noqa: E402
from mct_ray.trajectory import flatten, unflatten  # noqa: E402

SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "tinyimagenet": (3, 64, 200)}
MODES = ("reference", "unroll", "checkpoint", "tesla")
EXACT = ("unroll", "checkpoint")


def setup(shape: str, ipc: int, steps: int, batch_syn: int, device: str, seed: int = 0):
    channels, size, classes = SHAPES[shape]
    spec = make_spec(NetConfig(width=128), (channels, size, size), classes)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(classes * ipc, channels, size, size, generator=gen).to(device)
    labels = torch.arange(classes).repeat_interleave(ipc).to(device)
    start = [p.to(device) for p in spec.init_params(gen)]
    target = [p + 0.01 * torch.randn(p.shape, generator=gen).to(device) for p in start]
    aug = Augmenter(AugmentConfig())
    plans = plan_unroll(len(images), batch_syn, steps, size, aug, gen)
    return spec, images, labels, Segment(0, 0.0, 2.0, start, target), aug, plans


def reference_iteration(spec, images, labels, seg, aug, plans, step_size):
    """MTT's distill.py loop: flat parameters, autograd.grad on the flat vector each step."""
    start_flat = flatten(seg.start)
    target_flat = flatten(seg.target)
    student_params = [start_flat.clone().requires_grad_(True)]
    for plan in plans:
        x = aug.apply(images[plan.indices], plan.aug)
        out = spec.forward(unflatten(spec, student_params[-1]), x)
        ce = F.cross_entropy(out, labels[plan.indices])
        grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - step_size * grad)
    num_params = start_flat.numel()
    param_loss = torch.nn.functional.mse_loss(student_params[-1], target_flat, reduction="sum")
    param_dist = torch.nn.functional.mse_loss(start_flat, target_flat, reduction="sum")
    loss = (param_loss / num_params) / (param_dist / num_params)
    loss.backward()
    return loss.detach()


def one_iteration(mode, spec, images, labels, seg, aug, plans):
    x = images.detach().clone().requires_grad_()
    lr = torch.tensor(0.01, device=images.device, requires_grad=True)
    if mode == "reference":
        return reference_iteration(spec, x, labels, seg, aug, plans, lr), x.grad
    student = Student(spec, labels, aug)
    fn = {"unroll": grad_unroll, "checkpoint": grad_checkpoint, "tesla": grad_tesla}[mode]
    args = (student, x, lr, seg, plans) + ((0,) if mode == "checkpoint" else ())
    return fn(*args), x.grad


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_modes(args) -> dict[str, list[float]]:
    problem = setup(args.shape, args.ipc, args.steps, args.batch_syn, args.device)
    times = {m: [] for m in MODES}
    grads = {}
    for rep in range(args.repeats + 1):  # the first round is a warm-up
        for mode in MODES:
            sync(args.device)
            t0 = time.perf_counter()
            _, grad = one_iteration(mode, *problem)
            sync(args.device)
            if rep:
                times[mode].append(time.perf_counter() - t0)
            grads[mode] = grad
    ref = grads["reference"]
    for mode in EXACT:  # same inputs: the exact modes must agree with the reference
        rel = float((grads[mode] - ref).norm() / ref.norm())
        assert rel < 1e-4, f"{mode} differs from the reference by {rel:.2e}"
    return times


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory_child(args) -> None:
    """In a fresh process: extra memory of one iteration of args.child over set-up."""
    problem = setup(args.shape, args.ipc, args.steps, args.batch_syn, args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_iteration(args.child, *problem)
        peak = torch.cuda.max_memory_allocated()
    else:
        base = rss_bytes()
        one_iteration(args.child, *problem)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"base": base, "peak": peak}))


def measure_memory(args, mode: str) -> int:
    cmd = [sys.executable, __file__, "--child", mode, "--shape", args.shape, "--ipc",
           str(args.ipc), "--steps", str(args.steps), "--batch-syn", str(args.batch_syn),
           "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["peak"] - result["base"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES), default="cifar10")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-syn", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--child", choices=MODES, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return memory_child(args)
    times = time_modes(args)
    extra = {m: measure_memory(args, m) for m in MODES}
    rows = [{"mode": m, "median_s": statistics.median(times[m]),
             "min_s": min(times[m]), "speedup_vs_reference":
             statistics.median(times["reference"]) / statistics.median(times[m]),
             "extra_memory_mb": extra[m] / 2**20,
             "memory_vs_unroll": extra[m] / extra["unroll"]} for m in MODES]
    for r in rows:
        r.update(shape=args.shape, device=args.device, ipc=args.ipc, steps=args.steps)
    save_table(f"unroll_speed_{args.shape}_{args.device}", rows)
    plot(rows, args)
    print_table([{k: r[k] for k in ("mode", "median_s", "min_s", "speedup_vs_reference",
                                    "extra_memory_mb", "memory_vs_unroll")} for r in rows])
    best = min(EXACT, key=lambda m: statistics.median(times[m]))
    speedup = statistics.median(times["reference"]) / statistics.median(times[best])
    print(f"fastest_exact_mode={best}")
    print(f"unroll_speedup_vs_reference={speedup:.3f}")


def plot(rows, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["mode"] for r in rows]
    a.bar(names, [r["median_s"] for r in rows])
    a.set_ylabel("seconds per iteration (median)")
    b.bar(names, [r["extra_memory_mb"] for r in rows])
    b.set_ylabel("extra memory (MiB)")
    fig.suptitle(f"{args.shape}, ipc {args.ipc}, N={args.steps}, {args.device}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"unroll_speed_{args.shape}_{args.device}.png", dpi=100,
                bbox_inches="tight")


if __name__ == "__main__":
    main()
