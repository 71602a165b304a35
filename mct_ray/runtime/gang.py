"""One distillation over a gang of `ray.distill_workers` workers, on Ray Train.

`TorchTrainer` starts the gang (one worker per device, in one placement group: PACK or
SPREAD), connects it with torch.distributed (gloo on CPUs, NCCL on GPUs) and, when a worker
or its node is lost, starts the whole gang again, up to `ray.distill_restarts` times
(`FailureConfig`). Every worker runs the same distiller steps on its rows of each
minibatch (`mct_ray.shard`); worker 0 alone runs the loop around them: evaluations,
checkpoints and every write to the run folder. A restarted gang resumes from worker 0's
last checkpoint in the run folder, as a restarted single distillation actor does; Ray
Train's own checkpoints are not used (they would be a second copy of that file, and the run
folder is what `--resume` reads).

The outcome, or an error of ours (a diverged distillation is not retried), comes back to
the driver through a small actor, `Report`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading

import ray
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mct_ray.config import Config
from mct_ray.context import Context, Launch
from mct_ray.errors import MctRayError
from mct_ray.loop import follow_distillation
from mct_ray.pipeline import make_distiller
from mct_ray.progress import configure_logging
from mct_ray.records import DistillOutcome
from mct_ray.runtime import workers
from mct_ray.runtime.codec import data_from_numpy, trajectory_from_numpy
from mct_ray.shard import Shard

log = logging.getLogger(__name__)


class GangFailed(MctRayError):
    """The gang was lost more often than ray.distill_restarts allows."""

    exit_code = 1


class Report:
    """Holds what worker 0 hands the driver: the outcome's fields, or an error of ours."""

    def __init__(self):
        self.value: DistillOutcome | None = None
        self.error: MctRayError | None = None

    def put(self, value: DistillOutcome | None, error: MctRayError | None = None) -> None:
        self.value, self.error = value, error

    def get(self) -> tuple[DistillOutcome | None, MctRayError | None]:
        return self.value, self.error


def gang_worker(config: dict) -> None:
    """Ray Train's loop for each worker: worker 0 runs the distillation loop (as the single
    actor does), the others the same steps in step with it."""
    configure_logging()
    cfg: Config = config["cfg"]
    if cfg.ray.distill_num_gpus and torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())  # "cuda" is then this worker's
    shard = Shard.current()
    refs = config["refs"]
    nodes = [None] * shard.world  # where the gang holds its shares (none for evaluations)
    torch.distributed.all_gather_object(nodes, workers.node_id())
    if shard.rank == 0:
        try:
            outcome = workers.DistillWorker(cfg, config["out"]).run(refs, config["launch"],
                                                                    nodes)
        except MctRayError as exc:  # ours: the same on a restart, so not retried
            ray.get(config["report"].put.remote(None, exc))
            # the others may wait in a collective for this worker: closing the group ends it
            torch.distributed.destroy_process_group()
            return
        ray.get(config["report"].put.remote(outcome))
        return
    ctx = Context.from_data(cfg, data_from_numpy(ray.get(refs["data"])),
                            cfg.ray.distill_num_cpus)
    trajectories = [trajectory_from_numpy(d, ctx.spec, cfg.needs_full)
                    for d in ray.get(refs["experts"])]
    try:
        follow_distillation(ctx, make_distiller(ctx, trajectories))
    except MctRayError:
        return  # worker 0 met it too, and reports it
    except Exception:
        if ray.get(config["report"].get.remote())[1] is not None:
            return  # worker 0 ended on an error of ours and closed the group: not a fault
        raise


def distill_gang(cfg: Config, out_uri: str, refs: dict, launch: Launch) -> DistillOutcome:
    """Run the distillation on a gang of ray.distill_workers workers; its outcome."""
    r = cfg.ray
    here = ray.get_runtime_context().get_node_id()  # with the driver: lost only with it
    report = ray.remote(Report).options(num_cpus=0, scheduling_strategy=(
        NodeAffinitySchedulingStrategy(here, soft=False))).remote()
    name = f"mct-ray-distill-{launch.run_id[:12]}"
    records = tempfile.mkdtemp(prefix=f"{name}-")  # Train's own records; the run is in out
    trainer = TorchTrainer(
        gang_worker,  # Train runs it in its own working directory: the folder as an absolute path
        train_loop_config={"cfg": cfg, "out": out_uri if "://" in out_uri
                           else os.path.abspath(out_uri), "launch": launch, "refs": refs,
                           "report": report},
        torch_config=TorchConfig(backend="nccl" if r.distill_num_gpus else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=r.distill_workers, use_gpu=r.distill_num_gpus > 0,
            resources_per_worker=workers.needs(cfg)["distillation"],
            placement_strategy=r.distill_placement),
        run_config=RunConfig(name=name, storage_path=records,
                             failure_config=FailureConfig(max_failures=r.distill_restarts)))
    lost = ""
    try:
        try:
            _fit_interruptibly(trainer)
        except TrainingFailedError as exc:  # the last of its attempts failed
            lost = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        value, error = ray.get(report.get.remote())
    finally:
        ray.kill(report)
        shutil.rmtree(records, ignore_errors=True)
    if error is not None:
        raise error
    if value is None:
        raise GangFailed(
            f"the distillation gang of {r.distill_workers} workers failed "
            f"{r.distill_restarts + 1} times (ray.distill_restarts={r.distill_restarts}"
            f"{': ' + lost if lost else ''}); continue the run with --resume --out {out_uri}")
    return value


def _fit_interruptibly(trainer: TorchTrainer) -> None:
    """trainer.fit() in a thread: its blocking wait on Train's controller lets no signal
    handler run, and the main thread must stay free for SIGTERM and Ctrl-C (the command then
    ends in one line; the gang goes with the driver's Ray or, on a cluster, with the driver)."""
    done, failed = threading.Event(), []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # handed to the main thread as it is
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=fit, name="distillation-gang", daemon=True).start()
    while not done.wait(0.2):
        pass
    if failed:
        raise failed[0]
