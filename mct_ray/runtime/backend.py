"""The Ray backend of `pipeline.run`: experts as tasks spread over the nodes (re-run
elsewhere when their worker or node dies), the distillation loop in one actor (or, in a
grid trial, in the trial itself), evaluations fanned out as tasks that the loop never
waits for. The driver holds refs and small results; trajectories it trained come back as
numpy objects it owns and writes to storage as each arrives.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Iterator

import ray

from mct_ray import layout
from mct_ray.context import Context, Launch
from mct_ray.errors import MctRayError
from mct_ray.experts import ExpertResult, load_expert
from mct_ray.nets import NetSpec
from mct_ray.pipeline import LocalBackend
from mct_ray.records import DistillOutcome
from mct_ray.runtime import waits, workers
from mct_ray.runtime.cluster import ClusterError
from mct_ray.runtime.codec import data_to_numpy, expert_from_numpy, trajectory_to_numpy
from mct_ray.runtime.gang import distill_gang
from mct_ray.runtime.workers import RayEvals
from mct_ray.storage import Storage
from mct_ray.synthetic import SyntheticSet

log = logging.getLogger(__name__)


class DistillationLost(MctRayError):
    """Every attempt of the distillation actor was lost with its process or node."""

    exit_code = 1


def check_room(cfg, phases: tuple[str, ...]) -> None:
    """Before any work: each phase's work fits some node of the cluster (a task that fits
    none would wait forever); evaluations that fit none are run by the distillation."""
    need = workers.needs(cfg)
    gang = cfg.ray.distill_workers
    if "distill" in phases and gang > 1 and waits.copies_fitting(need["distillation"]) < gang:
        raise ClusterError(
            f"the Ray cluster cannot place a distillation gang of {gang} workers of "
            f"{waits.shown(need['distillation'])} each: its nodes have room for "
            f"{waits.copies_fitting(need['distillation'])} (nodes: {waits.shown_nodes()}); "
            "lower ray.distill_workers or add nodes that have them")
    for what in (("expert",) if "experts" in phases else ()) + \
            (("distillation",) if "distill" in phases else ()):
        if not waits.fits_a_node(need[what]):
            shown = waits.shown(need[what])
            largest = max(waits.capacities().values(),
                          key=lambda c: (c.get("GPU", 0), c.get("CPU", 0)), default={})
            raise ClusterError(
                f"no node of the Ray cluster can run the {what} ({shown}; the largest node "
                f"has CPU {largest.get('CPU', 0):g}, GPU {largest.get('GPU', 0):g}): lower "
                f"ray.{'expert' if what == 'expert' else 'distill'}_num_cpus/_num_gpus or "
                "add a node that has them")


def expert_refs(experts: Storage, spec: NetSpec, full: bool) -> list[ray.ObjectRef]:
    """The folder's trajectories (full ones with `full`) in the object store, read one at a
    time. Put by the driver, so held on its node: a task's result lives on the node that ran
    it, and a lost node would take it along (Ray would train the expert again)."""
    return [ray.put(trajectory_to_numpy(load_expert(experts, i, spec, full), i, spec))
            for i in layout.expert_ids(experts, full)]


class RayBackend:
    """Experts as tasks, the distillation loop in an actor (or a gang), evaluations as
    tasks; the data set put in the object store once (or given: `data_ref`)."""

    def __init__(self, ctx: Context, data_ref: ray.ObjectRef | None = None):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.data_ref = ray.put(data_to_numpy(ctx.data)) if data_ref is None else data_ref
        self.nodes: dict[int, str] = {}
        self.evals = RayEvals(self.cfg, self.data_ref)
        self.evals_fit: bool | None = None  # whether an evaluation fits some node

    def train_experts(self, ids: list[int]) -> Iterator[ExpertResult]:
        r = self.cfg.ray
        task = ray.remote(waits.announced).options(
            name="train_expert", num_cpus=r.expert_num_cpus, num_gpus=r.expert_num_gpus,
            max_retries=r.expert_retries, scheduling_strategy="SPREAD",
            num_returns="streaming")
        need = workers.needs(self.cfg)["expert"]
        todo, inflight = deque(ids), {}
        limit = r.max_expert_workers or len(ids)
        while todo or inflight:
            while todo and len(inflight) < limit:
                i = todo.popleft()
                inflight[i] = waits.Launched(
                    task.remote(workers.train_expert_task, self.cfg, self.data_ref, i),
                    waits.Waiting(f"training of expert {i}", need, r.start_wait_s))
            finished = [i for i, t in inflight.items() if t.done()]
            if not finished:
                time.sleep(0.05)
            for i in finished:
                value = inflight.pop(i).result()  # read-only views of the object store
                self.nodes[i] = value["node_id"]
                yield expert_from_numpy(value, self.ctx.spec)

    def submit_eval(self, syn: SyntheticSet, tag: str, model: str | None = None):
        """Evaluation tasks; here, in the driver, when they fit no node of the cluster."""
        if self.evals_fit is None:
            need = workers.needs(self.cfg)["evaluation"]
            self.evals_fit = waits.fits_a_node(need)
            if not self.evals_fit:
                log.warning("no node of the cluster can run an evaluation (%s): the driver "
                            "evaluates the baselines itself", need)
        if self.evals_fit:
            return self.evals.submit(syn, tag, model)
        return LocalBackend(self.ctx).submit_eval(syn, tag, model)

    def distill(self, store: Storage, launch: Launch) -> DistillOutcome:
        refs = expert_refs(launch.experts, self.ctx.spec, self.cfg.needs_full)
        if self.cfg.ray.distill_workers > 1:
            return distill_gang(self.cfg, store.uri, {"data": self.data_ref, "experts": refs},
                                launch)
        # The driver, not Ray's actor restarts, replaces a lost actor: Ray spends its task
        # retries on "temporarily unavailable" within seconds while a node is being lost.
        r = self.cfg.ray
        then = f"; add such a node and continue with --resume --out {store.uri}"
        for attempt in range(r.distill_restarts + 1):
            actor = ray.remote(workers.DistillWorker).options(
                name=f"mct-ray-distill-{launch.run_id[:12]}-{attempt}",
                num_cpus=r.distill_num_cpus, num_gpus=r.distill_num_gpus, max_restarts=0,
            ).remote(self.cfg, store.uri)
            try:
                waits.until_ready(actor.__ray_ready__.remote(), waits.Waiting(
                    "distillation actor", workers.needs(self.cfg)["distillation"],
                    r.start_wait_s, then=then))
                return ray.get(actor.run.remote({"data": self.data_ref, "experts": refs},
                                                launch))
            except ray.exceptions.RayActorError as exc:  # its process or its node is gone
                lost = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
                log.warning("the distillation actor was lost (%s); %s", lost,
                            "starting another from the last checkpoint"
                            if attempt < r.distill_restarts else "no restarts left")
            finally:
                ray.kill(actor)
        raise DistillationLost(
            f"the distillation actor was lost {r.distill_restarts + 1} times "
            f"(ray.distill_restarts={r.distill_restarts}); continue the run with --resume "
            f"--out {store.uri}")

    def expert_nodes(self) -> list[str]:
        return sorted(set(self.nodes.values()))
