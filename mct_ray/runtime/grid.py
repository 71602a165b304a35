"""`mct-ray grid` on Ray Tune: one trial per cell of a grid (see `mct_ray.grid`; the folder's
layout is in `mct_ray.storage`).

Before Tune starts, the driver trains each expert group's missing experts (the pipeline's
expert phase on the Ray backend) and puts the data set and the trajectories in the object
store. Each trial then reserves a placement group: one bundle for its distillation loop,
which runs in the trial itself, and `eval_workers` bundles for its evaluations; Tune makes
tasks submitted from a trial land in its placement group, so a cell's evaluations never
compete with other cells for resources. Cells run concurrently as far as the cluster's
resources allow.

Resuming (`--resume`) reads only the project's own records: a cell with its cell.json is
done; one with a distillation checkpoint continues from it; the others start. Nothing is
restored from Tune's files (pickles) in the output location.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass, field

import ray
from ray import tune

from mct_ray import layout, pipeline, preflight
from mct_ray.runtime import shell
from mct_ray.config import METHODS, experts_difference
from mct_ray.context import Context, Launch
from mct_ray.errors import ConfigError, MctRayError
from mct_ray.grid import Grid, build_grid, describe_difference, grid_factories, \
    grid_from_dict, grid_png, summary_table
from mct_ray.records import DistillOutcome
from mct_ray.runtime.backend import RayBackend, expert_refs
from mct_ray.runtime.codec import data_from_numpy
from mct_ray.runtime.workers import distill_from_refs
from mct_ray.storage import Storage

log = logging.getLogger(__name__)

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
                "table": store.uri_of(layout.GRID_TABLE),
                "plot": store.uri_of(layout.GRID_PLOT)}


# ---------------------------------------------------------------------------------------
# A trial: one cell.

def run_cell(config: dict, shared: dict) -> None:
    """The Tune trainable: distil one cell on its group's shared data and experts (the
    pipeline's distill phase, the loop in this trial, its evaluations fanned out into the
    trial's placement group); report the cell's row.

    `config` is {"cell": id} (all Tune shows and stores); `shared` holds every cell's
    resolved config and every group's object refs, passed once with `tune.with_parameters`.
    """
    cell = shared["cells"][config["cell"]]
    store, experts = Storage.open(cell["uri"]), Storage.open(cell["experts_uri"])
    if store.exists(layout.CELL_DONE):  # finished before the previous driver stopped
        tune.report(_progress(store.read_json(layout.CELL_DONE)))
        return
    cfg, started = cell["cfg"], time.time()
    refs = shared["groups"][cell["group"]]
    ctx = Context.from_data(cfg, data_from_numpy(ray.get(refs["data"])),
                                     cfg.ray.distill_num_cpus)
    store.write_json(layout.CONFIG, cfg.to_dict())
    backend = TrialBackend(ctx, refs["data"], refs[cfg.distill.method])
    summary = pipeline.run(ctx, store, backend, ("distill",),
                           Launch(experts, True, f"{cell['id']}-{shared['launch']}", started))
    row = {"cell": cell["id"], "dataset": cell["dataset"], **summary.grid_row(),
           "num_experts": len(refs[cfg.distill.method]), "experts": experts.uri}
    store.write_json(layout.CELL_DONE, row)
    tune.report(_progress(row))


class TrialBackend(RayBackend):
    """A grid trial's: the loop runs in the trial itself (which holds the cell's placement
    group), on its group's trajectories, already in the object store."""

    def __init__(self, ctx: Context, data_ref: ray.ObjectRef, expert_refs: list):
        super().__init__(ctx, data_ref)
        self.expert_refs = expert_refs

    def distill(self, store: Storage, launch: Launch) -> DistillOutcome:
        return distill_from_refs(self.ctx, store, self.expert_refs, self.submit_eval, launch)


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
    if store.exists(layout.GRID_JSON):
        if not resume:
            raise ConfigError(f"{store.uri} already holds a grid; continue it with --resume "
                              "or choose another --out")
        stored = grid_from_dict(store.read_json(layout.GRID_JSON),
                                store.uri_of(layout.GRID_JSON))
        named = sorted(set(grid_factories(stored)))
        if named and not spec:  # a record names a factory the user did not type
            raise ConfigError(f"{store.uri_of(layout.GRID_JSON)} names the network factory "
                              f"'{named[0]}', which a stored record alone never imports; "
                              "give the grid's --spec again to continue it")
        if spec or overrides:
            given = build_grid(spec, overrides) if spec else \
                build_grid(stored.name, overrides, stored.spec_text)
            diff = describe_difference(stored, given)
            if diff:
                raise ConfigError(f"--resume: the grid given differs from the one in "
                                  f"{store.uri_of(layout.GRID_JSON)} ({diff}); give no spec or "
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


def _preflight(grid: Grid) -> dict[str, Context]:
    """Every cell checked against its data set before any work (the data loaded once per
    expert group); the bad cells, all of them, refuse the grid. The groups' contexts."""
    contexts = {g.name: Context.build(g.cfg) for g in grid.groups}
    bad = []
    for cell in grid.cells:
        try:
            preflight.check_data(dataclasses.replace(contexts[cell.group], cfg=cell.cfg))
        except MctRayError as exc:
            bad.append(f"{cell.id}: {exc}")
    if bad:
        raise ConfigError(f"{len(bad)} of {len(grid.cells)} grid cells cannot run, nothing "
                          f"started: {'; '.join(bad)}")
    return contexts


def _prepare_experts(grid: Grid, store: Storage, contexts: dict) -> dict:
    """Each group's missing experts trained (the pipeline's expert phase), and its data set
    and trajectories as object refs: {group: {"data": ref, "mct"|"mtt": [ref per expert]}}."""
    shared = {}
    for group in grid.groups:
        cfg = group.cfg
        gstore = store.child(layout.expert_group(group.name))
        ctx = contexts[group.name]
        if gstore.exists(layout.CONFIG):
            stored = gstore.read_json(layout.CONFIG)
            diff = experts_difference(stored, cfg.to_dict(), count=True) \
                if isinstance(stored, dict) else (layout.CONFIG, stored, "a config")
            if diff:
                raise ConfigError(f"{gstore.uri} holds other experts "
                                  f"({diff[0]} = {diff[1]!r} there, {diff[2]!r} now); "
                                  "choose another --out")
        gstore.write_json(layout.CONFIG, cfg.to_dict())
        backend = RayBackend(ctx)
        pipeline.train_missing_experts(ctx, gstore, backend)
        shared[group.name] = {"data": backend.data_ref}
        for method in group.methods:
            shared[group.name][method] = expert_refs(gstore, ctx.spec,
                                                     METHODS[method].reads_full)
    return shared


def _status(grid: Grid, store: Storage) -> dict[str, list[str]]:
    """Each cell's state from its folder: done (cell.json), in flight (a checkpoint), or
    pending."""
    status: dict[str, list[str]] = {"done": [], "in_flight": [], "pending": []}
    for c in grid.cells:
        folder = layout.grid_cell(c.id)
        key = "done" if store.exists(f"{folder}/{layout.CELL_DONE}") else \
            "in_flight" if store.exists(f"{folder}/{layout.STATE}") else "pending"
        status[key].append(c.id)
    return status


def _fit(grid: Grid, store: Storage, groups: dict, todo: list[str]) -> tune.ResultGrid:
    cells = {c.id: {"id": c.id, "dataset": c.dataset, "group": c.group, "cfg": c.cfg,
                    "uri": store.uri_of(layout.grid_cell(c.id)),
                    "experts_uri": store.uri_of(layout.expert_group(c.group))}
             for c in grid.cells}
    bundles = {c.id: _bundles(c.cfg, grid.eval_workers) for c in grid.cells}
    launch = time.strftime("%Y%m%d-%H%M%S")
    trainable = tune.with_resources(
        tune.with_parameters(run_cell, shared={"cells": cells, "groups": groups,
                                               "launch": launch}),
        functools.partial(cell_resources, bundles))
    restarts = max(c.cfg.ray.distill_restarts for c in grid.cells)
    tuner = tune.Tuner(
        trainable, param_space={"cell": tune.grid_search(todo)},
        # reuse_actors: a finished cell's process (torch imported, data mapped) runs the
        # next cell with the same resources; every cell seeds its own generators.
        tune_config=tune.TuneConfig(trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name, reuse_actors=True),
        run_config=tune.RunConfig(name=launch, storage_path=store.path(layout.GRID_TUNE),
                                  storage_filesystem=store.fs, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=restarts)))
    return tuner.fit()


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
    store = shell.output(out, local=False)
    grid = _resolve(store, spec, overrides, resume)
    gangs = [c.id for c in grid.cells if c.cfg.ray.distill_workers > 1]
    if gangs:
        raise ConfigError(f"ray.distill_workers > 1 in {len(gangs)} grid cells ({gangs[0]}, "
                          "...): a grid trial distils on one worker; run such a cell with "
                          "`mct-ray run` or `mct-ray distill`")
    contexts = _preflight(grid)
    failed: dict[str, str] = {}
    with shell.session(store, "grid", grid.cells[0].cfg.ray,
                       lambda own_ray: _check_fits(grid, own_ray)):
        status = _status(grid, store)
        if resume:
            log.info("grid %s: %d cells done, %d in flight (continue from their checkpoint), "
                     "%d pending", store.uri, *map(len, status.values()))
        if not store.exists(layout.GRID_JSON):
            store.write_json(layout.GRID_JSON, grid.to_dict())
        todo = status["in_flight"] + status["pending"]
        if todo:
            shared = _prepare_experts(grid, store, contexts)
            failed = _failures(_fit(grid, store, shared, todo))
    rows = [store.read_json(f"{layout.grid_cell(cell)}/{layout.CELL_DONE}")
            for cell in _status(grid, store)["done"]]
    failed.update({c.id: "did not finish" for c in grid.cells if c.id not in failed
                   and not any(r["cell"] == c.id for r in rows)})
    table = summary_table(rows) if rows else "(no cell finished)"
    if rows:
        store.write_table(layout.GRID_TABLE, rows)
        store.write_bytes(layout.GRID_PLOT, grid_png(rows))
    return GridOutcome(store.uri, rows, table, failed, resume and bool(status["done"] or
                                                                      status["in_flight"]),
                       time.perf_counter() - started)
