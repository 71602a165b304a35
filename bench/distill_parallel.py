"""One distillation iteration on one worker against a gang of N (`ray.distill_workers=N`,
default 2): peak memory per worker, seconds per iteration, and how far the image gradients
agree.

Each worker is a fresh process (one torch thread on a CPU, one device on GPUs), connected
to the others by gloo on 127.0.0.1 (NCCL on GPUs); the single worker has no process group:
the library's one-worker path. Each builds the library's Distiller on two random convex
trajectories of the case's network, random images and DSA on, and runs one iteration
(`Distiller.step`) after a first one that builds the optimiser states. Memory, two
measures in separate runs: tensor bytes, the peak of the bytes held by tensors allocated
during the iteration (torch.profiler's tracking on a CPU; torch.cuda.max_memory_allocated
on a GPU), which is what the ratio is taken of; and on a CPU the peak resident set during
the iteration (VmHWM, reset through /proc/self/clear_refs) minus the resident set before
it (after malloc_trim), which also counts what glibc keeps of freed blocks and varies by 10-20 % from run to
run. Agreement: max |g2 - g1| / max |g1| over the image gradients of
worker 0 (float32), beside the same measure between one worker and one worker whose images
are one float32 ulp up (float32 unrolls this long are ill-conditioned: any change of the
summation order shows at that level; tests/test_shard.py checks equality in float64).

Cases: the CIFAR-10 shape (ConvNet-128-3, ipc 10, N=30, the whole set per step, unroll) and
the ImageNet subsets' 128x128 shape (ConvNetD5, ipc 1 and 10, checkpoint, N reduced from
MTT's 20 to keep this CPU run short: checkpoint mode's memory is one step's graph plus N
parameter copies of 2.3 MB each, so N hardly moves it; the seconds scale with N).

    python -m bench.distill_parallel                 # every case, about 20 min on 2 cores
    python -m bench.distill_parallel --cases cifar10
    python -m bench.distill_parallel --quick         # seconds (the tests)
    python -m bench.distill_parallel --device cuda --workers 4   # on a node with 4 GPUs

Last line: distill_parallel_memory_ratio=<peak tensor bytes per worker with N / with 1, the
first case (the CIFAR-10 shape)>.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import pathlib
import re
import socket
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench.common import RESULTS, print_table, save_table  # noqa: E402
from mct_ray.augment import Augmenter  # noqa: E402
from mct_ray.config import AugmentConfig, DistillConfig, NetConfig  # noqa: E402
from mct_ray.distill import Distiller  # noqa: E402
from mct_ray.nets import Network, make_spec  # noqa: E402
from mct_ray.shard import Shard  # noqa: E402
from mct_ray.trajectory import ConvexTrajectory, beta_from_step_norms  # noqa: E402

# name -> (channels, size, classes, depth, ipc, syn_steps, batch_syn, grad_mode)
CASES = {
    "cifar10": (3, 32, 10, 3, 10, 30, 0, "unroll"),
    "imagenet128-ipc1": (3, 128, 10, 5, 1, 4, 0, "checkpoint"),
    "imagenet128-ipc10": (3, 128, 10, 5, 10, 2, 0, "checkpoint"),
}
QUICK = {"quick": (3, 16, 4, 2, 2, 3, 0, "unroll")}


def _kb(key: str) -> int:
    text = pathlib.Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def build(case: tuple, shard: Shard, device: str = "cpu") -> Distiller:
    channels, size, classes, depth, ipc, steps, batch, mode = case
    spec = make_spec(NetConfig(width=128 if size > 16 else 16, depth=depth),
                     (channels, size, size), classes)
    gen = torch.Generator().manual_seed(0)
    trajectories = []
    for _ in range(2):
        start = torch.cat([p.flatten() for p in spec.init_params(gen)])
        end = start + 0.01 * torch.randn(start.shape, generator=gen)
        beta = beta_from_step_norms(torch.rand(4, len(spec.param_shapes()), generator=gen))
        trajectories.append(ConvexTrajectory(spec, (0, 4), torch.stack([start, end]), beta))
    images = torch.randn(classes * ipc, channels, size, size, generator=gen)
    labels = torch.arange(classes).repeat_interleave(ipc)
    cfg = DistillConfig(grad_mode=mode, batch_syn=batch, syn_steps=steps, expert_epochs=2,
                        max_start_epoch=2, lr_img=100.0)
    return Distiller(Network(spec, device), trajectories, images, labels.to(device), cfg,
                     Augmenter(AugmentConfig()), seed=0, shard=shard)


def peak_tensor_bytes(fn) -> int:
    """The most bytes held by tensors allocated while `fn` runs (torch.profiler's trace)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(pathlib.Path(f.name).read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def worker(rank: int, world: int, port: int, case: tuple, out: str, probe: str,
           device: str) -> None:
    """One worker's iteration; `probe`: rss (with the time and gradient), tensors (the
    tensor bytes) or nudged (the gradient with the images one ulp up)."""
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    if world > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=30))
    try:
        distiller = build(case, Shard.current(), device)
        distiller.step()  # the optimiser states exist before the measured iteration
        if probe == "nudged":  # every pixel one float32 ulp up: the comparison's noise floor
            with torch.no_grad():
                distiller.images.copy_(torch.nextafter(distiller.images,
                                                       torch.tensor(float("inf"))))
        result = {"grad": None}
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        elif probe == "rss":
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # the warm-up's freed heap handed back
            base = _kb("VmRSS")
            pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        started = time.perf_counter()
        if probe == "tensors" and device != "cuda":
            result["extra"] = peak_tensor_bytes(distiller.step)
        else:
            distiller.step()
        if device == "cuda":
            torch.cuda.synchronize()
            result["extra"] = torch.cuda.max_memory_allocated() - base
        elif probe == "rss":
            result["extra"] = _kb("VmHWM") - base
        result["seconds"] = time.perf_counter() - started
        if rank == 0:
            result["grad"] = distiller.images.grad.cpu().clone()
        torch.save(result, f"{out}.{rank}")
    finally:
        if world > 1:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(case: tuple, world: int, probe: str, device: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result"
        mp.spawn(worker, args=(world, free_port(), case, out, probe, device), nprocs=world)
        return [torch.load(f"{out}.{rank}") for rank in range(world)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--quick", action="store_true", help="a tiny case only (the tests)")
    parser.add_argument("--out", default=None, help="results folder (default: bench/results)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workers", type=int, default=2, help="the gang's size (N)")
    args = parser.parse_args(argv)
    cases = QUICK if args.quick else {name: CASES[name] for name in args.cases}
    n, rows = args.workers, []
    for name, case in cases.items():
        run = {(w, probe): measure(case, w, probe, args.device) for w in (1, n)
               for probe in (("rss", "tensors") if args.device == "cpu" else ("rss",))}
        nudged = measure(case, 1, "nudged", args.device)[0]["grad"]
        one, many = run[(1, "rss")], run[(n, "rss")]
        tensors = (run[(1, "tensors")], run[(n, "tensors")]) if args.device == "cpu" \
            else (one, many)
        g1, gn = one[0]["grad"], many[0]["grad"]
        row = {"case": name, "device": args.device, "workers": n, "ipc": case[4],
               "syn_steps": case[5], "grad_mode": case[7],
               "tensor_mb_1": tensors[0][0]["extra"] / 2**20,
               "tensor_mb_n": max(r["extra"] for r in tensors[1]) / 2**20,
               "rss_mb_1": one[0]["extra"] / 2**20,
               "rss_mb_n": max(r["extra"] for r in many) / 2**20,
               "s_per_it_1": one[0]["seconds"], "s_per_it_n": max(r["seconds"] for r in many),
               "grad_rel_diff": float((gn - g1).abs().max() / g1.abs().max()),
               "grad_rel_diff_ulp": float((nudged - g1).abs().max() / g1.abs().max())}
        row["memory_ratio"] = row["tensor_mb_n"] / row["tensor_mb_1"]
        row["speedup"] = row["s_per_it_1"] / row["s_per_it_n"]
        rows.append(row)
        print(f"{name}: {row['tensor_mb_1']:.0f} MB of tensors on one worker, "
              f"{row['tensor_mb_n']:.0f} MB per worker of {n} ({row['memory_ratio']:.2f}; "
              f"resident {row['rss_mb_1']:.0f} against {row['rss_mb_n']:.0f} MB); "
              f"{row['s_per_it_1']:.2f} s against {row['s_per_it_n']:.2f} s per iteration; "
              f"gradients agree to {row['grad_rel_diff']:.1e} (one worker against itself with "
              f"the images one ulp up: {row['grad_rel_diff_ulp']:.1e})", flush=True)
    save_table("distill_parallel" + ("_quick" if args.quick else f"_{args.device}"), rows,
               pathlib.Path(args.out) if args.out else RESULTS)
    print_table(rows)
    first = rows[0]["memory_ratio"]
    print(f"distill_parallel_memory_ratio={first:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
