"""The single-process phases of a run: experts, distillation with periodic evaluation,
final evaluation and baseline, report. The CLI calls these in order; `runtime/` replaces
the parts it spreads over a cluster and reuses the rest.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from mct_ray import formats, report
from mct_ray import storage as layout
from mct_ray.augment import Augmenter
from mct_ray.config import Config
from mct_ray.data import ImageData, load_data
from mct_ray.distill import Distiller, init_synthetic
from mct_ray.errors import DataError
from mct_ray.evaluate import EvalResult, evaluate, random_real
from mct_ray.experts import ExpertResult, train_expert
from mct_ray.nets import NetSpec, make_spec
from mct_ray.rng import generator
from mct_ray.storage import Storage, parent_and_name
from mct_ray.tensorboard import TensorBoardLog
from mct_ray.trajectory import FullTrajectory, Trajectory

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What every phase needs, built once from the config."""

    cfg: Config
    data: ImageData
    spec: NetSpec
    aug: Augmenter
    device: str

    @classmethod
    def build(cls, cfg: Config) -> "Context":
        return cls.from_data(cfg, load_data(cfg.data, cfg.seed))

    @classmethod
    def from_data(cls, cfg: Config, data: ImageData, num_cpus: float = 0) -> "Context":
        """`num_cpus`: what a Ray worker was given, its thread count unless the config sets
        one (the same count gives the same floating-point result on every path)."""
        device = setup_torch(cfg, num_cpus)
        spec = make_spec(cfg.net, data.shape, data.num_classes)
        return cls(cfg, data, spec, Augmenter(cfg.augment), device)


def setup_torch(cfg: Config, num_cpus: float = 0) -> str:
    """Set torch's thread count and return the device to use."""
    threads = cfg.run.num_threads or int(num_cpus)
    if threads:
        torch.set_num_threads(threads)
    device = cfg.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise DataError("run.device=cuda but no CUDA device is visible")
    return device


# ---------------------------------------------------------------------------------------
# Experts.

def save_expert(store: Storage, result: ExpertResult, store_init_as_seed: bool) -> None:
    seed = result.init_seed if store_init_as_seed else None
    store.write_bytes(layout.expert_name(result.expert_id),
                      formats.save_trajectory(result.convex, init_seed=seed))
    if result.full is not None:
        store.write_bytes(layout.expert_name(result.expert_id, full=True),
                          formats.save_trajectory(result.full))


def generate_experts(ctx: Context, store: Storage) -> list[ExpertResult]:
    cfg = ctx.cfg
    results = []
    bar = tqdm(range(cfg.expert.num_experts), desc="experts", disable=not cfg.run.progress)
    for i in bar:
        result = train_expert(ctx.spec, ctx.data, cfg.expert, ctx.aug, cfg.seed, i, ctx.device)
        save_expert(store, result, cfg.expert.store_init_as_seed)
        results.append(result)
        bar.set_postfix(test_acc=f"{result.test_acc:.3f}")
    return results


def load_experts(store: Storage, spec: NetSpec, full: bool) -> list[Trajectory]:
    """Every expert of a run folder: convex files (MCT) or full ones (MTT)."""
    names = [n for n in store.list(layout.EXPERTS, ".safetensors")
             if n.endswith(".full.safetensors") == full]
    if not names:
        kind = "full (MTT) trajectories; train experts with expert.keep_full=true" if full \
            else "expert trajectories; run `mct-ray experts` first"
        raise DataError(f"no {kind} under {store.uri_of(layout.EXPERTS)}")
    return [formats.load_trajectory(store.read_bytes(n), store.uri_of(n), spec) for n in names]


def storage_bytes(store: Storage, spec: NetSpec, epochs: int) -> tuple[int, int]:
    """(bytes of the first stored convex expert, bytes the same expert takes stored by MTT)."""
    names = [n for n in store.list(layout.EXPERTS, ".safetensors") if ".full." not in n]
    convex = store.size(names[0]) if names else 0
    mtt = len(formats.save_trajectory(
        FullTrajectory(spec, torch.zeros(epochs + 1, spec.num_params))))
    return convex, mtt


# ---------------------------------------------------------------------------------------
# Distillation with periodic evaluation.

@dataclass
class DistillOutcome:
    rows: list[dict] = field(default_factory=list)  # one per finished evaluation
    best_acc: float = -1.0
    best_iteration: int = -1
    pending: list["PendingEval"] = field(default_factory=list)  # from a checkpoint
    step_times: list[float] = field(default_factory=list)  # perf_counter after each step
    resumed_from: int | None = None


@dataclass(frozen=True)
class PendingEval:
    """A snapshot submitted for evaluation, with what its metrics row needs."""

    iteration: int
    images: torch.Tensor  # (num_classes * ipc, C, H, W)
    labels: torch.Tensor
    step_size: float
    loss: float
    seconds: float

    @property
    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.images, self.labels, self.step_size

    def to_state(self) -> dict:
        return {"iteration": self.iteration, "images": self.images, "labels": self.labels,
                "step_size": self.step_size, "loss": self.loss, "seconds": self.seconds}


class LocalEvaluator:
    """Scores each snapshot at once, in this process (the `--local` path)."""

    def __init__(self, ctx: "Context"):
        self.ctx, self.done = ctx, []

    def submit(self, p: PendingEval) -> None:
        cfg = self.ctx.cfg
        result = evaluate(self.ctx.spec, p.images, p.labels, p.step_size, self.ctx.data,
                          cfg.eval, cfg.augment, cfg.seed, p.iteration, device=self.ctx.device)
        self.done.append((p, result))

    def poll(self) -> list[tuple[PendingEval, EvalResult]]:
        done, self.done = self.done, []
        return done

    drain = poll

    @property
    def pending(self) -> list[PendingEval]:
        return []


class Progress:
    """A tqdm bar; the Ray runtime passes its own with the same three methods."""

    def __init__(self, desc: str, total: int, initial: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def note(self, **values: float) -> None:
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})

    def close(self) -> None:
        self.bar.close()


def _save_synthetic(store: Storage, name: str, ctx: Context, snapshot, iteration: int) -> None:
    images, labels, step = snapshot
    info = {"iteration": iteration, "data": ctx.data.name, "mean": ctx.data.mean,
            "std": ctx.data.std, "zca": ctx.cfg.data.zca, "method": ctx.cfg.distill.method}
    store.write_bytes(name, formats.save_synthetic(images, labels, step, ctx.spec, info))


def make_distiller(ctx: Context, trajectories: list[Trajectory]) -> Distiller:
    cfg = ctx.cfg
    images, labels = init_synthetic(ctx.data.train_x, ctx.data.train_y, ctx.data.num_classes,
                                    cfg.distill.ipc, generator(cfg.seed, "init"))
    return Distiller(ctx.spec, trajectories, images, labels, cfg.distill, ctx.aug, cfg.seed,
                     ctx.device)


def eval_iterations(every: int, iterations: int) -> list[int]:
    """Evaluate at 0, every, 2*every, ... and always at the last iteration."""
    its = list(range(0, iterations + 1, every))
    return its if its[-1] == iterations else its + [iterations]


def record_eval(store: Storage, ctx: Context, outcome: DistillOutcome, p: PendingEval,
                result: EvalResult, tb: TensorBoardLog | None = None) -> None:
    """Append a metrics row and keep synthetic.safetensors at the best evaluation so far.

    Results may arrive out of order (Ray); the best is the highest mean, ties going to the
    earlier iteration, so the outcome does not depend on arrival order."""
    outcome.rows.append({"iteration": p.iteration, "acc_mean": result.mean,
                         "acc_std": result.std, "loss": p.loss, "step_size": p.step_size,
                         "seconds": p.seconds})
    outcome.rows.sort(key=lambda r: r["iteration"])
    if (result.mean, -p.iteration) > (outcome.best_acc, -outcome.best_iteration):
        outcome.best_acc, outcome.best_iteration = result.mean, p.iteration
        _save_synthetic(store, layout.SYNTHETIC, ctx, p.snapshot, p.iteration)
    store.write_table(layout.METRICS, outcome.rows)
    if tb is not None:
        tb.scalars({"eval/acc_mean": result.mean, "eval/acc_std": result.std}, p.iteration)
        tb.image_grid("synthetic", p.images, p.iteration, nrow=ctx.cfg.distill.ipc)
        tb.flush()


def save_checkpoint(store: Storage, ctx: Context, distiller: Distiller,
                    outcome: DistillOutcome, pending: list[PendingEval], run_id: str = "") -> None:
    _save_synthetic(store, layout.LAST, ctx, distiller.snapshot(), distiller.iteration)
    state = {"distiller": distiller.state_dict(), "rows": outcome.rows,
             "best_acc": outcome.best_acc, "best_iteration": outcome.best_iteration,
             "pending": [p.to_state() for p in pending], "run_id": run_id}
    store.write_bytes(layout.STATE, formats.save_state(state))


def checkpoint_run_id(store: Storage) -> str | None:
    """The run id stored with the checkpoint (None without one): a restarted worker finds
    its own run's checkpoint by it."""
    if not store.exists(layout.STATE):
        return None
    state = formats.load_state(store.read_bytes(layout.STATE), store.uri_of(layout.STATE))
    return state.get("run_id", "")


def load_checkpoint(store: Storage, distiller: Distiller) -> DistillOutcome:
    state = formats.load_state(store.read_bytes(layout.STATE), store.uri_of(layout.STATE))
    distiller.load_state_dict(state["distiller"])
    pending = [PendingEval(**p) for p in state.get("pending", [])]
    return DistillOutcome(state["rows"], state["best_acc"], state["best_iteration"], pending,
                          resumed_from=distiller.iteration)


def run_distillation(ctx: Context, store: Storage, trajectories: list[Trajectory],
                     resume: bool = False, evaluator=None, progress_cls=None,
                     run_id: str = "") -> DistillOutcome:
    """The distillation loop with an evaluation at each of `eval_iterations`.

    `evaluator` scores snapshots (default: at once, here); the Ray runtime passes one that
    fans them out and returns results as they finish, so the loop never waits for them.
    """
    cfg = ctx.cfg
    evaluator = evaluator or LocalEvaluator(ctx)
    distiller = make_distiller(ctx, trajectories)
    outcome = DistillOutcome()
    if resume and store.exists(layout.STATE):
        outcome = load_checkpoint(store, distiller)
        log.info("resumed at iteration %d", distiller.iteration)
        for p in outcome.pending:  # scored by a process that is gone: submit again
            evaluator.submit(p)
    evals = set(eval_iterations(cfg.eval.every, cfg.distill.iterations))
    started, losses = time.perf_counter(), []
    bar = (progress_cls or Progress)("distill", cfg.distill.iterations, distiller.iteration,
                                     cfg.run.progress)
    tb = TensorBoardLog(store) if cfg.run.tensorboard else None
    try:
        while True:
            it = distiller.iteration
            submitted = it in evals and not any(
                r["iteration"] == it for r in outcome.rows) and not any(
                p.iteration == it for p in evaluator.pending)
            if submitted:
                images, labels, step_size = distiller.snapshot()
                loss = statistics.fmean(losses) if losses else float("nan")
                evaluator.submit(PendingEval(it, images, labels, step_size, loss,
                                             time.perf_counter() - started))
                losses.clear()
            for p, result in evaluator.poll():
                record_eval(store, ctx, outcome, p, result, tb)
                bar.note(acc=result.mean, best=outcome.best_acc)
            if submitted or (cfg.run.checkpoint_every and it % cfg.run.checkpoint_every == 0):
                save_checkpoint(store, ctx, distiller, outcome, evaluator.pending, run_id)
            if it >= cfg.distill.iterations:
                break
            # A DivergenceError propagates: synthetic.safetensors (best evaluated) and the
            # last checkpoint stay on disk as they were.
            step = distiller.step()
            outcome.step_times.append(time.perf_counter())
            if not step.skipped:
                losses.append(step.loss)
                if tb is not None:
                    tb.scalars({"distill/loss": step.loss, "distill/step_size": step.step_size},
                               step.iteration)
            bar.update(1)
        for p, result in evaluator.drain():
            record_eval(store, ctx, outcome, p, result, tb)
        save_checkpoint(store, ctx, distiller, outcome, [], run_id)
    finally:  # a DivergenceError still leaves the event files complete
        bar.close()
        if tb is not None:
            tb.close()
    return outcome


# ---------------------------------------------------------------------------------------
# Summary.

def iterations_to_within(rows: list[dict], points: float = 0.02) -> int:
    """First evaluated iteration whose accuracy is within `points` of the run's best."""
    best = max(r["acc_mean"] for r in rows)
    return min(r["iteration"] for r in rows if r["acc_mean"] >= best - points)


def second_half_spread(rows: list[dict]) -> float:
    """Standard deviation of the evaluated accuracy over the second half of the run."""
    last = max(r["iteration"] for r in rows)
    accs = [r["acc_mean"] for r in rows if r["iteration"] >= last / 2]
    return statistics.pstdev(accs) if len(accs) > 1 else 0.0


def summarise(ctx: Context, experts: Storage, outcome: DistillOutcome,
              baseline: EvalResult | None, seconds: float) -> dict:
    cfg, rows = ctx.cfg, outcome.rows
    best = max(rows, key=lambda r: r["acc_mean"])
    final = max(rows, key=lambda r: r["iteration"])
    convex_bytes, mtt_bytes = storage_bytes(experts, ctx.spec, cfg.expert.epochs)
    return {
        "method": cfg.distill.method, "dataset": cfg.data.name, "ipc": cfg.distill.ipc,
        "seed": cfg.seed, "iterations": final["iteration"],
        "best_acc_mean": best["acc_mean"], "best_acc_std": best["acc_std"],
        "best_iteration": best["iteration"],
        "final_acc_mean": final["acc_mean"], "final_acc_std": final["acc_std"],
        "iterations_to_within_2pts": iterations_to_within(rows),
        "second_half_acc_std": second_half_spread(rows),
        "random_baseline_acc_mean": baseline.mean if baseline else None,
        "random_baseline_acc_std": baseline.std if baseline else None,
        "storage_bytes_per_expert": convex_bytes, "mtt_bytes_per_expert": mtt_bytes,
        "storage_ratio": convex_bytes / mtt_bytes if convex_bytes else None,
        "final_step_size": final["step_size"], "wall_seconds": seconds,
    }


def run_baseline(ctx: Context) -> EvalResult:
    cfg = ctx.cfg
    images, labels = random_real(ctx.data, cfg.distill.ipc, cfg.seed)
    return evaluate(ctx.spec, images, labels, cfg.expert.lr, ctx.data, cfg.eval, cfg.augment,
                    cfg.seed, 0, tag="baseline", device=ctx.device)


def synthetic_source(store: Storage, synthetic: str | None) -> tuple[Storage, str]:
    """Where `eval` reads: a given file (path or URI), else the run's synthetic set."""
    if not synthetic:
        return store, layout.SYNTHETIC
    folder, name = parent_and_name(synthetic)
    return Storage.open(folder), name


def write_eval(store: Storage, cfg: Config, result: EvalResult, source: str) -> dict:
    out = {"acc_mean": result.mean, "acc_std": result.std, "accs": list(result.accs),
           "num_eval": cfg.eval.num_eval, "epochs": cfg.eval.epochs, "source": source}
    store.write_json("eval.json", out)
    return out


def finish(ctx: Context, store: Storage, outcome: DistillOutcome, started: float,
           experts: Storage, baseline: EvalResult | None) -> dict:
    summary = summarise(ctx, experts, outcome, baseline, time.perf_counter() - started)
    store.write_json(layout.SUMMARY, summary)
    images, labels, _, info = formats.load_synthetic(store.read_bytes(layout.SYNTHETIC),
                                                     store.uri_of(layout.SYNTHETIC))
    store.write_bytes(layout.GRID_PNG, report.image_grid_png(images, labels, info,
                                                             ctx.data.num_classes))
    store.write_bytes(layout.CURVE_PNG, report.curve_png(outcome.rows, summary))
    return summary
