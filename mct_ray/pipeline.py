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
from mct_ray.storage import Storage
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
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        device = cfg.run.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise DataError("run.device=cuda but no CUDA device is visible")
        data = load_data(cfg.data, cfg.seed)
        spec = make_spec(cfg.net, data.shape, data.num_classes)
        return cls(cfg, data, spec, Augmenter(cfg.augment), device)


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
    rows: list[dict] = field(default_factory=list)  # one per evaluation
    best_acc: float = -1.0
    best_iteration: int = -1


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


def record_eval(store: Storage, ctx: Context, outcome: DistillOutcome, result: EvalResult,
                iteration: int, snapshot, loss: float, seconds: float) -> None:
    """Append a metrics row and keep synthetic.safetensors at the best evaluation so far."""
    outcome.rows.append({"iteration": iteration, "acc_mean": result.mean,
                         "acc_std": result.std, "loss": loss, "step_size": snapshot[2],
                         "seconds": seconds})
    outcome.rows.sort(key=lambda r: r["iteration"])
    if result.mean > outcome.best_acc:
        outcome.best_acc, outcome.best_iteration = result.mean, iteration
        _save_synthetic(store, layout.SYNTHETIC, ctx, snapshot, iteration)
    store.write_table(layout.METRICS, outcome.rows)


def save_checkpoint(store: Storage, ctx: Context, distiller: Distiller,
                    outcome: DistillOutcome) -> None:
    _save_synthetic(store, layout.LAST, ctx, distiller.snapshot(), distiller.iteration)
    state = {"distiller": distiller.state_dict(), "rows": outcome.rows,
             "best_acc": outcome.best_acc, "best_iteration": outcome.best_iteration}
    store.write_bytes(layout.STATE, formats.save_state(state))


def load_checkpoint(store: Storage, distiller: Distiller) -> DistillOutcome:
    state = formats.load_state(store.read_bytes(layout.STATE), store.uri_of(layout.STATE))
    distiller.load_state_dict(state["distiller"])
    return DistillOutcome(state["rows"], state["best_acc"], state["best_iteration"])


def run_distillation(ctx: Context, store: Storage, trajectories: list[Trajectory],
                     resume: bool = False) -> DistillOutcome:
    cfg = ctx.cfg
    distiller = make_distiller(ctx, trajectories)
    outcome = DistillOutcome()
    if resume and store.exists(layout.STATE):
        outcome = load_checkpoint(store, distiller)
        log.info("resumed at iteration %d", distiller.iteration)
    evals = set(eval_iterations(cfg.eval.every, cfg.distill.iterations))
    started, losses = time.perf_counter(), []
    bar = tqdm(total=cfg.distill.iterations, initial=distiller.iteration, desc="distill",
               disable=not cfg.run.progress)
    while True:
        it = distiller.iteration
        if it in evals and not any(r["iteration"] == it for r in outcome.rows):
            snap = distiller.snapshot()
            result = evaluate(ctx.spec, snap[0], snap[1], snap[2], ctx.data, cfg.eval,
                              cfg.augment, cfg.seed, it, device=ctx.device)
            loss = statistics.fmean(losses) if losses else float("nan")
            record_eval(store, ctx, outcome, result, it, snap, loss,
                        time.perf_counter() - started)
            losses.clear()
            bar.set_postfix(acc=f"{result.mean:.3f}", best=f"{outcome.best_acc:.3f}")
            save_checkpoint(store, ctx, distiller, outcome)
        elif cfg.run.checkpoint_every and it % cfg.run.checkpoint_every == 0:
            save_checkpoint(store, ctx, distiller, outcome)
        if it >= cfg.distill.iterations:
            break
        # A DivergenceError propagates: synthetic.safetensors (best evaluated) and the
        # last checkpoint stay on disk as they were.
        step = distiller.step()
        if not step.skipped:
            losses.append(step.loss)
        bar.update(1)
    bar.close()
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


def finish(ctx: Context, store: Storage, outcome: DistillOutcome, started: float,
           experts: Storage) -> dict:
    baseline = run_baseline(ctx) if ctx.cfg.eval.baseline else None
    summary = summarise(ctx, experts, outcome, baseline, time.perf_counter() - started)
    store.write_json(layout.SUMMARY, summary)
    images, labels, _, info = formats.load_synthetic(store.read_bytes(layout.SYNTHETIC),
                                                     store.uri_of(layout.SYNTHETIC))
    store.write_bytes(layout.GRID_PNG, report.image_grid_png(images, labels, info,
                                                             ctx.data.num_classes))
    store.write_bytes(layout.CURVE_PNG, report.curve_png(outcome.rows, summary))
    return summary
