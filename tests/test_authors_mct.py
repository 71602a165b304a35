"""Each step of the MCT authors' procedure (Zhong0x29a/MCT: exps/trajectory_compression.py
and distill_compressed.py), written here from their definitions, against ours:

1. compression: waypoints at the anchors, smoothed in place one after another, then the end
   as the mean of the (smoothed) second-last checkpoint and the last; beta per tensor and
   per piece from the unsmoothed checkpoints;
2. point(c) anywhere on the piecewise path;
3. the sampled (start, target) pair for a given draw: c ~ U[0, max_start), target c + M
   clamped to the end;
4. one TESLA-style iteration: the first pass with detached per-step gradients, then per
   step the image gradient of (syn_lr (T - theta0) + syn_lr^2 sum_j g_j) . g_i / D, which
   their code leaves unscaled (`2 * torch.autograd.grad(...)` repeats the returned tuple, it
   does not double the gradient), and the step size's gradient of
   ||theta0 - syn_lr sum_j g_j - T||^2 / D with the g_j held fixed.
Everything in float64; the network's forward and gradients come from PyTorch's own ops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mct_ray.augment import Augmenter
from mct_ray.config import AugmentConfig, ExpertConfig, load_config
from mct_ray.distill import Distiller, Segment, plan_unroll, sample_segment
from mct_ray.experts import anchor_points, smoothing_epochs, train_expert
from mct_ray.nets import NetSpec, Network
from mct_ray.trajectory import ConvexTrajectory, beta_from_step_norms, flatten, unflatten

pytestmark = pytest.mark.core

SPEC = NetSpec("convnet", channels=1, resolution=8, num_classes=3, width=4, depth=1,
               norm="instancenorm")


# ---------------------------------------------------------------------------------------
# The authors' procedure, from their definitions.

def authors_compress(checkpoints: list[list[torch.Tensor]], waypoints: list[int]):
    """Per piece, per tensor: the cumulative step-norm fractions of the unsmoothed
    checkpoints; then the checkpoints smoothed in place at each interior waypoint, in order,
    and the end replaced by the mean of the second-last and the last."""
    steps = []
    for a, b in zip(waypoints[:-1], waypoints[1:]):
        per_tensor = []
        for t in range(len(checkpoints[0])):
            norms = [float(torch.norm(checkpoints[k + 1][t] - checkpoints[k][t]))
                     for k in range(a, b)]
            cum = [0.0]
            for n in norms:
                cum.append(cum[-1] + n)
            per_tensor.append([v / cum[-1] if cum[-1] else 0.0 for v in cum])
        steps.append(per_tensor)
    traj = [list(c) for c in checkpoints]
    for idx in waypoints[1:-1]:
        traj[idx] = [(x + y) / 2 for x, y in zip(traj[idx - 1], traj[idx + 1])]
    traj[-1] = [(x + y) / 2 for x, y in zip(traj[-2], traj[-1])]
    return [traj[w] for w in waypoints], steps


def authors_point(points, steps, waypoints: list[int], n: float) -> list[torch.Tensor]:
    """The piece with waypoints[i] <= n < waypoints[i+1] (the last one at n = K); beta
    interpolated between the checkpoint indices around n, inside that piece."""
    i = max(j for j in range(len(waypoints) - 1) if waypoints[j] <= n)
    low = int(math.floor(n)) - waypoints[i]
    high = min(low + 1, waypoints[i + 1] - waypoints[i])
    frac = n - math.floor(n)
    out = []
    for t, (p0, p1) in enumerate(zip(points[i], points[i + 1])):
        beta = steps[i][t][low] + frac * (steps[i][t][high] - steps[i][t][low])
        out.append(p0 + beta * (p1 - p0))
    return out


# ---------------------------------------------------------------------------------------
# 1-2. Compression and point(c).

def ours(checkpoints: list[list[torch.Tensor]], anchors: tuple[int, ...]) -> ConvexTrajectory:
    """What train_expert builds from these checkpoints (its two helpers, in its order)."""
    num_epochs = len(checkpoints) - 1
    cfg = ExpertConfig(epochs=num_epochs, anchors=anchors, smooth_anchors=True)
    flat = [flatten(c).float() for c in checkpoints]
    snapshots = {e: flat[e] for e in smoothing_epochs(cfg)}
    norms = torch.tensor([[float(torch.norm(b - a)) for a, b in zip(c0, c1)]
                          for c0, c1 in zip(checkpoints[:-1], checkpoints[1:])])
    return ConvexTrajectory(SPEC, (0, *anchors, num_epochs), anchor_points(cfg, snapshots),
                            beta_from_step_norms(norms).float())


def random_checkpoints(num_epochs: int, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    params = [p.double() for p in SPEC.init_params(gen)]
    out = [params]
    for _ in range(num_epochs):  # steps of varying size per tensor, as training makes them
        out.append([p + torch.rand((), generator=gen, dtype=torch.float64) * 0.1 *
                    torch.randn(p.shape, generator=gen, dtype=torch.float64)
                    for p in out[-1]])
    return out


@pytest.mark.parametrize("anchors", [(3, 6, 9), (4, 5), (2, 9), (5,)],
                         ids=["every-3-epochs", "adjacent", "at-K-1", "one"])
def test_compression_and_every_point_equal_the_authors(anchors):
    ckpts = random_checkpoints(10)
    waypoints = [0, *anchors, 10]
    points, steps = authors_compress(ckpts, waypoints)
    traj = ours(ckpts, anchors)
    for j, w in enumerate(points):  # the stored waypoints themselves
        torch.testing.assert_close(traj.anchors[j].double(), flatten(w), rtol=0, atol=1e-6)
    for c in [0.0, 0.3, 1.0, 2.999, 3.0, 4.5, 5.25, 6.0, 7.7, 8.5, 9.0, 9.6, 10.0]:
        torch.testing.assert_close(traj.point(c).double(),
                                   flatten(authors_point(points, steps, waypoints, c)),
                                   rtol=0, atol=1e-6)


def test_an_anchor_at_k_minus_1_makes_the_end_a_quarter_and_three_quarters():
    ckpts = random_checkpoints(10)
    traj = ours(ckpts, (9,))
    expected = 0.25 * flatten(ckpts[8]) + 0.75 * flatten(ckpts[10])
    torch.testing.assert_close(traj.anchors[-1].double(), expected, rtol=0, atol=1e-6)


def test_a_trained_expert_compresses_as_the_authors_script(tiny_ctx):
    """train_expert end to end: its convex path against the authors' compression of its own
    full trajectory (every epoch kept)."""
    c = tiny_ctx
    cfg = c.cfg.replace(**{"expert.keep_full": True, "expert.anchors": [1, 2],
                           "expert.smooth_anchors": True}).expert_training
    result = train_expert(c.net, c.data, cfg, c.aug, 0, 0)
    ckpts = [unflatten(c.spec, p.double()) for p in result.full.checkpoints]
    waypoints = [0, 1, 2, cfg.epochs]
    points, steps = authors_compress(ckpts, waypoints)
    for x in [0.0, 0.5, 1.25, 2.0, 2.5, 3.9, 4.0]:
        torch.testing.assert_close(result.convex.point(x).double(),
                                   flatten(authors_point(points, steps, waypoints, x)),
                                   rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# 3. The sampled (start, target) pair.

@pytest.mark.parametrize("seed", range(5))
def test_the_sampled_segment_is_the_authors_for_the_same_draw(seed):
    trajs = [ours(random_checkpoints(10, s), (3, 6, 9)) for s in (0, 1)]
    cfg = load_config("fashion-mnist-ipc1", ["distill.max_start_epoch=5",
                                             "distill.expert_epochs=2.5"]).distill
    seg = sample_segment(trajs, cfg, torch.Generator().manual_seed(seed), "cpu")
    # The draw: which expert, then start_epoch = U[0, max_start) (their np.random.uniform).
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(2, (1,), generator=gen))
    start = float(torch.rand((), generator=gen, dtype=torch.float64)) * 5
    target = min(start + 2.5, 10)
    ckpts = random_checkpoints(10, k)
    points, steps = authors_compress(ckpts, [0, 3, 6, 9, 10])
    assert (seg.expert, seg.start_epoch, seg.target_epoch) == (k, start, target)
    for ours_, epoch in ((seg.start, start), (seg.target, target)):
        torch.testing.assert_close(flatten(ours_).double(), flatten(
            authors_point(points, steps, [0, 3, 6, 9, 10], epoch)), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# 4. One TESLA-style iteration.

def authors_tesla(images, labels, start, target, syn_lr: float, plans, aug):
    """(image gradient, step-size gradient) as distill_compressed.py forms them."""
    forward = lambda params, x: SPEC.forward(params, x, "builtin")  # PyTorch's own ops
    # First pass: each step's gradient at its own parameters, detached.
    w, grads, xs = [p.clone() for p in start], [], []
    for plan in plans:
        x = aug.apply(images[plan.indices], plan.aug)
        leaves = [p.detach().requires_grad_() for p in w]
        ce = F.cross_entropy(forward(leaves, x), labels[plan.indices])
        g = torch.autograd.grad(ce, leaves)
        grads.append((leaves, [gi.detach() for gi in g]))
        w = [p - syn_lr * gi for p, gi in zip(w, g)]
    flat_sum = flatten([sum(gs[t] for _, gs in grads) for t in range(len(start))])
    theta0, target_flat = flatten(start), flatten(target)
    param_dist = ((theta0 - target_flat) ** 2).sum()
    single = syn_lr * (target_flat - theta0)
    square = syn_lr ** 2 * flat_sum
    image_grad = torch.zeros_like(images)
    for plan, (leaves, _) in zip(plans, grads):  # second pass, per step, w_i held fixed
        x_leaf = images[plan.indices].detach().requires_grad_()
        ce = F.cross_entropy(forward(leaves, aug.apply(x_leaf, plan.aug)),
                             labels[plan.indices])
        g_i = flatten(torch.autograd.grad(ce, leaves, create_graph=True))
        (gx,) = torch.autograd.grad((single + square) @ g_i / param_dist, x_leaf)
        image_grad[plan.indices] += gx  # `2 * (gx,)` is `(gx, gx)`: [0] is gx, unscaled
    lr = torch.tensor(syn_lr, dtype=torch.float64, requires_grad=True)
    residual = theta0 - lr * flat_sum - target_flat
    (lr_grad,) = torch.autograd.grad(residual @ residual / param_dist, lr)
    return image_grad, lr_grad


def tesla_case(seed: int, batch: int, num_steps: int, syn_lr: float, recipe: str,
               overrides: list[str]):
    """Images, a segment and a step plan; the authors' gradients for them; and a Distiller
    of an MCT preset (with `overrides`) that has filled its own."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    start = [p.double() for p in SPEC.init_params(gen)]
    target = [p + 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
              for p in start]
    aug = Augmenter(AugmentConfig(enabled=True, mode="all"))
    plans = plan_unroll(6, batch, num_steps, 8, aug, gen)  # shuffled passes, DSA
    theirs = authors_tesla(images, labels, start, target, syn_lr, plans, aug)
    cfg = load_config(recipe, overrides).distill
    distiller = Distiller(Network(SPEC), [ours(random_checkpoints(2), ())], images, labels, cfg,
                          aug, 0)
    distiller.step_size = torch.tensor(syn_lr, dtype=torch.float64, requires_grad=True)
    distiller.compute_grads(Segment(0, 0.0, 1.0, start, target), plans)
    return theirs, distiller


def test_one_tesla_iteration_equals_the_authors_gradients():
    """The CIFAR-10 MCT preset (the authors' published setting) runs their gradient."""
    (theirs_x, theirs_lr), distiller = tesla_case(0, 4, 5, 0.02, "cifar10-ipc1", [])
    assert (distiller.cfg.grad_mode, distiller.cfg.image_grad_scale) == ("tesla", 0.5)
    torch.testing.assert_close(distiller.images.grad, theirs_x, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(distiller.step_size.grad, theirs_lr, rtol=1e-6, atol=1e-12)
    assert float(theirs_x.abs().max()) > 1e-6  # not vacuous


def test_the_full_image_gradient_is_twice_the_authors():
    """Without the preset's scale, the image gradient is the TESLA-style gradient of the
    matching loss itself: twice the authors'; the step size's is unchanged."""
    (theirs_x, theirs_lr), distiller = tesla_case(1, 6, 3, 0.01, "cifar10-ipc1",
                                                  ["distill.image_grad_scale=1"])
    torch.testing.assert_close(distiller.images.grad, 2 * theirs_x, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(distiller.step_size.grad, theirs_lr, rtol=1e-6, atol=1e-12)
