"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021) with MTT's strengths.

Drawing and applying are split: `Augmenter.sample` draws every random parameter of one call
from a `torch.Generator` into an `AugPlan`; `Augmenter.apply` is a deterministic,
differentiable function of (images, plan). The recomputing gradient modes of the
distillation replay a step by applying the same plan twice.

kornia's colour ops do not match DSA's formulas (its saturation works in HSV, its contrast
scales around zero, its affine warps use pixel coordinates), so the ops are written here in
torch, following DSA's definitions; kornia is used for ZCA (see data/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mct_ray.config import AugmentConfig
from mct_ray.errors import ConfigError

FAMILIES = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("crop",),
    "cutout": ("cutout",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("rotate",),
}


@dataclass(frozen=True)
class AugPlan:
    """The random parameters of one augmentation call: (op name, per-sample tensor)."""

    ops: tuple[tuple[str, torch.Tensor], ...]

    def rows(self, rows: slice) -> "AugPlan":
        """The parameters of these rows of the batch."""
        return AugPlan(tuple((op, params[rows]) for op, params in self.ops))


class Augmenter:
    def __init__(self, cfg: AugmentConfig):
        families = [f for f in cfg.strategy.split("_") if f]
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ConfigError(f"config key 'augment.strategy': unknown family '{unknown[0]}' "
                              f"(allowed: {', '.join(FAMILIES)})")
        self.cfg = cfg
        self.families = families if cfg.enabled else []

    def sample(self, num: int, size: int, gen: torch.Generator) -> AugPlan:
        """Draw the parameters for a batch of `num` images of side `size`."""
        if not self.families:
            return AugPlan(())
        if self.cfg.mode == "single":
            pick = int(torch.randint(len(self.families), (1,), generator=gen))
            families = [self.families[pick]]
        else:
            families = self.families
        ops = []
        for family in families:
            for op in FAMILIES[family]:
                ops.append((op, _SAMPLERS[op](self.cfg, num, size, gen)))
        return AugPlan(tuple(ops))

    def apply(self, x: torch.Tensor, plan: AugPlan) -> torch.Tensor:
        for op, params in plan.ops:
            x = _APPLY[op](self.cfg, x, params.to(x.device))
        return x

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(len(x), x.shape[-1], gen))


def _uniform(num: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(num, generator=gen)


def _shift(cfg: AugmentConfig, num: int, size: int, gen: torch.Generator) -> torch.Tensor:
    s = int(size * cfg.crop + 0.5)
    return torch.randint(-s, s + 1, (num, 2), generator=gen)


def _cutout_at(cfg: AugmentConfig, num: int, size: int, gen: torch.Generator) -> torch.Tensor:
    cut = int(size * cfg.cutout + 0.5)
    return torch.randint(0, size + (1 - cut % 2), (num, 2), generator=gen)


_SAMPLERS = {
    "brightness": lambda cfg, n, s, g: _uniform(n, g),
    "saturation": lambda cfg, n, s, g: _uniform(n, g),
    "contrast": lambda cfg, n, s, g: _uniform(n, g),
    "flip": lambda cfg, n, s, g: _uniform(n, g),
    "scale": lambda cfg, n, s, g: torch.rand((n, 2), generator=g),
    "rotate": lambda cfg, n, s, g: _uniform(n, g),
    "crop": _shift,
    "cutout": _cutout_at,
}


def _per_sample(r: torch.Tensor) -> torch.Tensor:
    return r[:, None, None, None]


def _brightness(cfg, x, r):
    return x + _per_sample(r - 0.5) * cfg.brightness


def _saturation(cfg, x, r):
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * _per_sample(r * cfg.saturation) + mean


def _contrast(cfg, x, r):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _per_sample(r + cfg.contrast) + mean


def _flip(cfg, x, r):
    return torch.where(_per_sample(r < cfg.flip), x.flip(3), x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(cfg, x, r):
    lo = 1.0 / cfg.scale
    sx, sy = (r[:, 0] * (cfg.scale - lo) + lo), (r[:, 1] * (cfg.scale - lo) + lo)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta)  # theta: (B, 2, 3)


def _rotate(cfg, x, r):
    angle = (r - 0.5) * 2 * cfg.rotate / 180 * math.pi
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    return _affine(x, theta)


def _crop(cfg, x, shift):
    """Translate each image by whole pixels, filling with zeros (DSA's 'crop')."""
    size = x.shape[-1]
    s = int(size * cfg.crop + 0.5)
    if s == 0:
        return x
    padded = F.pad(x, [s, s, s, s])
    base = torch.arange(size, device=x.device)
    rows = base[None, :] + s + shift[:, :1]  # (B, H)
    cols = base[None, :] + s + shift[:, 1:]  # (B, W)
    batch = torch.arange(len(x), device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def _cutout(cfg, x, at):
    """Zero one square of side cutout*size per image (DSA's 'cutout')."""
    size = x.shape[-1]
    cut = int(size * cfg.cutout + 0.5)
    base = torch.arange(size, device=x.device)[None, :]
    start = at - cut // 2  # (B, 2)
    in_rows = (base >= start[:, :1]) & (base < start[:, :1] + cut)  # (B, H)
    in_cols = (base >= start[:, 1:]) & (base < start[:, 1:] + cut)  # (B, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


_APPLY = {
    "brightness": _brightness,
    "saturation": _saturation,
    "contrast": _contrast,
    "flip": _flip,
    "scale": _scale,
    "rotate": _rotate,
    "crop": _crop,
    "cutout": _cutout,
}
