"""Grids (data set x ipc x method x seed) on Ray Tune, on the shared two-node cluster.

The spec is checked before any work; a grid finishes with a row per cell, experts trained
once and shared; a driver killed mid-grid and restarted runs only the unfinished cells and
ends with the same accuracies as a grid that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mct_ray.cli import main
from mct_ray.config import parse_overrides
from mct_ray.errors import ConfigError
from mct_ray.grid import build_grid, grid_png, summary_table
from tests.conftest import TINY

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = ("best_acc_mean", "best_acc_std", "best_iteration", "final_acc_mean",
            "final_acc_std", "iterations_to_within_2pts", "random_acc_mean", "random_acc_std")
# Four cells, two at a time on the 4-CPU test cluster (each reserves 1 CPU for its distiller
# and 1 for its evaluation worker), so a driver killed after the first finishes leaves work.
TINY_GRID = {
    "datasets": {"digits": {"recipe": "digits", "ipc": [1, 2]}},
    "methods": ["mct", "mtt"],
    "seeds": [0],
    "method_overrides": {"mtt": {"distill.expert_epochs": 2}},
    "overrides": parse_overrides([*TINY, "eval.models=[mlp]"]),
}
CELL_IDS = {f"digits-ipc{i}-{m}-seed0" for i in (1, 2) for m in ("mct", "mtt")}


def write_spec(folder: Path, spec: dict, name: str = "grid.yaml") -> str:
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("mct-ray: error:") and "\n" not in err and "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------------
# The spec (no Ray).

def test_default_grid_is_digits_ipc_1_10_by_mct_mtt_by_two_seeds():
    grid = build_grid("digits")
    assert sorted(c.id for c in grid.cells) == sorted(
        f"digits-ipc{i}-{m}-seed{s}" for i in (1, 10) for m in ("mct", "mtt") for s in (0, 1))
    assert [c.ipc for c in grid.cells][:4] == [10] * 4  # longest cells first
    for cell in grid.cells:
        assert cell.cfg.distill.ipc == cell.ipc and cell.cfg.seed == cell.seed
        assert cell.cfg.distill.method == cell.method
        assert cell.cfg.distill.expert_epochs == (2 if cell.method == "mtt" else 4)
        assert cell.cfg.eval.baseline == (cell.method == "mct")  # one Random per ipc, seed
        assert cell.group == "digits" and cell.cfg.expert.keep_full
    (group,) = grid.groups
    assert group.methods == ("mct", "mtt") and group.cfg.seed == 0
    assert group.cfg.expert.keep_full and group.cfg.expert.num_experts == 8


def test_overrides_apply_most_specific_first_then_the_command_line(tmp_path):
    spec = {"datasets": {"digits": {"recipe": "digits", "ipc": [1],
                                    "overrides": {"distill": {"lr_img": 50}},
                                    "method_overrides": {"mtt": {"distill.syn_steps": 7}}}},
            "methods": ["mct", "mtt"], "seeds": [3],
            "method_overrides": {"mtt": {"distill.syn_steps": 5, "distill.lr_lr": 1e-6}},
            "overrides": {"distill.iterations": 9, "distill.lr_img": 20, "distill.syn_steps": 4}}
    grid = build_grid(write_spec(tmp_path, spec), ["distill.iterations=11"])
    cells = {c.method: c.cfg.distill for c in grid.cells}
    assert cells["mct"].lr_img == 50 and cells["mct"].syn_steps == 4  # data set > grid
    assert cells["mtt"].syn_steps == 7 and cells["mtt"].lr_lr == 1e-6  # data set's method
    assert cells["mct"].iterations == cells["mtt"].iterations == 11  # command line last
    assert all(c.cfg.seed == 3 for c in grid.cells)


def test_cells_share_experts_only_when_their_expert_config_agrees(tmp_path):
    other = tmp_path / "longer.yaml"
    other.write_text("base: digits\nexpert:\n  epochs: 20\n")
    spec = {"datasets": {"digits": {"recipe": {1: "digits", 2: str(other), 3: "digits"},
                                    "ipc": [1, 2, 3]}},
            "methods": ["mct"], "seeds": [0]}
    grid = build_grid(write_spec(tmp_path, spec))
    groups = {c.ipc: c.group for c in grid.cells}
    assert groups[1] == groups[3] != groups[2]
    assert {g.name for g in grid.groups} == {"digits-ipc1", "digits-ipc2"}
    assert not any(g.cfg.expert.keep_full for g in grid.groups)  # no MTT cell


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown grid key 'colour'"),
    ({"methods": ["mct", "dc"]}, "grid key 'methods'"),
    ({"seeds": [0, 0]}, "lists a value twice"),
    ({"datasets": {"digits": {"recipe": "digits", "ipc": [0]}}}, "'datasets.digits.ipc'"),
    ({"datasets": {"digits": {"recipe": {1: "digits"}, "ipc": [1, 10]}}},
     "names no recipe for ipc 10"),
    ({"datasets": {"digits": {"recipe": "nope", "ipc": [1]}}}, "unknown recipe 'nope'"),
    ({"overrides": {"distill.ipc": 3}}, "'distill.ipc' in grid key 'overrides' is set by each "
                                        "cell itself"),
    ({"method_overrides": {"dc": {}}}, "unknown method 'dc'"),
    ({"overrides": {"distill.lr_img": -1}}, "grid cell digits-ipc1-mct-seed0: config key "
                                            "'distill.lr_img'"),
    ({"datasets": {"a/b": {"recipe": "digits", "ipc": [1]}}}, "grid data set name 'a/b'"),
])
def test_a_bad_spec_fails_before_any_work_with_one_line(tmp_path, capsys, change, message):
    spec = {"datasets": {"digits": {"recipe": "digits", "ipc": [1]}}, "seeds": [0], **change}
    path = write_spec(tmp_path, spec)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_grid(path)
    out = tmp_path / "out"
    assert message in one_line_error(capsys, ["grid", "--spec", path, "--out", str(out)])
    assert not (out / "grid.json").exists()


def test_cli_rejects_a_bad_override_an_unknown_grid_and_resume_without_out(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "distill.nope" in one_line_error(capsys, ["grid", "--out", out, "distill.nope=1"])
    assert "'seed' in the command-line overrides is set by each cell" in one_line_error(
        capsys, ["grid", "--out", out, "seed=4"])
    assert "unknown grid 'nope'" in one_line_error(capsys, ["grid", "--spec", "nope",
                                                            "--out", out])
    assert "--resume needs the --out" in one_line_error(capsys, ["grid", "--resume"])


def test_bad_cells_are_refused_before_any_work_and_all_listed(tmp_path, capsys):
    """ipc above the smallest digits class (which has fewer than 200 training images)."""
    spec = write_spec(tmp_path, {**TINY_GRID, "datasets": {"digits": {
        "recipe": "digits", "ipc": [1, 400, 500]}}})
    out = tmp_path / "out"
    err = one_line_error(capsys, ["grid", "--spec", spec, "--out", str(out)])
    assert "4 of 6 grid cells cannot run, nothing started" in err
    for cell in ("digits-ipc400-mct-seed0", "digits-ipc400-mtt-seed0",
                 "digits-ipc500-mct-seed0", "digits-ipc500-mtt-seed0"):
        assert f"{cell}: config key 'distill.ipc' is" in err
    assert "digits-ipc1-" not in err and not out.exists()


@pytest.mark.parametrize("record", ["factory", "[1, 2]", "{}"])
def test_a_crafted_grid_record_runs_no_code(record, tmp_path, capsys, monkeypatch):
    """A grid.json edited to name an importable function (the spec it stores included)
    is refused on --resume, as a record that is not a grid is, and nothing of it runs."""
    from tests.test_formats import EVIL

    (tmp_path / "evil_mod.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    if record == "factory":
        spec = write_spec(tmp_path, {**TINY_GRID, "overrides": {
            **TINY_GRID["overrides"], "net.name": "evil_mod:make"}})
        (out / "grid.json").write_text(json.dumps(build_grid(spec).to_dict()))
        message = "names the network factory 'evil_mod:make'"
    else:
        (out / "grid.json").write_text(record)
        message = "grid.json is not a grid record"
    assert message in one_line_error(capsys, ["grid", "--out", str(out), "--resume"])
    assert not (tmp_path / "imported").exists() and not (tmp_path / "called").exists()
    assert sorted(p.name for p in out.iterdir()) == ["grid.json"]


def _rows(values: dict) -> list[dict]:
    """Table rows from {(ipc, method, seed): (best, final, iterations, random)}."""
    return [{"dataset": "digits", "ipc": ipc, "method": m, "seed": s, "best_acc_mean": b,
             "final_acc_mean": f, "iterations_to_within_2pts": it,
             "random_acc_mean": r} for (ipc, m, s), (b, f, it, r) in values.items()]


def test_summary_table_has_the_papers_layout_and_the_seed_statistics():
    rows = _rows({(1, "mct", 0): (0.90, 0.88, 10, 0.70), (1, "mct", 1): (0.94, 0.90, 30, 0.74),
                  (1, "mtt", 0): (0.80, 0.78, 40, None), (1, "mtt", 1): (0.86, 0.80, 60, None),
                  (10, "mct", 0): (0.95, 0.95, 0, 0.93), (10, "mtt", 0): (0.96, 0.94, 0, None)})
    lines = summary_table(rows).splitlines()
    assert lines[1] == "| data set | ipc | Random | MTT | MCT |"
    ipc1 = next(line for line in lines if line.startswith("| digits | 1 |"))
    # mean and sample standard deviation (n - 1) over the seeds, by hand, in percent
    assert ipc1 == "| digits | 1 | 72.0 ± 2.8 | 83.0 ± 4.2 | 92.0 ± 2.8 |"
    assert next(line for line in lines if line.startswith("| digits | 10 |")) == \
        "| digits | 10 | 93.0 | 96.0 | 95.0 |"  # one seed: no spread to show
    final = [line for line in lines if line.startswith("| digits | 1 |")][1]
    assert final == "| digits | 1 | 79.0 ± 1.4 | 89.0 ± 1.4 | 50 | 20 |"
    assert grid_png(rows)[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------
# Grids on the cluster.

def grid_rows(out: Path) -> list[dict]:
    return sorted(pq.read_table(out / "grid.parquet").to_pylist(), key=lambda r: r["cell"])


def printed_json(text: str) -> dict:
    return json.loads(text[text.rindex("\n{\n") + 1:])


@pytest.fixture(scope="module")
def finished_grid(ray_cluster, tmp_path_factory):
    """The tiny grid run once, uninterrupted, by the CLI in this process."""
    folder = tmp_path_factory.mktemp("grid")
    spec = write_spec(folder, TINY_GRID)
    out = folder / "out"
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(["grid", "--spec", spec, "--out", str(out)])
    assert code == 0, buffer.getvalue()[-2000:]
    return spec, out, buffer.getvalue()


@pytest.mark.slow  # the grid fixture: a Tune run of 4 cells
def test_grid_writes_a_row_per_cell_the_table_and_the_plot(finished_grid):
    _, out, printed = finished_grid
    rows = grid_rows(out)
    assert {r["cell"] for r in rows} == CELL_IDS and len(rows) == 4
    for r in rows:
        rows_of_cell = pq.read_table(out / "cells" / r["cell"] / "metrics.parquet").to_pylist()
        assert [(m["iteration"], m["model"]) for m in rows_of_cell] == [
            (i, n) for i in (0, 2, 4) for n in ("convnet", "mlp")]
        metrics = [m for m in rows_of_cell if m["model"] == "convnet"]
        mlp = [m for m in rows_of_cell if m["model"] == "mlp"]
        at_best = next(m for m in mlp if m["iteration"] == r["best_iteration"])
        assert r["models"]["mlp"]["acc_mean"] == at_best["acc_mean"]
        # the row's best and final are the cell's own evaluations, recomputed here
        best = max(metrics, key=lambda m: (m["acc_mean"], -m["iteration"]))
        assert (r["best_acc_mean"], r["best_iteration"]) == (best["acc_mean"],
                                                             best["iteration"])
        assert r["final_acc_mean"] == metrics[-1]["acc_mean"]
        assert 0.0 <= r["final_acc_mean"] <= r["best_acc_mean"] <= 1.0
        assert r["iterations_to_within_2pts"] <= r["best_iteration"]
        assert r["iterations"] == 4 and r["num_experts"] == 2 and r["wall_seconds"] > 0
        assert (r["random_acc_mean"] is not None) == (r["method"] == "mct")
        cfg = json.loads((out / "cells" / r["cell"] / "config.json").read_text())
        assert cfg["distill"]["expert_epochs"] == (2 if r["method"] == "mtt" else 1)
    sizes = {r["method"]: r["storage_bytes_per_expert"] for r in rows}
    assert 0 < sizes["mct"] < sizes["mtt"]
    summary = printed_json(printed)
    assert summary["finished"] == 4 and summary["failed"] == {} and not summary["resumed"]
    assert "| data set | ipc | Random | MTT | MCT |" in printed
    assert "| data set | ipc | architecture | Random | MTT | MCT | MTT best | MCT best | " \
           "MTT final | MCT final |" in printed
    assert sum(line.startswith("| digits | ") and "| mlp |" in line
               for line in printed.splitlines()) == 2  # ipc 1 and 2
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # the grid fixture: a Tune run of 4 cells
def test_a_cell_equals_a_standalone_distillation_on_the_grids_experts(finished_grid, tmp_path):
    """The grid adds scheduling, not numerics: `mct-ray distill --local` with a cell's
    config.json and the grid's experts gives the cell's evaluations exactly."""
    _, out, _ = finished_grid
    cell = out / "cells" / "digits-ipc2-mtt-seed0"
    assert main(["distill", "--local", "--config", str(cell / "config.json"), "--out",
                 str(tmp_path), "--experts", str(out / "experts" / "digits")]) == 0
    ours = pq.read_table(cell / "metrics.parquet").to_pylist()
    alone = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    keys = ("iteration", "model", "acc_mean", "acc_std", "step_size")
    assert [[r[k] for k in keys] for r in ours] == [[r[k] for k in keys] for r in alone]
    ours, alone = ([r for r in rows if r["model"] == "convnet"] for rows in (ours, alone))
    assert [r["loss"] for r in ours[1:]] == [r["loss"] for r in alone[1:]]  # 0: no loss yet


@pytest.mark.slow  # the grid fixture: a Tune run of 4 cells
def test_experts_are_trained_once_and_shared(finished_grid):
    _, out, _ = finished_grid
    files = sorted(p.name for p in (out / "experts" / "digits" / "experts").iterdir())
    assert files == ["expert-00000.full.safetensors", "expert-00000.safetensors",
                     "expert-00001.full.safetensors", "expert-00001.safetensors"]
    assert not list((out / "cells").glob("*/experts"))  # no cell trained its own
    assert {r["experts"] for r in grid_rows(out)} == {str(out / "experts" / "digits")}


@pytest.mark.slow  # the grid fixture: a Tune run of 4 cells
def test_a_grid_folder_is_not_reused_by_mistake(finished_grid, capsys):
    spec, out, _ = finished_grid
    assert "already holds a grid" in one_line_error(capsys, ["grid", "--spec", spec,
                                                             "--out", str(out)])
    assert "differs from the one in" in one_line_error(
        capsys, ["grid", "--spec", spec, "--out", str(out), "--resume", "eval.epochs=4"])
    assert "eval.epochs = 3 != 4" in one_line_error(  # rebuilt from the spec it stored
        capsys, ["grid", "--out", str(out), "--resume", "eval.epochs=4"])
    from mct_ray.runtime.grid import _resolve
    from mct_ray.storage import Storage

    store = Storage.open(str(out))
    stored = json.loads((out / "grid.json").read_text())
    for again in ((spec, []), (None, ["eval.epochs=3"]), (None, [])):  # the same grid
        assert json.loads(json.dumps(_resolve(store, *again, resume=True).to_dict())) == stored


def _done(out: Path) -> set[str]:
    return {p.parent.name for p in (out / "cells").glob("*/cell.json")}


def _mtimes(paths) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in paths}


@pytest.mark.slow
def test_killed_grid_resumes_only_unfinished_cells_with_equal_results(
        finished_grid, ray_cluster, tmp_path, capsys):
    spec, reference, _ = finished_grid
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "jobs.grid", "--spec", spec, "--out",
                               str(out)], cwd=ROOT, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 900  # a hang guard only: a loaded machine is slower
    while not _done(out) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    log.close()
    finished = _done(out)
    assert 1 <= len(finished) < len(CELL_IDS), (tmp_path / "driver.log").read_text()[-3000:]
    kept = _mtimes(p for cell in finished for p in (out / "cells" / cell).rglob("*")
                   if p.is_file())
    experts = _mtimes((out / "experts" / "digits" / "experts").iterdir())
    time.sleep(1.0)  # let the cluster notice the driver is gone
    import shutil

    shutil.rmtree(out / "tune", ignore_errors=True)  # resume reads only mct-ray's records
    assert main(["grid", "--out", str(out), "--resume"]) == 0
    summary = printed_json(capsys.readouterr().out)
    assert summary["resumed"] and summary["finished"] == 4 and summary["failed"] == {}
    assert _done(out) == CELL_IDS
    assert _mtimes(map(Path, kept)) == kept  # finished cells were not run again
    assert _mtimes(map(Path, experts)) == experts  # nor were the experts trained again
    resumed, uninterrupted = grid_rows(out), grid_rows(reference)
    assert [{k: r[k] for k in ("cell", *ACCURACY)} for r in resumed] == \
        [{k: r[k] for k in ("cell", *ACCURACY)} for r in uninterrupted]


def test_the_paper_grid_builds_with_a_folder_per_expert_group():
    # Tiny ImageNet's MCT and MTT presets train different experts at every ipc: the
    # methods name their folders apart.
    grid = build_grid("paper")
    names = [g.name for g in grid.groups]
    assert len(set(names)) == len(names) == 6
    assert {"tinyimagenet-ipc1-mct", "tinyimagenet-ipc1-mtt"} <= set(names)
    assert len(grid.cells) == 3 * 3 * 2 * 3


def test_a_grid_of_gangs_is_refused_before_any_work(tmp_path, capsys):
    spec = write_spec(tmp_path, TINY_GRID)
    out = tmp_path / "out"
    err = one_line_error(capsys, ["grid", "--spec", spec, "--out", str(out),
                                  "ray.distill_workers=2"])
    assert "ray.distill_workers > 1 in" in err and "a grid trial distils on one worker" in err
    assert not out.exists()
