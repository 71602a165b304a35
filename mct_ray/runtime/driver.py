"""The job driver on Ray: the same phases as `pipeline`, spread over a cluster.

Experts are tasks (one per expert, spread over the nodes, re-run elsewhere when their worker
or node dies); their trajectories come back as numpy objects owned by this driver, which
also writes each to storage as it arrives. One distillation actor gets the list of refs and
fans its evaluations out as tasks. The driver never holds more than refs and small results.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections import deque

import ray

from mct_ray import formats, pipeline
from mct_ray import storage as layout
from mct_ray.config import Config
from mct_ray.errors import MctRayError
from mct_ray.evaluate import EvalResult, random_real
from mct_ray.runtime import workers
from mct_ray.runtime.codec import data_to_numpy, expert_from_numpy, trajectory_to_numpy
from mct_ray.runtime.cluster import check_address, connect, disconnect
from mct_ray.storage import Storage

log = logging.getLogger(__name__)


def unwrap(exc: ray.exceptions.RayTaskError) -> Exception:
    """A project error raised on a worker, as itself (its one-line message, its exit code)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, MctRayError) else exc


def generate_experts(cfg: Config, store: Storage, data_ref: ray.ObjectRef,
                     ctx: pipeline.Context, resume: bool) -> tuple[list[ray.ObjectRef], dict]:
    """Every expert exactly once, in id order, as refs; plus {expert_id: node_id}."""
    num = cfg.expert.num_experts
    refs, nodes = {}, {}
    if resume:  # experts already in storage are loaded, not trained again
        for name in store.list(layout.EXPERTS, ".safetensors"):
            if name.endswith(".full.safetensors") != (cfg.distill.method == "mtt"):
                continue
            i = int(name.rsplit("expert-", 1)[1].split(".")[0])
            traj = formats.load_trajectory(store.read_bytes(name), store.uri_of(name), ctx.spec)
            refs[i] = ray.put(trajectory_to_numpy(traj, i, ctx.spec))
    r = cfg.ray
    task = ray.remote(workers.train_expert_task).options(
        num_cpus=r.expert_num_cpus, num_gpus=r.expert_num_gpus, max_retries=r.expert_retries,
        scheduling_strategy="SPREAD")
    todo = deque(i for i in range(num) if i not in refs)
    limit = r.max_expert_workers or num
    inflight: dict[ray.ObjectRef, int] = {}
    bar = workers.RayProgress("experts", num, len(refs), cfg.run.progress)
    cfg_dict = cfg.to_dict()
    while todo or inflight:
        while todo and len(inflight) < limit:
            i = todo.popleft()
            inflight[task.remote(cfg_dict, data_ref, i)] = i
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for ref in ready:
            i = inflight.pop(ref)
            value = ray.get(ref)  # read-only views of the object store
            pipeline.save_expert(store, expert_from_numpy(value, ctx.spec),
                                 cfg.expert.store_init_as_seed)
            refs[i], nodes[i] = ref, value["node_id"]
            bar.update(1)
            bar.note(test_acc=value["test_acc"])
    bar.close()
    return [refs[i] for i in sorted(refs)], nodes


def distill(cfg: Config, store: Storage, experts: Storage, ctx: pipeline.Context,
            data_ref: ray.ObjectRef, expert_refs: list[ray.ObjectRef], resume: bool,
            started: float) -> dict:
    """The distillation actor's run, the baseline fanned out beside it, then the report."""
    cfg_dict, r = cfg.to_dict(), cfg.ray
    baseline = []
    if cfg.eval.baseline:
        images, labels = random_real(ctx.data, cfg.distill.ipc, cfg.seed)
        baseline = workers.submit_evaluation(cfg_dict, data_ref, images, labels, cfg.expert.lr,
                                             "baseline", 0)
    run_id = uuid.uuid4().hex
    actor = ray.remote(workers.DistillWorker).options(
        name=f"mct-ray-distill-{run_id[:12]}", num_cpus=r.distill_num_cpus,
        num_gpus=r.distill_num_gpus, max_restarts=r.distill_restarts,
        max_task_retries=r.distill_restarts,
    ).remote(cfg_dict, {"data": data_ref, "experts": expert_refs}, store.uri, run_id)
    result = ray.get(actor.run.remote(resume))
    ray.kill(actor)
    outcome = pipeline.DistillOutcome(result["rows"], result["best_acc"],
                                      result["best_iteration"])
    base = EvalResult(tuple(ray.get(baseline))) if baseline else None
    summary = pipeline.finish(ctx, store, outcome, started, experts, base)
    return {**summary, "resumed_from": result["resumed_from"]}


def _guarded(fn):
    """Check the cluster address and the storage (fail fast, nothing written), load the data
    set, start or join Ray, put the data set in the object store, run the command; project
    errors raised on workers come back as themselves."""
    def wrapped(cfg: Config, args: argparse.Namespace) -> dict:
        started_ray = False
        try:
            check_address()
            Storage.open(cfg.run.out, check=True)
            ctx = pipeline.Context.build(cfg)
            started_ray = connect(cfg.ray)
            data_ref = ray.put(data_to_numpy(ctx.data))
            return fn(cfg, args, ctx, data_ref)
        except ray.exceptions.RayTaskError as exc:
            raise unwrap(exc) from None
        finally:
            disconnect(started_ray)
    return wrapped


@_guarded
def cmd_experts(cfg, args, ctx, data_ref) -> dict:
    store = Storage.open(cfg.run.out)
    store.write_json(layout.CONFIG, cfg.to_dict())
    refs, nodes = generate_experts(cfg, store, data_ref, ctx, getattr(args, "resume", False))
    accs = [v["test_acc"] for v in ray.get(refs)]
    return {"experts": len(refs), "expert_test_acc": accs, "nodes": sorted(set(nodes.values()))}


@_guarded
def cmd_distill(cfg, args, ctx, data_ref) -> dict:
    started = time.perf_counter()
    store = Storage.open(cfg.run.out)
    experts = Storage.open(getattr(args, "experts", None) or cfg.run.out)
    trajs = pipeline.load_experts(experts, ctx.spec, full=cfg.distill.method == "mtt")
    refs = [ray.put(trajectory_to_numpy(t, i, ctx.spec)) for i, t in enumerate(trajs)]
    store.write_json(layout.CONFIG, cfg.to_dict())
    return distill(cfg, store, experts, ctx, data_ref, refs, args.resume, started)


@_guarded
def cmd_run(cfg, args, ctx, data_ref) -> dict:
    started = time.perf_counter()
    store = Storage.open(cfg.run.out)
    store.write_json(layout.CONFIG, cfg.to_dict())
    refs, _ = generate_experts(cfg, store, data_ref, ctx, args.resume)
    return distill(cfg, store, store, ctx, data_ref, refs, args.resume, started)


@_guarded
def cmd_eval(cfg, args, ctx, data_ref) -> dict:
    store = Storage.open(cfg.run.out)
    source, name = pipeline.synthetic_source(store, args.synthetic)
    images, labels, step, info = formats.load_synthetic(source.read_bytes(name),
                                                        source.uri_of(name), ctx.spec)
    refs = workers.submit_evaluation(cfg.to_dict(), data_ref, images, labels, step, "final",
                                     int(info.get("iteration", 0)))
    result = EvalResult(tuple(ray.get(refs)))
    return pipeline.write_eval(store, cfg, result, source.uri_of(name))


COMMANDS = {"run": cmd_run, "experts": cmd_experts, "distill": cmd_distill, "eval": cmd_eval}
