"""The distillation actor's memory with 8 against 32 experts of the digits recipe.

The actor receives refs and maps the trajectories read-only from the object store (zero
copy), so its own memory should not grow with the number of experts. Two numbers per run,
taken after the actor has built everything, run `--iterations` iterations and returned
freed heap to the system (malloc_trim); medians over `--rounds` alternating rounds:
  rss  resident set size (counts object-store pages the process has touched),
  uss  unique set size (memory no other process shares: what copies would add to).
A third run per size copies every trajectory into private memory, to show what the
zero-copy path avoids. Last line: distiller_rss_32v8=<rss with 32 / rss with 8> (zero-copy).

    python -m bench.distiller_memory [--iterations 20]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import ray

from bench.common import print_table, save_table
from bench.ray_common import bar_png, digits, median, start_ray
from mct_ray.runtime import workers
from mct_ray.runtime.driver import generate_experts
from mct_ray.storage import Storage


def measure(cfg, data_ref, refs: list, out: str, copy: bool) -> dict:
    if copy:  # what the actor would hold if the values were passed instead of refs
        refs = [ray.put({k: (np.array(v) if isinstance(v, np.ndarray) else v)
                         for k, v in ray.get(r).items()}) for r in refs]
    actor = ray.remote(CopyingDistiller if copy else workers.DistillWorker).options(
        num_cpus=1).remote(cfg.to_dict(), {"data": data_ref, "experts": refs}, out, "mem")
    ray.get(actor.run.remote(False))
    memory = ray.get(actor.memory.remote())
    ray.kill(actor)
    return memory


class CopyingDistiller(workers.DistillWorker):
    """The same actor, with each trajectory copied out of the object store first."""

    def __init__(self, *args):
        super().__init__(*args)
        import copy

        import torch

        self.trajectories = [copy.copy(t) for t in self.trajectories]
        for t in self.trajectories:
            for name in ("anchors", "beta"):
                object.__setattr__(t, name, torch.clone(getattr(t, name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    start_ray(num_cpus=2)
    cfg, ctx, data_ref = digits(["expert.num_experts=32", "eval.baseline=false",
                                 f"distill.iterations={args.iterations}",
                                 f"eval.every={args.iterations}", "eval.num_eval=1",
                                 "eval.epochs=10"])
    rows = []
    with tempfile.TemporaryDirectory() as out:
        refs, _ = generate_experts(cfg, Storage.open(out), data_ref, ctx, False)
        bytes_per_expert = sum(v.nbytes for v in ray.get(refs[0]).values()
                               if isinstance(v, np.ndarray))
        measure(cfg, data_ref, refs[:8], out, False)  # warm-up: the first actor runs larger
        for round_ in range(1, args.rounds + 1):  # alternating, medians below
            for copy in (False, True):
                for num in (8, 32):
                    m = measure(cfg, data_ref, refs[:num], out, copy)
                    rows.append({"round": round_, "experts": num,
                                 "path": "copied" if copy else "zero-copy refs",
                                 "rss_mb": m["rss"] / 2**20, "uss_mb": m["uss"] / 2**20,
                                 "trajectory_mb": num * bytes_per_expert / 2**20})
    print_table(rows)
    save_table("distiller_memory", rows)
    get = lambda path, num, key: median([r[key] for r in rows
                                         if r["path"] == path and r["experts"] == num])
    zero = "zero-copy refs"
    bar_png("distiller_memory", ["8 experts", "32 experts"],
            [get(zero, 8, "rss_mb"), get(zero, 32, "rss_mb")], "actor RSS (MB)",
            "distillation actor, digits recipe, zero-copy refs")
    for path in (zero, "copied"):
        print(f"{path}: USS +{get(path, 32, 'uss_mb') - get(path, 8, 'uss_mb'):.1f} MB "
              f"from 8 to 32 experts (24 more trajectories: "
              f"{24 * bytes_per_expert / 2**20:.1f} MB)")
    ray.shutdown()
    print("median of rounds; rss and uss in MB")
    print(f"distiller_rss_32v8={get(zero, 32, 'rss_mb') / get(zero, 8, 'rss_mb'):.4f}")


if __name__ == "__main__":
    main()
