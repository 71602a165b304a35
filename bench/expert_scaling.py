"""Expert generation on Ray: 2 one-CPU workers against 1, on this machine.

The same experts (digits recipe; ids 0..n-1) are trained with at most 1 and at most 2 in
flight, rounds interleaved (1, 2, 1, 2, ...) after a warm-up, so both see the same machine
state. Each run's trajectories are checked identical to the first run's: parallelism changes
only the wall time. Last line: expert_scaling_2v1=<median 1-worker seconds / median 2-worker>.

    python -m bench.expert_scaling [--experts 4] [--epochs 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
import torch

from bench.common import print_table, save_table
from bench.ray_common import bar_png, digits, median, start_ray, train_experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    start_ray(num_cpus=2)
    base = [f"expert.num_experts={args.experts}", f"expert.epochs={args.epochs}",
            "distill.max_start_epoch=2", "ray.expert_num_cpus=1"]
    reference, rows = None, []
    for round_ in range(args.rounds + 1):  # round 0 warms both worker processes up
        for workers in (1, 2):
            cfg, ctx, backend = digits([*base, f"ray.max_expert_workers={workers}"])
            with tempfile.TemporaryDirectory() as out:
                started = time.perf_counter()
                refs = train_experts(ctx, backend, out)
                seconds = time.perf_counter() - started
            anchors = [torch.from_numpy(v["anchors"].copy()) for v in ray.get(refs)]
            reference = reference or anchors
            assert all(torch.equal(a, b) for a, b in zip(reference, anchors)), \
                "experts differ between runs"
            if round_:
                rows.append({"round": round_, "workers": workers, "experts": args.experts,
                             "epochs": args.epochs, "seconds": seconds})
    print_table(rows)
    t1 = median([r["seconds"] for r in rows if r["workers"] == 1])
    t2 = median([r["seconds"] for r in rows if r["workers"] == 2])
    save_table("expert_scaling", rows)
    bar_png("expert_scaling", ["1 worker", "2 workers"], [t1, t2], "seconds (median)",
            f"{args.experts} digits experts x {args.epochs} epochs, 2-core CPU")
    print(f"median seconds: 1 worker {t1:.2f}, 2 workers {t2:.2f}; "
          "trajectories identical across all runs")
    ray.shutdown()
    print(f"expert_scaling_2v1={t1 / t2:.4f}")


if __name__ == "__main__":
    main()
