"""The prepared device check (`python -m bench.gpu OUT`) runs end to end on the CPU at
tiny sizes (`--dry-run`, under 30 s on 2 idle cores), so it is known to work before a GPU is
lent. Its time limit is a hang guard, not a speed target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_check_dry_run_passes_every_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", str(tmp_path), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [
        "pytest_gpu", "unroll_cifar10", "unroll_tinyimagenet", "unroll_cifar10_builtin",
        "packing", "end_to_end", "distill_parallel"]
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check=7/7")
    assert summary["device"]["peak_fp32_tflops"] > 0
    tables = {p.name for p in (tmp_path / "tables").iterdir()}
    assert {"unroll_speed_cifar10_cpu.parquet", "unroll_speed_tinyimagenet_cpu.parquet",
            "unroll_speed_cifar10_cpu_builtin.parquet", "distill_parallel_quick.parquet"} <= tables
    assert [r["experts_per_gpu"] for r in json.loads((tmp_path / "packing.json").read_text())
            ] == [1, 2]
    assert (tmp_path / "end_to_end_run" / "summary.json").exists()
