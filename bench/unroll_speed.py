"""One distillation iteration per gradient mode against a reference unroll written the way
the original MTT code does it: one flat parameter vector, MTT's functional forward
(F.conv2d / F.group_norm / F.relu / F.avg_pool2d / F.linear, autograd's own double backward),
`torch.autograd.grad(create_graph=True)` each step.

Timing: every mode and the reference run interleaved in one process on the same inputs
(segment, minibatches, DSA parameters); the order rotates every round and the first round is
a warm-up. Speed-up = median over rounds of (reference seconds / mode seconds) in that round.
Exactness: (1) float64 at the same network shape, ipc 2, N=4: every exact mode's image and
step-size gradients equal the reference's to 1e-9; (2) float32 at the timed shape: the
relative difference to the reference is reported next to the reference's own spread (its
gradient after a one-ulp change of the start parameters); float32 unrolls of this length are
ill-conditioned, so bit-level differences in any kernel show at that size.
Memory: each mode runs in a fresh process (spawned, nothing inherited); the baseline is taken
after building the model and data there. CPU: the peak resident set during one iteration
(VmHWM, reset through /proc/self/clear_refs after set-up) minus the resident set after
set-up. GPU: torch.cuda.max_memory_allocated minus the allocation after set-up.
FLOPs: counted once with torch.utils.flop_counter at N=1 and N=2 and extrapolated linearly.

    python bench/unroll_speed.py                       # CIFAR-10 shape, ipc 10, N 30
    python bench/unroll_speed.py --shape tinyimagenet  # ConvNetD4, 64x64, 200 classes
    python bench/unroll_speed.py --device cuda --autocast bf16
Last line: unroll_speedup_vs_reference=<the fastest exact mode's speed-up>.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
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


@dataclasses.dataclass
class Problem:
    spec: object
    images: torch.Tensor
    labels: torch.Tensor
    seg: Segment
    aug: Augmenter
    plans: list


def setup(shape: str, ipc: int, steps: int, batch_syn: int, device: str, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> Problem:
    channels, size, classes = SHAPES[shape]
    spec = make_spec(NetConfig(width=128), (channels, size, size), classes)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(classes * ipc, channels, size, size, generator=gen)
    labels = torch.arange(classes).repeat_interleave(ipc).to(device)
    start = [p.to(device, dtype) for p in spec.init_params(gen)]
    target = [p + 0.01 * torch.randn(p.shape, generator=gen).to(device, dtype) for p in start]
    aug = Augmenter(AugmentConfig())
    plans = plan_unroll(len(images), batch_syn, steps, size, aug, gen)
    return Problem(spec, images.to(device, dtype), labels, Segment(0, 0.0, 2.0, start, target),
                   aug, plans)


def mtt_forward(spec, params, x):
    """MTT's ConvNet forward: built-in functional ops (autograd's own double backward)."""
    it = iter(params)
    for _ in range(spec.depth):
        x = F.conv2d(x, next(it), next(it), padding=1)
        if spec.norm == "instancenorm":
            x = F.group_norm(x, spec.width, next(it), next(it), eps=1e-5)
        x = F.avg_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), next(it), next(it))


def reference_iteration(p: Problem, images, step_size):
    """MTT's distill.py loop: flat parameters, autograd.grad on the flat vector each step."""
    start_flat = flatten(p.seg.start)
    target_flat = flatten(p.seg.target)
    student_params = [start_flat.clone().requires_grad_(True)]
    for plan in p.plans:
        x = p.aug.apply(images[plan.indices], plan.aug)
        out = mtt_forward(p.spec, unflatten(p.spec, student_params[-1]), x)
        ce = F.cross_entropy(out, p.labels[plan.indices])
        grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - step_size * grad)
    num_params = start_flat.numel()
    param_loss = F.mse_loss(student_params[-1], target_flat, reduction="sum")
    param_dist = F.mse_loss(start_flat, target_flat, reduction="sum")
    loss = (param_loss / num_params) / (param_dist / num_params)
    loss.backward()
    return loss.detach()


def one_iteration(mode: str, p: Problem, autocast: str = "none", segments: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration of `mode`; returns the image and step-size gradients."""
    x = p.images.detach().clone().requires_grad_()
    lr = torch.tensor(0.01, device=x.device, dtype=x.dtype, requires_grad=True)
    if mode == "reference":
        reference_iteration(p, x, lr)
        return x.grad, lr.grad
    student = Student(p.spec, p.labels, p.aug, autocast)
    if mode == "unroll":
        grad_unroll(student, x, lr, p.seg, p.plans)
    elif mode == "checkpoint":
        grad_checkpoint(student, x, lr, p.seg, p.plans, segments)
    else:
        grad_tesla(student, x, lr, p.seg, p.plans)
    return x.grad, lr.grad


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check_float64(args) -> dict[str, float]:
    """Exactness where rounding cannot hide anything: float64, same net, ipc 2, N=4."""
    p = setup(args.shape, 2, 4, 0, args.device, dtype=torch.float64)  # 2 chunks on CPU
    ref_x, ref_lr = one_iteration("reference", p)
    out = {}
    for mode in MODES[1:]:
        gx, glr = one_iteration(mode, p, segments=args.segments)
        out[mode] = max(rel_diff(gx, ref_x), rel_diff(glr, ref_lr))
    for mode in EXACT:
        assert out[mode] < 1e-9, f"{mode} differs from the reference in float64: {out[mode]:.2e}"
    return out


def time_modes(args, p: Problem) -> tuple[dict, dict, float]:
    """Interleaved rounds; returns (seconds per mode, float32 rel. diff. per mode, the
    reference's own spread)."""
    times = {m: [] for m in MODES}
    grads = {}
    # Warm-up round; its reference runs from start parameters one ulp away, which measures
    # how far float32 rounding alone moves the reference's gradient.
    nudged = [s * (1 + torch.finfo(s.dtype).eps * torch.sign(torch.randn(s.shape, generator=
              torch.Generator().manual_seed(1)).to(s.device))) for s in p.seg.start]
    warm = dataclasses.replace(p, seg=dataclasses.replace(p.seg, start=nudged))
    floor_x, _ = one_iteration("reference", warm)
    for rnd in range(args.repeats + 1):
        order = MODES[rnd % len(MODES):] + MODES[:rnd % len(MODES)]
        for mode in order:
            if rnd == 0 and mode == "reference":
                continue
            sync(args.device)
            t0 = time.perf_counter()
            grads[mode] = one_iteration(mode, p, args.autocast, args.segments)
            sync(args.device)
            if rnd:
                times[mode].append(time.perf_counter() - t0)
            log(f"round {rnd} {mode}: {time.perf_counter() - t0:.2f} s")
    ref = grads["reference"][0]
    rel = {m: rel_diff(grads[m][0], ref) for m in MODES}
    return times, rel, rel_diff(floor_x, ref)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def count_flops(args, mode: str) -> float:
    """FLOPs of one iteration at args.steps, from counts at N=1 and N=2 (linear in N)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for steps in (1, 2):
        p = setup(args.shape, args.ipc, steps, args.batch_syn, args.device)
        with FlopCounterMode(display=False) as counter:
            one_iteration(mode, p, args.autocast, args.segments)
        counts.append(counter.get_total_flops())
    return counts[0] + (args.steps - 1) * (counts[1] - counts[0])


def peak_flops(device: str) -> float:
    """Measured float32 matmul throughput (FLOP/s): the device's practical peak."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _status_kb(key: str) -> int:
    text = pathlib.Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def memory_child(args) -> None:
    """In a fresh process: extra memory of one iteration of args.child over set-up."""
    p = setup(args.shape, args.ipc, args.steps, args.batch_syn, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_iteration(args.child, p, args.autocast, args.segments)
        peak = torch.cuda.max_memory_allocated()
    else:
        base = _status_kb("VmRSS")
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        one_iteration(args.child, p, args.autocast, args.segments)
        peak = _status_kb("VmHWM")
    print(json.dumps({"base": base, "peak": peak}))


def measure_memory(args, mode: str) -> int:
    cmd = [sys.executable, __file__, "--child", mode, "--shape", args.shape, "--ipc",
           str(args.ipc), "--steps", str(args.steps), "--batch-syn", str(args.batch_syn),
           "--device", args.device, "--threads", str(args.threads), "--autocast",
           args.autocast, "--segments", str(args.segments)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["peak"] - result["base"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES), default="cifar10")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-syn", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none",
                        help="our modes only (the reference stays float32); CUDA only")
    parser.add_argument("--segments", type=int, default=0, help="checkpoint; 0: ~sqrt(N)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", choices=MODES, default=None)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return memory_child(args)
    exact64 = check_float64(args)
    log(f"float64 check: {exact64}")
    extra = {} if args.no_memory else {m: measure_memory(args, m) for m in MODES}
    log(f"memory: {extra}")
    p = setup(args.shape, args.ipc, args.steps, args.batch_syn, args.device)
    times, rel32, floor = time_modes(args, p)
    flops = {m: count_flops(args, m) for m in MODES}
    peak = peak_flops(args.device)
    ref_times = times["reference"]
    rows = []
    for m in MODES:
        med = statistics.median(times[m])
        rows.append({
            "mode": m, "median_s": med, "min_s": min(times[m]),
            "speedup_vs_reference": statistics.median(
                r / t for r, t in zip(ref_times, times[m])),
            "extra_memory_mb": extra[m] / 2**20 if extra else float("nan"),
            "memory_vs_unroll": extra[m] / extra["unroll"] if extra else float("nan"),
            "gflop": flops[m] / 1e9, "achieved_tflops": flops[m] / med / 1e12,
            "rel_diff_f32": rel32[m], "rel_diff_f64": exact64.get(m, 0.0)})
    for r in rows:
        r.update(shape=args.shape, device=args.device, ipc=args.ipc, steps=args.steps,
                 batch_syn=args.batch_syn, threads=torch.get_num_threads(),
                 autocast=args.autocast, peak_tflops=peak / 1e12, reference_f32_spread=floor,
                 rounds=args.repeats)
    name = f"unroll_speed_{args.shape}_{args.device}"
    save_table(name, rows)
    plot(rows, args, name)
    print(f"{args.shape}, ipc {args.ipc}, N={args.steps}, batch_syn {args.batch_syn}, "
          f"{args.device}, {torch.get_num_threads()} threads, {args.repeats} timed rounds; "
          f"measured fp32 matmul peak {peak / 1e12:.3f} TFLOP/s")
    print_table([{k: r[k] for k in ("mode", "median_s", "min_s", "speedup_vs_reference",
                                    "extra_memory_mb", "memory_vs_unroll", "achieved_tflops",
                                    "rel_diff_f32", "rel_diff_f64")} for r in rows])
    print(f"float32 spread of the reference itself (one-ulp start): {floor:.2e}")
    print("speed-up: median over rounds of reference s / mode s (interleaved, one process); "
          "memory: peak over set-up in a fresh process per mode "
          f"({'max_memory_allocated' if args.device == 'cuda' else 'VmHWM - VmRSS'})")
    best = max(EXACT, key=lambda m: next(r for r in rows if r["mode"] == m)
               ["speedup_vs_reference"])
    speedup = next(r for r in rows if r["mode"] == best)["speedup_vs_reference"]
    print(f"fastest_exact_mode={best}")
    print(f"unroll_speedup_vs_reference={speedup:.3f}")


def plot(rows, args, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["mode"] for r in rows]
    a.bar(names, [r["median_s"] for r in rows])
    a.set_ylabel("seconds per iteration (median)")
    for i, r in enumerate(rows):
        a.annotate(f"{r['speedup_vs_reference']:.2f}x", (i, r["median_s"]), ha="center",
                   va="bottom")
    b.bar(names, [r["extra_memory_mb"] for r in rows])
    b.set_ylabel("extra memory over set-up (MiB)")
    fig.suptitle(f"{args.shape}, ipc {args.ipc}, N={args.steps}, {args.device}, "
                 f"{torch.get_num_threads()} threads")
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
