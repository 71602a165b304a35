"""The distillation loop with an evaluation at each of `eval_iterations`, and its checkpoint.

Evaluations go through `submit(syn, tag, model) -> EvalFuture`: the local backend scores a
snapshot at once; the Ray one fans it out as tasks and the loop collects results as they
finish, so it never waits for them (except at the end). Each point is scored by the
distillation network (model None: it picks the best set) and, with eval.models_at=every, by
every other architecture of eval.models; metrics.parquet has a row per (iteration, model).
Everything here runs wherever the backend puts the loop: this process, a Ray actor, or a
grid trial.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from mct_ray import formats, layout, progress
from mct_ray.context import Context, Launch
from mct_ray.distill import Distiller
from mct_ray.evaluate import EvalResult
from mct_ray.progress import Progress, duration
from mct_ray.records import Checkpoint, DistillOutcome, PendingEval
from mct_ray.storage import Storage
from mct_ray.synthetic import SyntheticSet
from mct_ray.tensorboard import TensorBoardLog

log = logging.getLogger(__name__)


class EvalFuture(Protocol):
    def done(self) -> bool: ...

    def result(self) -> EvalResult: ...  # waits


@dataclass(frozen=True)
class Finished:
    """An evaluation already scored (the local backend's future)."""

    value: EvalResult

    def done(self) -> bool:
        return True

    def result(self) -> EvalResult:
        return self.value


Submit = Callable[[SyntheticSet, str, str | None], EvalFuture]


class Evaluations:
    """The evaluations in flight, by (iteration, model); results handed back in iteration
    order, the distillation network (None) first."""

    def __init__(self, submit: Submit, models: tuple[str | None, ...]):
        self.submit_fn, self.models, self.inflight = submit, models, {}

    def submit(self, p: PendingEval, models: tuple[str | None, ...] | None = None) -> None:
        for i, model in enumerate(self.models):
            if models is None or model in models:
                self.inflight[(p.iteration, i)] = (p, model,
                                                   self.submit_fn(p.syn, "syn", model))

    def poll(self) -> list[tuple[PendingEval, str | None, EvalResult]]:
        """The evaluations that have finished (none is waited for)."""
        done = []
        for key in sorted(self.inflight):
            p, model, future = self.inflight[key]
            if future.done():
                done.append((p, model, future.result()))
                del self.inflight[key]
        return done

    def wait_all(self) -> list[tuple[PendingEval, str | None, EvalResult]]:
        """Every evaluation still in flight, as each finishes. While some cannot finish (on
        Ray: a cluster with no room for them beside the distiller), a line every 30 s says
        what is awaited, so a wait is never silent."""
        done, started = self.poll(), time.monotonic()
        last = started
        while self.inflight:
            time.sleep(0.1)
            done += self.poll()
            if self.inflight and time.monotonic() - last >= progress.EVERY_S:
                last = time.monotonic()
                log.info("waiting %s for %d evaluations of iterations %s (on Ray: each needs "
                         "room on the cluster beside the distiller; `ray status` shows what "
                         "is pending)", duration(last - started), len(self.inflight),
                         sorted({p.iteration for p, _, _ in self.inflight.values()}))
        return done

    @property
    def pending(self) -> list[PendingEval]:
        return list({p.iteration: p for p, _, _ in self.inflight.values()}.values())


def eval_iterations(every: int, iterations: int) -> list[int]:
    """Evaluate at 0, every, 2*every, ... and always at the last iteration."""
    its = list(range(0, iterations + 1, every))
    return its if its[-1] == iterations else its + [iterations]


def save_synthetic(store: Storage, name: str, ctx: Context, syn: SyntheticSet) -> None:
    info = {**syn.info, "data": ctx.data.name, "mean": ctx.data.mean, "std": ctx.data.std,
            "zca": ctx.cfg.data.zca, "method": ctx.cfg.distill.method,
            "labels": ctx.cfg.distill.labels if syn.soft else "hard"}
    store.write_bytes(name, formats.save_synthetic(SyntheticSet(
        syn.images, syn.labels, syn.step_size, info, syn.classes), ctx.spec))


def record_eval(store: Storage, ctx: Context, outcome: DistillOutcome, p: PendingEval,
                model: str | None, result: EvalResult, tb: TensorBoardLog | None = None
                ) -> None:
    """Append a metrics row; for the distillation network's (model None), keep
    synthetic.safetensors at the best evaluation so far (results may arrive out of order on
    Ray: `DistillOutcome.add` makes the best independent of it)."""
    row = p.row(model or ctx.cfg.net.name, result.mean, result.std)
    if model is not None:
        outcome.model_rows.append(row)
        store.write_table(layout.METRICS, outcome.metrics(ctx.cfg.other_models))
        log.info("evaluated iteration %d on %s: %.2f %% +- %.2f", p.iteration, model,
                 100 * result.mean, 100 * result.std)
        if tb is not None:
            tb.scalars({f"eval/{model}/acc_mean": result.mean}, p.iteration)
        return
    if outcome.add(row):
        save_synthetic(store, layout.SYNTHETIC, ctx, p.syn)
    store.write_table(layout.METRICS, outcome.metrics(ctx.cfg.other_models))
    log.info("evaluated iteration %d: %.2f %% +- %.2f (best %.2f %% at iteration %d)",
             p.iteration, 100 * result.mean, 100 * result.std, 100 * outcome.best_acc,
             outcome.best_iteration)
    if tb is not None:
        tb.scalars({"eval/acc_mean": result.mean, "eval/acc_std": result.std}, p.iteration)
        tb.image_grid("synthetic", p.syn.images, p.iteration, nrow=ctx.cfg.distill.ipc)
        tb.flush()


def save_checkpoint(store: Storage, ctx: Context, distiller: Distiller, outcome: DistillOutcome,
                    pending: list[PendingEval], launch: Launch) -> None:
    save_synthetic(store, layout.LAST, ctx, distiller.snapshot())
    checkpoint = Checkpoint(distiller.state_dict(), outcome, pending, launch.run_id)
    store.write_bytes(layout.STATE, formats.save_state(
        checkpoint.to_state(time.time() - launch.started)))


def load_checkpoint(store: Storage) -> Checkpoint | None:
    """The folder's checkpoint (None without one)."""
    if not store.exists(layout.STATE):
        return None
    return Checkpoint.from_state(formats.load_state(store.read_bytes(layout.STATE),
                                                    store.uri_of(layout.STATE)))


def run_distillation(ctx: Context, store: Storage, distiller: Distiller, submit: Submit,
                     launch: Launch) -> DistillOutcome:
    """Distil to distill.iterations, evaluating at `eval_iterations`; when the launch
    resumes, from the folder's checkpoint if there is one."""
    cfg = ctx.cfg
    evals = Evaluations(submit, (None, *(cfg.other_models if cfg.eval.models_at == "every"
                                         else ())))
    outcome = DistillOutcome()
    checkpoint = load_checkpoint(store) if launch.resume else None
    if checkpoint is not None:
        distiller.load_state_dict(checkpoint.distiller)
        outcome = checkpoint.outcome
        log.info("resumed at iteration %d", distiller.iteration)
        for p in checkpoint.pending:  # scored by a process that is gone: submit the rest
            scored = outcome.scored(p.iteration)
            evals.submit(p, tuple(m for m in evals.models if (m or cfg.net.name) not in scored))
    elif launch.resume:
        log.info("nothing to resume in %s (no %s): starting at iteration 0", store.uri,
                 layout.STATE)
    distiller.sync()  # in a gang, the others take this worker's state
    todo = set(eval_iterations(cfg.eval.every, cfg.distill.iterations))
    loop_started, losses = time.perf_counter(), outcome.losses
    saved_at = time.monotonic()
    bar = Progress("distill", cfg.distill.iterations, distiller.iteration, cfg.run.progress,
                   unit="iterations", bar=True)
    tb = TensorBoardLog(store) if cfg.run.tensorboard else None
    try:
        while True:
            it = distiller.iteration
            submitted = it in todo and not any(r.iteration == it for r in outcome.rows) \
                and not any(p.iteration == it for p in evals.pending)
            if submitted:
                loss = statistics.fmean(losses) if losses else float("nan")
                evals.submit(PendingEval(distiller.snapshot(), loss,
                                         time.perf_counter() - loop_started))
                losses.clear()
            for p, model, result in evals.poll():
                record_eval(store, ctx, outcome, p, model, result, tb)
            if submitted or (cfg.run.checkpoint_every and it % cfg.run.checkpoint_every == 0) \
                    or (cfg.run.checkpoint_minutes
                        and time.monotonic() - saved_at >= 60 * cfg.run.checkpoint_minutes):
                save_checkpoint(store, ctx, distiller, outcome, evals.pending, launch)
                saved_at = time.monotonic()
            if it >= cfg.distill.iterations:
                break
            # A DivergenceError propagates: synthetic.safetensors (best evaluated) and the
            # last checkpoint stay on disk as they were.
            step = distiller.step()
            if not step.skipped:
                losses.append(step.loss)
                if tb is not None:
                    tb.scalars({"distill/loss": step.loss, "distill/step_size": step.step_size},
                               step.iteration)
            bar.update(1)
        for p, model, result in evals.wait_all():
            record_eval(store, ctx, outcome, p, model, result, tb)
        save_checkpoint(store, ctx, distiller, outcome, [], launch)
    finally:  # a DivergenceError still leaves the event files complete
        bar.close()
        if tb is not None:
            tb.close()
    return outcome


def follow_distillation(ctx: Context, distiller: Distiller) -> None:
    """A gang's other workers: worker 0's state, then the same steps in step with its loop
    (their collectives pair), writing nothing."""
    distiller.sync()
    while distiller.iteration < ctx.cfg.distill.iterations:
        distiller.step()
