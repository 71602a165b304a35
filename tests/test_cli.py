"""The command line end to end on a tiny digits run: outputs, determinism, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from mct_ray import formats
from mct_ray.cli import main
from tests.conftest import TINY

pytestmark = pytest.mark.core


def run_cli(capsys, command, *argv):
    code = main([command, "--local", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "--local", "--out", str(out), *TINY]) == 0
    return out


def test_run_writes_every_output(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    for name in ("config.json", "synthetic.safetensors", "metrics.parquet", "summary.json",
                 "synthetic.png", "curve.png", "experts", "state.safetensors"):
        assert name in names
    assert len(list((tiny_run / "experts").glob("*.safetensors"))) == 2
    summary = json.loads((tiny_run / "summary.json").read_text())
    for key in ("method", "dataset", "ipc", "iterations", "best_acc_mean", "best_acc_std",
                "best_iteration", "final_acc_mean", "random_baseline_acc_mean",
                "storage_bytes_per_expert", "mtt_bytes_per_expert"):
        assert summary[key] is not None, key
    assert summary["iterations"] == 4 and summary["method"] == "mct"
    assert summary["storage_bytes_per_expert"] < summary["mtt_bytes_per_expert"]
    import pyarrow.parquet as pq

    table = pq.read_table(tiny_run / "metrics.parquet").to_pylist()
    assert [r["iteration"] for r in table] == [0, 2, 4]
    assert set(table[0]) == {"iteration", "model", "acc_mean", "acc_std", "loss", "step_size",
                             "seconds"}
    assert {r["model"] for r in table} == {"convnet"}
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["distill"]["iterations"] == 4 and cfg["run"]["out"] == str(tiny_run)
    assert (tiny_run / "synthetic.png").read_bytes()[:4] == b"\x89PNG"


def test_same_seed_gives_bitwise_identical_synthetic_set(tiny_run, tmp_path):
    assert main(["run", "--local", "--out", str(tmp_path), *TINY]) == 0
    load = lambda p: formats.load_synthetic((p / "last.safetensors").read_bytes(), "s")
    a, b = load(tiny_run), load(tmp_path)
    assert torch.equal(a.images, b.images) and a.step_size == b.step_size
    assert main(["distill", "--local", "--out", str(tmp_path / "other"), "--experts",
                 str(tmp_path),
                 *TINY, "seed=1"]) == 0
    c = load(tmp_path / "other")
    assert not torch.equal(a.images, c.images)


def test_separate_phases_and_mtt(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["experts", "--local", "--out", out, *TINY, "expert.keep_full=true"]) == 0
    assert len(list((tmp_path / "experts").glob("*.full.safetensors"))) == 2
    assert main(["distill", "--local", "--out", out, *TINY, "distill.method=mtt"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "mtt"
    capsys.readouterr()
    assert main(["eval", "--local", "--out", out, *TINY]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= result["acc_mean"] <= 1.0 and len(result["accs"]) == 1


def test_resume_continues_to_the_same_result(tiny_run, tmp_path):
    out = str(tmp_path)
    half = [a for a in TINY if not a.startswith("distill.iterations")]
    assert main(["distill", "--local", "--out", out, "--experts", str(tiny_run), *half,
                 "distill.iterations=2"]) == 0
    assert main(["distill", "--local", "--out", out, "--experts", str(tiny_run), "--resume",
                 *TINY]) == 0
    load = lambda p: formats.load_synthetic((p / "last.safetensors").read_bytes(), "s")
    assert torch.equal(load(tmp_path).images, load(tiny_run).images)


def one_line_error(code, err, expected_code=2):
    assert code == expected_code
    lines = [l for l in err.strip().splitlines() if l.startswith("mct-ray: error: ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["distill.ipcc=3"], "unknown config key 'distill.ipcc'"),
    (["distill.lr_img=-1"], "config key 'distill.lr_img' must be in"),
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["data.name=cifar10"], "cifar10 not found"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", "--out", str(out), *TINY, *args,
                           f"data.root={tmp_path / 'nodata'}")
    assert message in one_line_error(code, err)
    assert not (out / "experts").exists()


def test_corrupt_or_mismatched_expert_file(tiny_run, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny_run / "experts", tmp_path / "experts")
    code, _, err = run_cli(capsys, "distill", "--out", str(tmp_path / "a"), "--experts",
                           str(tmp_path), *TINY, "net.width=16")
    assert "network does not match the config" in one_line_error(code, err)
    victim = tmp_path / "experts" / "expert-00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    code, _, err = run_cli(capsys, "distill", "--out", str(tmp_path / "b"), "--experts",
                           str(tmp_path), *TINY)
    assert "expert-00001.safetensors: checksum mismatch" in one_line_error(code, err)
    code, _, err = run_cli(capsys, "distill", "--out", str(tmp_path / "c"), "--experts",
                           str(tmp_path / "missing"), *TINY)
    assert "no expert trajectories" in one_line_error(code, err)


def test_divergence_stops_with_clear_error_and_keeps_the_last_good_set(tiny_run, tmp_path,
                                                                        capsys, monkeypatch):
    import mct_ray.distill

    real = mct_ray.distill.match_loss
    monkeypatch.setattr(mct_ray.distill, "match_loss",
                        lambda final, seg: real(final, seg) * float("nan"))
    out = tmp_path / "div"
    code, _, err = run_cli(capsys, "distill", "--out", str(out), "--experts", str(tiny_run),
                           *TINY, "distill.max_bad_steps=2", "distill.iterations=20",
                           "eval.every=20")
    line = one_line_error(code, err, expected_code=1)
    assert "distillation diverged: 2 non-finite matching losses in a row" in line
    best = formats.load_synthetic((out / "synthetic.safetensors").read_bytes(), "s")
    assert torch.isfinite(best.images).all() and best.iteration == 0


def test_run_writes_tensorboard_events_matching_the_metrics(tiny_run):
    import pyarrow.parquet as pq
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tb"), size_guidance={"images": 0}).Reload()
    rows = pq.read_table(tiny_run / "metrics.parquet").to_pylist()
    acc = events.Scalars("eval/acc_mean")
    assert [e.step for e in acc] == [r["iteration"] for r in rows]
    assert [e.value for e in acc] == pytest.approx([r["acc_mean"] for r in rows])
    assert [e.step for e in events.Scalars("distill/loss")] == list(range(4))
    assert [e.step for e in events.Images("synthetic")] == [r["iteration"] for r in rows]
