"""What runs on Ray workers: plain functions and one plain class, made remote at launch.

Each is a few lines around the core. Workers receive the config as a dict (validated again,
cheaply, on arrival) and the data set and trajectories as object refs to numpy arrays, so
every process on a node reads one shared copy.
"""

from __future__ import annotations

import logging
import os
import ray
from ray.experimental import tqdm_ray
from ray.util.metrics import Gauge

from mct_ray.config import from_dict
from mct_ray.evaluate import EvalResult, eval_seed, train_and_test
from mct_ray.experts import train_expert
from mct_ray.pipeline import Context, PendingEval, checkpoint_run_id, run_distillation
from mct_ray.runtime.codec import (as_tensor, data_from_numpy, expert_to_numpy,
                                   trajectory_from_numpy)
from mct_ray.storage import Storage

log = logging.getLogger(__name__)


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


# ---------------------------------------------------------------------------------------
# Progress: a bar the driver draws (tqdm_ray), a log line per note, dashboard gauges.

class RayProgress:
    def __init__(self, desc: str, total: int, initial: int = 0, enabled: bool = True):
        self.desc, self.enabled, self.gauges = desc, enabled, {}
        self.bar = tqdm_ray.tqdm(total=total, desc=desc) if enabled else None
        self.done = initial
        if self.bar is not None and initial:
            self.bar.update(initial)
        self._gauge("total").set(total)
        self._gauge("done").set(initial)

    def _gauge(self, key: str) -> Gauge:
        if key not in self.gauges:
            self.gauges[key] = Gauge(f"mct_ray_{self.desc}_{key}",
                                     description=f"mct-ray {self.desc}: {key}")
        return self.gauges[key]

    def update(self, n: int = 1) -> None:
        self.done += n
        self._gauge("done").set(self.done)
        if self.bar is not None:
            self.bar.update(n)

    def note(self, **values: float) -> None:
        text = ", ".join(f"{k} {v:.4f}" for k, v in values.items())
        for key, value in values.items():
            self._gauge(key).set(value)
        if self.bar is not None:
            self.bar.set_description(f"{self.desc} ({text})")
        log.info("%s %d: %s", self.desc, self.done, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------
# Tasks.

def train_expert_task(cfg_dict: dict, data: dict, expert_id: int) -> dict:
    """One expert; the trajectory comes back as numpy arrays, owned by the caller."""
    cfg = from_dict(cfg_dict)
    ctx = Context.from_data(cfg, data_from_numpy(data), cfg.ray.expert_num_cpus)
    result = train_expert(ctx.spec, ctx.data, cfg.expert, ctx.aug, cfg.seed, expert_id,
                          ctx.device)
    return {**expert_to_numpy(result, ctx.spec), "node_id": node_id(), "pid": os.getpid()}


def evaluate_task(cfg_dict: dict, data: dict, snapshot: dict, tag: str, iteration: int,
                  index: int) -> float:
    """Train evaluation network `index` on a snapshot; its test accuracy."""
    cfg = from_dict(cfg_dict)
    ctx = Context.from_data(cfg, data_from_numpy(data), cfg.ray.eval_num_cpus)
    return train_and_test(ctx.spec, as_tensor(snapshot["images"]),
                          as_tensor(snapshot["labels"]), snapshot["step_size"],
                          ctx.data.test_x, ctx.data.test_y, cfg.eval, cfg.augment,
                          eval_seed(cfg.seed, tag, iteration, index), ctx.device)


_remote_evaluate = None


def submit_evaluation(cfg_dict: dict, data_ref: ray.ObjectRef, images, labels,
                      step_size: float, tag: str, iteration: int) -> list[ray.ObjectRef]:
    """Put one snapshot in the object store and fan out eval.num_eval networks on it."""
    global _remote_evaluate
    if _remote_evaluate is None:  # exported to the cluster once per process
        _remote_evaluate = ray.remote(evaluate_task)
    cfg = from_dict(cfg_dict)
    r = cfg.ray
    task = _remote_evaluate.options(num_cpus=r.eval_num_cpus, num_gpus=r.eval_num_gpus,
                                    max_retries=r.eval_retries)
    snapshot = ray.put({"images": images.numpy(), "labels": labels.numpy(),
                        "step_size": step_size})
    return [task.remote(cfg_dict, data_ref, snapshot, tag, iteration, i)
            for i in range(cfg.eval.num_eval)]


class RayEvaluator:
    """Fans each snapshot out as eval tasks and hands back the ones that have finished,
    without ever waiting for them (except in `drain`, after the last iteration)."""

    def __init__(self, cfg_dict: dict, data_ref: ray.ObjectRef):
        self.cfg_dict, self.data_ref = cfg_dict, data_ref
        self.inflight: dict[int, tuple[PendingEval, list[ray.ObjectRef]]] = {}

    def submit(self, p: PendingEval) -> None:
        refs = submit_evaluation(self.cfg_dict, self.data_ref, p.images, p.labels, p.step_size,
                                 "syn", p.iteration)
        self.inflight[p.iteration] = (p, refs)

    def poll(self, timeout: float | None = 0) -> list[tuple[PendingEval, EvalResult]]:
        refs = [r for _, rs in self.inflight.values() for r in rs]
        if not refs:
            return []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        ready = set(ready)
        done = []
        for iteration in sorted(self.inflight):
            p, rs = self.inflight[iteration]
            if all(r in ready for r in rs):
                done.append((p, EvalResult(tuple(ray.get(rs)))))
                del self.inflight[iteration]
        return done

    def drain(self) -> list[tuple[PendingEval, EvalResult]]:
        return self.poll(timeout=None)

    @property
    def pending(self) -> list[PendingEval]:
        return [p for p, _ in self.inflight.values()]


# ---------------------------------------------------------------------------------------
# The distillation actor.

class DistillWorker:
    """Runs the core distillation loop on trajectories read zero-copy from the object store.

    `refs` is {"data": ref, "experts": [ref, ...]}: refs inside a container reach the actor
    unresolved, so it (not Ray's argument passing) decides when to map them. Restarted after
    a crash, Ray builds it again with the same arguments and retries `run`, which finds the
    checkpoint its run wrote (by `run_id`, unique per launch) and resumes from it.
    """

    def __init__(self, cfg_dict: dict, refs: dict, out_uri: str, run_id: str):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.cfg_dict, self.cfg = cfg_dict, from_dict(cfg_dict)
        self.data_ref = refs["data"]
        self.ctx = Context.from_data(self.cfg, data_from_numpy(ray.get(self.data_ref)),
                                     self.cfg.ray.distill_num_cpus)
        full = self.cfg.distill.method == "mtt"
        self.trajectories = [trajectory_from_numpy(d, self.ctx.spec, full)
                             for d in ray.get(refs["experts"])]
        self.store, self.run_id = Storage.open(out_uri), run_id

    def run(self, resume: bool) -> dict:
        restarted = checkpoint_run_id(self.store) == self.run_id
        if restarted:
            log.warning("distillation actor restarted: resuming from its last checkpoint")
        outcome = run_distillation(self.ctx, self.store, self.trajectories,
                                   resume=resume or restarted,
                                   evaluator=RayEvaluator(self.cfg_dict, self.data_ref),
                                   progress_cls=RayProgress, run_id=self.run_id)
        return {"rows": outcome.rows, "best_acc": outcome.best_acc,
                "best_iteration": outcome.best_iteration, "step_times": outcome.step_times,
                "resumed_from": outcome.resumed_from, "node_id": node_id()}

    def pid(self) -> int:
        return os.getpid()

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
