"""Convex trajectory math against hand-written float64 computations over stored checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from mct_ray.trajectory import ConvexTrajectory, tensor_sizes

pytestmark = pytest.mark.core


def hand_beta(checkpoints: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Eq. 9 written out: per tensor, cumulative step norm over total, as loops in float64."""
    ck = checkpoints.double()
    num_epochs = ck.shape[0] - 1
    out = torch.zeros(len(sizes), num_epochs + 1, dtype=torch.float64)
    offset = 0
    for layer, size in enumerate(sizes):
        norms = []
        for k in range(num_epochs):
            diff = ck[k + 1, offset:offset + size] - ck[k, offset:offset + size]
            norms.append(math.sqrt(sum(float(d) ** 2 for d in diff)))
        total = sum(norms) or 1.0
        for t in range(num_epochs + 1):
            out[layer, t] = sum(norms[:t]) / total
        offset += size
    return out


def single_segment(result) -> ConvexTrajectory:
    full = result.full
    anchors = torch.stack([full.checkpoints[0], full.checkpoints[-1]])
    return ConvexTrajectory(full.spec, (0, full.num_epochs), anchors, result.convex.beta)


def test_beta_matches_hand_loop_over_checkpoints(tiny_experts):
    for result in tiny_experts:
        sizes = tensor_sizes(result.convex.spec)
        expected = hand_beta(result.full.checkpoints, sizes)
        torch.testing.assert_close(result.convex.beta.double(), expected, rtol=0, atol=2e-6)
        beta = result.convex.beta
        assert torch.all(beta[:, 0] == 0)
        assert torch.all(beta[:, 1:] >= beta[:, :-1])  # non-decreasing


def test_endpoints_and_anchors_are_the_expert_checkpoints(tiny_experts):
    for result in tiny_experts:
        conv, full = result.convex, result.full
        assert conv.anchor_epochs == (0, 2, 4)
        for j, epoch in enumerate(conv.anchor_epochs):
            assert torch.equal(conv.anchors[j], full.checkpoints[epoch])
            assert torch.equal(conv.point(epoch), full.checkpoints[epoch])


def test_point_at_integers_is_lerp_of_endpoints_by_beta(tiny_experts):
    traj = single_segment(tiny_experts[0])
    sizes = tensor_sizes(traj.spec)
    theta0, theta_k = traj.anchors.double()
    for t in range(traj.num_epochs + 1):
        expected = []
        offset = 0
        for layer, size in enumerate(sizes):
            b = float(traj.beta[layer, t])
            expected.append((1 - b) * theta0[offset:offset + size] + b * theta_k[offset:offset + size])
            offset += size
        torch.testing.assert_close(traj.point(t).double(), torch.cat(expected), rtol=0, atol=1e-6)


def test_point_fractional_interpolates_beta(tiny_experts):
    traj = single_segment(tiny_experts[0])
    c = 1.25
    beta_hat = 0.75 * traj.beta[:, 1].double() + 0.25 * traj.beta[:, 2].double()
    w = beta_hat.repeat_interleave(torch.tensor(tensor_sizes(traj.spec)))
    expected = (1 - w) * traj.anchors[0].double() + w * traj.anchors[1].double()
    torch.testing.assert_close(traj.point(c).double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("piecewise", [False, True])
def test_point_is_continuous(tiny_experts, piecewise):
    traj = tiny_experts[1].convex if piecewise else single_segment(tiny_experts[1])
    scale = float((traj.anchors[-1] - traj.anchors[0]).abs().max())
    for t in range(traj.num_epochs + 1):
        for eps in (1e-4, -1e-4):
            c = min(max(t + eps, 0.0), traj.num_epochs)
            gap = float((traj.point(c) - traj.point(t)).abs().max())
            assert gap <= 1e-3 * scale, (t, eps, gap)


def test_point_rejects_epochs_outside(tiny_experts):
    traj = tiny_experts[0].convex
    with pytest.raises(ValueError):
        traj.point(traj.num_epochs + 0.5)
    with pytest.raises(ValueError):
        tiny_experts[0].full.point(1.5)


def test_zero_path_length_tensor_stays_put():
    from mct_ray.trajectory import beta_from_step_norms

    norms = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # tensor 1 never moved
    beta = beta_from_step_norms(norms)
    torch.testing.assert_close(beta, torch.tensor([[0.0, 0.25, 1.0], [0.0, 0.0, 0.0]],
                                                  dtype=torch.float64))
