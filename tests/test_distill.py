"""The matching step against independent computations: a hand-written float64 SGD loop,
finite differences, the exact modes against each other, the sampling ranges."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

from mct_ray.augment import Augmenter
from mct_ray.config import AugmentConfig
from mct_ray.config import DistillConfig
from mct_ray.distill import (GRAD_MODES, Distiller, Segment, Student, grad_checkpoint,
                             grad_unroll, match_loss, num_chunks, plan_unroll, sample_segment)
from mct_ray.errors import DivergenceError
from mct_ray.fastops import conv3x3, instance_norm
from mct_ray.nets import ConvNet, NetSpec, Network
from mct_ray.rng import generator
from mct_ray.trajectory import unflatten

pytestmark = pytest.mark.core

SPEC = NetSpec("convnet", channels=1, resolution=8, num_classes=3, width=4, depth=1,
               norm="instancenorm")


def problem(dtype=torch.float64, num_steps=4, batch=4, augment=True, seed=0):
    """A small random synthetic set, start/target points and a replayable step plan."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(6, 1, 8, 8, generator=gen, dtype=dtype)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    start = [p.to(dtype) for p in SPEC.init_params(gen)]
    target = [p + 0.05 * torch.randn(p.shape, generator=gen, dtype=dtype) for p in start]
    seg = Segment(0, 0.0, 1.0, start, target)
    aug = Augmenter(AugmentConfig(enabled=augment, mode="all"))
    plans = plan_unroll(6, batch, num_steps, 8, aug, gen)
    return images, labels, seg, aug, plans


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_()


def test_unroll_matches_hand_written_sgd_loop():
    images, labels, seg, aug, plans = problem()
    step_size = 0.1
    # Hand loop: an nn.Module, loss.backward(), and a manual in-place update, in float64.
    net = ConvNet(SPEC, seg.start).double()
    for plan in plans:
        x = aug.apply(images[plan.indices], plan.aug)
        loss = F.cross_entropy(net(x), labels[plan.indices])
        net.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in net.params:
                p -= step_size * p.grad
    student = Student(Network(SPEC), labels, aug)
    final = student.run([leaf(p) for p in seg.start], leaf(images),
                        torch.tensor(step_size, dtype=torch.float64), plans, keep_graph=True)
    for ours, theirs in zip(final, net.params):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)


def test_match_loss_is_normalised_distance():
    _, _, seg, _, _ = problem()
    final = [t + 0.5 * (s - t) for s, t in zip(seg.start, seg.target)]  # halfway back
    num = sum(float(((f - t) ** 2).sum()) for f, t in zip(final, seg.target))
    den = sum(float(((s - t) ** 2).sum()) for s, t in zip(seg.start, seg.target))
    assert float(match_loss(final, seg)) == pytest.approx(num / den, rel=1e-12)
    assert float(match_loss(final, seg)) == pytest.approx(0.25, rel=1e-12)
    assert float(match_loss(seg.start, seg), ) == pytest.approx(1.0, rel=1e-12)


def test_unroll_gradient_matches_finite_differences():
    images, labels, seg, aug, plans = problem(num_steps=3)
    student = Student(Network(SPEC), labels, aug)
    x, lr = leaf(images), torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    grad_unroll(student, x, lr, seg, plans)

    def loss_at(imgs, step):
        final = student.run([leaf(p) for p in seg.start], leaf(imgs),
                            torch.tensor(step, dtype=torch.float64), plans, keep_graph=False)
        return float(match_loss(final, seg))

    eps = 1e-6
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        direction = torch.randn(images.shape, generator=gen, dtype=torch.float64)
        fd = (loss_at(images + eps * direction, 0.1) - loss_at(images - eps * direction, 0.1))
        fd /= 2 * eps
        assert float((x.grad * direction).sum()) == pytest.approx(fd, rel=1e-5, abs=1e-9)
    fd_lr = (loss_at(images, 0.1 + eps) - loss_at(images, 0.1 - eps)) / (2 * eps)
    assert float(lr.grad) == pytest.approx(fd_lr, rel=1e-5)


def grads_of(mode, dtype=torch.float32, num_steps=6, num_segments=0):
    images, labels, seg, aug, plans = problem(dtype=dtype, num_steps=num_steps)
    student = Student(Network(SPEC), labels, aug)
    x, lr = leaf(images), torch.tensor(0.1, dtype=dtype, requires_grad=True)
    cfg = DistillConfig(checkpoint_segments=num_segments)
    loss = GRAD_MODES[mode](student, x, lr, seg, plans, cfg)
    return float(loss), x.grad, lr.grad


@pytest.mark.parametrize("segments", [0, 1, 2, 4, 6])
def test_checkpoint_equals_unroll(segments):
    loss_u, gx_u, glr_u = grads_of("unroll")
    loss_c, gx_c, glr_c = grads_of("checkpoint", num_segments=segments)
    assert loss_c == pytest.approx(loss_u, rel=1e-6)
    rel = float((gx_c - gx_u).norm() / gx_u.norm())
    assert rel <= 1e-5, rel
    assert float(glr_c) == pytest.approx(float(glr_u), rel=1e-5)


def test_tesla_is_exact_for_one_step_and_an_approximation_after():
    _, gx_u, glr_u = grads_of("unroll", dtype=torch.float64, num_steps=1)
    _, gx_t, glr_t = grads_of("tesla", dtype=torch.float64, num_steps=1)
    torch.testing.assert_close(gx_t, gx_u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(glr_t, glr_u, rtol=1e-10, atol=1e-12)
    # Over several steps it drops the dependence of later steps on earlier images:
    # close in direction, not equal.
    _, gx_u, _ = grads_of("unroll", dtype=torch.float64, num_steps=6)
    _, gx_t, _ = grads_of("tesla", dtype=torch.float64, num_steps=6)
    cos = float(F.cosine_similarity(gx_u.flatten(), gx_t.flatten(), dim=0))
    assert 0.5 < cos < 1 - 1e-9, cos


def test_augmentation_replays_exactly():
    images, _, _, aug, plans = problem(dtype=torch.float32)
    x = images[plans[0].indices]
    assert torch.equal(aug.apply(x, plans[0].aug), aug.apply(x, plans[0].aug))
    gen_a, gen_b = generator(0, "t", 1), generator(0, "t", 1)
    assert torch.equal(aug(images, gen_a), aug(images, gen_b))


def trajectories_of(tiny_experts, method):
    return [r.convex if method == "mct" else r.full for r in tiny_experts]


def test_mct_samples_continuous_starts_in_range(tiny_experts, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg.distill, method="mct", max_start_epoch=2.5,
                              expert_epochs=1.5)
    trajs = trajectories_of(tiny_experts, "mct")
    starts, experts = [], set()
    for i in range(300):
        seg = sample_segment(trajs, cfg, generator(0, "s", i), "cpu")
        assert 0.0 <= seg.start_epoch <= 2.5
        assert seg.target_epoch == pytest.approx(min(seg.start_epoch + 1.5, 4))
        starts.append(seg.start_epoch)
        experts.add(seg.expert)
    assert experts == {0, 1}
    assert sum(s != int(s) for s in starts) == len(starts)  # not snapped to epochs
    assert min(starts) < 0.25 and max(starts) > 2.25  # covers the range
    # Start/target are the trajectory's points at those epochs.
    seg = sample_segment(trajs, cfg, generator(0, "s", 0), "cpu")
    traj = trajs[seg.expert]
    assert torch.equal(torch.cat([p.flatten() for p in seg.start]), traj.point(seg.start_epoch))


def test_mct_target_is_clamped_to_the_last_epoch(tiny_experts, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg.distill, method="mct", max_start_epoch=3.9,
                              expert_epochs=3.0)
    trajs = trajectories_of(tiny_experts, "mct")
    for i in range(50):
        seg = sample_segment(trajs, cfg, generator(1, "s", i), "cpu")
        assert seg.target_epoch == min(seg.start_epoch + 3.0, 4)


def make_distiller(tiny_ctx, tiny_experts, **overrides) -> Distiller:
    from mct_ray.pipeline import make_distiller as build

    cfg = tiny_ctx.cfg.replace(**{f"distill.{k}": v for k, v in overrides.items()})
    ctx = dataclasses.replace(tiny_ctx, cfg=cfg)
    return build(ctx, trajectories_of(tiny_experts, cfg.distill.method))


def test_state_dict_resumes_exactly(tiny_ctx, tiny_experts):
    ref = make_distiller(tiny_ctx, tiny_experts)
    for _ in range(4):
        ref.step()
    first = make_distiller(tiny_ctx, tiny_experts)
    for _ in range(2):
        first.step()
    from mct_ray import formats

    state = formats.load_state(formats.save_state(first.state_dict()), "state")
    resumed = make_distiller(tiny_ctx, tiny_experts)
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.step()
    assert torch.equal(resumed.images, ref.images)
    assert torch.equal(resumed.step_size, ref.step_size)


def test_non_finite_loss_skips_update_then_stops(tiny_ctx, tiny_experts, caplog, monkeypatch):
    distiller = make_distiller(tiny_ctx, tiny_experts, max_bad_steps=3)
    distiller.step()
    good = distiller.images.detach().clone()
    monkeypatch.setattr(distiller, "compute_grads",
                        lambda seg, plans: torch.tensor(float("nan")))
    with caplog.at_level(logging.WARNING):
        result = distiller.step()
    assert result.skipped and "non-finite" in caplog.text
    assert torch.equal(distiller.images, good)
    distiller.step()
    with pytest.raises(DivergenceError, match="3 non-finite matching losses in a row"):
        distiller.step()
    assert torch.equal(distiller.images, good)


@pytest.mark.parametrize("mode", ["unroll", "checkpoint", "tesla"])
def test_every_mode_lowers_the_matching_loss(tiny_ctx, tiny_experts, mode):
    """Sanity of the whole update: repeated steps on one segment reduce its loss."""
    distiller = make_distiller(tiny_ctx, tiny_experts, grad_mode=mode, lr_img=100.0)
    gen = generator(0, "fixed")
    seg = sample_segment(distiller.trajectories, distiller.cfg, gen, "cpu")
    plans = plan_unroll(len(distiller.images), 0, 3, 8, Augmenter(AugmentConfig(enabled=False)),
                        gen)
    losses = []
    for _ in range(5):
        distiller.opt_img.zero_grad()
        distiller.opt_lr.zero_grad()
        losses.append(float(distiller.compute_grads(seg, plans)))
        distiller.opt_img.step()
    assert losses[-1] < losses[0]


def test_unflatten_round_trip():
    flat = torch.arange(SPEC.num_params, dtype=torch.float32)
    parts = unflatten(SPEC, flat)
    assert [tuple(p.shape) for p in parts] == [s for _, s in SPEC.param_shapes()]
    assert torch.equal(torch.cat([p.flatten() for p in parts]), flat)


def test_checkpoint_equals_unroll_over_a_long_float32_unroll():
    """N=30 in float32: the recomputed segments must replay the forward pass bit for bit
    (a first-order gradient kernel in the forward pass drifted this to ~1e-3; the drift
    needs multi-threaded kernels, so this test runs with two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = _unroll_and_checkpoint_grads()
    finally:
        torch.set_num_threads(threads)
    rel = float((grads["checkpoint"][0] - grads["unroll"][0]).norm() / grads["unroll"][0].norm())
    assert rel <= 1e-5, rel
    assert float(grads["checkpoint"][1]) == pytest.approx(float(grads["unroll"][1]), rel=1e-5)


def _unroll_and_checkpoint_grads() -> dict:
    # The CIFAR-10 ConvNet at ipc 1, where the drift showed (smaller nets hid it).
    spec = NetSpec("convnet", channels=3, resolution=32, num_classes=10, width=128, depth=3,
                   norm="instancenorm")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(10, 3, 32, 32, generator=gen)
    labels = torch.arange(10)
    start = spec.init_params(gen)
    target = [p + 0.01 * torch.randn(p.shape, generator=gen) for p in start]
    seg = Segment(0, 0.0, 1.0, start, target)
    aug = Augmenter(AugmentConfig())
    plans = plan_unroll(10, 0, 30, 32, aug, gen)
    grads = {}
    for mode in ("unroll", "checkpoint"):
        x, lr = leaf(images), torch.tensor(0.01, requires_grad=True)
        student = Student(Network(spec), labels, aug)
        GRAD_MODES[mode](student, x, lr, seg, plans, DistillConfig())
        grads[mode] = (x.grad, lr.grad)
    return grads


# ---------------------------------------------------------------------------------------
# The fast student (fastops.conv3x3 / fastops.instance_norm, chunked batches, bf16 autocast).

def test_conv_and_instance_norm_second_derivatives_match_autograd_numerics():
    """Hand-written double backward against finite differences (gradgradcheck), float64."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()
    x, w, b = rand(2, 3, 6, 6), rand(4, 3, 3, 3), rand(4)
    assert torch.autograd.gradgradcheck(conv3x3, (x, w, b))
    x, w, b = rand(3, 4, 5, 6), rand(4), rand(4)
    assert torch.autograd.gradgradcheck(instance_norm, (x, w, b))


def test_fast_conv_and_norm_first_order_equal_the_builtins_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 32, 32, generator=gen).requires_grad_()
    w = torch.randn(16, 16, 3, 3, generator=gen).requires_grad_()
    b, g = torch.randn(16, generator=gen).requires_grad_(), torch.randn(16, generator=gen)
    g.requires_grad_()
    ours = instance_norm(conv3x3(x, w, b), g, b)
    theirs = F.group_norm(F.conv2d(x, w, b, padding=1), 16, g, b, eps=1e-5)
    assert torch.equal(ours, theirs)
    for create_graph in (False, True):
        a = torch.autograd.grad((ours ** 2).sum(), [x, w, b, g], create_graph=create_graph,
                                retain_graph=True)
        e = torch.autograd.grad((theirs ** 2).sum(), [x, w, b, g], retain_graph=True)
        assert all(torch.equal(u, v) for u, v in zip(a, e))


def _cifar_student(num_images: int, autocast: str = "none"):
    spec = NetSpec("convnet", channels=3, resolution=32, num_classes=10, width=128, depth=3,
                   norm="instancenorm")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(num_images, 3, 32, 32, generator=gen)
    labels = torch.arange(num_images) % 10
    aug = Augmenter(AugmentConfig())
    plans = plan_unroll(num_images, 0, 2, 32, aug, gen)
    return Student(Network(spec), labels, aug, autocast), spec.init_params(gen), images, plans


def test_student_step_has_the_same_bits_with_and_without_a_graph():
    """What lets checkpoint/tesla sweep forward without building the double backward."""
    student, params, images, plans = _cifar_student(40)
    assert num_chunks(student.net.spec, images) == 2  # the chunked path is the one tested
    lr = torch.tensor(0.01)
    first, _ = student.step([leaf(p) for p in params], images, lr, plans[0], create_graph=False)
    second, _ = student.step([leaf(p) for p in params], leaf(images), lr.requires_grad_(),
                             plans[0], create_graph=True)
    assert all(torch.equal(a, b.detach()) for a, b in zip(first, second))


def test_chunked_loss_equals_the_whole_batch(monkeypatch):
    images, labels, seg, aug, plans = problem()
    student = Student(Network(SPEC), labels, aug)
    whole = student.loss(seg.start, images, plans[0])
    monkeypatch.setattr("mct_ray.distill.CPU_CHUNK_BYTES", 1)  # one image per chunk
    assert num_chunks(SPEC, images[plans[0].indices]) == len(plans[0].indices)
    assert float(student.loss(seg.start, images, plans[0])) == pytest.approx(float(whole),
                                                                              rel=1e-14)
    loss_chunked, gx_chunked, _ = grads_of("unroll", dtype=torch.float64)
    monkeypatch.undo()
    loss_whole, gx_whole, _ = grads_of("unroll", dtype=torch.float64)
    assert loss_chunked == pytest.approx(loss_whole, rel=1e-12)
    torch.testing.assert_close(gx_chunked, gx_whole, rtol=1e-10, atol=1e-14)


def test_bf16_autocast_runs_exactly_replayable_and_close_to_float32():
    """distill.autocast=bf16 (meant for GPUs) through CPU autocast: checkpoint still replays
    unroll exactly, and the gradient stays close to float32's."""
    student, params, images, plans = _cifar_student(10, "bf16")
    target = [p + 0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
              for p in params]
    seg = Segment(0, 0.0, 1.0, params, target)
    out = {}
    for name, mode_student in (("unroll", student), ("checkpoint", student),
                               ("fp32", Student(student.net, student.labels, student.aug))):
        x, lr = leaf(images), torch.tensor(0.01, requires_grad=True)
        if name == "checkpoint":
            grad_checkpoint(mode_student, x, lr, seg, plans, 0)
        else:
            grad_unroll(mode_student, x, lr, seg, plans)
        out[name] = x.grad
    assert torch.equal(out["unroll"], out["checkpoint"])
    cos = F.cosine_similarity(out["unroll"].flatten(), out["fp32"].flatten(), dim=0)
    assert 0.97 < float(cos) < 1.0


@pytest.mark.parametrize("mode", ["unroll", "checkpoint", "tesla"])
def test_builtin_and_generic_kernels_give_the_same_gradient_as_the_hand_written_ones(mode):
    """run.kernels=builtin (F.conv2d / F.group_norm / F.avg_pool2d and autograd's double
    backward, what a GPU uses by default) and generic (functional_call over zoo's convnet
    module, every other network's path) against the hand-written ops, in float64."""
    images, labels, seg, aug, plans = problem(num_steps=4)
    out = {}
    for kernels in ("fast", "builtin", "generic"):
        x, lr = leaf(images), torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        student = Student(Network(SPEC, kernels=kernels), labels, aug)
        loss = GRAD_MODES[mode](student, x, lr, seg, plans, DistillConfig())
        out[kernels] = (float(loss), x.grad, lr.grad)
    for other in ("builtin", "generic"):
        assert out[other][0] == pytest.approx(out["fast"][0], rel=1e-12)
        torch.testing.assert_close(out[other][1], out["fast"][1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out[other][2], out["fast"][2], rtol=1e-9, atol=1e-12)


def test_builtin_and_fast_convnets_agree_in_float32_at_the_mnist_shape():
    spec = NetSpec("convnet", channels=1, resolution=28, num_classes=10, width=16, depth=3,
                   norm="instancenorm")
    gen = torch.Generator().manual_seed(0)
    params, x = spec.init_params(gen), torch.randn(8, 1, 28, 28, generator=gen)
    torch.testing.assert_close(spec.forward(params, x, "builtin"), spec.forward(params, x),
                               rtol=1e-5, atol=1e-6)
