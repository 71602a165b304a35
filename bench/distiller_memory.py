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
import time

import numpy as np
import ray

from bench.common import print_table, save_table
from bench.ray_common import bar_png, digits, median, start_ray, train_experts
from mct_ray.context import Context, Launch
from mct_ray.loop import run_distillation
from mct_ray.records import DistillOutcome
from mct_ray.pipeline import make_distiller
from mct_ray.runtime import workers
from mct_ray.runtime.codec import data_from_numpy, trajectory_from_numpy
from mct_ray.storage import Storage


def measure(cfg, data_ref, refs: list, out: str, copy: bool) -> dict:
    if copy:  # what the actor would hold if the values were passed instead of refs
        refs = [ray.put({k: (np.array(v) if isinstance(v, np.ndarray) else v)
                         for k, v in ray.get(r).items()}) for r in refs]
    actor = ray.remote(CopyingDistiller if copy else MeasuredDistiller).options(
        num_cpus=1).remote(cfg, out)
    ray.get(actor.run.remote({"data": data_ref, "experts": refs},
                             Launch(Storage.open(out), False, "mem", time.time())))
    memory = ray.get(actor.memory.remote())
    ray.kill(actor)
    return memory


class MeasuredDistiller(workers.DistillWorker):
    """The library's distillation actor, run as `DistillWorker.run` does, except that it
    keeps what it built (the data set and the trajectories, as views of the object store)
    after the run, so that `memory` counts what the actor holds while it distils; plus
    `memory` itself."""

    def run(self, refs: dict, launch: Launch) -> DistillOutcome:
        self.ctx = Context.from_data(self.cfg, data_from_numpy(ray.get(refs["data"])),
                                     self.cfg.ray.distill_num_cpus)
        self.trajectories = self.load_trajectories(ray.get(refs["experts"]))
        outcome = run_distillation(self.ctx, self.store,
                                   make_distiller(self.ctx, self.trajectories),
                                   workers.RayEvals(self.cfg, refs["data"]).submit, launch)
        return outcome

    def load_trajectories(self, values: list[dict]) -> list:
        return [trajectory_from_numpy(d, self.ctx.spec, self.cfg.needs_full) for d in values]

    def memory(self) -> dict:
        """This process's resident and unique (not shared with the object store) bytes,
        after returning freed heap to the system (so they count what is held, not what the
        allocator happens to keep)."""
        import ctypes
        import gc

        import psutil

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc
            pass
        info = psutil.Process().memory_full_info()
        return {"rss": info.rss, "uss": info.uss}


class CopyingDistiller(MeasuredDistiller):
    """The same actor, with each trajectory copied out of the object store first."""

    def load_trajectories(self, values: list[dict]) -> list:
        import copy

        import torch

        trajectories = [copy.copy(t) for t in super().load_trajectories(values)]
        for t in trajectories:
            for name in ("anchors", "beta"):
                object.__setattr__(t, name, torch.clone(getattr(t, name)))
        return trajectories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    start_ray(num_cpus=2)
    cfg, ctx, backend = digits(["expert.num_experts=32", "eval.baseline=false",
                                f"distill.iterations={args.iterations}",
                                f"eval.every={args.iterations}", "eval.num_eval=1",
                                "eval.epochs=10"])
    rows = []
    with tempfile.TemporaryDirectory() as out:
        refs = train_experts(ctx, backend, out)
        data_ref = backend.data_ref
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
