"""`mct-ray grid` on Ray Tune: one trial per cell of a grid (see `mct_ray.grid`).

    <out>/grid.json                         the resolved grid (every cell's config)
    <out>/experts/<group>/experts/...       each expert group's experts, trained once
    <out>/cells/<cell>/                     a run folder per cell (metrics, synthetic set,
                                            checkpoint, summary.json, cell.json when done)
    <out>/tune/                             Ray Tune's experiment state (for Tuner.restore)
    <out>/grid.parquet, grid.png            a row per finished cell; accuracy against ipc

Before Tune starts, the driver trains each expert group's experts once (Ray tasks, as
`mct-ray experts` does; experts already in storage are kept) and puts the data set and the
trajectories in the object store. Each trial then reserves a placement group: one bundle for
its distillation loop, which runs in the trial itself, and `eval_workers` bundles for its
evaluations; Tune makes tasks submitted from a trial land in its placement group, so a cell's
evaluations never compete with other cells for resources. Cells run concurrently as far as
the cluster's resources allow.

Resuming (`--resume`) restores the Tune experiment with `Tuner.restore`: finished trials are
not run again, unfinished and failed ones are; a restarted cell continues from its own
distillation checkpoint, and a cell that finished after Tune's last experiment snapshot
finds its cell.json and only reports it again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field

import ray
from ray import tune

from mct_ray import pipeline
from mct_ray import storage as layout
from mct_ray.config import from_dict
from mct_ray.errors import ConfigError, MctRayError
from mct_ray.evaluate import EvalResult, random_real
from mct_ray.grid import Grid, build_grid, describe_difference, grid_from_dict, grid_png, \
    summary_table
from mct_ray.runtime import driver, workers
from mct_ray.runtime.codec import data_from_numpy, data_to_numpy, trajectory_from_numpy, \
    trajectory_to_numpy
from mct_ray.runtime.cluster import check_address, connect, disconnect
from mct_ray.storage import Storage

log = logging.getLogger(__name__)

GRID_JSON = "grid.json"
TABLE = "grid.parquet"
PLOT = "grid.png"
CELLS = "cells"
EXPERT_GROUPS = "experts"
TUNE_DIR = "tune"
CELL_DONE = "cell.json"  # a finished cell's row; written last


@dataclass
class GridOutcome:
    out: str
    rows: list[dict]
    table: str
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> one-line reason
    resumed: bool = False
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        store = Storage.open(self.out)
        return {"cells": len(self.rows) + len(self.failed), "finished": len(self.rows),
                "failed": self.failed, "resumed": self.resumed,
                "wall_seconds": round(self.wall_seconds, 1),
                "table": store.uri_of(TABLE), "plot": store.uri_of(PLOT)}


# ---------------------------------------------------------------------------------------
# A trial: one cell.

def _placement_group_hex() -> str | None:
    pg = ray.util.get_current_placement_group()
    return pg.id.hex() if pg else None


def _placement_check(cfg) -> dict:
    """Where this trial runs and whether a task it submits like an evaluation lands in the
    same placement group (Tune captures child tasks; this records that it did)."""
    pg = ray.util.get_current_placement_group()
    r = cfg.ray
    probe = ray.remote(_placement_group_hex).options(num_cpus=r.eval_num_cpus,
                                                     num_gpus=r.eval_num_gpus)
    own = pg.id.hex() if pg else None
    return {"placement_bundles": len(pg.bundle_specs) if pg else 0,
            "evals_in_trial_placement_group": own is not None and ray.get(probe.remote()) == own}


def _bytes_per_expert(experts: Storage, full: bool) -> int:
    """Stored size of the first expert of the kind this cell's method reads."""
    names = [n for n in experts.list(layout.EXPERTS, ".safetensors")
             if n.endswith(".full.safetensors") == full]
    return experts.size(names[0])


def run_cell(config: dict, shared: dict) -> None:
    """The Tune trainable: distil one cell on its group's shared data and experts, with its
    evaluations fanned out into the trial's placement group; report the cell's row.

    `config` is {"cell": id} (all Tune shows and stores); `shared` holds every cell's
    resolved config and every group's object refs, passed once with `tune.with_parameters`.
    """
    cell = shared["cells"][config["cell"]]
    store, experts = Storage.open(cell["uri"]), Storage.open(cell["experts_uri"])
    if store.exists(CELL_DONE):  # finished before the previous driver stopped
        tune.report(_progress(store.read_json(CELL_DONE)))
        return
    cfg, started = from_dict(cell["cfg"]), time.perf_counter()
    refs = shared["groups"][cell["group"]]
    ctx = pipeline.Context.from_data(cfg, data_from_numpy(ray.get(refs["data"])),
                                     cfg.ray.distill_num_cpus)
    full = cfg.distill.method == "mtt"
    trajectories = [trajectory_from_numpy(d, ctx.spec, full)
                    for d in ray.get(refs[cfg.distill.method])]
    store.write_json(layout.CONFIG, cfg.to_dict())
    placement = _placement_check(cfg)
    baseline = []
    if cfg.eval.baseline:  # scored beside the loop, in this trial's placement group
        images, labels = random_real(ctx.data, cfg.distill.ipc, cfg.seed)
        baseline = workers.submit_evaluation(cell["cfg"], refs["data"], images, labels,
                                             cfg.expert.lr, "baseline", 0)
    outcome = pipeline.run_distillation(
        ctx, store, trajectories, resume=True,
        evaluator=workers.RayEvaluator(cell["cfg"], refs["data"]),
        progress_cls=workers.RayProgress, run_id=cell["id"])
    base = EvalResult(tuple(ray.get(baseline))) if baseline else None
    summary = pipeline.finish(ctx, store, outcome, started, experts, base)
    row = {"cell": cell["id"], "dataset": cell["dataset"], **_row(summary, outcome),
           "storage_bytes_per_expert": _bytes_per_expert(experts, full),
           "num_experts": len(trajectories), "experts": experts.uri, **placement}
    store.write_json(CELL_DONE, row)
    tune.report(_progress(row))


def _row(summary: dict, outcome: pipeline.DistillOutcome) -> dict:
    """The grid's columns from a run's summary."""
    keys = ("ipc", "method", "seed", "best_acc_mean", "best_acc_std", "best_iteration",
            "final_acc_mean", "final_acc_std", "iterations_to_within_2pts", "iterations",
            "wall_seconds")
    return {"data": summary["dataset"], **{k: summary[k] for k in keys},
            "random_acc_mean": summary["random_baseline_acc_mean"],
            "random_acc_std": summary["random_baseline_acc_std"],
            "resumed_from": -1 if outcome.resumed_from is None else outcome.resumed_from}


def _progress(row: dict) -> dict:
    """What Tune shows of a finished cell (the whole row is in its cell.json)."""
    return {k: row[k] for k in ("best_acc_mean", "final_acc_mean", "best_iteration",
                                "wall_seconds")}


def cell_resources(bundles: dict[str, list[dict]], config: dict) -> tune.PlacementGroupFactory:
    """The trial's placement group: bundle 0 runs the trial (the distiller), the others are
    its evaluation workers."""
    return tune.PlacementGroupFactory(bundles[config["cell"]])


def _bundles(cfg, eval_workers: int) -> list[dict]:
    def bundle(cpus: float, gpus: float) -> dict:
        return {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v}
    r = cfg.ray
    return [bundle(r.distill_num_cpus, r.distill_num_gpus)] + \
        [bundle(r.eval_num_cpus, r.eval_num_gpus)] * eval_workers


def _trial_name(trial) -> str:
    return trial.config["cell"]


# ---------------------------------------------------------------------------------------
# The driver.

def _resolve(store: Storage, spec: str | None, overrides: list[str], resume: bool) -> Grid:
    """The grid to run: a new one from the spec, or (resume) the one stored in grid.json,
    which a spec and overrides given again must match."""
    if store.exists(GRID_JSON):
        if not resume:
            raise ConfigError(f"{store.uri} already holds a grid; continue it with --resume "
                              "or choose another --out")
        stored = grid_from_dict(store.read_json(GRID_JSON))
        if spec or overrides:
            given = build_grid(spec, overrides) if spec else \
                build_grid(stored.name, overrides, stored.spec_text)
            diff = describe_difference(stored, given)
            if diff:
                raise ConfigError(f"--resume: the grid given differs from the one in "
                                  f"{store.uri_of(GRID_JSON)} ({diff}); give no spec or "
                                  "overrides to continue it as it was")
        return stored
    if resume:
        log.info("nothing to resume in %s: starting the grid", store.uri)
    return build_grid(spec or "digits", overrides)


def _check_fits(grid: Grid, own_ray: bool) -> None:
    """A cell that asks for more than the whole cluster would wait forever: fail on a Ray
    started for this job (it cannot grow), warn on a joined one (an autoscaler may add)."""
    total = ray.cluster_resources()
    for cell in grid.cells:
        need: dict[str, float] = {}
        for b in _bundles(cell.cfg, grid.eval_workers):
            for k, v in b.items():
                need[k] = need.get(k, 0.0) + v
        short = {k: v for k, v in need.items() if v > total.get(k, 0.0)}
        if short:
            key, value = next(iter(short.items()))
            msg = (f"grid cell {cell.id} reserves {value:g} {key} (distiller + "
                   f"{grid.eval_workers} evaluation worker(s)) but the cluster has "
                   f"{total.get(key, 0.0):g}; lower ray.*_num_{key.lower()}s or eval_workers"
                   + (", or raise ray.num_cpus" if key == "CPU" else ""))
            if own_ray:
                raise ConfigError(msg)
            log.warning("%s (waiting for the autoscaler)", msg)
            return


def _prepare_experts(grid: Grid, store: Storage) -> dict:
    """Each group's experts, trained once (kept if already stored), and its data set, as
    object refs: {group: {"data": ref, "mct"|"mtt": [ref per expert]}}."""
    shared = {}
    for group in grid.groups:
        cfg = group.cfg
        gstore = store.child(f"{EXPERT_GROUPS}/{group.name}")
        ctx = pipeline.Context.build(cfg)
        data_ref = ray.put(data_to_numpy(ctx.data))
        resolved = json.loads(json.dumps(cfg.to_dict()))  # as stored: lists, not tuples
        if gstore.exists(layout.CONFIG) and gstore.read_json(layout.CONFIG) != resolved:
            raise ConfigError(f"{gstore.uri} holds experts trained with another config; "
                              "choose another --out")
        gstore.write_json(layout.CONFIG, cfg.to_dict())
        names = set(gstore.list(layout.EXPERTS, ".safetensors"))
        need = {layout.expert_name(i, full) for i in range(cfg.expert.num_experts)
                for full in ((False, True) if cfg.expert.keep_full else (False,))}
        if need - names:
            log.info("expert group %s: training %d experts", group.name,
                     cfg.expert.num_experts)
            driver.generate_experts(cfg, gstore, data_ref, ctx, resume=True)
        else:
            log.info("expert group %s: %d experts already stored", group.name,
                     cfg.expert.num_experts)
        shared[group.name] = {"data": data_ref}
        for method in group.methods:
            trajs = pipeline.load_experts(gstore, ctx.spec, full=method == "mtt")
            shared[group.name][method] = [ray.put(trajectory_to_numpy(t, i, ctx.spec))
                                          for i, t in enumerate(trajs)]
    return shared


def _fit(grid: Grid, store: Storage, groups: dict, resume: bool) -> tuple[tune.ResultGrid, bool]:
    cells = {c.id: {"id": c.id, "dataset": c.dataset, "group": c.group, "cfg": c.cfg.to_dict(),
                    "uri": store.uri_of(f"{CELLS}/{c.id}"),
                    "experts_uri": store.uri_of(f"{EXPERT_GROUPS}/{c.group}")}
             for c in grid.cells}
    bundles = {c.id: _bundles(c.cfg, grid.eval_workers) for c in grid.cells}
    trainable = tune.with_resources(
        tune.with_parameters(run_cell, shared={"cells": cells, "groups": groups}),
        functools.partial(cell_resources, bundles))
    path = store.path(TUNE_DIR)
    if resume and tune.Tuner.can_restore(path, storage_filesystem=store.fs):
        log.info("restoring the grid's Tune experiment from %s", store.uri_of(TUNE_DIR))
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   restart_errored=True, storage_filesystem=store.fs)
        return tuner.fit(), True
    restarts = max(c.cfg.ray.distill_restarts for c in grid.cells)
    tuner = tune.Tuner(
        trainable, param_space={"cell": tune.grid_search([c.id for c in grid.cells])},
        # reuse_actors: a finished cell's process (torch imported, data mapped) runs the
        # next cell with the same resources; every cell seeds its own generators.
        tune_config=tune.TuneConfig(trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name, reuse_actors=True),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=store.root,
                                  storage_filesystem=store.fs, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=restarts)))
    return tuner.fit(), False


def _failures(results: tune.ResultGrid) -> dict[str, str]:
    failed = {}
    for result in results:
        if result.error is not None:
            exc = result.error
            cause = getattr(exc, "cause", None)
            exc = cause if isinstance(cause, MctRayError) else exc
            text = str(exc).strip().splitlines()
            failed[result.config["cell"]] = (f"{type(exc).__name__}: "
                                                   f"{text[-1] if text else ''}")
    return failed


def run_grid(spec: str | None, overrides: list[str], out: str, resume: bool) -> GridOutcome:
    """Run (or resume) a grid into `out`; write grid.parquet and grid.png; the outcome."""
    started = time.perf_counter()
    if "://" not in out:
        out = os.path.abspath(out)  # trials run in Tune's own working directories
    check_address()
    store = Storage.open(out, check=True)
    grid = _resolve(store, spec, overrides, resume)
    started_ray = False
    try:
        started_ray = connect(grid.cells[0].cfg.ray)
        _check_fits(grid, started_ray)
        if not store.exists(GRID_JSON):  # only now: a grid that could not start left nothing
            store.write_json(GRID_JSON, grid.to_dict())
        shared = _prepare_experts(grid, store)
        results, restored = _fit(grid, store, shared, resume)
        failed = _failures(results)
    except ray.exceptions.RayTaskError as exc:
        raise driver.unwrap(exc) from None
    finally:
        disconnect(started_ray)
    rows = [store.read_json(f"{CELLS}/{c.id}/{CELL_DONE}") for c in grid.cells
            if store.exists(f"{CELLS}/{c.id}/{CELL_DONE}")]
    failed.update({c.id: "did not finish" for c in grid.cells if c.id not in failed
                   and not any(r["cell"] == c.id for r in rows)})
    table = summary_table(rows) if rows else "(no cell finished)"
    if rows:
        store.write_table(TABLE, rows)
        store.write_bytes(PLOT, grid_png(rows))
    return GridOutcome(store.uri, rows, table, failed, restored,
                       time.perf_counter() - started)
