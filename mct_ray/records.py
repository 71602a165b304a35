"""The records of a run, typed and built here alone: a metrics row per evaluation
(metrics.parquet), the distillation's outcome (its rows and best point), the checkpoint
(state.safetensors, through `formats.save_state`), the summary (summary.json) and a grid's
row taken from it. Whoever writes or reads one of them goes through these types; the dicts
they become are the files' layout, written once here.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any

from mct_ray.synthetic import SyntheticSet


@dataclass(frozen=True)
class MetricRow:
    """One evaluation of one snapshot by one architecture (a row of metrics.parquet)."""

    iteration: int
    model: str
    acc_mean: float
    acc_std: float
    loss: float  # mean matching loss since the previous evaluation
    step_size: float
    seconds: float  # into the distillation loop

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MetricRow":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class PendingEval:
    """A snapshot submitted for evaluation, with what its metrics row needs."""

    syn: SyntheticSet
    loss: float
    seconds: float

    @property
    def iteration(self) -> int:
        return self.syn.iteration

    def row(self, model: str, mean: float, std: float) -> MetricRow:
        return MetricRow(self.iteration, model, mean, std, self.loss, self.syn.step_size,
                         self.seconds)

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
    """What the loop has recorded: the distillation network's rows (they pick the best
    set), the other architectures' rows, and the run's parts so far."""

    rows: list[MetricRow] = field(default_factory=list)  # by iteration
    best_acc: float = -1.0
    best_iteration: int = -1
    resumed_from: int | None = None
    parts: list[dict] = field(default_factory=list)  # earlier commands' share of this run
    losses: list[float] = field(default_factory=list)  # matching losses since the last eval
    model_rows: list[MetricRow] = field(default_factory=list)  # the other architectures'

    def add(self, row: MetricRow) -> bool:
        """Record the distillation network's row; whether it is the best so far (the
        highest mean, ties going to the earlier iteration, so that the outcome does not
        depend on the order in which results arrive)."""
        self.rows.append(row)
        self.rows.sort(key=lambda r: r.iteration)
        if (row.acc_mean, -row.iteration) > (self.best_acc, -self.best_iteration):
            self.best_acc, self.best_iteration = row.acc_mean, row.iteration
            return True
        return False

    def scored(self, iteration: int) -> set[str]:
        """The architectures that have a row at `iteration`."""
        return {r.model for r in (*self.rows, *self.model_rows) if r.iteration == iteration}

    def metrics(self, others: tuple[str, ...]) -> list[dict]:
        """metrics.parquet: by iteration, the distillation network's row first, then the
        architectures `others` in their order."""
        order = {m: i for i, m in enumerate(others)}
        return [r.to_dict() for r in sorted([*self.rows, *self.model_rows],
                                             key=lambda r: (r.iteration, order.get(r.model, -1)))]

    def parts_with(self, run_id: str, iteration: int, seconds: float) -> list[dict]:
        """The run's parts, one per command that worked on it (a restarted worker continues
        its command's part): iterations from and to, and the command's seconds so far."""
        earlier = [p for p in self.parts if p["run_id"] != run_id]
        own = next((p for p in self.parts if p["run_id"] == run_id), None)
        start = own["from_iteration"] if own else (self.resumed_from or 0)
        return [*earlier, {"run_id": run_id, "from_iteration": start, "to_iteration": iteration,
                           "seconds": round(seconds, 3)}]


@dataclass
class Checkpoint:
    """state.safetensors: the distiller's state, the outcome so far, the snapshots whose
    evaluations had not finished, and the run (by `run_id`) that wrote it."""

    distiller: dict
    outcome: DistillOutcome
    pending: list[PendingEval]
    run_id: str

    def to_state(self, seconds: float) -> dict:
        """The state `formats.save_state` stores; `seconds`: the command's so far."""
        o = self.outcome
        return {"distiller": self.distiller, "rows": [r.to_dict() for r in o.rows],
                "best_acc": o.best_acc, "best_iteration": o.best_iteration,
                "pending": [p.to_state() for p in self.pending], "run_id": self.run_id,
                "losses": o.losses, "model_rows": [r.to_dict() for r in o.model_rows],
                "parts": o.parts_with(self.run_id, self.distiller["iteration"], seconds)}

    @classmethod
    def from_state(cls, state: dict) -> "Checkpoint":
        outcome = DistillOutcome([MetricRow.from_dict(r) for r in state["rows"]],
                                 state["best_acc"], state["best_iteration"],
                                 state["distiller"]["iteration"], list(state.get("parts", [])),
                                 list(state.get("losses", [])),
                                 [MetricRow.from_dict(r) for r in state.get("model_rows", [])])
        return cls(state["distiller"], outcome,
                   [PendingEval.from_state(p) for p in state.get("pending", [])],
                   state.get("run_id", ""))


@dataclass(frozen=True)
class ExpertsTrained:
    """What the expert phase did (the output of `mct-ray experts`)."""

    experts: int  # expert.num_experts: the folder holds 0 .. experts-1
    trained: list[int]  # by this command
    test_acc: list[float]  # of each trained, in `trained`'s order
    nodes: list[str] = field(default_factory=list)  # on Ray: the nodes that trained them

    def to_dict(self) -> dict:
        return {"experts": self.experts, "trained": self.trained,
                "expert_test_acc": self.test_acc, **({"nodes": self.nodes} if self.nodes else {})}


# ---------------------------------------------------------------------------------------
# The summary.

def iterations_to_within(curve: list[tuple[int, float]], points: float = 0.02) -> int:
    """First evaluated iteration of (iteration, accuracy) pairs whose accuracy is within
    `points` of the best."""
    best = max(acc for _, acc in curve)
    return min(it for it, acc in curve if acc >= best - points)


def second_half_spread(curve: list[tuple[int, float]]) -> float:
    """Standard deviation of the accuracy over the second half of (iteration, accuracy)."""
    last = max(it for it, _ in curve)
    accs = [acc for it, acc in curve if it >= last / 2]
    return statistics.pstdev(accs) if len(accs) > 1 else 0.0


@dataclass(frozen=True)
class Score:
    """A mean and standard deviation over evaluation networks (None: not scored)."""

    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class Summary:
    """summary.json: a distillation run in one record."""

    method: str
    dataset: str
    ipc: int
    seed: int
    labels: str
    outcome: DistillOutcome
    random: Score  # ipc random real images per class
    hard_label: Score  # a soft-label run's best images with hard labels
    storage_bytes_per_expert: int
    mtt_bytes_per_expert: int
    parts: list[dict]
    models: dict[str, dict] = field(default_factory=dict)  # the best set on eval.models

    def to_dict(self) -> dict:
        o, rows = self.outcome, self.outcome.rows
        best = max(rows, key=lambda r: r.acc_mean)
        final = max(rows, key=lambda r: r.iteration)
        curve = [(r.iteration, r.acc_mean) for r in rows]
        convex, mtt = self.storage_bytes_per_expert, self.mtt_bytes_per_expert
        out = {
            "method": self.method, "dataset": self.dataset, "ipc": self.ipc, "seed": self.seed,
            "iterations": final.iteration,
            "best_acc_mean": best.acc_mean, "best_acc_std": best.acc_std,
            "best_iteration": best.iteration,
            "final_acc_mean": final.acc_mean, "final_acc_std": final.acc_std,
            "iterations_to_within_2pts": iterations_to_within(curve),
            "second_half_acc_std": second_half_spread(curve),
            "random_baseline_acc_mean": self.random.mean,
            "random_baseline_acc_std": self.random.std,
            "storage_bytes_per_expert": convex, "mtt_bytes_per_expert": mtt,
            "storage_ratio": convex / mtt if convex else None,
            "final_step_size": final.step_size,
            "wall_seconds": round(sum(p["seconds"] for p in self.parts), 3),
            "resumed_from": o.resumed_from, "parts": self.parts, "labels": self.labels,
            "hard_label_acc_mean": self.hard_label.mean,
            "hard_label_acc_std": self.hard_label.std}
        if self.models:
            out["models"] = self.models
        return out

    def grid_row(self) -> dict[str, Any]:
        """A grid's columns for this run (the grid adds the cell's own)."""
        d = self.to_dict()
        keys = ("ipc", "method", "seed", "best_acc_mean", "best_acc_std", "best_iteration",
                "final_acc_mean", "final_acc_std", "iterations_to_within_2pts", "iterations",
                "wall_seconds", "storage_bytes_per_expert")
        row = {"data": self.dataset, **{k: d[k] for k in keys},
               "random_acc_mean": self.random.mean, "random_acc_std": self.random.std,
               "resumed_from": -1 if d["resumed_from"] is None else d["resumed_from"]}
        if self.labels != "hard":  # soft labels: the images' hard-label score
            row.update(labels=self.labels, hard_label_acc_mean=self.hard_label.mean)
        if self.models:  # eval.models: the scores on each architecture
            row["models"] = self.models
        return row
