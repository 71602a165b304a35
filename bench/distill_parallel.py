"""One distillation iteration on one worker against a gang of two (`ray.distill_workers=2`):
peak memory per worker, seconds per iteration, and how far the two image gradients agree.

Each worker is a fresh process with one torch thread, connected to the other by gloo on
127.0.0.1 (the single worker has no process group: the library's one-worker path). Each
builds the library's Distiller on two random convex trajectories of the case's network,
random images and DSA on, and runs one iteration (`Distiller.step`). Memory: the peak
resident set during the iteration (VmHWM, reset through /proc/self/clear_refs) minus the
resident set after set-up. Agreement: max |g2 - g1| / max |g1| over the image gradients of
worker 0 (float32), beside the same measure between one worker and one worker whose images
are one float32 ulp up (float32 unrolls this long are ill-conditioned: any change of the
summation order shows at that level; tests/test_shard.py checks equality in float64).

Cases: the CIFAR-10 shape (ConvNet-128-3, ipc 10, N=30, the whole set per step, unroll) and
the ImageNet subsets' 128x128 shape (ConvNetD5, ipc 1 and 10, checkpoint, N reduced from
MTT's 20 to keep this CPU run short: checkpoint mode's memory is one step's graph plus N
parameter copies of 1.3 MB each, so N hardly moves it; the seconds scale with N).

    python -m bench.distill_parallel                 # every case, about 15 min on 2 cores
    python -m bench.distill_parallel --cases cifar10
    python -m bench.distill_parallel --quick         # seconds (the tests)

Last line: distill_parallel_memory_ratio=<peak per worker with 2 / with 1, CIFAR-10 shape>.
"""

from __future__ import annotations

import argparse
import datetime
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
from mct_ray.nets import make_spec  # noqa: E402
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


def build(case: tuple, shard: Shard) -> Distiller:
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
    return Distiller(spec, trajectories, images, labels, cfg, Augmenter(AugmentConfig()),
                     seed=0, shard=shard)


def worker(rank: int, world: int, port: int, case: tuple, out: str, nudge: bool) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=30))
    try:
        distiller = build(case, Shard.current())
        if nudge:  # every pixel one float32 ulp up: the noise floor of the comparison
            with torch.no_grad():
                distiller.images.copy_(torch.nextafter(distiller.images,
                                                       torch.tensor(float("inf"))))
        base = _kb("VmRSS")
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        started = time.perf_counter()
        distiller.step()
        seconds = time.perf_counter() - started
        torch.save({"extra": _kb("VmHWM") - base, "seconds": seconds,
                    "grad": distiller.images.grad.clone() if rank == 0 else None},
                   f"{out}.{rank}")
    finally:
        if world > 1:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(case: tuple, world: int, nudge: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result"
        mp.spawn(worker, args=(world, free_port(), case, out, nudge), nprocs=world)
        return [torch.load(f"{out}.{rank}") for rank in range(world)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--quick", action="store_true", help="a tiny case only (the tests)")
    parser.add_argument("--out", default=None, help="results folder (default: bench/results)")
    args = parser.parse_args(argv)
    cases = QUICK if args.quick else {name: CASES[name] for name in args.cases}
    rows = []
    for name, case in cases.items():
        one, two, nudged = measure(case, 1), measure(case, 2), measure(case, 1, nudge=True)
        g1, g2, g1n = one[0]["grad"], two[0]["grad"], nudged[0]["grad"]
        row = {"case": name, "ipc": case[4], "syn_steps": case[5], "grad_mode": case[7],
               "peak_mb_1": one[0]["extra"] / 2**20,
               "peak_mb_2": max(r["extra"] for r in two) / 2**20,
               "s_per_it_1": one[0]["seconds"], "s_per_it_2": max(r["seconds"] for r in two),
               "grad_rel_diff": float((g2 - g1).abs().max() / g1.abs().max()),
               "grad_rel_diff_ulp": float((g1n - g1).abs().max() / g1.abs().max())}
        row["memory_ratio"] = row["peak_mb_2"] / row["peak_mb_1"]
        row["speedup"] = row["s_per_it_1"] / row["s_per_it_2"]
        rows.append(row)
        print(f"{name}: {row['peak_mb_1']:.0f} MB on one worker, {row['peak_mb_2']:.0f} MB per "
              f"worker of two ({row['memory_ratio']:.2f}); {row['s_per_it_1']:.2f} s against "
              f"{row['s_per_it_2']:.2f} s per iteration; gradients agree to "
              f"{row['grad_rel_diff']:.1e} (one worker against itself with the images one "
              f"ulp up: {row['grad_rel_diff_ulp']:.1e})", flush=True)
    save_table("distill_parallel" + ("_quick" if args.quick else ""), rows,
               pathlib.Path(args.out) if args.out else RESULTS)
    print_table(rows)
    first = rows[0]["memory_ratio"]
    print(f"distill_parallel_memory_ratio={first:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
