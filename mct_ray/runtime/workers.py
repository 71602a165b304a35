"""What runs on Ray workers: two plain functions and one plain class, made remote by
`runtime.backend` (the class also by `runtime.gang`, in worker 0 of a gang), and the
evaluations' fan-out (used by the loop wherever it runs). Each is a few lines around the
core. Workers receive the frozen config itself (validated once, on the driver) and the data
set and trajectories as object refs to numpy arrays, so every process on a node reads one
shared copy.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import ray

from mct_ray.config import Config
from mct_ray.context import Context, Launch
from mct_ray.evaluate import EvalResult, eval_seed, train_and_test
from mct_ray.experts import train_expert
from mct_ray.loop import load_checkpoint, run_distillation
from mct_ray.pipeline import LocalBackend, make_distiller
from mct_ray.progress import configure_logging
from mct_ray.records import DistillOutcome
from mct_ray.runtime import waits
from mct_ray.runtime.codec import (data_from_numpy, expert_to_numpy, synthetic_from_numpy,
                                   synthetic_to_numpy, trajectory_from_numpy)
from mct_ray.runtime.waits import Launched, Waiting, announced
from mct_ray.storage import Storage
from mct_ray.synthetic import SyntheticSet

log = logging.getLogger(__name__)


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def train_expert_task(cfg: Config, data: dict, expert_id: int) -> dict:
    """One expert; the trajectory comes back as numpy arrays, owned by the caller."""
    configure_logging()
    ctx = Context.from_data(cfg, data_from_numpy(data), cfg.ray.expert_num_cpus)
    result = train_expert(ctx.net, ctx.data, cfg.expert_training, ctx.aug, cfg.seed,
                          expert_id)
    return {**expert_to_numpy(result, ctx.spec), "node_id": node_id()}


def evaluate_task(cfg: Config, data: dict, snapshot: dict, tag: str, index: int,
                  model: str | None = None) -> float:
    """Train evaluation network `index` (of `model`, default the distillation's) on a
    snapshot; its test accuracy."""
    configure_logging()
    ctx = Context.from_data(cfg, data_from_numpy(data), cfg.ray.eval_num_cpus)
    syn = synthetic_from_numpy(snapshot)
    return train_and_test(cfg, ctx.net, syn, ctx.data.test_x, ctx.data.test_y,
                          eval_seed(cfg.seed, tag, syn.iteration, index), model)


SETS = {"syn": "the synthetic set", "baseline": "the random real images",
        "final": "the best set"}  # what each evaluation tag scores, as a log line says it


@dataclass
class RayEval:
    """eval.num_eval evaluation tasks on one snapshot."""

    tasks: list[Launched]

    def done(self) -> bool:
        return all([t.done() for t in self.tasks])  # each checked: its wait is watched

    def result(self) -> EvalResult:
        return EvalResult(tuple(t.result() for t in self.tasks))


class RayEvals:
    """Puts each snapshot in the object store and fans out eval.num_eval networks on it.
    `beside`: what the distillation that waits for them holds, by node (its share is not
    theirs); `then`: what a person does when they can never start."""

    def __init__(self, cfg: Config, data_ref: ray.ObjectRef,
                 beside: dict[str, dict] | None = None, then: str = ""):
        r = cfg.ray
        self.cfg, self.data_ref, self.beside, self.then = cfg, data_ref, beside, then
        self.task = ray.remote(announced).options(
            name="evaluate", num_cpus=r.eval_num_cpus, num_gpus=r.eval_num_gpus,
            max_retries=r.eval_retries, num_returns="streaming")

    def submit(self, syn: SyntheticSet, tag: str, model: str | None = None) -> RayEval:
        """One task per network: eval.num_eval of the distillation's architecture, or of
        `model`."""
        snapshot = ray.put(synthetic_to_numpy(syn))
        need = needs(self.cfg)
        n, name = self.cfg.eval.num_eval, model or self.cfg.net.name
        return RayEval([Launched(
            self.task.remote(evaluate_task, self.cfg, self.data_ref, snapshot, tag, i, model),
            Waiting(f"evaluation {i + 1} of {n} ({name}) of {SETS.get(tag, tag)} at "
                    f"iteration {syn.iteration}", need["evaluation"], self.cfg.ray.start_wait_s,
                    self.beside, self.then))
            for i in range(n)])


def distill_from_refs(ctx: Context, store: Storage, expert_refs: list, submit,
                      launch: Launch) -> DistillOutcome:
    """The distillation loop on trajectories mapped zero-copy from the object store, in
    this process (the actor below, or a grid trial)."""
    trajectories = [trajectory_from_numpy(d, ctx.spec, ctx.cfg.needs_full)
                    for d in ray.get(expert_refs)]
    return run_distillation(ctx, store, make_distiller(ctx, trajectories, store), submit,
                            launch)


def needs(cfg: Config) -> dict[str, dict]:
    """Each kind of work's share of a node, as Ray schedules it."""
    r = cfg.ray
    return {"expert": {"CPU": r.expert_num_cpus, "GPU": r.expert_num_gpus},
            "distillation": {"CPU": r.distill_num_cpus, "GPU": r.distill_num_gpus},
            "evaluation": {"CPU": r.eval_num_cpus, "GPU": r.eval_num_gpus}}


def room_for_evaluation(cfg: Config, held: dict[str, dict]) -> bool:
    """Whether some node can run an evaluation while the distillation holds `held` (by
    node)."""
    return waits.fits_a_node(needs(cfg)["evaluation"], held)


class DistillWorker:
    """Runs the core distillation loop on trajectories read zero-copy from the object store.

    Its constructor takes only small values, so the driver can always start another: after
    its process or node is lost, the next one finds the checkpoint its run wrote (by
    its launch's `run_id`) and resumes from it. Where no node has room for an
    evaluation beside it (a cluster shrunk by a lost node, or one this small), it evaluates
    in its own process, with the same numbers.
    """

    def __init__(self, cfg: Config, out_uri: str):
        configure_logging()
        self.cfg, self.store = cfg, Storage.open(out_uri)

    def run(self, refs: dict, launch: Launch, gang_nodes: list[str] | None = None
            ) -> DistillOutcome:
        """`refs`: {"data": ref, "experts": [ref, ...]}; refs inside a container reach the
        actor unresolved, so it (not Ray's argument passing) decides when to map them.
        `gang_nodes`: in a gang, the node of each worker (each holds a distillation share)."""
        ctx = Context.from_data(self.cfg, data_from_numpy(ray.get(refs["data"])),
                                self.cfg.ray.distill_num_cpus)
        checkpoint = load_checkpoint(self.store)
        restarted = checkpoint is not None and checkpoint.run_id == launch.run_id
        if restarted:
            log.warning("distillation actor restarted: resuming from its last checkpoint")
        held = waits.holdings(gang_nodes or [node_id()], needs(self.cfg)["distillation"])
        submit = RayEvals(self.cfg, refs["data"], held,
                          f"; add such a node and continue with --resume --out "
                          f"{self.store.uri}").submit
        if not room_for_evaluation(self.cfg, held):
            log.warning("no node of the cluster has room for an evaluation (%s) beside the "
                        "distillation: evaluating in the distillation's own process",
                        needs(self.cfg)["evaluation"])
            submit = LocalBackend(ctx).submit_eval
        return distill_from_refs(ctx, self.store, refs["experts"], submit,
                                 dataclasses.replace(launch, resume=launch.resume or restarted))
