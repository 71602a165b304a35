"""One distillation iteration per gradient mode against a reference unroll written the way
the original MTT code does it: one flat parameter vector, MTT's functional forward
(F.conv2d / F.group_norm / F.relu / F.avg_pool2d / F.linear, autograd's own double backward),
`torch.autograd.grad(create_graph=True)` each step.

Modes: unroll, checkpoint (the default distill.checkpoint_segments=0: one step per segment,
every step's parameters kept, 1.3 MB each here), checkpoint-sqrt (round(sqrt N) segments, the
textbook count), tesla (approximate).
Timing: every mode and the reference run interleaved in one process on the same inputs
(segment, minibatches, DSA parameters); the order rotates every round, after a warm-up round.
Speed-up = median over rounds of (reference seconds / mode seconds) in that round.
Exactness: (1) float64 at the same network shape, ipc 2, N=4: every exact mode's image and
step-size gradients equal the reference's to 1e-9; (2) float32 at the timed shape: the
relative difference to the reference is reported next to the reference's own spread (its
gradient after a one-ulp change of the start parameters, measured in a full warm-up round);
float32 unrolls of this length are ill-conditioned, so rounding differences show at 1e-3.
Memory: each mode runs once more in a fresh process (nothing inherited), the baseline taken
after building the model and data there. CPU, two measures: rss = peak resident set during
the iteration (VmHWM, reset through /proc/self/clear_refs) minus the resident set after
set-up, which includes what glibc keeps of freed blocks; alloc = peak of the bytes held by
tensors (torch.profiler's allocation tracking, the CPU counterpart of the GPU measure).
GPU: torch.cuda.max_memory_allocated minus the allocation after set-up (both columns).
FLOPs: counted once with torch.utils.flop_counter at N=1 and N=2 and extrapolated linearly;
achieved TFLOP/s is set against a measured float32 matmul peak of the device.

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
from mct_ray.config import AugmentConfig, DistillConfig, NetConfig  # noqa: E402
from mct_ray.distill import GRAD_MODES, Segment, Student, plan_unroll  # noqa: E402
from mct_ray.nets import Network, make_spec  # noqa: E402
from mct_ray.trajectory import flatten, unflatten  # noqa: E402

SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "tinyimagenet": (3, 64, 200),
          "digits28": (1, 28, 10)}  # digits28: MNIST-sized, for comparison with MTT's code
MODES = ("reference", "unroll", "checkpoint", "checkpoint-sqrt", "tesla")
EXACT = ("unroll", "checkpoint", "checkpoint-sqrt")
# each mode but the reference (the bench's own): its distill.grad_mode in the library
GRAD_MODE_OF = {"unroll": "unroll", "checkpoint": "checkpoint", "checkpoint-sqrt": "checkpoint",
                "tesla": "tesla"}


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
    spec = make_spec(NetConfig(width=WIDTH[0]), (channels, size, size), classes)
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
    for i in range(spec.depth):  # MTT pads the first convolution by 3 for 1x28x28 input
        x = F.conv2d(x, next(it), next(it), padding=spec.first_padding if i == 0 else 1)
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


def one_iteration(mode: str, p: Problem, autocast: str = "none"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration of `mode`; returns the image and step-size gradients."""
    x = p.images.detach().clone().requires_grad_()
    lr = torch.tensor(0.01, device=x.device, dtype=x.dtype, requires_grad=True)
    if mode == "reference":
        reference_iteration(p, x, lr)
        return x.grad, lr.grad
    student = Student(Network(p.spec, kernels=KERNELS[0]), p.labels, p.aug, autocast)
    # checkpoint: the library's default (one step per segment); checkpoint-sqrt: round(sqrt N)
    segments = round(len(p.plans) ** 0.5) if mode == "checkpoint-sqrt" else 0
    GRAD_MODES[GRAD_MODE_OF[mode]](student, x, lr, p.seg, p.plans,
                                   DistillConfig(checkpoint_segments=segments))
    return x.grad, lr.grad


# --kernels builtin: our modes with PyTorch's own ops and double backward (cuDNN's on a GPU)
# instead of the hand-written ones; generic: through functional_call over zoo's convnet. Set
# once per process from the arguments.
KERNELS = ["fast"]
WIDTH = [128]  # --width: the ConvNet's width (128 in every paper; smaller for dry runs)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check_float64(args) -> dict[str, float]:
    """Exactness where rounding cannot hide anything: float64, same net, ipc 2, N=4 (or
    the timed ipc and N where smaller: dry runs), minibatches of the timed batch_syn."""
    p = setup(args.shape, min(2, args.ipc), min(4, args.steps), args.batch_syn, args.device,
              dtype=torch.float64)  # minibatches of batch_syn where the set is larger
    ref_x, ref_lr = one_iteration("reference", p)
    out = {}
    for mode in MODES[1:]:
        gx, glr = one_iteration(mode, p)
        out[mode] = max(rel_diff(gx, ref_x), rel_diff(glr, ref_lr))
    for mode in EXACT:
        assert out[mode] < 1e-9, f"{mode} differs from the reference in float64: {out[mode]:.2e}"
    return out


def time_modes(args, p: Problem) -> tuple[dict, dict, float]:
    """Interleaved rounds; returns (seconds per mode, float32 rel. diff. per mode, the
    reference's own spread, NaN without a full warm-up round)."""
    modes = args.modes
    times = {m: [] for m in modes}
    grads, floor = {}, float("nan")
    if args.warmup_steps < args.steps:  # a short warm-up: kernels and buffers only
        short = setup(args.shape, args.ipc, args.warmup_steps, args.batch_syn, args.device)
        for mode in modes:
            one_iteration(mode, short, args.autocast)
    else:  # a full warm-up round; its reference starts one ulp away from the others'
        nudged = [s * (1 + torch.finfo(s.dtype).eps * torch.sign(torch.randn(
            s.shape, generator=torch.Generator().manual_seed(1)).to(s.device)))
            for s in p.seg.start]
        warm = dataclasses.replace(p, seg=dataclasses.replace(p.seg, start=nudged))
        floor_x, _ = one_iteration("reference", warm)
        for mode in modes[1:]:
            one_iteration(mode, p, args.autocast)
    for rnd in range(args.repeats):
        order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]
        for mode in order:
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            grads[mode] = one_iteration(mode, p, args.autocast)
            sync(args.device)
            times[mode].append((time.perf_counter() - t0, time.process_time() - c0))
            log(f"round {rnd + 1} {mode}: {times[mode][-1][0]:.2f} s "
                f"(cpu {times[mode][-1][1]:.2f} s)")
    ref = grads["reference"][0]
    if args.warmup_steps >= args.steps:
        floor = rel_diff(floor_x, ref)
    return times, {m: rel_diff(grads[m][0], ref) for m in modes}, floor


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def count_flops(args, mode: str) -> float:
    """FLOPs of one iteration at args.steps, from counts at N=1 and N=2 (linear in N)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for steps in (1, 2):
        p = setup(args.shape, args.ipc, steps, args.batch_syn, args.device)
        with FlopCounterMode(display=False) as counter:
            one_iteration(mode, p, args.autocast)
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
    """In a fresh process: extra memory of one iteration of args.child over set-up, as
    args.measure says (rss and alloc run in separate processes: the profiler that tracks
    tensor bytes keeps enough of its own to distort the resident set)."""
    p = setup(args.shape, args.ipc, args.steps, args.batch_syn, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_iteration(args.child, p, args.autocast)
        extra = torch.cuda.max_memory_allocated() - base
    elif args.measure == "rss":
        base = _status_kb("VmRSS")
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        one_iteration(args.child, p, args.autocast)
        extra = _status_kb("VmHWM") - base
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            one_iteration(args.child, p, args.autocast)
        extra = _peak_allocated(prof)
    print(json.dumps({"extra": extra}))


def _peak_allocated(prof) -> int:
    """Peak of the bytes held by tensors allocated while profiling (from its trace)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def measure_memory(args, mode: str) -> dict[str, float]:
    out = {}
    for measure in ("rss", "alloc"):
        if args.device == "cuda" and measure == "alloc":  # one measure on a GPU: both columns
            out[measure] = out.get("rss", float("nan"))
            continue
        if measure not in args.memory:
            out[measure] = float("nan")
            continue
        cmd = [sys.executable, __file__, "--child", mode, "--measure", measure, "--shape",
               args.shape, "--ipc", str(args.ipc), "--steps", str(args.steps), "--batch-syn",
               str(args.batch_syn), "--device", args.device, "--threads", str(args.threads),
               "--autocast", args.autocast, "--kernels", args.kernels,
               "--width", str(args.width)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        out[measure] = json.loads(res.strip().splitlines()[-1])["extra"]
        log(f"memory {mode} {measure}: {out[measure] / 2**20:.0f} MiB")
    return out


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
                        help="our modes only (the reference stays float32); meant for "
                             "GPUs, on a CPU it emulates bf16's numerics (slowly)")
    parser.add_argument("--kernels", choices=("fast", "builtin", "generic"), default="fast",
                        help="our modes' ops: hand-written double backward, PyTorch's, or "
                             "the generic functional_call path")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--modes", nargs="+", choices=MODES[1:], default=list(MODES[1:]))
    parser.add_argument("--warmup-steps", type=int, default=10**9,
                        help="N of the warm-up round (default: a full round, which also "
                             "measures the reference's float32 spread)")
    parser.add_argument("--memory", nargs="*", choices=("rss", "alloc"),
                        default=["rss", "alloc"], help="measures to take (none: skip)")
    parser.add_argument("--memory-modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--ablation", action="store_true",
                        help="time each optimisation switched off instead (unroll_ablation)")
    parser.add_argument("--child", choices=MODES, default=None)
    parser.add_argument("--measure", choices=("rss", "alloc"), default="rss")
    args = parser.parse_args(argv)
    args.modes = ["reference", *args.modes]
    return args


def main() -> None:
    args = parse_args()
    KERNELS[0], WIDTH[0] = args.kernels, args.width
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return memory_child(args)
    exact64 = check_float64(args)
    log(f"float64 check: {exact64}")
    if args.ablation:
        return run_ablation(args)
    mem = {m: measure_memory(args, m) for m in args.modes
           if args.memory and m in args.memory_modes}
    log(f"memory: {mem}")
    p = setup(args.shape, args.ipc, args.steps, args.batch_syn, args.device)
    times, rel32, floor = time_modes(args, p)
    flops = {m: count_flops(args, m) for m in args.modes}
    peak = peak_flops(args.device)
    rows = [result_row(args, m, times, mem, flops, rel32, exact64) for m in args.modes]
    for r in rows:
        r.update(shape=args.shape, device=args.device, ipc=args.ipc, steps=args.steps,
                 batch_syn=args.batch_syn, threads=torch.get_num_threads(),
                 autocast=args.autocast, kernels=args.kernels, peak_tflops=peak / 1e12, reference_f32_spread=floor,
                 rounds=args.repeats, date=time.strftime("%Y-%m-%d"),
                 device_name=device_name(args.device))
    name = f"unroll_speed_{args.shape}_{args.device}" + \
        ("" if args.kernels == "fast" else f"_{args.kernels}")
    save_table(name, rows)
    plot(rows, args, name)
    report(args, rows, floor, peak)


def result_row(args, m, times, mem, flops, rel32, exact64) -> dict:
    wall = [t for t, _ in times[m]]
    cpu = [c for _, c in times[m]]
    ref_wall = [t for t, _ in times["reference"]]
    ref_cpu = [c for _, c in times["reference"]]
    med = statistics.median(wall)
    nan = float("nan")
    get = lambda key, mode: mem[mode][key] if mode in mem else nan  # noqa: E731
    return {
        "mode": m, "median_s": med, "min_s": min(wall), "median_cpu_s": statistics.median(cpu),
        "speedup_vs_reference": statistics.median(r / t for r, t in zip(ref_wall, wall)),
        "cpu_speedup_vs_reference": statistics.median(r / c for r, c in zip(ref_cpu, cpu)),
        "rss_mb": get("rss", m) / 2**20, "alloc_mb": get("alloc", m) / 2**20,
        "rss_vs_unroll": get("rss", m) / get("rss", "unroll"),
        "alloc_vs_unroll": get("alloc", m) / get("alloc", "unroll"),
        "gflop": flops[m] / 1e9, "achieved_tflops": flops[m] / med / 1e12,
        "rel_diff_f32": rel32[m], "rel_diff_f64": exact64.get(m, 0.0)}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return "cpu"


def report(args, rows: list[dict], floor: float, peak: float) -> None:
    print(f"{args.shape}, ipc {args.ipc}, N={args.steps}, batch_syn {args.batch_syn}, "
          f"{device_name(args.device)}, {args.repeats} timed rounds, "
          f"{time.strftime('%Y-%m-%d')}; measured fp32 matmul peak {peak / 1e12:.3f} TFLOP/s")
    print_table([{k: r[k] for k in ("mode", "median_s", "speedup_vs_reference",
                                    "cpu_speedup_vs_reference", "rss_mb", "rss_vs_unroll",
                                    "alloc_mb", "alloc_vs_unroll", "achieved_tflops",
                                    "rel_diff_f32", "rel_diff_f64")} for r in rows])
    print(f"float32 spread of the reference itself (one-ulp start): {floor:.2e}")
    print("speed-up: median over rounds of reference s / mode s (interleaved, one process; "
          "cpu: the same with process CPU seconds, robust to other load at 1 thread); "
          "memory: peak over set-up in a fresh process per mode (rss: VmHWM - VmRSS; alloc: "
          "tensor bytes held, torch.profiler; cuda: max_memory_allocated for both)")
    by_mode = {r["mode"]: r for r in rows}
    for mode in ("checkpoint", "checkpoint-sqrt", "tesla"):
        for key in ("rss_vs_unroll", "alloc_vs_unroll"):
            value = by_mode.get(mode, {}).get(key, float("nan"))
            if value == value:
                print(f"{mode.replace('-', '_')}_{key}={value:.4f}")
    exact = [m for m in EXACT if m in by_mode]
    best = max(exact, key=lambda m: by_mode[m]["speedup_vs_reference"])
    print(f"fastest_exact_mode={best}")
    print(f"unroll_speedup_vs_reference={by_mode[best]['speedup_vs_reference']:.3f}")


def plot(rows, args, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["mode"] for r in rows]
    a.bar(names, [r["median_s"] for r in rows])
    a.tick_params(axis="x", labelrotation=20)
    a.set_ylabel("seconds per iteration (median)")
    for i, r in enumerate(rows):
        a.annotate(f"{r['speedup_vs_reference']:.2f}x", (i, r["median_s"]), ha="center",
                   va="bottom")
    pos = range(len(rows))
    b.bar([i - 0.2 for i in pos], [r["rss_mb"] for r in rows], 0.4, label="resident (VmHWM)")
    b.bar([i + 0.2 for i in pos], [r["alloc_mb"] for r in rows], 0.4, label="tensor bytes")
    b.set_xticks(list(pos), names, rotation=20)
    b.set_ylabel("extra memory over set-up (MiB)")
    b.legend()
    fig.suptitle(f"{args.shape}, ipc {args.ipc}, N={args.steps}, {args.device}, "
                 f"{torch.get_num_threads()} threads")
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Ablation: each optimisation of the fast student switched off (or one rejected idea switched
# on) in turn, interleaved with the reference and the full version in one process.

def _ablations() -> dict[str, tuple]:
    import contextlib
    from unittest import mock

    def patched(*patches):
        @contextlib.contextmanager
        def ctx():
            with contextlib.ExitStack() as stack:
                for target, value in patches:
                    stack.enter_context(mock.patch(target, value))
                yield
        return ctx

    def graph_in_sweeps(self, params, images, step_size, plan, create_graph=True):
        return original_step(self, params, images, step_size, plan, create_graph=True)

    original_step = Student.step
    cl = lambda apply: (lambda self, x, plan: apply(self, x, plan).contiguous(  # noqa: E731
        memory_format=torch.channels_last))
    return {  # name: (mode, context)
        "reference": ("reference", contextlib.nullcontext),
        "unroll (all)": ("unroll", contextlib.nullcontext),
        "- instance norm 2nd derivative": ("unroll", patched(
            ("mct_ray.nets.instance_norm",
             lambda x, w, b: F.group_norm(x, x.shape[1], w, b, eps=1e-5)))),
        "- conv 2nd derivative": ("unroll", patched(
            ("mct_ray.nets.conv3x3", lambda x, w, b, pad=1: F.conv2d(x, w, b, padding=pad)))),
        "- pooling": ("unroll", patched(
            ("mct_ray.nets.avg_pool2", lambda x: F.avg_pool2d(x, 2)))),
        "- image gradient as GEMM + col2im": ("unroll", patched(
            ("mct_ray.fastops._FEW_CHANNELS", 0))),
        "- skip the inner image gradient": ("unroll", patched(
            ("mct_ray.fastops._engine_uses", lambda t: True))),
        "- batch chunking": ("unroll", patched(("mct_ray.distill.CPU_CHUNK_BYTES", 2**62))),
        "+ channels_last (rejected)": ("unroll", patched(
            ("mct_ray.augment.Augmenter.apply", cl(Augmenter.apply)))),
        "checkpoint (all)": ("checkpoint", contextlib.nullcontext),
        "checkpoint - first-order sweep": ("checkpoint", patched(
            ("mct_ray.distill.Student.step", graph_in_sweeps))),
    }


def run_ablation(args) -> None:
    variants = _ablations()
    p = setup(args.shape, args.ipc, args.steps, args.batch_syn, args.device)
    names = list(variants)
    times = {n: [] for n in names}
    grads = {}
    for rnd in range(args.repeats + 1):  # round 0 is a warm-up
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            mode, ctx = variants[name]
            with ctx():
                t0, c0 = time.perf_counter(), time.process_time()
                grads[name] = one_iteration(mode, p)[0]
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rnd:
                times[name].append((dt, dc))
            log(f"round {rnd} {name}: {dt:.2f} s (cpu {dc:.2f} s)")
    ref = times["reference"]
    ratio = lambda n, i: statistics.median(r[i] / t[i] for r, t in zip(ref, times[n]))  # noqa
    rows = [{"variant": n, "mode": variants[n][0],
             "median_s": statistics.median(t for t, _ in times[n]),
             "median_cpu_s": statistics.median(c for _, c in times[n]),
             "speedup_vs_reference": ratio(n, 0), "cpu_speedup_vs_reference": ratio(n, 1),
             "rel_diff_f32": rel_diff(grads[n], grads["reference"]),
             "shape": args.shape, "ipc": args.ipc, "steps": args.steps,
             "threads": torch.get_num_threads(), "rounds": args.repeats,
             "date": time.strftime("%Y-%m-%d")} for n in names]
    full = {r["mode"]: r["median_cpu_s"] for r in rows if r["variant"].endswith("(all)")}
    for r in rows:  # > 1: that variant is slower than the full version (CPU seconds)
        r["cpu_vs_all"] = r["median_cpu_s"] / full.get(r["mode"], r["median_cpu_s"])
    name = f"unroll_ablation_{args.shape}_{args.device}"
    save_table(name, rows)
    print(f"{args.shape}, ipc {args.ipc}, N={args.steps}, {device_name(args.device)}, "
          f"{args.repeats} timed rounds")
    print_table([{k: r[k] for k in ("variant", "median_s", "speedup_vs_reference",
                                    "median_cpu_s", "cpu_speedup_vs_reference", "cpu_vs_all",
                                    "rel_diff_f32")} for r in rows])
    _ablation_plot(rows, name)


def _ablation_plot(rows, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r["variant"] for r in rows], [r["median_s"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds per iteration (median)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
