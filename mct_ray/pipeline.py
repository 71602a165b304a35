"""The run sequence, written once for every backend and command:

    experts       train the experts missing from the experts folder (all, on a fresh run)
    distill       the distillation loop with periodic evaluation; the random-real baseline
                  is scored beside it
    report        summary.json, synthetic.png, curve.png

`run(...)` is that order; a backend decides where each piece runs: `LocalBackend` (below) in
this process, `runtime.backend.RayBackend` on a Ray cluster (experts as tasks, the loop in an
actor or a grid trial, evaluations fanned out as tasks). `cli` checks the input
(`preflight`), takes the run folder (`runfolder`), picks a backend and calls `run`.
"""

from __future__ import annotations

import logging
import statistics
from typing import Iterator, Protocol

import torch

from mct_ray import formats, layout, report, starting
from mct_ray.context import Context
from mct_ray.distill import Distiller
from mct_ray.errors import DataError
from mct_ray.evaluate import EvalResult, evaluate, random_real
from mct_ray.experts import ExpertResult, train_expert
from mct_ray.loop import DistillOutcome, EvalFuture, Finished, parts_with, run_distillation
from mct_ray.nets import NetSpec
from mct_ray.progress import Progress
from mct_ray.shard import Shard
from mct_ray.storage import Storage
from mct_ray.synthetic import SyntheticSet
from mct_ray.trajectory import FullTrajectory, Trajectory

log = logging.getLogger(__name__)

PHASES = ("experts", "distill")


class Backend(Protocol):
    """Where the pieces of a run execute."""

    def train_experts(self, ids: list[int]) -> Iterator[ExpertResult]:
        """Train these experts; yield each as it finishes (any order)."""

    def submit_eval(self, syn: SyntheticSet, tag: str, model: str | None = None
                    ) -> EvalFuture:
        """Score a synthetic set with eval.num_eval fresh networks (the distillation's, or
        `model` of the zoo)."""

    def distill(self, store: Storage, experts: Storage, resume: bool, run_id: str,
                started: float) -> DistillOutcome:
        """Run the distillation loop on the experts of `experts` into `store`."""

    def placement(self) -> dict:
        """What the report says about where the work ran (empty for one process)."""


class LocalBackend:
    """Everything in this process, one piece after another."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def train_experts(self, ids: list[int]) -> Iterator[ExpertResult]:
        c = self.ctx
        for i in ids:
            yield train_expert(c.spec, c.data, c.cfg.expert_training, c.aug, c.cfg.seed, i,
                               c.device, c.kernels)

    def submit_eval(self, syn: SyntheticSet, tag: str, model: str | None = None
                    ) -> EvalFuture:
        c = self.ctx
        return Finished(evaluate(c.cfg, c.spec, c.data, syn, tag, c.device, c.kernels, model))

    def distill(self, store: Storage, experts: Storage, resume: bool, run_id: str,
                started: float) -> DistillOutcome:
        trajectories = load_experts(experts, self.ctx.spec, self.ctx.cfg.needs_full)
        return run_distillation(self.ctx, store, make_distiller(self.ctx, trajectories, store),
                                self.submit_eval, resume, run_id, started)

    def placement(self) -> dict:
        return {}


# ---------------------------------------------------------------------------------------
# The sequence.

def run(ctx: Context, store: Storage, backend: Backend, experts: Storage,
        phases: tuple[str, ...], resume: bool, run_id: str, started: float) -> dict:
    """The phases of one command, in the one order there is (see the module docstring).
    `experts` is the folder holding (or receiving) the experts; `started` is time.time()
    at the command's start."""
    result: dict = {}
    if "experts" in phases:
        result = train_missing_experts(ctx, experts, backend)
    if "distill" in phases:
        cfg = ctx.cfg
        real = random_real(cfg, ctx.data)  # scored on every architecture beside the loop
        baselines = {m: backend.submit_eval(real, "baseline", m)
                     for m in (None, *cfg.other_models)} if cfg.eval.baseline else {}
        outcome = backend.distill(store, experts, resume, run_id, started)
        scores = {m: f.result() for m, f in baselines.items()}
        best = formats.load_synthetic(store.read_bytes(layout.SYNTHETIC),
                                      store.uri_of(layout.SYNTHETIC), ctx.spec)
        hard = hard_label_score(ctx, best, backend)
        result = finish(ctx, store, experts, outcome, best, scores.get(None), run_id, started,
                        cross_architecture(ctx, best, backend, outcome, scores),
                        hard and hard.result())
    return result


def hard_label_score(ctx: Context, best: SyntheticSet, backend: Backend):
    """A soft-label run's best images trained with the class of each as its label, by the
    networks that scored the best set (so the pair differs in the labels alone: where the
    best set is the starting one, which has hard labels, the two are equal); a future, or
    None for a hard-label run."""
    if ctx.cfg.distill.labels == "hard":
        return None
    return backend.submit_eval(best.hard(), "syn", None)


def cross_architecture(ctx: Context, best_set: SyntheticSet, backend: Backend,
                       outcome: DistillOutcome, baselines: dict[str | None, EvalResult]
                       ) -> dict:
    """{model: scores} for every architecture of eval.models: `acc_mean`/`acc_std` of the
    best set (picked by the distillation network) and `random_acc_mean`/`random_acc_std`;
    with eval.models_at=every also the model's own best and final evaluation points. With
    models_at=best the best set is trained on each model here, at the end."""
    cfg, out = ctx.cfg, {}
    if not cfg.eval.models:
        return out
    if cfg.eval.models_at == "every":
        for model in cfg.eval.models:
            rows = outcome.rows if model == cfg.net.name else \
                [r for r in outcome.model_rows if r["model"] == model]
            at_best = next(r for r in rows if r["iteration"] == outcome.best_iteration)
            best = max(rows, key=lambda r: (r["acc_mean"], -r["iteration"]))
            final = max(rows, key=lambda r: r["iteration"])
            out[model] = {"acc_mean": at_best["acc_mean"], "acc_std": at_best["acc_std"],
                          "best_acc_mean": best["acc_mean"], "best_acc_std": best["acc_std"],
                          "best_iteration": best["iteration"],
                          "final_acc_mean": final["acc_mean"],
                          "final_acc_std": final["acc_std"]}
    else:
        futures = {m: backend.submit_eval(best_set, "final", m) for m in cfg.eval.models}
        for model, future in futures.items():  # all submitted first: on Ray they run together
            r = future.result()
            out[model] = {"acc_mean": r.mean, "acc_std": r.std}
    for model, scores in out.items():
        base = baselines.get(None if model == cfg.net.name else model)
        scores.update(random_acc_mean=base.mean if base else None,
                      random_acc_std=base.std if base else None)
        log.info("best set (iteration %d) on %s: %.2f %% +- %.2f%s", outcome.best_iteration,
                 model, 100 * scores["acc_mean"], 100 * scores["acc_std"],
                 f"; random real {100 * base.mean:.2f} %" if base else "")
    return out


def train_missing_experts(ctx: Context, store: Storage, backend: Backend) -> dict:
    """Train the experts 0 .. num_experts-1 not yet stored (with their full trajectory when
    the run keeps it), saving each as it arrives."""
    training = ctx.cfg.expert_training
    missing = missing_experts(ctx, store)
    if len(missing) < training.num_experts:
        log.info("%d experts already in %s; training %d", training.num_experts - len(missing),
                 store.uri_of(layout.EXPERTS), len(missing))
    bar = Progress("experts", training.num_experts, training.num_experts - len(missing),
                   ctx.cfg.run.progress, unit="experts", bar=True)
    accs = {}
    for result in backend.train_experts(missing):
        save_expert(store, result, training.store_init_as_seed)
        accs[result.expert_id] = result.test_acc
        log.info("expert %d trained: test accuracy %.2f %%", result.expert_id,
                 100 * result.test_acc)
        bar.update(1)
    bar.close()
    return {"experts": training.num_experts, "trained": sorted(accs),
            "expert_test_acc": [accs[i] for i in sorted(accs)], **backend.placement()}


def missing_experts(ctx: Context, store: Storage) -> list[int]:
    """The experts 0 .. num_experts-1 not yet stored (in full too, when the run keeps it)."""
    training = ctx.cfg.expert_training
    stored = set(layout.expert_ids(store, full=False))
    if training.keep_full:
        stored &= set(layout.expert_ids(store, full=True))
    return [i for i in range(training.num_experts) if i not in stored]


def save_expert(store: Storage, result: ExpertResult, store_init_as_seed: bool) -> None:
    seed = result.init_seed if store_init_as_seed else None
    store.write_bytes(layout.expert_name(result.expert_id),
                      formats.save_trajectory(result.convex, init_seed=seed))
    if result.full is not None:
        store.write_bytes(layout.expert_name(result.expert_id, full=True),
                          formats.save_trajectory(result.full))


def load_expert(store: Storage, expert_id: int, spec: NetSpec, full: bool) -> Trajectory:
    name = layout.expert_name(expert_id, full)
    return formats.load_trajectory(store.read_bytes(name), store.uri_of(name), spec)


def load_experts(store: Storage, spec: NetSpec, full: bool) -> list[Trajectory]:
    """Every expert of a run folder: convex files (MCT) or full ones (MTT)."""
    ids = layout.expert_ids(store, full)
    if not ids:
        raise DataError(missing_experts_message(store, full))
    return [load_expert(store, i, spec, full) for i in ids]


def missing_experts_message(store: Storage, full: bool) -> str:
    kind = "full (MTT) trajectories; train experts with expert.keep_full=true" if full \
        else "expert trajectories; run `mct-ray experts` first"
    return f"no {kind} under {store.uri_of(layout.EXPERTS)}"


def make_distiller(ctx: Context, trajectories: list[Trajectory],
                   store: Storage | None = None) -> Distiller:
    """The distiller, from the starting images the run folder `store` records (recording
    them first); without a folder, from the given or drawn ones."""
    cfg = ctx.cfg
    idx = starting.starting_indices(ctx, store, trajectories) if store is not None else \
        starting.resolve(ctx, trajectories)
    idx = idx.to(ctx.data.train_x.device)
    return Distiller(ctx.spec, trajectories, ctx.data.train_x[idx].clone(),
                     ctx.data.train_y[idx].clone(), cfg.distill, ctx.aug, cfg.seed,
                     ctx.device, ctx.kernels, Shard.current())


def evaluate_saved(ctx: Context, store: Storage, backend: Backend, source: Storage,
                   name: str) -> dict:
    """`mct-ray eval`: score a saved synthetic set; eval.json in `store`."""
    syn = formats.load_synthetic(source.read_bytes(name), source.uri_of(name), ctx.spec)
    out = {"iteration": syn.iteration, "num_eval": ctx.cfg.eval.num_eval,
           "epochs": ctx.cfg.eval.epochs, "source": source.uri_of(name),
           "labels": "soft" if syn.soft else "hard"}
    models = ctx.cfg.eval.models
    futures = {m: backend.submit_eval(syn, "final", m) for m in (models or (None,))}
    for model, future in futures.items():  # all submitted first: on Ray they run together
        result = future.result()
        scores = {"acc_mean": result.mean, "acc_std": result.std, "accs": list(result.accs)}
        if model is None:
            out.update(scores)
        else:
            out.setdefault("models", {})[model] = scores
        log.info("%s%s: %.2f %% +- %.2f over %d networks", source.uri_of(name),
                 f" on {model}" if model else "", 100 * result.mean, 100 * result.std,
                 len(result.accs))
    store.write_json(layout.EVAL, out)
    return out


# ---------------------------------------------------------------------------------------
# Report.

def iterations_to_within(rows: list[dict], points: float = 0.02) -> int:
    """First evaluated iteration whose accuracy is within `points` of the run's best."""
    best = max(r["acc_mean"] for r in rows)
    return min(r["iteration"] for r in rows if r["acc_mean"] >= best - points)


def second_half_spread(rows: list[dict]) -> float:
    """Standard deviation of the evaluated accuracy over the second half of the run."""
    last = max(r["iteration"] for r in rows)
    accs = [r["acc_mean"] for r in rows if r["iteration"] >= last / 2]
    return statistics.pstdev(accs) if len(accs) > 1 else 0.0


def storage_bytes(store: Storage, spec: NetSpec, epochs: int, full: bool) -> tuple[int, int]:
    """(bytes of the first stored expert of the kind the run read, bytes the same expert
    takes stored by MTT: every epoch's parameters, to within a few header bytes)."""
    ids = layout.expert_ids(store, full)
    convex = store.size(layout.expert_name(ids[0], full)) if ids else 0
    # One checkpoint serialised, plus the other epochs' float32 bytes: within the header's
    # few digits of the whole file, without holding K+1 copies of a large network.
    one = len(formats.save_trajectory(FullTrajectory(spec, torch.zeros(1, spec.num_params))))
    return convex, one + 4 * epochs * spec.num_params


def summarise(ctx: Context, experts: Storage, outcome: DistillOutcome,
              baseline: EvalResult | None, parts: list[dict]) -> dict:
    cfg, rows = ctx.cfg, outcome.rows
    best = max(rows, key=lambda r: r["acc_mean"])
    final = max(rows, key=lambda r: r["iteration"])
    convex_bytes, mtt_bytes = storage_bytes(experts, ctx.spec, cfg.expert.epochs,
                                             cfg.needs_full)
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
        "final_step_size": final["step_size"],
        "wall_seconds": round(sum(p["seconds"] for p in parts), 3),
        "resumed_from": outcome.resumed_from, "parts": parts,
    }


def finish(ctx: Context, store: Storage, experts: Storage, outcome: DistillOutcome,
           best: SyntheticSet, baseline: EvalResult | None, run_id: str, started: float,
           models: dict | None = None, hard: EvalResult | None = None) -> dict:
    final = max(r["iteration"] for r in outcome.rows)
    summary = summarise(ctx, experts, outcome, baseline,
                        parts_with(outcome, run_id, final, started))
    summary.update(labels=ctx.cfg.distill.labels,
                   hard_label_acc_mean=hard.mean if hard else None,
                   hard_label_acc_std=hard.std if hard else None)
    if hard:
        log.info("the best set's images with hard labels: %.2f %% +- %.2f (soft: %.2f %%)",
                 100 * hard.mean, 100 * hard.std, 100 * summary["best_acc_mean"])
    if models:
        summary["models"] = models  # the best set on other architectures
    store.write_json(layout.SUMMARY, summary)
    store.write_bytes(layout.SYNTHETIC_PNG, report.image_grid_png(best, ctx.data.num_classes))
    store.write_bytes(layout.CURVE_PNG, report.curve_png(outcome.rows, summary, ctx.cfg))
    log.info("best %.2f %% at iteration %d, final %.2f %%, random real %s; in %.0f s",
             100 * summary["best_acc_mean"], summary["best_iteration"],
             100 * summary["final_acc_mean"],
             f"{100 * baseline.mean:.2f} %" if baseline else "not scored",
             summary["wall_seconds"])
    return summary
