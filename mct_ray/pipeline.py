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
import time
from typing import Iterator, Protocol

import torch

from mct_ray import formats, layout, report, starting
from mct_ray.context import Context, Launch
from mct_ray.distill import Distiller
from mct_ray.evaluate import EvalResult, evaluate, random_real
from mct_ray.experts import ExpertResult, load_experts, save_expert, train_expert
from mct_ray.loop import EvalFuture, Finished, run_distillation
from mct_ray.nets import NetSpec
from mct_ray.progress import Progress
from mct_ray.records import DistillOutcome, ExpertsTrained, Score, Summary
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

    def distill(self, store: Storage, launch: Launch) -> DistillOutcome:
        """Run the distillation loop on the launch's experts into `store`."""

    def expert_nodes(self) -> list[str]:
        """The nodes that trained this backend's experts (none for one process)."""


class LocalBackend:
    """Everything in this process, one piece after another."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def train_experts(self, ids: list[int]) -> Iterator[ExpertResult]:
        c = self.ctx
        for i in ids:
            yield train_expert(c.net, c.data, c.cfg.expert_training, c.aug, c.cfg.seed, i)

    def submit_eval(self, syn: SyntheticSet, tag: str, model: str | None = None
                    ) -> EvalFuture:
        c = self.ctx
        return Finished(evaluate(c.cfg, c.net, c.data, syn, tag, model))

    def distill(self, store: Storage, launch: Launch) -> DistillOutcome:
        trajectories = load_experts(launch.experts, self.ctx.spec, self.ctx.cfg.needs_full)
        return run_distillation(self.ctx, store, make_distiller(self.ctx, trajectories, store),
                                self.submit_eval, launch)

    def expert_nodes(self) -> list[str]:
        return []


# ---------------------------------------------------------------------------------------
# The sequence.

def run(ctx: Context, store: Storage, backend: Backend, phases: tuple[str, ...],
        launch: Launch) -> Summary | ExpertsTrained:
    """The phases of one command, in the one order there is (see the module docstring): the
    run's summary when it distils, else what the expert phase did."""
    result: Summary | ExpertsTrained = ExpertsTrained(0, [], [])
    if "experts" in phases:
        result = train_missing_experts(ctx, launch.experts, backend)
    if "distill" in phases:
        cfg = ctx.cfg
        real = random_real(cfg, ctx.data)  # scored on every architecture beside the loop
        baselines = {m: backend.submit_eval(real, "baseline", m)
                     for m in (None, *cfg.other_models)} if cfg.eval.baseline else {}
        outcome = backend.distill(store, launch)
        scores = {m: f.result() for m, f in baselines.items()}
        best = formats.load_synthetic(store.read_bytes(layout.SYNTHETIC),
                                      store.uri_of(layout.SYNTHETIC), ctx.spec)
        hard = hard_label_score(ctx, best, backend)
        result = finish(ctx, store, launch, outcome, best, scores.get(None),
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
                [r for r in outcome.model_rows if r.model == model]
            at_best = next(r for r in rows if r.iteration == outcome.best_iteration)
            best = max(rows, key=lambda r: (r.acc_mean, -r.iteration))
            final = max(rows, key=lambda r: r.iteration)
            out[model] = {"acc_mean": at_best.acc_mean, "acc_std": at_best.acc_std,
                          "best_acc_mean": best.acc_mean, "best_acc_std": best.acc_std,
                          "best_iteration": best.iteration,
                          "final_acc_mean": final.acc_mean, "final_acc_std": final.acc_std}
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


def train_missing_experts(ctx: Context, store: Storage, backend: Backend) -> ExpertsTrained:
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
    return ExpertsTrained(training.num_experts, sorted(accs), [accs[i] for i in sorted(accs)],
                          backend.expert_nodes())


def missing_experts(ctx: Context, store: Storage) -> list[int]:
    """The experts 0 .. num_experts-1 not yet stored (in full too, when the run keeps it)."""
    training = ctx.cfg.expert_training
    stored = set(layout.expert_ids(store, full=False))
    if training.keep_full:
        stored &= set(layout.expert_ids(store, full=True))
    return [i for i in range(training.num_experts) if i not in stored]


def make_distiller(ctx: Context, trajectories: list[Trajectory],
                   store: Storage | None = None) -> Distiller:
    """The distiller, from the starting images the run folder `store` records (recording
    them first); without a folder, from the given or drawn ones."""
    cfg = ctx.cfg
    idx = starting.starting_indices(ctx, store, trajectories) if store is not None else \
        starting.resolve(ctx, trajectories)
    idx = idx.to(ctx.data.train_x.device)
    return Distiller(ctx.net, trajectories, ctx.data.train_x[idx].clone(),
                     ctx.data.train_y[idx].clone(), cfg.distill, ctx.aug, cfg.seed,
                     Shard.current())


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

def storage_bytes(store: Storage, spec: NetSpec, epochs: int, full: bool) -> tuple[int, int]:
    """(bytes of the first stored expert of the kind the run read, bytes the same expert
    takes stored by MTT: every epoch's parameters, to within a few header bytes)."""
    ids = layout.expert_ids(store, full)
    convex = store.size(layout.expert_name(ids[0], full)) if ids else 0
    # One checkpoint serialised, plus the other epochs' float32 bytes: within the header's
    # few digits of the whole file, without holding K+1 copies of a large network.
    one = len(formats.save_trajectory(FullTrajectory(spec, torch.zeros(1, spec.num_params))))
    return convex, one + 4 * epochs * spec.num_params


def finish(ctx: Context, store: Storage, launch: Launch, outcome: DistillOutcome,
           best: SyntheticSet, baseline: EvalResult | None, models: dict,
           hard: EvalResult | None = None) -> Summary:
    """The run's summary (summary.json) and pictures (synthetic.png, curve.png)."""
    cfg = ctx.cfg
    final = max(r.iteration for r in outcome.rows)
    convex_bytes, mtt_bytes = storage_bytes(launch.experts, ctx.spec, cfg.expert.epochs,
                                             cfg.needs_full)
    summary = Summary(cfg.distill.method, cfg.data.name, cfg.distill.ipc, cfg.seed,
                      cfg.distill.labels, outcome, score(baseline), score(hard), convex_bytes,
                      mtt_bytes, outcome.parts_with(launch.run_id, final,
                                                    time.time() - launch.started), models)
    record = summary.to_dict()
    if hard:
        log.info("the best set's images with hard labels: %.2f %% +- %.2f (soft: %.2f %%)",
                 100 * hard.mean, 100 * hard.std, 100 * record["best_acc_mean"])
    store.write_json(layout.SUMMARY, record)
    store.write_bytes(layout.SYNTHETIC_PNG, report.image_grid_png(best, ctx.data.num_classes))
    store.write_bytes(layout.CURVE_PNG, report.curve_png(summary, cfg))
    log.info("best %.2f %% at iteration %d, final %.2f %%, random real %s; in %.0f s",
             100 * record["best_acc_mean"], record["best_iteration"],
             100 * record["final_acc_mean"],
             f"{100 * baseline.mean:.2f} %" if baseline else "not scored",
             record["wall_seconds"])
    return summary


def score(result: EvalResult | None) -> Score:
    return Score(result.mean, result.std) if result else Score()
