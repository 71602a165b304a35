"""ConvNet family (as in DC/DSA/MTT) with a functional forward over a list of tensors.

The student unroll in distillation needs the network as a pure function of its parameters;
`NetSpec.forward(params, x)` is that function, and `ConvNet` (an nn.Module) calls the same
function with its own parameters, so both paths share one definition. Parameter names and
order are stable (`blocks.{i}.conv.weight`, ...), which is what trajectories are matched by.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mct_ray.config import NetConfig
from mct_ray.errors import ConfigError


@dataclass(frozen=True)
class NetSpec:
    """Everything that fixes a network's parameter layout; stored in trajectory metadata."""

    name: str
    channels: int
    resolution: int
    num_classes: int
    width: int
    depth: int
    norm: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "NetSpec":
        return cls(**values)

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return ARCHITECTURES[self.name].param_shapes(self)

    def forward(self, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return ARCHITECTURES[self.name].forward(self, params, x)

    def init_params(self, generator: torch.Generator) -> list[torch.Tensor]:
        return ARCHITECTURES[self.name].init(self, generator)

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.param_shapes())


@dataclass(frozen=True)
class Architecture:
    param_shapes: Callable[[NetSpec], list[tuple[str, tuple[int, ...]]]]
    forward: Callable[[NetSpec, Sequence[torch.Tensor], torch.Tensor], torch.Tensor]
    init: Callable[[NetSpec, torch.Generator], list[torch.Tensor]]


# ---------------------------------------------------------------------------------------
# ConvNet: [conv3x3(width) -> instance norm -> ReLU -> avgpool2] x depth -> linear.

def _convnet_shapes(spec: NetSpec) -> list[tuple[str, tuple[int, ...]]]:
    shapes, in_ch = [], spec.channels
    for i in range(spec.depth):
        shapes.append((f"blocks.{i}.conv.weight", (spec.width, in_ch, 3, 3)))
        shapes.append((f"blocks.{i}.conv.bias", (spec.width,)))
        if spec.norm == "instancenorm":
            shapes.append((f"blocks.{i}.norm.weight", (spec.width,)))
            shapes.append((f"blocks.{i}.norm.bias", (spec.width,)))
        in_ch = spec.width
    side = spec.resolution // 2 ** spec.depth
    shapes.append(("classifier.weight", (spec.num_classes, spec.width * side * side)))
    shapes.append(("classifier.bias", (spec.num_classes,)))
    return shapes


def _convnet_forward(spec: NetSpec, params: Sequence[torch.Tensor], x: torch.Tensor
                     ) -> torch.Tensor:
    it = iter(params)
    for _ in range(spec.depth):
        x = F.conv2d(x, next(it), next(it), padding=1)
        if spec.norm == "instancenorm":
            # Instance norm with affine parameters, as GroupNorm(width, width) in MTT.
            x = F.group_norm(x, spec.width, next(it), next(it), eps=1e-5)
        x = F.avg_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), next(it), next(it))


def _convnet_init(spec: NetSpec, gen: torch.Generator) -> list[torch.Tensor]:
    """PyTorch's default initialisation (kaiming-uniform a=sqrt(5)), drawn from `gen`."""
    out = []
    for name, shape in spec.param_shapes():
        if name.endswith("norm.weight"):
            out.append(torch.ones(shape))
        elif name.endswith("norm.bias"):
            out.append(torch.zeros(shape))
        else:
            # Weight and bias bounds both come from the weight's fan-in.
            fan_in = math.prod(shape[1:]) if name.endswith("weight") else fan_in
            bound = 1.0 / math.sqrt(fan_in)
            out.append((torch.rand(shape, generator=gen) * 2 - 1) * bound)
    return out


ARCHITECTURES: dict[str, Architecture] = {
    "convnet": Architecture(_convnet_shapes, _convnet_forward, _convnet_init),
}


def default_depth(resolution: int) -> int:
    """MTT's choice: depth 3 at 32x32 (ConvNet), 4 at 64x64 (ConvNetD4); 2 at 8x8."""
    return max(1, int(round(math.log2(resolution))) - 2)


def make_spec(cfg: NetConfig, shape: tuple[int, int, int], num_classes: int) -> NetSpec:
    channels, height, width = shape
    if height != width:
        raise ConfigError(f"net: images must be square, got {height}x{width}")
    depth = cfg.depth or default_depth(height)
    if height // 2 ** depth < 1:
        raise ConfigError(f"config key 'net.depth' must leave at least 1 pixel after pooling: "
                          f"depth {depth} at resolution {height}")
    return NetSpec(cfg.name, channels, height, num_classes, cfg.width, depth, cfg.norm)


class ConvNet(nn.Module):
    """nn.Module view of a NetSpec (used by expert training and evaluation)."""

    def __init__(self, spec: NetSpec, params: Sequence[torch.Tensor]):
        super().__init__()
        self.spec = spec
        self._names = [n for n, _ in spec.param_shapes()]
        self.params = nn.ParameterList(nn.Parameter(p.clone()) for p in params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.forward(list(self.params), x)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(self._names, self.params)}


def build_net(spec: NetSpec, generator: torch.Generator) -> ConvNet:
    return ConvNet(spec, spec.init_params(generator))
