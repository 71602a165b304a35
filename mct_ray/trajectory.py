"""Expert trajectories: the convexified one (MCT) and the full one (MTT).

Both expose `num_epochs`, `spec` and `point(c)`, a flat float32 parameter vector at epoch c,
so the distillation loop treats them alike. File I/O is in `formats.py`.

Convex trajectory (paper eqs. 8-10, DESIGN.md): per parameter tensor l,
    beta_l(t) = sum_{k<t} ||theta_l(k+1) - theta_l(k)|| / sum_{k<K} ||...||   (0/0 counts as 0)
    theta_hat_l(c) = lerp(theta_l(0), theta_l(K), lerp(beta_l(floor c), beta_l(ceil c), c - floor c))
With interior anchors (the authors' code bends the path at e.g. epochs 6 and 25) the path is
piecewise linear through the anchors, and inside segment [e_j, e_j+1] the fraction is
(beta(c) - beta(e_j)) / (beta(e_j+1) - beta(e_j)); with no anchors this is the formula above.
The anchor points may be smoothed (experts.py, `expert.smooth_anchors`); beta always comes
from the original checkpoints, as in the authors' compression script.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mct_ray.nets import NetSpec


def tensor_sizes(spec: NetSpec) -> list[int]:
    return [math.prod(shape) for _, shape in spec.param_shapes()]


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(spec: NetSpec, flat: torch.Tensor) -> list[torch.Tensor]:
    """Views of a flat vector as the network's tensors (in parameter order)."""
    shapes = [shape for _, shape in spec.param_shapes()]
    return [part.view(shape) for part, shape in zip(flat.split(tensor_sizes(spec)), shapes)]


def beta_from_step_norms(step_norms: torch.Tensor) -> torch.Tensor:
    """(K, T) per-epoch, per-tensor step norms -> (T, K+1) cumulative path fractions."""
    norms = step_norms.double()
    cum = torch.cat([torch.zeros(1, norms.shape[1], dtype=norms.dtype), norms.cumsum(0)])
    total = cum[-1].clone()
    total[total == 0] = 1.0  # a tensor that never moved: beta stays 0, both ends are equal
    return (cum / total).T.contiguous()  # (T, K+1), float64


@dataclass(frozen=True)
class ConvexTrajectory:
    spec: NetSpec
    anchor_epochs: tuple[int, ...]  # (0, ..., K), increasing
    anchors: torch.Tensor  # (num_anchors, P) float32: theta at each anchor epoch
    beta: torch.Tensor  # (T, K+1) float32
    info: dict = field(default_factory=dict)  # seed, data set, expert accuracy ...

    def __post_init__(self) -> None:
        num_tensors = len(self.spec.param_shapes())
        assert self.anchor_epochs[0] == 0 and list(self.anchor_epochs) == sorted(
            set(self.anchor_epochs))
        assert self.anchors.shape == (len(self.anchor_epochs), self.spec.num_params)
        assert self.beta.shape == (num_tensors, self.num_epochs + 1)

    @property
    def num_epochs(self) -> int:
        return self.anchor_epochs[-1]

    def beta_at(self, c: float) -> torch.Tensor:
        """(T,) float64 path fraction at real-valued epoch c (eq. 10)."""
        lo, hi = math.floor(c), math.ceil(c)
        beta = self.beta.double()
        return torch.lerp(beta[:, lo], beta[:, hi], c - lo)

    def point(self, c: float) -> torch.Tensor:
        """Flat parameters at real-valued epoch c in [0, K] (float32, (P,))."""
        if not 0.0 <= c <= self.num_epochs:
            raise ValueError(f"epoch {c} outside the trajectory [0, {self.num_epochs}]")
        j = max(i for i, e in enumerate(self.anchor_epochs[:-1]) if e <= c)
        e0, e1 = self.anchor_epochs[j], self.anchor_epochs[j + 1]
        b0, b1 = self.beta[:, e0].double(), self.beta[:, e1].double()
        span = b1 - b0
        frac = torch.where(span > 0, (self.beta_at(c) - b0) / span.clamp_min(1e-300), 0.0)
        sizes = torch.tensor(tensor_sizes(self.spec))
        weight = frac.to(self.anchors.dtype).repeat_interleave(sizes)
        return torch.lerp(self.anchors[j], self.anchors[j + 1], weight)


@dataclass(frozen=True)
class FullTrajectory:
    """Every epoch's parameters, as MTT stores them."""

    spec: NetSpec
    checkpoints: torch.Tensor  # (K+1, P) float32
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.checkpoints.ndim == 2 and self.checkpoints.shape[1] == self.spec.num_params

    @property
    def num_epochs(self) -> int:
        return self.checkpoints.shape[0] - 1

    def point(self, c: float) -> torch.Tensor:
        """Parameters at epoch c; MTT only asks for whole epochs (no interpolation here)."""
        if c != int(c) or not 0 <= c <= self.num_epochs:
            raise ValueError(f"a full trajectory has whole epochs 0..{self.num_epochs}, got {c}")
        return self.checkpoints[int(c)]


Trajectory = ConvexTrajectory | FullTrajectory
