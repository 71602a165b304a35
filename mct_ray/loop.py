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
from dataclasses import dataclass, field
from typing import Callable, Protocol

from mct_ray import formats, layout, progress
from mct_ray.context import Context
from mct_ray.distill import Distiller
from mct_ray.evaluate import EvalResult
from mct_ray.progress import Progress, duration
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


@dataclass(frozen=True)
class PendingEval:
    """A snapshot submitted for evaluation, with what its metrics row needs."""

    syn: SyntheticSet
    loss: float
    seconds: float

    @property
    def iteration(self) -> int:
        return self.syn.iteration

    def to_state(self) -> dict:
        return {"iteration": self.iteration, "images": self.syn.images,
                "labels": self.syn.labels, "step_size": self.syn.step_size, "loss": self.loss,
                "seconds": self.seconds,
                **({"classes": self.syn.classes} if self.syn.soft else {})}

    @classmethod
    def from_state(cls, d: dict) -> "PendingEval":
        syn = SyntheticSet(d["images"], d["labels"], d["step_size"], {"iteration": d["iteration"]},
                           d.get("classes"))
        return cls(syn, d["loss"], d["seconds"])


@dataclass
class DistillOutcome:
    rows: list[dict] = field(default_factory=list)  # one per finished evaluation
    best_acc: float = -1.0
    best_iteration: int = -1
    resumed_from: int | None = None
    parts: list[dict] = field(default_factory=list)  # earlier commands' share of this run
    losses: list[float] = field(default_factory=list)  # matching losses since the last eval
    model_rows: list[dict] = field(default_factory=list)  # the other architectures' rows


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
    synthetic.safetensors at the best evaluation so far.

    Results may arrive out of order (Ray); the best is the highest mean, ties going to the
    earlier iteration, so the outcome does not depend on arrival order."""
    row = {"iteration": p.iteration, "model": model or ctx.cfg.net.name,
           "acc_mean": result.mean, "acc_std": result.std, "loss": p.loss,
           "step_size": p.syn.step_size, "seconds": p.seconds}
    if model is not None:
        outcome.model_rows.append(row)
        store.write_table(layout.METRICS, metrics_rows(outcome, ctx.cfg.other_models))
        log.info("evaluated iteration %d on %s: %.2f %% +- %.2f", p.iteration, model,
                 100 * result.mean, 100 * result.std)
        if tb is not None:
            tb.scalars({f"eval/{model}/acc_mean": result.mean}, p.iteration)
        return
    outcome.rows.append(row)
    outcome.rows.sort(key=lambda r: r["iteration"])
    if (result.mean, -p.iteration) > (outcome.best_acc, -outcome.best_iteration):
        outcome.best_acc, outcome.best_iteration = result.mean, p.iteration
        save_synthetic(store, layout.SYNTHETIC, ctx, p.syn)
    store.write_table(layout.METRICS, metrics_rows(outcome, ctx.cfg.other_models))
    log.info("evaluated iteration %d: %.2f %% +- %.2f (best %.2f %% at iteration %d)",
             p.iteration, 100 * result.mean, 100 * result.std, 100 * outcome.best_acc,
             outcome.best_iteration)
    if tb is not None:
        tb.scalars({"eval/acc_mean": result.mean, "eval/acc_std": result.std}, p.iteration)
        tb.image_grid("synthetic", p.syn.images, p.iteration, nrow=ctx.cfg.distill.ipc)
        tb.flush()


def metrics_rows(outcome: DistillOutcome, others: tuple[str, ...]) -> list[dict]:
    """metrics.parquet: by iteration, the distillation network's row first, then eval.models
    in their order."""
    order = {m: i for i, m in enumerate(others)}
    return sorted([*outcome.rows, *outcome.model_rows],
                  key=lambda r: (r["iteration"], order.get(r["model"], -1)))


def save_checkpoint(store: Storage, ctx: Context, distiller: Distiller, outcome: DistillOutcome,
                    pending: list[PendingEval], run_id: str, started: float) -> None:
    save_synthetic(store, layout.LAST, ctx, distiller.snapshot())
    state = {"distiller": distiller.state_dict(), "rows": outcome.rows,
             "best_acc": outcome.best_acc, "best_iteration": outcome.best_iteration,
             "pending": [p.to_state() for p in pending], "run_id": run_id,
             "losses": outcome.losses, "model_rows": outcome.model_rows,
             "parts": parts_with(outcome, run_id, distiller.iteration, started)}
    store.write_bytes(layout.STATE, formats.save_state(state))


def parts_with(outcome: DistillOutcome, run_id: str, iteration: int, started: float
               ) -> list[dict]:
    """The run's parts, one per command that worked on it (a restarted actor continues its
    command's part): iterations from and to, and the command's seconds so far."""
    earlier = [p for p in outcome.parts if p["run_id"] != run_id]
    own = next((p for p in outcome.parts if p["run_id"] == run_id), None)
    start = own["from_iteration"] if own else (outcome.resumed_from or 0)
    return [*earlier, {"run_id": run_id, "from_iteration": start, "to_iteration": iteration,
                       "seconds": round(time.time() - started, 3)}]


def checkpoint_run_id(store: Storage) -> str | None:
    """The run id stored with the checkpoint (None without one): a restarted worker finds
    its own run's checkpoint by it."""
    if not store.exists(layout.STATE):
        return None
    state = formats.load_state(store.read_bytes(layout.STATE), store.uri_of(layout.STATE))
    return state.get("run_id", "")


def load_checkpoint(store: Storage, distiller: Distiller
                    ) -> tuple[DistillOutcome, list[PendingEval]]:
    state = formats.load_state(store.read_bytes(layout.STATE), store.uri_of(layout.STATE))
    distiller.load_state_dict(state["distiller"])
    pending = [PendingEval.from_state(p) for p in state.get("pending", [])]
    outcome = DistillOutcome(state["rows"], state["best_acc"], state["best_iteration"],
                             distiller.iteration, list(state.get("parts", [])),
                             list(state.get("losses", [])), list(state.get("model_rows", [])))
    return outcome, pending


def run_distillation(ctx: Context, store: Storage, distiller: Distiller, submit: Submit,
                     resume: bool, run_id: str, started: float) -> DistillOutcome:
    """Distil to distill.iterations, evaluating at `eval_iterations`; with `resume`, from
    the folder's checkpoint when there is one. `started`: time.time() at the command's start.
    """
    cfg = ctx.cfg
    evals = Evaluations(submit, (None, *(cfg.other_models if cfg.eval.models_at == "every"
                                         else ())))
    outcome = DistillOutcome()
    if resume and store.exists(layout.STATE):
        outcome, pending = load_checkpoint(store, distiller)
        log.info("resumed at iteration %d", distiller.iteration)
        for p in pending:  # scored by a process that is gone: submit what has no row yet
            scored = {r["model"] for r in (*outcome.rows, *outcome.model_rows)
                      if r["iteration"] == p.iteration}
            evals.submit(p, tuple(m for m in evals.models if (m or cfg.net.name) not in scored))
    elif resume:
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
            submitted = it in todo and not any(r["iteration"] == it for r in outcome.rows) \
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
                save_checkpoint(store, ctx, distiller, outcome, evals.pending, run_id, started)
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
        save_checkpoint(store, ctx, distiller, outcome, [], run_id, started)
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
