"""The run sequence is one thing on every backend: the local one, Ray (actor loop), and a
grid cell (loop in a Tune trial). On each: (a) experts partly on disk -> only the missing
ones are trained, and the run equals one that trained them all; (b) a run killed
(SIGKILL) mid-distillation and resumed ends bit for bit equal to an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mct_ray import formats
from mct_ray.cli import main
from mct_ray.config import parse_overrides
from tests.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SEQ = [*TINY, "expert.num_experts=3", "distill.iterations=100", "distill.syn_steps=10",
       "eval.every=50", "run.checkpoint_every=1"]
CELL = "digits-ipc1-mct-seed0"


class Backend:
    """How a test drives one backend: a run in this process, or one as its own process."""

    name = "local"
    flags = ["--local"]

    def __init__(self, tmp: Path):
        self.tmp = tmp

    def run(self, out: Path, *extra: str) -> None:
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            code = main(["run", *self.flags, "--out", str(out), *SEQ, *extra])
        assert code == 0, buffer.getvalue()[-2000:]

    def start(self, out: Path) -> subprocess.Popen:
        argv = [sys.executable, "-m", "mct_ray.cli", "run", *self.flags, "--out", str(out),
                *SEQ]
        return subprocess.Popen(argv, cwd=ROOT, env=self.env(), stdout=subprocess.DEVNULL,
                                stderr=open(self.tmp / f"{out.name}.log", "w"))

    def env(self) -> dict:
        return {**os.environ, "PYTHONPATH": str(ROOT)}

    def folder(self, out: Path) -> Path:  # where the run's files are
        return out

    def experts(self, out: Path) -> Path:
        return out / "experts"


class RayBackend(Backend):
    name = "ray"
    flags: list[str] = []

    def __init__(self, tmp: Path, cluster):
        super().__init__(tmp)
        self.cluster = cluster

    def env(self) -> dict:
        return {**super().env(), "RAY_ADDRESS": self.cluster.address}


class GridCell(RayBackend):
    name = "grid"

    def spec(self) -> str:
        path = self.tmp / "one-cell.yaml"
        path.write_text(yaml.safe_dump({
            "datasets": {"digits": {"recipe": "digits", "ipc": [1]}}, "methods": ["mct"],
            "seeds": [0], "overrides": parse_overrides(SEQ)}))
        return str(path)

    def run(self, out: Path, *extra: str) -> None:
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            code = main(["grid", "--spec", self.spec(), "--out", str(out), *extra])
        assert code == 0, buffer.getvalue()[-2000:]

    def start(self, out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "jobs.grid", "--spec", self.spec(),
                                 "--out", str(out)], cwd=ROOT, env=self.env(),
                                stdout=subprocess.DEVNULL,
                                stderr=open(self.tmp / f"{out.name}.log", "w"))

    def folder(self, out: Path) -> Path:
        return out / "cells" / CELL

    def experts(self, out: Path) -> Path:
        return out / "experts" / "digits" / "experts"


@pytest.fixture(params=["local", "ray", "grid"])
def backend(request, tmp_path):
    if request.param == "local":
        return Backend(tmp_path)
    cluster = request.getfixturevalue("ray_cluster")
    return (RayBackend if request.param == "ray" else GridCell)(tmp_path, cluster)


def same_run(a: Path, b: Path) -> None:
    """Bit for bit the same synthetic sets (last and best) and evaluations."""
    for name in ("last.safetensors", "synthetic.safetensors"):
        x = formats.load_synthetic((a / name).read_bytes(), name)
        y = formats.load_synthetic((b / name).read_bytes(), name)
        assert torch.equal(x.images, y.images) and x.step_size == y.step_size, name
    keys = ("iteration", "acc_mean", "acc_std", "loss", "step_size")
    rows = [[[None if r[k] != r[k] else r[k] for k in keys]  # NaN (no loss yet) as None
             for r in pq.read_table(f / "metrics.parquet").to_pylist()] for f in (a, b)]
    assert rows[0] == rows[1]


def state_iteration(folder: Path) -> int:
    try:
        return formats.load_state((folder / "state.safetensors").read_bytes(),
                                  "s")["distiller"]["iteration"]
    except Exception:  # not there yet, or being replaced right now
        return -1


def test_partial_experts_and_a_killed_run_resume_to_the_same_result(backend, tmp_path):
    whole = tmp_path / "whole"
    backend.run(whole)
    reference = backend.folder(whole)

    # (a) one expert already on disk: only the other two are trained.
    part = tmp_path / "part"
    stored = backend.experts(part)
    stored.mkdir(parents=True)
    for path in backend.experts(whole).glob("expert-00000*"):
        shutil.copy2(path, stored / path.name)
    kept = {p.name: p.stat().st_mtime_ns for p in stored.iterdir()}
    backend.run(part, "--resume")
    assert {p.name: p.stat().st_mtime_ns for p in stored.glob("expert-00000*")} == kept
    names = sorted(p.name for p in stored.iterdir())
    assert names == sorted(p.name for p in backend.experts(whole).iterdir())
    for name in names:  # the trained ones equal the reference's
        a = formats.unpack((stored / name).read_bytes(), formats.TRAJECTORY, name)[0]
        b = formats.unpack((backend.experts(whole) / name).read_bytes(), formats.TRAJECTORY,
                           name)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same_run(reference, backend.folder(part))

    # (b) killed mid-distillation (SIGKILL: no cleanup at all), then resumed.
    killed = tmp_path / "killed"
    proc = backend.start(killed)
    deadline = time.monotonic() + 900  # a hang guard only: a loaded machine is slower
    while state_iteration(backend.folder(killed)) < 20:
        assert proc.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = state_iteration(backend.folder(killed))
    assert 20 <= at < 100
    time.sleep(1.0)  # let the cluster notice the driver is gone (its actors die with it)
    backend.run(killed, "--resume")
    same_run(reference, backend.folder(killed))
    summary = json.loads((backend.folder(killed) / "summary.json").read_text())
    assert summary["resumed_from"] is not None and 20 <= summary["resumed_from"] < 100
    assert len(summary["parts"]) == 2 and summary["parts"][0]["to_iteration"] >= 20
    assert summary["wall_seconds"] == pytest.approx(sum(p["seconds"]
                                                        for p in summary["parts"]), abs=0.01)
