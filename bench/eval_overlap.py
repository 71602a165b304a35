"""Distillation iteration rate with the evaluation fan-out on against off.

Set-up ("a spare worker exists"): a local Ray with 2 CPUs on this 2-core machine; the
distillation actor takes one CPU (one torch thread), evaluation tasks the other, so they run
beside the loop, one at a time. "on" evaluates every `--every` iterations (eval.num_eval
networks each, queued on the spare CPU); "off" runs the same loop with an evaluator that
drops its snapshots. The rate is iterations per second between the first and the last
step; rounds alternate off/on. Last line: eval_overlap_ratio=<median rate on / median off>.

    python -m bench.eval_overlap [--iterations 100] [--every 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray

from bench.common import print_table, save_table
from bench.ray_common import bar_png, digits, median, start_ray, train_experts
from mct_ray.context import Context, Launch
from mct_ray.distill import Distiller
from mct_ray.evaluate import EvalResult
from mct_ray.loop import Finished, run_distillation
from mct_ray.pipeline import make_distiller
from mct_ray.runtime import workers
from mct_ray.runtime.codec import data_from_numpy, trajectory_from_numpy
from mct_ray.synthetic import SyntheticSet


def drop(syn: SyntheticSet, tag: str) -> Finished:
    """Evaluation switched off: the snapshot is dropped, nothing is scored (the placeholder
    result's rows are not counted)."""
    return Finished(EvalResult((0.0,)))


def time_steps(distiller: Distiller) -> list[float]:
    """Record time.perf_counter() after each of the distiller's steps, in the list returned."""
    times, step = [], distiller.step

    def timed_step():
        result = step()
        times.append(time.perf_counter())
        return result

    distiller.step = timed_step
    return times


class BenchDistiller(workers.DistillWorker):
    """The distillation actor, built once from the refs (as `DistillWorker.run` builds it),
    running the library's loop with the evaluation fan-out on or off."""

    def __init__(self, cfg, refs: dict, out_uri: str, run_id: str):
        super().__init__(cfg, out_uri)
        self.run_id = run_id
        self.data_ref = refs["data"]
        self.ctx = Context.from_data(cfg, data_from_numpy(ray.get(self.data_ref)),
                                     cfg.ray.distill_num_cpus)
        self.trajectories = [trajectory_from_numpy(d, self.ctx.spec, cfg.needs_full)
                             for d in ray.get(refs["experts"])]
        self.evals = workers.RayEvals(cfg, self.data_ref)

    def run_mode(self, evaluate: bool) -> dict:
        submit = self.evals.submit if evaluate else drop
        distiller = make_distiller(self.ctx, self.trajectories)
        t = time_steps(distiller)
        outcome = run_distillation(self.ctx, self.store, distiller, submit,
                                   Launch(self.store, False, self.run_id, time.time()))
        return {"rate": (len(t) - 1) / (t[-1] - t[0]),
                "evaluations": len(outcome.rows) if evaluate else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    start_ray(num_cpus=2)
    cfg, ctx, backend = digits([f"distill.iterations={args.iterations}",
                                f"eval.every={args.every}", "eval.num_eval=1",
                                "expert.num_experts=4", "run.num_threads=1"])
    with tempfile.TemporaryDirectory() as out:
        refs = train_experts(ctx, backend, out)
        actor = ray.remote(BenchDistiller).options(num_cpus=1).remote(
            cfg, {"data": backend.data_ref, "experts": refs}, out, "bench")
        ray.get(actor.run_mode.remote(True))  # warm-up: the eval worker process starts
        rows = []
        for round_ in range(1, args.rounds + 1):
            for evaluate in (False, True):
                r = ray.get(actor.run_mode.remote(evaluate))
                rows.append({"round": round_, "fan_out": "on" if evaluate else "off",
                             "iterations_per_s": r["rate"], "evaluations": r["evaluations"]})
    print_table(rows)
    off = median([r["iterations_per_s"] for r in rows if r["fan_out"] == "off"])
    on = median([r["iterations_per_s"] for r in rows if r["fan_out"] == "on"])
    save_table("eval_overlap", rows)
    bar_png("eval_overlap", ["fan-out off", "fan-out on"], [off, on], "iterations / s",
            f"digits, eval every {args.every} its, 1 spare CPU")
    print(f"median iterations/s: off {off:.2f}, on {on:.2f} "
          f"({cfg.eval.epochs}-epoch evaluations every {args.every} iterations)")
    ray.shutdown()
    print(f"eval_overlap_ratio={on / off:.4f}")


if __name__ == "__main__":
    main()
