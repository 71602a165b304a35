"""Grids of runs: data sets x images per class (ipc) x method x seed, without Ray.

A grid spec is YAML; named ones live in `mct_ray/grids/` (`digits` is the default):

    datasets:
      digits:                     # the name the table's rows carry
        recipe: digits            # one recipe for every ipc, or {ipc: recipe}
        ipc: [1, 10]
        overrides: {}             # optional: this data set's cells only
        method_overrides: {}      # optional: per method, this data set only
    methods: [mct, mtt]
    seeds: [0, 1]
    method_overrides:             # per method, every data set
      mtt: {distill.expert_epochs: 2}
    overrides: {}                 # every cell
    expert_seed: 0                # the seed the shared experts are trained with
    eval_workers: 1               # evaluation bundles each cell reserves

A cell's config is its recipe <- grid overrides <- data-set overrides <- method overrides
(grid-wide, then the data set's) <- command-line overrides, and then the cell itself (seed,
distill.ipc, distill.method), which no override may set: the more specific entry of the spec
wins, and the command line wins over the spec. Cells whose data, network,
augmentation and expert sections agree share one set of experts (an expert group), trained
once with `expert_seed` (and `expert.keep_full` when the grid has MTT cells); the cell seed
drives the synthetic set's initialisation, segment sampling and evaluations. The Random
baseline (random real images, the paper's first column) is scored by the cells of the first
method only: it does not depend on the method.

This module builds and checks the cells and renders the results (table, plot);
`runtime/grid.py` runs the cells on Ray Tune.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from mct_ray import zoo
from mct_ray.config import (METHODS, Config, experts_key, first_difference, flatten,
                            is_config_file, load_config, parse_overrides)
from mct_ray.errors import ConfigError, FormatError

CELL_KEYS = ("seed", "distill.ipc", "distill.method", "run.out", "recipe")
SPEC_KEYS = {"datasets", "methods", "seeds", "method_overrides", "overrides", "expert_seed",
             "eval_workers", "description"}
DATASET_KEYS = {"recipe", "ipc", "overrides", "method_overrides"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
LABELS = {"random": "Random", "mtt": "MTT", "mct": "MCT"}  # the paper's column order


@dataclass(frozen=True)
class Cell:
    id: str  # '<dataset>-ipc<ipc>-<method>-seed<seed>', also its folder under cells/
    dataset: str
    ipc: int
    method: str
    seed: int
    group: str  # its expert group (folder under experts/)
    cfg: Config


@dataclass(frozen=True)
class ExpertGroup:
    name: str
    cfg: Config  # trains the experts: seed = expert_seed; keep_full when MTT cells use them
    methods: tuple[str, ...]  # which kinds of trajectory its cells read


@dataclass(frozen=True)
class Grid:
    name: str
    cells: tuple[Cell, ...]
    groups: tuple[ExpertGroup, ...]
    eval_workers: int
    spec_text: str  # the spec as read, so a resumed grid can be rebuilt and compared

    def to_dict(self) -> dict:
        """What grid.json holds: every resolved cell config, so a resumed grid is this one."""
        return {"version": 1, "name": self.name, "eval_workers": self.eval_workers,
                "spec_text": self.spec_text,
                "cells": [{"id": c.id, "dataset": c.dataset, "ipc": c.ipc, "method": c.method,
                           "seed": c.seed, "group": c.group, "cfg": c.cfg.to_dict()}
                          for c in self.cells],
                "groups": [{"name": g.name, "methods": list(g.methods), "cfg": g.cfg.to_dict()}
                           for g in self.groups]}


# ---------------------------------------------------------------------------------------
# The spec.

def grid_names() -> list[str]:
    folder = resources.files("mct_ray") / "grids"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _spec_text(name: str) -> str:
    if is_config_file(name):
        try:
            with open(name) as f:
                return f.read()
        except OSError as exc:
            raise ConfigError(f"grid file '{name}' cannot be read: {exc.strerror}") from None
    if name in grid_names():
        return (resources.files("mct_ray") / "grids" / f"{name}.yaml").read_text()
    raise ConfigError(f"unknown grid '{name}' (known: {', '.join(grid_names())}; "
                      "or give a .yaml grid file)")


def _flat(where: str, value: Any) -> dict[str, Any]:
    """Overrides as flat dotted keys; none of them may set what a cell sets itself."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"grid key '{where}' must be a mapping of config keys to values")
    out = flatten(value)
    for key in out:
        if key in CELL_KEYS:
            place = where if where.startswith("the ") else f"grid key '{where}'"
            raise ConfigError(f"'{key}' in {place} is set by each cell itself "
                              "(change the grid's lists instead)")
    return out


def _int_list(where: str, value: Any, lo: int) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, list) or not value or
            any(not isinstance(v, int) or isinstance(v, bool) or v < lo for v in value)):
        raise ConfigError(f"grid key '{where}' must be a non-empty list of integers >= {lo}, "
                          f"got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"grid key '{where}' lists a value twice: {value}")
    return value


def _method_overrides(where: str, value: Any, methods: list[str]) -> dict[str, dict]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"grid key '{where}' must map a method to overrides")
    unknown = sorted(set(value) - set(METHODS))
    if unknown:
        raise ConfigError(f"grid key '{where}' names unknown method '{unknown[0]}' "
                          f"(allowed: {', '.join(METHODS)})")
    return {m: _flat(f"{where}.{m}", v) for m, v in value.items()}


def _unknown(where: str, value: dict, allowed: set) -> None:
    extra = sorted(set(value) - allowed)
    if extra:
        raise ConfigError(f"unknown grid key '{where}{extra[0]}' "
                          f"(allowed here: {', '.join(sorted(allowed))})")


def parse_spec(text: str, name: str) -> dict:
    """A grid spec, validated and normalised (lists, flat overrides), as a dict."""
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid '{name}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"grid '{name}' must be a mapping with a 'datasets' key")
    _unknown("", spec, SPEC_KEYS)
    methods = spec.get("methods", list(METHODS))
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not methods or any(m not in METHODS for m in methods) \
            or len(set(methods)) != len(methods):
        raise ConfigError(f"grid key 'methods' must list some of {', '.join(METHODS)} once "
                          f"each, got {methods!r}")
    datasets = spec.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise ConfigError("grid key 'datasets' must map a data set name to its recipe and ipc")
    out = {"methods": methods, "seeds": _int_list("seeds", spec.get("seeds", [0]), 0),
           "method_overrides": _method_overrides("method_overrides",
                                                 spec.get("method_overrides"), methods),
           "overrides": _flat("overrides", spec.get("overrides")),
           "expert_seed": _int_list("expert_seed", spec.get("expert_seed", 0), 0)[0],
           "eval_workers": _int_list("eval_workers", spec.get("eval_workers", 1), 1)[0],
           "datasets": {}}
    for ds, entry in datasets.items():
        where = f"datasets.{ds}"
        if not isinstance(ds, str) or not NAME.fullmatch(ds):
            raise ConfigError(f"grid data set name {ds!r} must be letters, digits, '.', '_' "
                              "or '-'")
        if not isinstance(entry, dict):
            raise ConfigError(f"grid key '{where}' must be a mapping with recipe and ipc")
        _unknown(where + ".", entry, DATASET_KEYS)
        ipcs = _int_list(f"{where}.ipc", entry.get("ipc"), 1)
        recipe = entry.get("recipe")
        if isinstance(recipe, str):
            recipes = {ipc: recipe for ipc in ipcs}
        elif isinstance(recipe, dict) and all(isinstance(v, str) for v in recipe.values()):
            missing = [ipc for ipc in ipcs if ipc not in recipe]
            if missing:
                raise ConfigError(f"grid key '{where}.recipe' names no recipe for ipc "
                                  f"{missing[0]}")
            recipes = {ipc: recipe[ipc] for ipc in ipcs}
        else:
            raise ConfigError(f"grid key '{where}.recipe' must be a recipe name or file, or "
                              f"map each ipc to one; got {recipe!r}")
        out["datasets"][ds] = {
            "recipes": recipes,
            "overrides": _flat(f"{where}.overrides", entry.get("overrides")),
            "method_overrides": _method_overrides(f"{where}.method_overrides",
                                                  entry.get("method_overrides"), methods)}
    return out


# ---------------------------------------------------------------------------------------
# Cells and expert groups.

def _expert_key(cfg: Config, expert_seed: int) -> str:
    """Cells whose experts are the same (trained with the grid's expert seed) share a group
    when they also ask for as many."""
    return experts_key(cfg.replace(seed=expert_seed), count=True)


def _cell_config(spec: dict, ds: str, ipc: int, method: str, seed: int,
                 cli: dict[str, Any]) -> Config:
    entry = spec["datasets"][ds]
    values = {**spec["overrides"], **entry["overrides"],
              **spec["method_overrides"].get(method, {}),
              **entry["method_overrides"].get(method, {}), **cli,
              "seed": seed, "distill.ipc": ipc, "distill.method": method}
    if any(METHODS[m].reads_full for m in spec["methods"]):  # shared experts keep every epoch
        values["expert.keep_full"] = True
    if method != spec["methods"][0]:  # one Random baseline per ipc and seed is enough
        values["eval.baseline"] = False
    try:
        return load_config(entry["recipes"][ipc], values)
    except ConfigError as exc:
        raise ConfigError(f"grid cell {ds}-ipc{ipc}-{method}-seed{seed}: {exc}") from None


def _group_names(members: dict[tuple[str, str], list[Cell]]) -> dict[tuple[str, str], str]:
    """A folder name per expert group: the data set; with several groups for it, and its
    smallest ipc; where that is still shared (the presets of MCT and MTT differ in the
    experts, as for Tiny ImageNet), and the methods."""
    def name(ds: str, group: list[Cell], detail: int) -> str:
        several = sum(1 for d, _ in members if d == ds) > 1
        parts = [ds] + ([f"ipc{min(c.ipc for c in group)}"] if several else []) + \
            ([m for m in METHODS if any(c.method == m for c in group)] if detail else [])
        return "-".join(parts)

    names = {k: name(k[0], g, 0) for k, g in members.items()}
    shared = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {k: name(k[0], g, 1) if names[k] in shared else names[k]
            for k, g in members.items()}


def build_grid(name: str, overrides: list[str] | None = None, text: str | None = None) -> Grid:
    """Every cell's config, validated now (a bad one fails before any work), and the expert
    groups they share. Cells come largest ipc first, so the longest start first. `text`:
    the spec itself (e.g. as stored in grid.json) instead of reading `name`."""
    text = _spec_text(name) if text is None else text
    spec = parse_spec(text, name)
    cli = parse_overrides(list(overrides or []))
    _flat("the command-line overrides", cli)
    cells = [Cell(f"{ds}-ipc{ipc}-{m}-seed{s}", ds, ipc, m, s, "",
                  _cell_config(spec, ds, ipc, m, s, cli))
             for ds, entry in spec["datasets"].items()
             for ipc in sorted(entry["recipes"], reverse=True)
             for m in spec["methods"] for s in spec["seeds"]]
    members: dict[tuple[str, str], list[Cell]] = defaultdict(list)  # (data set, experts)
    for cell in cells:
        members[(cell.dataset, _expert_key(cell.cfg, spec["expert_seed"]))].append(cell)
    group_of, groups = {}, []
    names = _group_names(members)
    for (ds, key), group in members.items():
        name_ = names[(ds, key)]
        methods = tuple(m for m in METHODS if any(c.method == m for c in group))
        source = next((c for c in group if c.cfg.needs_full), group[0]).cfg
        groups.append(ExpertGroup(name_, source.replace(seed=spec["expert_seed"]), methods))
        group_of.update({c.id: name_ for c in group})
    if len({g.name for g in groups}) != len(groups):
        raise ConfigError("grid: two expert groups would share a folder name; rename a data set")
    out = tuple(dataclasses.replace(c, group=group_of[c.id]) for c in cells)
    for cell in out:
        r = cell.cfg.ray
        if r.distill_num_cpus + r.distill_num_gpus == 0 or r.eval_num_cpus + r.eval_num_gpus == 0:
            raise ConfigError(f"grid cell {cell.id}: the distiller and the evaluations must "
                              "each ask for some CPU or GPU (ray.*_num_cpus / ray.*_num_gpus)")
    return Grid(name.rsplit("/", 1)[-1].split(".")[0], out, tuple(groups),
                spec["eval_workers"], text)


def grid_from_dict(d: dict, where: str = "grid.json") -> Grid:
    """The grid stored in grid.json (configs already resolved, and checked again)."""
    from mct_ray.config import from_dict

    try:
        cells = tuple(Cell(c["id"], c["dataset"], c["ipc"], c["method"], c["seed"],
                           c["group"], from_dict(c["cfg"])) for c in d["cells"])
        groups = tuple(ExpertGroup(g["name"], from_dict(g["cfg"]), tuple(g["methods"]))
                       for g in d["groups"])
        return Grid(d["name"], cells, groups, d["eval_workers"], d["spec_text"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{where} is not a grid record ({type(exc).__name__}: {exc})"
                          ) from None


def grid_factories(grid: Grid) -> list[str]:
    """The network factories (not zoo networks) its cells and groups would import."""
    cfgs = [c.cfg for c in grid.cells] + [g.cfg for g in grid.groups]
    return [n for cfg in cfgs for n in (cfg.net.name, *cfg.eval.models)
            if n not in zoo.MODELS]


def describe_difference(a: Grid, b: Grid) -> str | None:
    """None when two grids run the same cells with the same configs; else what differs."""
    ca, cb = {c.id: c for c in a.cells}, {c.id: c for c in b.cells}
    if ca.keys() != cb.keys():
        extra = sorted(ca.keys() ^ cb.keys())
        return f"cell {extra[0]} is in one grid only"
    if a.eval_workers != b.eval_workers:
        return f"eval_workers {a.eval_workers} != {b.eval_workers}"
    for cid, cell in ca.items():
        diff = first_difference(cell.cfg.to_dict(), cb[cid].cfg.to_dict())
        if diff:
            return f"cell {cid}: {diff[0]} = {diff[1]!r} != {diff[2]!r}"
    return None


# ---------------------------------------------------------------------------------------
# Results: the summary table and the plot.

def _over_seeds(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n-1; None for one seed), in percent."""
    pct = [100 * v for v in values]
    return statistics.fmean(pct), statistics.stdev(pct) if len(pct) > 1 else None


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = _over_seeds(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def table_columns(rows: list[dict]) -> dict[tuple[str, int], dict[str, list[float]]]:
    """{(dataset, ipc): {'random'|'mtt'|'mct': [best accuracy of each seed]}}, in row order."""
    out: dict = {}
    for r in rows:
        col = out.setdefault((r["dataset"], r["ipc"]), {})
        col.setdefault(r["method"], []).append(r["best_acc_mean"])
        if r.get("random_acc_mean") is not None:
            col.setdefault("random", []).append(r["random_acc_mean"])
    return out


def summary_table(rows: list[dict]) -> str:
    """The layout of the MCT paper's Table 1: a row per data set and ipc, columns Random,
    MTT, MCT; best test accuracy in percent, mean ± std over seeds."""
    cols = table_columns(rows)
    kinds = [k for k in LABELS if any(k in c for c in cols.values())]
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Best test accuracy (%), mean ± std over seeds {seeds} "
             "(Random: ipc real training images per class)",
             "| data set | ipc | " + " | ".join(LABELS[k] for k in kinds) + " |",
             "| --- | --- | " + " | ".join("---" for _ in kinds) + " |"]
    for (ds, ipc), col in sorted(cols.items(), key=lambda kv: (_order(rows, kv[0][0]),
                                                               kv[0][1])):
        lines.append(f"| {ds} | {ipc} | " + " | ".join(_fmt(col.get(k, [])) for k in kinds)
                     + " |")
    methods = [m for m in ("mtt", "mct") if m in kinds]
    lines += ["", "Final accuracy (%) and iterations to within 2 points of the best, "
              "mean over seeds",
              "| data set | ipc | " + " | ".join(f"{LABELS[m]} final" for m in methods) + " | "
              + " | ".join(f"{LABELS[m]} iterations" for m in methods) + " |",
              "| --- | --- | " + " | ".join("---" for _ in methods * 2) + " |"]
    for key in sorted(cols, key=lambda k: (_order(rows, k[0]), k[1])):
        cell_rows = [r for r in rows if (r["dataset"], r["ipc"]) == key]
        finals = [_fmt([r["final_acc_mean"] for r in cell_rows if r["method"] == m])
                  for m in methods]
        its = [[r["iterations_to_within_2pts"] for r in cell_rows if r["method"] == m]
               for m in methods]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(finals) + " | "
                     + " | ".join(f"{statistics.fmean(i):.0f}" if i else "-" for i in its)
                     + " |")
    return "\n".join(lines + cross_architecture_table(rows, methods))


def cross_architecture_table(rows: list[dict], methods: list[str]) -> list[str]:
    """With eval.models: each cell's best set (picked by the distillation network) trained
    on each architecture, random real images beside it, and, where every evaluation point
    was scored (eval.models_at=every), the architecture's own best and final accuracy."""
    models = list(dict.fromkeys(m for r in rows for m in r.get("models") or {}))
    if not models:
        return []
    own = any("final_acc_mean" in v for r in rows for v in (r.get("models") or {}).values())
    extra = [(f"{LABELS[m]} {k}", m, f"{k}_acc_mean") for k in ("best", "final")
             for m in methods] if own else []
    lines = ["", "Cross-architecture: the best set trained on each architecture (%), mean ± "
             "std over seeds" + ("; best and final: the architecture's own evaluation points"
                                 if own else ""),
             "| data set | ipc | architecture | Random | "
             + " | ".join(LABELS[m] for m in methods)
             + "".join(f" | {label}" for label, _, _ in extra) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in methods)
             + " | ---" * len(extra) + " |"]
    keys = sorted({(r["dataset"], r["ipc"]) for r in rows}, key=lambda k: (_order(rows, k[0]),
                                                                          k[1]))
    for ds, ipc in keys:
        cell = [r for r in rows if (r["dataset"], r["ipc"]) == (ds, ipc)]
        for model in models:
            def pick(method: str | None, key: str) -> list[float]:
                return [r["models"][model][key] for r in cell
                        if model in (r.get("models") or {}) and method in (None, r["method"])
                        and r["models"][model].get(key) is not None]
            # One method's per seed (every method of a seed has the same random images).
            randoms = next((v for v in (pick(m, "random_acc_mean") for m in methods) if v), [])
            lines.append(f"| {ds} | {ipc} | {model} | {_fmt(randoms)} | "
                         + " | ".join(_fmt(pick(m, "acc_mean")) for m in methods)
                         + "".join(f" | {_fmt(pick(m, key))}" for _, m, key in extra) + " |")
    return lines


def _order(rows: list[dict], dataset: str) -> int:
    return next(i for i, r in enumerate(rows) if r["dataset"] == dataset)


def grid_png(rows: list[dict]) -> bytes:
    """Best accuracy against ipc, one panel per data set: MCT and MTT with error bars over
    seeds, random real images dashed."""
    from mct_ray.report import _png, plt

    cols = table_columns(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    styles = {"mct": ("tab:blue", "o", "-"), "mtt": ("tab:orange", "s", "-"),
              "random": ("gray", "^", "--")}
    for ax, ds in zip(axes[0], datasets):
        ipcs = sorted(ipc for d, ipc in cols if d == ds)
        for kind in ("mct", "mtt", "random"):
            points = [(ipc, _over_seeds(cols[(ds, ipc)][kind])) for ipc in ipcs
                      if kind in cols[(ds, ipc)]]
            if not points:
                continue
            color, marker, ls = styles[kind]
            ax.errorbar([p[0] for p in points], [p[1][0] for p in points],
                        yerr=[p[1][1] or 0.0 for p in points], color=color, marker=marker,
                        ls=ls, capsize=4, label=LABELS[kind])
        if len(ipcs) > 1:
            ax.set_xscale("log")
        ax.set_xticks(ipcs, [str(i) for i in ipcs])
        ax.minorticks_off()
        ax.set_xlabel("images per class (ipc)")
        ax.set_ylabel("best test accuracy (%)")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)
