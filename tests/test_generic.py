"""Any network as expert and student (nets.py's generic path, torch.func.functional_call):
the generic path against the fast ConvNet, ResNet-18 and VGG-11 unrolls against central
finite differences in float64, batch norm on the current batch, a user's factory end to end,
and bad networks refused in one line before any work."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from mct_ray import formats, layout, zoo
from mct_ray.augment import Augmenter
from mct_ray.cli import main
from mct_ray.config import AugmentConfig, DistillConfig
from mct_ray.distill import GRAD_MODES, Segment, Student, grad_unroll, plan_unroll
from mct_ray.errors import FormatError
from mct_ray.nets import NetSpec, Network
from mct_ray.trajectory import ConvexTrajectory, beta_from_step_norms, flatten
from tests.conftest import TINY

pytestmark = pytest.mark.core

CONVNET = NetSpec("convnet", channels=3, resolution=16, num_classes=4, width=16, depth=2,
                  norm="instancenorm")


def student_problem(spec: NetSpec, dtype, num_images=8, num_steps=5, augment=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_images, spec.channels, spec.resolution, spec.resolution)
    images = torch.randn(shape, generator=gen, dtype=dtype)
    labels = torch.arange(num_images) % spec.num_classes
    # A start off the initialisation: with every norm bias at exactly 0, a constant plane
    # (a dead channel's output, convolved without bias) is normalised to exactly 0 and meets
    # a ReLU at its kink, where finite differences and any gradient disagree.
    start = [p.to(dtype) + 0.01 * torch.randn(p.shape, generator=gen, dtype=dtype)
             for p in spec.init_params(gen)]
    target = [p + 0.01 * torch.randn(p.shape, generator=gen, dtype=dtype) for p in start]
    aug = Augmenter(AugmentConfig(enabled=augment, mode="all"))
    plans = plan_unroll(num_images, num_images // 2, num_steps, spec.resolution, aug, gen)
    return images, labels, Segment(0, 0.0, 1.0, start, target), aug, plans


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    """Equal to `rel` of the reference's largest magnitude."""
    a, b = a.detach(), b.detach()
    assert float((a - b).abs().max()) <= rel * float(b.abs().max()), (a - b).abs().max()


@pytest.mark.parametrize("norm", ["instancenorm", "none"])
def test_the_zoos_convnet_has_the_functional_convnets_parameter_names(norm):
    spec = NetSpec("convnet", 1, 28, 10, 16, 3, norm)
    net = zoo.build("convnet", 1, 10, 28, seed=0, width=16, depth=3, norm=norm)
    assert [(n, tuple(p.shape)) for n, p in net.named_parameters()] == spec.param_shapes()


def test_the_generic_path_equals_the_fast_convnet_in_float32():
    """Forward, one SGD step, and the image gradient through an unroll of 5 steps, to 1e-5
    relative: the same parameters through functional_call over zoo's convnet module."""
    images, labels, seg, aug, plans = student_problem(CONVNET, torch.float32)
    fast, generic = (Student(Network(CONVNET, kernels=k), labels, aug) for k in ("fast", "generic"))
    close(CONVNET.forward(seg.start, images, "generic"), CONVNET.forward(seg.start, images), 1e-5)
    lr = torch.tensor(0.01)
    leaves = lambda: [p.clone().requires_grad_() for p in seg.start]  # noqa: E731
    (step_f, _), (step_g, _) = (s.step(leaves(), images, lr, plans[0], create_graph=False)
                                for s in (fast, generic))
    for a, b in zip(step_g, step_f, strict=True):
        close(a, b, 1e-5)
    out = {}
    for name, student in (("fast", fast), ("generic", generic)):
        x, step = images.clone().requires_grad_(), lr.clone().requires_grad_()
        loss = grad_unroll(student, x, step, seg, plans)
        out[name] = (loss, x.grad, step.grad)
    close(out["generic"][0], out["fast"][0], 1e-5)
    close(out["generic"][1], out["fast"][1], 1e-5)
    close(out["generic"][2], out["fast"][2], 1e-5)


def unroll_loss(student, images, step, seg, plans):
    final = student.run([p.detach() for p in seg.start], images, step, plans, keep_graph=False)
    return float(sum(((p - t) ** 2).sum() for p, t in zip(final, seg.target)) /
                 sum(((s - t) ** 2).sum() for s, t in zip(seg.start, seg.target)))


def agrees_with_finite_differences(analytic: float, loss_at, rel: float = 1e-4) -> bool:
    """Whether `analytic` equals the central difference (loss_at(h) - loss_at(-h)) / 2h for
    one of h = 1e-6, 1e-7, 1e-8. These networks are piecewise smooth (ReLU, max-pool) and
    instance norm over 2x2 planes is steep, so a step can straddle a kink: the measured
    differences jump between step sizes. A wrong gradient agrees with none of them."""
    fds = [(loss_at(h) - loss_at(-h)) / (2 * h) for h in (1e-6, 1e-7, 1e-8)]
    return any(abs(analytic - fd) <= rel * abs(fd) for fd in fds)


@pytest.mark.parametrize("name", ["resnet18", "resnet18-bn", "vgg11"])
def test_unroll_gradients_of_resnet_and_vgg_match_finite_differences(name):
    """float64, 8x8 inputs, an unroll of 2 steps: the image gradient along a random
    direction and the step size's derivative, against central finite differences."""
    spec = NetSpec(name, 1, 8, 2, 128, 2, "instancenorm")
    images, labels, seg, aug, plans = student_problem(spec, torch.float64, num_images=4,
                                                      num_steps=2, augment=False)
    student = Student(Network(spec), labels, aug)
    lr = torch.tensor(1e-4, dtype=torch.float64)
    x, step = images.clone().requires_grad_(), lr.clone().requires_grad_()
    grad_unroll(student, x, step, seg, plans)
    d = torch.randn(images.shape, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    assert agrees_with_finite_differences(
        float((x.grad * d).sum()), lambda h: unroll_loss(student, images + h * d, lr, seg, plans))
    assert agrees_with_finite_differences(
        float(step.grad), lambda h: unroll_loss(student, images, lr + h, seg, plans))


@pytest.mark.parametrize("mode", ["checkpoint", "tesla"])
def test_every_gradient_mode_runs_a_batch_norm_resnet(mode):
    """checkpoint is exact (equal to unroll); tesla is MTT's approximation (close)."""
    spec = NetSpec("resnet18-bn", 1, 8, 2, 128, 2, "instancenorm")
    images, labels, seg, aug, plans = student_problem(spec, torch.float64, num_images=4,
                                                      num_steps=3)
    grads = {}
    for m in ("unroll", mode):
        x, step = images.clone().requires_grad_(), torch.tensor(1e-3, dtype=torch.float64,
                                                                 requires_grad=True)
        GRAD_MODES[m](Student(Network(spec), labels, aug), x, step, seg, plans, DistillConfig())
        grads[m] = x.grad
    if mode == "checkpoint":
        torch.testing.assert_close(grads[mode], grads["unroll"], rtol=1e-9, atol=1e-12)
    else:
        cos = torch.nn.functional.cosine_similarity(grads[mode].flatten(),
                                                    grads["unroll"].flatten(), dim=0)
        assert float(cos) > 0.5


def test_batch_norm_in_the_unroll_uses_the_current_batch_and_keeps_no_statistics():
    spec = NetSpec("resnet18-bn", 3, 8, 10, 128, 2, "instancenorm")
    params = spec.init_params(torch.Generator().manual_seed(0))
    x = torch.randn(6, 3, 8, 8)
    net = spec.module(params).train()  # an ordinary module in train mode: batch statistics
    torch.testing.assert_close(spec.forward(params, x), net(x), rtol=1e-5, atol=1e-6)
    # Sample 0's logits depend on the rest of the batch, as batch statistics make them.
    assert not torch.allclose(spec.forward(params, x)[:1], spec.forward(params, x[:2])[:1])
    assert [n for n, _ in spec.param_shapes()] == [n for n, _ in net.named_parameters()]
    assert not any("running" in n for n, _ in spec.param_shapes())


FACTORIES = '''
import torch.nn as nn

def make_net(channels, num_classes, resolution):
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * (resolution // 2) ** 2, num_classes))

def not_a_module(channels, num_classes, resolution):
    return [channels, num_classes]

def too_deep(channels, num_classes, resolution):
    layers = []
    for i in range(5):  # 8 -> 4 -> 2 -> 1 -> a pool of nothing
        layers += [nn.Conv2d(channels if i == 0 else 4, 4, 3, padding=1), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4, num_classes))
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_nets"


def test_a_users_factory_is_trained_as_experts_and_unrolled_as_the_student(tmp_path,
                                                                            factories):
    out = tmp_path / "run"
    assert main(["run", "--local", "--out", str(out), *TINY,
                 f"net.name={factories}:make_net"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_iteration"] >= 0 and 0 <= summary["best_acc_mean"] <= 1
    # The expert file describes the network: name, arguments, every parameter.
    meta = formats.read_header((out / layout.expert_name(0)).read_bytes(), "e")
    net = json.loads(meta["net"])
    assert net["name"] == f"{factories}:make_net" and net["arguments"] == {}
    assert net["parameters"][:2] == [["0.weight", [4, 1, 3, 3]], ["0.bias", [4]]]
    assert [n for n, _ in net["parameters"]] == ["0.weight", "0.bias", "1.weight", "1.bias",
                                                 "5.weight", "5.bias"]


@pytest.mark.parametrize("name, message", [
    ("resnet50", "config key 'net.name': unknown architecture 'resnet50' (known: convnet"),
    ("no_such_pkg.nets:make", "config key 'net.name': cannot import 'no_such_pkg.nets:make' "
                              "(ModuleNotFoundError: No module named 'no_such_pkg')"),
    ("my_nets:absent", "config key 'net.name': cannot import 'my_nets:absent' "
                       "(AttributeError: module 'my_nets' has no attribute 'absent')"),
    ("my_nets:not_a_module", "config key 'net.name': my_nets:not_a_module returned list, not "
                             "a torch.nn.Module"),
    ("my_nets:too_deep", "config key 'net.name' (my_nets:too_deep) does not fit 1x8x8 inputs "
                         "(too deep for the resolution?)"),
    ("convnet", "config key 'net.depth' must leave at least 1 pixel after pooling: depth 4 at "
                "resolution 8"),
])
def test_a_bad_network_is_one_line_and_exit_2_before_any_work(tmp_path, factories, capsys,
                                                              name, message):
    out = tmp_path / "run"
    args = ["run", "--local", "--out", str(out), *TINY, f"net.name={name}"]
    code = main(args + (["net.depth=4"] if name == "convnet" else []))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"mct-ray: error: {message}"), err
    assert not (out / "experts").exists() and not (out / "config.json").exists()


def test_experts_of_one_network_are_refused_by_another(tmp_path, capsys):
    experts = tmp_path / "experts"
    assert main(["experts", "--local", "--out", str(experts), *TINY]) == 0
    capsys.readouterr()
    code = main(["distill", "--local", "--out", str(tmp_path / "d"), "--experts",
                 str(experts), *TINY, "net.name=mlp"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "network does not match the config (name 'convnet' != 'mlp')" in err


def test_a_file_written_for_other_parameters_of_the_same_name_is_named(monkeypatch):
    """A factory whose code changed since its experts were saved: the stored parameter list
    no longer matches what the name builds now."""
    spec = NetSpec("mlp", 1, 8, 10, 128, 2, "instancenorm")
    params = flatten(spec.init_params(torch.Generator().manual_seed(0)))
    num_tensors = len(spec.param_shapes())
    traj = ConvexTrajectory(spec, (0, 2), torch.stack([params, params + 1]),
                            beta_from_step_norms(torch.ones(2, num_tensors)).float())
    assert formats.load_trajectory(formats.save_trajectory(traj), "ok", spec).num_epochs == 2
    original = NetSpec.describe
    monkeypatch.setattr(NetSpec, "describe", lambda self: {
        **original(self), "parameters": [["layer.weight", [128, 64]]]})
    data = formats.save_trajectory(traj)
    monkeypatch.undo()
    with pytest.raises(FormatError, match=r"e.safetensors: written for a mlp with other "
                       r"parameters than mlp builds now \(\['layer.weight', \[128, 64\]\] != "
                       r"\['1.weight', \[128, 64\]\]\)"):
        formats.load_trajectory(data, "e.safetensors", spec)


def test_a_factory_in_eval_models_that_does_not_import_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--local", "--out", str(out), *TINY, "eval.models=[mlp,nope.nets:f]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("mct-ray: error: config key 'eval.models': cannot import "
                                 "'nope.nets:f' (ModuleNotFoundError: No module named 'nope')")
    assert not (out / "config.json").exists()


def test_eval_models_takes_a_users_factory(tmp_path, factories):
    out = tmp_path / "run"
    assert main(["run", "--local", "--out", str(out), *TINY,
                 f"eval.models=[{factories}:make_net]"]) == 0
    models = json.loads((out / "summary.json").read_text())["models"]
    assert list(models) == [f"{factories}:make_net"]
