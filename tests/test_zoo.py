"""The evaluation zoo (mct_ray.zoo): every architecture at every input size the data sets
have, the zoo's ConvNet equal to the distillation's, and cross-architecture scores through
`mct-ray eval` and at the end of a run."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from mct_ray import zoo
from mct_ray.cli import main
from mct_ray.nets import ConvNet, NetSpec
from tests.conftest import TINY

pytestmark = pytest.mark.core

SIZES = [(1, 8), (1, 28), (3, 32), (3, 64)]


@pytest.mark.parametrize("name", ["convnet", "resnet18", "resnet18-bn", "vgg11", "vgg11-bn",
                                  "alexnet", "mlp"])
@pytest.mark.parametrize("channels, side", SIZES)
def test_each_architecture_trains_at_each_input_size(name, channels, side):
    net = zoo.build(name, channels, 10, side, seed=0, width=16)
    x, y = torch.randn(4, channels, side, side), torch.arange(4)
    out = net(x)
    assert out.shape == (4, 10)
    assert (out - out[0]).abs().max() > 1e-4  # depends on its input (no collapsed plane)
    F.cross_entropy(out, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("name", [n for n in zoo.MODELS if n.startswith("convnet-")])
def test_every_convnet_variant_runs(name):
    assert zoo.build(name, 3, 10, 32, seed=0)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_build_is_seeded_and_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a, b = (zoo.build("resnet18", 3, 10, 32, seed=1) for _ in range(2))
    assert torch.equal(torch.rand(1), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("channels, side", [(1, 28), (3, 32), (1, 8)])
def test_the_zoos_convnet_is_the_distillation_network(channels, side):
    spec = NetSpec("convnet", channels, side, 10, 16, 3 if side > 8 else 2, "instancenorm")
    params = [p.double() for p in spec.init_params(torch.Generator().manual_seed(0))]
    net = zoo.build("convnet", channels, 10, side, seed=0, width=16, depth=spec.depth).double()
    with torch.no_grad():
        for mine, theirs in zip(net.parameters(), params, strict=True):
            mine.copy_(theirs)
    x = torch.randn(3, channels, side, side, dtype=torch.float64)
    torch.testing.assert_close(net(x), ConvNet(spec, params)(x), rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    assert main(["run", "--local", "--out", str(out), *TINY, "eval.models=[mlp,alexnet]"]) == 0
    return out


def test_every_evaluation_point_is_scored_on_every_listed_model(tiny_run):
    """metrics.parquet: a row per (iteration, model), the distillation network first;
    summary.json: per architecture the best set's score (the distillation network picks
    it), the model's own best and final points, and the random-real baseline."""
    rows = pq.read_table(tiny_run / "metrics.parquet").to_pylist()
    assert [(r["iteration"], r["model"]) for r in rows] == [
        (it, m) for it in (0, 2, 4) for m in ("convnet", "mlp", "alexnet")]
    summary = json.loads((tiny_run / "summary.json").read_text())
    models = summary["models"]
    assert sorted(models) == ["alexnet", "mlp"]
    for name, m in models.items():
        own = [r for r in rows if r["model"] == name]
        at_best = next(r for r in own if r["iteration"] == summary["best_iteration"])
        assert (m["acc_mean"], m["acc_std"]) == (at_best["acc_mean"], at_best["acc_std"])
        assert m["best_acc_mean"] == max(r["acc_mean"] for r in own)
        assert m["final_acc_mean"] == own[-1]["acc_mean"]
        assert 0 <= m["random_acc_mean"] <= 1
    ours = [r for r in rows if r["model"] == "convnet"]
    assert summary["best_acc_mean"] == max(r["acc_mean"] for r in ours)


@pytest.fixture(scope="module")
def tiny_run_best(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo-best")
    assert main(["run", "--local", "--out", str(out), *TINY, "eval.models=[mlp]",
                 "eval.models_at=best"]) == 0
    return out


def test_models_at_best_scores_only_the_best_set_at_the_end(tiny_run_best):
    rows = pq.read_table(tiny_run_best / "metrics.parquet").to_pylist()
    assert {r["model"] for r in rows} == {"convnet"}
    models = json.loads((tiny_run_best / "summary.json").read_text())["models"]
    assert sorted(models) == ["mlp"] and sorted(models["mlp"]) == [
        "acc_mean", "acc_std", "random_acc_mean", "random_acc_std"]


def test_eval_rescores_a_saved_set_per_architecture(tiny_run_best, capsys):
    assert main(["eval", "--local", "--out", str(tiny_run_best), *TINY,
                 "eval.models=[mlp,convnet-bn]", "eval.num_eval=2"]) == 0
    result = json.loads((tiny_run_best / "eval.json").read_text())
    assert sorted(result["models"]) == ["convnet-bn", "mlp"]
    assert all(len(m["accs"]) == 2 for m in result["models"].values())
    # The same set, architecture, seed and network index: the run's own end-of-run score.
    summary = json.loads((tiny_run_best / "summary.json").read_text())
    assert result["models"]["mlp"]["accs"][0] == summary["models"]["mlp"]["acc_mean"]


def test_an_unknown_architecture_is_one_line_before_any_work(tiny_run, capsys):
    before = (tiny_run / "eval.json").read_bytes() if (tiny_run / "eval.json").exists() else None
    assert main(["eval", "--local", "--out", str(tiny_run), *TINY,
                 "eval.models=[resnet50]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mct-ray: error: config key 'eval.models': unknown architecture "
                   f"'resnet50' (known: {', '.join(zoo.MODELS)}; or a factory "
                   "'my_pkg.module:function')")
    after = (tiny_run / "eval.json").read_bytes() if (tiny_run / "eval.json").exists() else None
    assert before == after


def test_a_resumed_run_has_the_same_rows_per_model(tmp_path):
    """Per-model rows survive a resume: a run stopped at iteration 2 and resumed to 4 has
    the rows of a run that went to 4 at once (seconds aside)."""
    args = ["--local", *TINY, "eval.models=[mlp]"]
    assert main(["run", "--out", str(tmp_path / "once"), *args]) == 0
    assert main(["run", "--out", str(tmp_path / "twice"), *args, "distill.iterations=2"]) == 0
    assert main(["run", "--out", str(tmp_path / "twice"), *args, "--resume"]) == 0
    once, twice = (pq.read_table(tmp_path / run / "metrics.parquet").drop(["seconds"])
                   .to_pylist() for run in ("once", "twice"))
    assert repr(once) == repr(twice)  # repr: the first row's loss is NaN (no step yet)
    assert {r["model"] for r in once} == {"convnet", "mlp"}
    summaries = [json.loads((tmp_path / run / "summary.json").read_text())["models"]
                 for run in ("once", "twice")]
    assert summaries[0] == summaries[1]


def test_the_grid_table_has_a_row_per_architecture():
    from mct_ray.grid import summary_table

    def row(method, seed, acc, resnet, random_resnet):
        return {"dataset": "digits", "ipc": 1, "method": method, "seed": seed,
                "best_acc_mean": acc, "final_acc_mean": acc, "iterations_to_within_2pts": 0,
                "random_acc_mean": 0.5,
                "models": {"resnet18": {"acc_mean": resnet, "acc_std": 0.0,
                                        "random_acc_mean": random_resnet,
                                        "best_acc_mean": resnet + 0.01,
                                        "final_acc_mean": resnet - 0.01}}}

    rows = [row("mct", 0, 0.9, 0.80, 0.6), row("mct", 1, 0.9, 0.82, 0.7),
            row("mtt", 0, 0.9, 0.70, 0.6), row("mtt", 1, 0.9, 0.74, 0.7)]
    table = summary_table(rows).splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("| data set | ipc | arch"))
    assert table[header] == ("| data set | ipc | architecture | Random | MTT | MCT | MTT best "
                             "| MCT best | MTT final | MCT final |")
    # mean ± sample std over the two seeds, in percent
    assert table[header + 2] == ("| digits | 1 | resnet18 | 65.0 ± 7.1 | 72.0 ± 2.8 | "
                                 "81.0 ± 1.4 | 73.0 ± 2.8 | 82.0 ± 1.4 | 71.0 ± 2.8 | "
                                 "80.0 ± 1.4 |")
