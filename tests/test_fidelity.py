"""Fidelity to the authors' pipeline, each against an independent computation: ZCA on raw
pixels, the customary normalisation, the smoothed piecewise path of their compression
script, MTT's start range, the 28x28 ConvNet, and the recipes' sources."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from importlib import resources

import pytest
import torch
import torch.nn.functional as F

from mct_ray.config import load_config, recipe_names
from mct_ray.data import NORMS, load_data, random_splits
from mct_ray.errors import ConfigError
from mct_ray.fastops import conv3x3
from mct_ray.nets import NetSpec, make_spec
from mct_ray.trajectory import unflatten

pytestmark = pytest.mark.core


# ---------------------------------------------------------------------------------------
# Pixels.

def test_zca_whitens_raw_pixels_as_an_eigendecomposition():
    cfg = load_config("digits", ["data.name=random", "data.channels=2", "data.resolution=4",
                                 "data.num_train=300", "data.num_test=40", "data.zca=true"])
    data = load_data(cfg.data)
    raw = random_splits(cfg.data)  # the same raw [0, 1] pixels, nothing applied
    x = raw.train_x.double().flatten(1)
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / (len(x) - 1)
    vals, vecs = torch.linalg.eigh(cov)
    whiten = vecs @ torch.diag((vals + cfg.data.zca_eps).rsqrt()) @ vecs.T
    for got, split in ((data.train_x, raw.train_x), (data.test_x, raw.test_x)):
        want = ((split.double().flatten(1) - mean) @ whiten).view_as(split)
        assert torch.allclose(got.double(), want, atol=2e-4), (got.double() - want).abs().max()
    assert data.mean == (0.0, 0.0) and data.std == (1.0, 1.0)  # nothing before ZCA


def test_zca_eps_regularises_the_raw_covariance():
    # On raw [0, 1] pixels (variance ~1/12) eps=0.1 dominates the small eigenvalues; the old
    # standardise-first pipeline (variance 1) whitened far harder. Raw pixels keep a small scale.
    cfg = load_config("digits", ["data.name=random", "data.resolution=4", "data.zca=true",
                                 "data.num_train=300"])
    assert load_data(cfg.data).train_x.std() < 0.9


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100",
                                  "tinyimagenet"])
def test_customary_constants(name):
    from mct_ray.data import normalisation

    mean, std = normalisation(name, torch.rand(4, len(NORMS[name][0]), 2, 2))
    assert mean.tolist() == pytest.approx(NORMS[name][0])
    assert std.tolist() == pytest.approx(NORMS[name][1])


def test_constants_are_the_published_ones():
    assert NORMS["fashion-mnist"] == ((0.2861,), (0.3530,))
    assert NORMS["mnist"] == ((0.1307,), (0.3081,))
    assert NORMS["cifar100"] == NORMS["cifar10"]  # as MTT's and MCT's code do


def test_computed_statistics_where_no_constants_exist():
    from mct_ray.data import normalisation

    x = torch.rand(50, 3, 4, 4) * 0.5 + 0.2
    mean, std = normalisation("imagefolder", x)
    assert torch.allclose(mean, x.mean((0, 2, 3))) and torch.allclose(std, x.std((0, 2, 3)))


# ---------------------------------------------------------------------------------------
# The convex path: smoothed anchors against the authors' compression formula.

def compression_formula(checkpoints: torch.Tensor, spec: NetSpec, waypoints: list[int],
                        c: float) -> torch.Tensor:
    """The authors' exps/trajectory_compression.py, written from its description on a stored
    full trajectory (float64): per segment [a, b] and tensor l, beta_j = sum of the first j
    step norms over all of them (on the original checkpoints); waypoints replaced by the mean
    of their two neighbouring epochs (the end by the mean of the last two, the start kept);
    theta(c) = lerp(P_s, P_s+1, lerp(beta[floor], beta[floor + 1], frac))."""
    ck = [unflatten(spec, row.double()) for row in checkpoints]
    K = waypoints[-1]
    points = [ck[0]] + [[(u + v) / 2 for u, v in zip(ck[w - 1], ck[w + 1])]
                        for w in waypoints[1:-1]] + [[(u + v) / 2 for u, v in zip(ck[K - 1],
                                                                                   ck[K])]]
    s = max(i for i, w in enumerate(waypoints[:-1]) if w <= c)
    a, b = waypoints[s], waypoints[s + 1]
    low = math.floor(c) - a
    frac = c - math.floor(c)
    out = []
    for l in range(len(ck[0])):
        norms = [torch.linalg.vector_norm(ck[k][l] - ck[k - 1][l]) for k in range(a + 1, b + 1)]
        total = sum(norms)
        total = total if total > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = [sum(norms[:j]) / total for j in range(b - a + 1)]
        hi = min(low + 1, b - a)
        t = beta[low] + frac * (beta[hi] - beta[low])
        out.append(points[s][l] + t * (points[s + 1][l] - points[s][l]))
    return torch.cat([t.reshape(-1) for t in out])


def test_smoothed_piecewise_path_equals_the_compression_formula(tiny_ctx):
    from mct_ray.experts import train_expert

    cfg = tiny_ctx.cfg.replace(**{"expert.epochs": 8, "expert.anchors": [2, 5],
                                  "expert.smooth_anchors": True, "expert.keep_full": True})
    result = train_expert(tiny_ctx.net, tiny_ctx.data, cfg.expert, tiny_ctx.aug, 0, 0)
    for c in (0.0, 0.3, 1.0, 1.99, 2.0, 2.5, 4.7, 5.0, 6.25, 7.5, 7.99, 8.0):
        want = compression_formula(result.full.checkpoints, tiny_ctx.spec, [0, 2, 5, 8], c)
        got = result.convex.point(c).double()
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (c, (got - want).abs().max())


def test_smoothing_changes_only_the_anchor_points(tiny_ctx):
    from mct_ray.experts import train_expert

    over = {"expert.epochs": 6, "expert.anchors": [3], "expert.keep_full": True}
    plain = train_expert(tiny_ctx.net, tiny_ctx.data, tiny_ctx.cfg.replace(**over).expert,
                         tiny_ctx.aug, 0, 0)
    smooth = train_expert(tiny_ctx.net, tiny_ctx.data,
                          tiny_ctx.cfg.replace(**over, **{"expert.smooth_anchors": True}).expert,
                          tiny_ctx.aug, 0, 0)
    full = plain.full.checkpoints
    assert torch.equal(smooth.full.checkpoints, full)  # the same training
    assert torch.equal(smooth.convex.beta, plain.convex.beta)  # beta from the originals
    assert torch.equal(plain.convex.anchors, full[[0, 3, 6]])
    assert torch.equal(smooth.convex.anchors[0], full[0])
    assert torch.allclose(smooth.convex.anchors[1], (full[2] + full[4]) / 2)
    assert torch.allclose(smooth.convex.anchors[2], (full[5] + full[6]) / 2)


def test_smoothing_needs_anchors():
    with pytest.raises(ConfigError, match="smooth_anchors"):
        load_config("digits", ["expert.smooth_anchors=true"])


def test_storage_bytes_grow_with_anchors(tiny_ctx):
    from mct_ray import formats
    from mct_ray.experts import train_expert

    sizes = []
    for anchors in ([], [1], [1, 2]):
        cfg = tiny_ctx.cfg.replace(**{"expert.anchors": anchors})
        result = train_expert(tiny_ctx.net, tiny_ctx.data, cfg.expert, tiny_ctx.aug, 0, 0)
        sizes.append(len(formats.save_trajectory(result.convex)))
    per_anchor = 4 * tiny_ctx.spec.num_params
    assert sizes[1] - sizes[0] == pytest.approx(per_anchor, rel=0.01)
    assert sizes[2] - sizes[1] == pytest.approx(per_anchor, rel=0.01)


# ---------------------------------------------------------------------------------------
# Start epochs.

def test_mtt_starts_exclude_max_start_epoch(tiny_experts, tiny_cfg):
    """MTT's code: start_epoch = np.random.randint(0, max_start_epoch), upper end excluded."""
    from mct_ray.distill import sample_segment
    from mct_ray.rng import generator

    cfg = dataclasses.replace(tiny_cfg.distill, method="mtt", max_start_epoch=3,
                              expert_epochs=1)
    trajs = [r.full for r in tiny_experts]
    starts = {sample_segment(trajs, cfg, generator(0, "m", i), "cpu").start_epoch
              for i in range(200)}
    assert starts == {0.0, 1.0, 2.0}


def test_mtt_needs_a_start_range():
    with pytest.raises(ConfigError, match="at least 1 for method mtt"):
        load_config("digits", ["distill.method=mtt", "distill.max_start_epoch=0"])
    # the last start is max_start_epoch - 1, so its target may be the last epoch
    cfg = load_config("digits", ["distill.method=mtt", "distill.max_start_epoch=29",
                                 "distill.expert_epochs=2"])
    assert cfg.distill.max_start_epoch - 1 + cfg.distill.expert_epochs <= cfg.expert.epochs


# ---------------------------------------------------------------------------------------
# The 28x28 one-channel ConvNet.

def test_one_channel_28x28_runs_at_32x32():
    spec = make_spec(load_config("fashion-mnist").net, (1, 28, 28), 10)
    assert spec.first_padding == 3 and spec.feature_side == 4
    assert dict(spec.param_shapes())["classifier.weight"] == (10, 2048)
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 128, 3, padding=3), torch.nn.GroupNorm(128, 128),
                              torch.nn.ReLU(), torch.nn.AvgPool2d(2))
    for i in range(1, 3):
        ref.extend([torch.nn.Conv2d(128, 128, 3, padding=1), torch.nn.GroupNorm(128, 128),
                    torch.nn.ReLU(), torch.nn.AvgPool2d(2)])
    ref.extend([torch.nn.Flatten(), torch.nn.Linear(2048, 10)])
    params = spec.init_params(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p, q in zip([p for p in ref.parameters()], params):
            p.copy_(q)
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(spec.forward(params, x), ref(x), atol=1e-5)
    # other shapes keep padding 1 (digits, CIFAR)
    assert make_spec(load_config("digits").net, (1, 8, 8), 10).first_padding == 1
    assert make_spec(load_config("cifar10").net, (3, 32, 32), 10).feature_side == 4


@pytest.mark.parametrize("pad", [1, 3])
def test_padded_conv_double_backward_matches_autograd(pad):
    gen = torch.Generator().manual_seed(pad)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)

    def second_order(conv):
        y = conv(x, w, b)
        gw, gb = torch.autograd.grad((y ** 2).sum(), [w, b], create_graph=True)
        return torch.autograd.grad((gw ** 2).sum() + (gb ** 3).sum(), [x, w, b])

    ours = second_order(lambda x, w, b: conv3x3(x, w, b, pad))
    want = second_order(lambda x, w, b: F.conv2d(x, w, b, padding=pad))
    for a, r in zip(ours, want):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------
# Presets.

def _recipe_text(name: str) -> str:
    return (resources.files("mct_ray") / "recipes" / f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_value_has_a_source_comment(name):
    for line in _recipe_text(name).splitlines():
        code = line.split("#", 1)[0]
        if re.match(r"^\s*[\w.]+:\s*\S", code) and not code.strip().startswith("base:"):
            assert "#" in line, f"{name}.yaml: no source comment on {line.strip()!r}"


def test_config_command_shows_the_papers_anchors_and_zca(capsys):
    from mct_ray.cli import main

    assert main(["config", "--recipe", "cifar10-ipc1"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["expert"]["anchors"] == [6, 25] and cfg["expert"]["smooth_anchors"] is True
    assert cfg["data"]["zca"] is True and cfg["distill"]["grad_mode"] == "tesla"
    assert (cfg["distill"]["syn_steps"], cfg["distill"]["expert_epochs"],
            cfg["distill"]["max_start_epoch"], cfg["distill"]["lr_img"]) == (60, 6, 4, 1000)


def test_method_selects_its_preset_and_overrides_win():
    mct = load_config("cifar10-ipc10")
    mtt = load_config("cifar10-ipc10", ["distill.method=mtt"])
    assert (mct.distill.expert_epochs, mct.distill.grad_mode) == (15, "tesla")
    assert (mtt.distill.expert_epochs, mtt.distill.grad_mode) == (2, "checkpoint")
    assert mtt.distill.lr_teacher == 0.001 and mct.distill.lr_teacher == 0.01
    assert load_config("cifar10-ipc50", ["distill.method=mtt"]).data.zca is False
    mine = load_config("cifar10-ipc10", ["distill.method=mtt", "distill.expert_epochs=3"])
    assert mine.distill.expert_epochs == 3


def test_cifar100_zca_follows_mtt_table():
    zca = [load_config(f"cifar100-ipc{i}", ["distill.method=mtt"]).data.zca for i in (1, 10, 50)]
    assert zca == [True, False, True]
    assert load_config("cifar100").expert.anchors == (15, 30)


def test_bad_by_method_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("by_method:\n  sgd: {distill: {ipc: 2}}\n")
    with pytest.raises(ConfigError, match="by_method"):
        load_config(str(path))
