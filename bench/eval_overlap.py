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

import ray

from bench.common import print_table, save_table
from bench.ray_common import bar_png, digits, median, start_ray
from mct_ray.pipeline import run_distillation
from mct_ray.runtime import workers
from mct_ray.runtime.driver import generate_experts


class DropEvaluator:
    """Evaluation switched off: snapshots are dropped, nothing is scored."""

    pending: list = []

    def submit(self, p) -> None:
        pass

    def poll(self) -> list:
        return []

    drain = poll


class BenchDistiller(workers.DistillWorker):
    def run_mode(self, evaluate: bool) -> dict:
        evaluator = workers.RayEvaluator(self.cfg_dict, self.data_ref) if evaluate \
            else DropEvaluator()
        outcome = run_distillation(self.ctx, self.store, self.trajectories,
                                   evaluator=evaluator, progress_cls=workers.RayProgress)
        t = outcome.step_times
        return {"rate": (len(t) - 1) / (t[-1] - t[0]), "evaluations": len(outcome.rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    start_ray(num_cpus=2)
    cfg, ctx, data_ref = digits([f"distill.iterations={args.iterations}",
                                 f"eval.every={args.every}", "eval.num_eval=1",
                                 "expert.num_experts=4", "run.num_threads=1"])
    with tempfile.TemporaryDirectory() as out:
        from mct_ray.storage import Storage

        refs, _ = generate_experts(cfg, Storage.open(out), data_ref, ctx, False)
        actor = ray.remote(BenchDistiller).options(num_cpus=1).remote(
            cfg.to_dict(), {"data": data_ref, "experts": refs}, out, "bench")
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
