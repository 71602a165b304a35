"""The evaluation zoo (mct_ray.zoo): every architecture at every input size the data sets
have, the zoo's ConvNet equal to the distillation's, and cross-architecture scores through
`mct-ray eval` and at the end of a run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mct_ray import zoo
from mct_ray.cli import main
from mct_ray.nets import ConvNet, NetSpec
from tests.conftest import TINY

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


def test_a_run_scores_its_best_set_and_the_baseline_on_every_listed_model(tiny_run):
    models = json.loads((tiny_run / "summary.json").read_text())["models"]
    assert sorted(models) == ["alexnet", "mlp"]
    for m in models.values():
        assert 0 <= m["acc_mean"] <= 1 and 0 <= m["random_acc_mean"] <= 1


def test_eval_rescores_a_saved_set_per_architecture(tiny_run, capsys):
    assert main(["eval", "--local", "--out", str(tiny_run), *TINY,
                 "eval.models=[mlp,convnet-bn]", "eval.num_eval=2"]) == 0
    result = json.loads((tiny_run / "eval.json").read_text())
    assert sorted(result["models"]) == ["convnet-bn", "mlp"]
    assert all(len(m["accs"]) == 2 for m in result["models"].values())
    # The same set, architecture, seed and network index: the run's own end-of-run score.
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert result["models"]["mlp"]["accs"][0] == summary["models"]["mlp"]["acc_mean"]


def test_an_unknown_architecture_is_one_line_before_any_work(tiny_run, capsys):
    before = (tiny_run / "eval.json").read_bytes() if (tiny_run / "eval.json").exists() else None
    assert main(["eval", "--local", "--out", str(tiny_run), *TINY,
                 "eval.models=[resnet50]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mct-ray: error: config key 'eval.models': unknown architecture "
                   f"'resnet50' (known: {', '.join(zoo.MODELS)}; or a factory 'my_pkg.module:function')")
    after = (tiny_run / "eval.json").read_bytes() if (tiny_run / "eval.json").exists() else None
    assert before == after
