"""The Ray backend of `pipeline.run`: experts as tasks spread over the nodes (re-run
elsewhere when their worker or node dies), the distillation loop in one actor (or, in a
grid trial, in the trial itself), evaluations fanned out as tasks that the loop never
waits for. The driver holds refs and small results; trajectories it trained come back as
numpy objects it owns and writes to storage as each arrives.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

import ray

from mct_ray import storage as layout
from mct_ray.distill import SyntheticSet
from mct_ray.experts import ExpertResult
from mct_ray.loop import DistillOutcome
from mct_ray.pipeline import Context, load_expert
from mct_ray.runtime import workers
from mct_ray.runtime.codec import data_to_numpy, expert_from_numpy, trajectory_to_numpy
from mct_ray.runtime.workers import RayEval, RayEvals
from mct_ray.storage import Storage


class RayBackend:
    """`loop_here`: run the distillation loop in this process (a grid trial, which already
    holds its resources) rather than in an actor of its own. `expert_refs`: trajectories
    already in the object store (a grid's shared experts), used instead of the folder's."""

    def __init__(self, ctx: Context, data_ref: ray.ObjectRef | None = None,
                 expert_refs: list | None = None, loop_here: bool = False):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.data_ref = ray.put(data_to_numpy(ctx.data)) if data_ref is None else data_ref
        self.given_refs, self.loop_here = expert_refs, loop_here
        self.trained: dict[int, ray.ObjectRef] = {}  # expert id -> its task's result
        self.nodes: dict[int, str] = {}
        self.evals = RayEvals(self.cfg, self.data_ref)

    def train_experts(self, ids: list[int]) -> Iterator[ExpertResult]:
        r = self.cfg.ray
        task = ray.remote(workers.train_expert_task).options(
            num_cpus=r.expert_num_cpus, num_gpus=r.expert_num_gpus,
            max_retries=r.expert_retries, scheduling_strategy="SPREAD")
        todo, inflight = deque(ids), {}
        limit = r.max_expert_workers or len(ids)
        while todo or inflight:
            while todo and len(inflight) < limit:
                i = todo.popleft()
                inflight[task.remote(self.cfg, self.data_ref, i)] = i
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                i = inflight.pop(ref)
                value = ray.get(ref)  # read-only views of the object store
                self.trained[i], self.nodes[i] = ref, value["node_id"]
                yield expert_from_numpy(value, self.ctx.spec)

    def submit_eval(self, syn: SyntheticSet, tag: str, model: str | None = None) -> RayEval:
        return self.evals.submit(syn, tag, model)

    def expert_refs(self, experts: Storage, full: bool | None = None) -> list[ray.ObjectRef]:
        """The run's trajectories (full ones with `full`, default: what its method reads) in
        the object store: those trained here as they are, the others read from the folder
        one at a time."""
        if self.given_refs is not None:
            return self.given_refs
        spec = self.ctx.spec
        full = self.cfg.needs_full if full is None else full
        return [self.trained[i] if i in self.trained else
                ray.put(trajectory_to_numpy(load_expert(experts, i, spec, full), i, spec))
                for i in layout.expert_ids(experts, full)]

    def distill(self, store: Storage, experts: Storage, resume: bool, run_id: str,
                started: float) -> DistillOutcome:
        refs = self.expert_refs(experts)
        if self.loop_here:
            return workers.distill_from_refs(self.ctx, store, refs, self.submit_eval, resume,
                                             run_id, started)
        r = self.cfg.ray
        actor = ray.remote(workers.DistillWorker).options(
            name=f"mct-ray-distill-{run_id[:12]}", num_cpus=r.distill_num_cpus,
            num_gpus=r.distill_num_gpus, max_restarts=r.distill_restarts,
            max_task_retries=r.distill_restarts,
        ).remote(self.cfg, store.uri, run_id)
        try:
            result = ray.get(actor.run.remote({"data": self.data_ref, "experts": refs},
                                              resume, started))
        finally:
            ray.kill(actor)
        return DistillOutcome(**result)

    def placement(self) -> dict:
        return {"nodes": sorted(set(self.nodes.values()))} if self.nodes else {}
