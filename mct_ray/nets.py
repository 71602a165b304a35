"""The networks as pure functions of their parameters: the student unroll differentiates
`NetSpec.forward(params, x, kernels)`; `NetSpec.module(params, kernels)` is the same network as
an nn.Module, for expert training and evaluation. Parameter names and order are stable
(`blocks.{i}.conv.weight`, ...); trajectories are matched by them.

Two paths, chosen by the network and `run.kernels`:
    convnet  the DC/DSA/MTT ConvNet written out as a function of a list of tensors, with the
             hand-written double backward of fastops.py (`fast`) or PyTorch's ops (`builtin`)
    generic  any network of the zoo (`resnet18`, `vgg11`, `convnet-bn`, ...) or a user's
             factory (`my_pkg.nets:make_net`) through torch.func.functional_call over the
             module's parameters. Batch norm normalises with the statistics of the current
             batch and keeps no running statistics in the unroll, as in the authors' code
             (its student runs in train mode); experts and evaluation networks train the
             module as usual. `run.kernels=generic` sends the ConvNet this way too (zoo's
             convnet has the same parameter names): that is how the two are checked.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from mct_ray import zoo
from mct_ray.config import NetConfig
from mct_ray.errors import ConfigError
from mct_ray.fastops import EPS, avg_pool2, conv3x3, instance_norm


@dataclass(frozen=True)
class NetSpec:
    """Everything that fixes a network's parameter layout; stored in trajectory metadata.
    `name` is `convnet` (the functional ConvNet), another zoo name, or `pkg.module:function`;
    width, depth and norm are the ConvNets' (zoo variants follow them where their name does
    not say otherwise)."""

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

    @property
    def functional(self) -> bool:
        """Whether the network has the written-out functional forward (the ConvNet)."""
        return self.name == "convnet"

    def describe(self) -> dict:
        """The full description stored with trajectories and synthetic sets: the spec, the
        factory's arguments and every parameter's name and shape."""
        return {**self.to_dict(), "arguments": zoo.arguments(self.name, self.width,
                                                             self.depth, self.norm),
                "parameters": [[n, list(s)] for n, s in self.param_shapes()]}

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        if self.functional:
            return list(_convnet_shapes(self))
        return [(n, tuple(p.shape)) for n, p in _template(self, "cpu").named_parameters()]

    def forward(self, params: Sequence[torch.Tensor], x: torch.Tensor,
                kernels: str = "fast") -> torch.Tensor:
        """The network at `params` on x (B, C, H, W) -> logits (B, num_classes)."""
        if self.functional and kernels != "generic":
            return _convnet_forward(self, params, x, kernels == "builtin")
        net = _template(self, str(x.device))
        names = [n for n, _ in net.named_parameters()]
        return functional_call(net, dict(zip(names, params)), (x,))

    def init_params(self, generator: torch.Generator) -> list[torch.Tensor]:
        """A fresh initialisation drawn from `generator` (the module's own init scheme)."""
        if self.functional:
            return _convnet_init(self, generator)
        seed = int(torch.randint(2**31 - 1, (), generator=generator))
        return [p.detach() for p in self.build(seed).parameters()]

    def build(self, seed: int, key: str = "net.name") -> nn.Module:
        """The zoo's (or the factory's) module, initialised from `seed`; `key` is the config
        key an error names."""
        return zoo.build(self.name, self.channels, self.num_classes, self.resolution, seed,
                         self.width, self.depth, self.norm, key)

    def module(self, params: Sequence[torch.Tensor], kernels: str = "fast") -> nn.Module:
        """An nn.Module holding a copy of `params` (expert training, evaluation); its
        `parameters()` are in `param_shapes()` order."""
        if self.functional and kernels != "generic":
            return ConvNet(self, params, kernels == "builtin")
        net = self.build(0)
        with torch.no_grad():
            for p, value in zip(net.parameters(), params, strict=True):
                p.copy_(value)
        return net

    @property
    def first_padding(self) -> int:
        """The first convolution's padding: 3 for one-channel 28x28 input (MNIST and
        Fashion-MNIST run at 32x32, as the DC/DSA/MTT ConvNet does), else 1."""
        return zoo.first_padding(self.channels, self.resolution)

    @property
    def feature_side(self) -> int:
        """Side of the ConvNet's last block's output (after its pooling)."""
        return (self.resolution + 2 * self.first_padding - 2) // 2 ** self.depth

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.param_shapes())


@dataclass(frozen=True)
class Network:
    """A network description bound to where it runs: the device, and the ops the ConvNet
    runs with (`kernels`: fast, builtin or generic; `resolve_kernels` picks them for a
    device). Expert training, evaluation and distillation all take one."""

    spec: NetSpec
    device: str = "cpu"
    kernels: str = "fast"

    def forward(self, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The network at `params` on x (on the device) -> logits."""
        return self.spec.forward(params, x, self.kernels)

    def module(self, params: Sequence[torch.Tensor]) -> nn.Module:
        """An nn.Module on the device holding a copy of `params`."""
        return self.spec.module(params, self.kernels).to(self.device)


@functools.lru_cache(maxsize=16)
def _template(spec: NetSpec, device: str) -> nn.Module:
    """The module functional_call runs for `spec`: batch norm without running statistics
    (each batch normalised by its own), in train mode. Its own parameters are never used."""
    net = spec.build(0)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return net.to(device).train().requires_grad_(False)


# ---------------------------------------------------------------------------------------
# ConvNet: [conv3x3(width) -> instance norm -> ReLU -> avgpool2] x depth -> linear.

@functools.lru_cache(maxsize=64)
def _convnet_shapes(spec: NetSpec) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter layout of the zoo's ConvNet (`zoo.convnet`, the module the evaluation
    and expert training run for `convnet` with run.kernels=generic): the written-out forward
    below takes its parameters in this order. Built on the meta device: no memory, no init."""
    with torch.device("meta"):
        net = zoo.convnet(spec.channels, spec.num_classes, spec.resolution, spec.width,
                          spec.depth, spec.norm)
    return [(n, tuple(p.shape)) for n, p in net.named_parameters()]


def _convnet_forward(spec: NetSpec, params: Sequence[torch.Tensor], x: torch.Tensor,
                     builtin: bool = False) -> torch.Tensor:
    it = iter(params)
    for i in range(spec.depth):
        pad = spec.first_padding if i == 0 else 1
        w, b = next(it), next(it)
        x = F.conv2d(x, w, b, padding=pad) if builtin else conv3x3(x, w, b, pad)
        if spec.norm == "instancenorm":
            # Instance norm with affine parameters, as GroupNorm(width, width) in MTT.
            w, b = next(it), next(it)
            x = F.group_norm(x, spec.width, w, b, eps=EPS) if builtin else \
                instance_norm(x, w, b)
        x = F.avg_pool2d(F.relu(x), 2) if builtin else avg_pool2(F.relu(x))
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


def make_spec(cfg: NetConfig, shape: tuple[int, int, int], num_classes: int) -> NetSpec:
    """The network of `net.*` for images of `shape` (C, H, W); a network that cannot take
    them (too deep for the resolution, a factory that fails) is a ConfigError here, before
    any work."""
    channels, height, width = shape
    if height != width:
        raise ConfigError(f"net: images must be square, got {height}x{width}")
    depth = cfg.depth or zoo.default_depth(height)
    spec = NetSpec(cfg.name, channels, height, num_classes, cfg.width, depth, cfg.norm)
    if spec.functional and spec.feature_side < 1:
        raise ConfigError(f"config key 'net.depth' must leave at least 1 pixel after pooling: "
                          f"depth {depth} at resolution {height}")
    if not spec.functional:
        zoo.check_fits(f"config key 'net.name' ({cfg.name})", _template(spec, "cpu"), shape,
                       num_classes)
    return spec


class ConvNet(nn.Module):
    """nn.Module view of the functional ConvNet (expert training and evaluation)."""

    def __init__(self, spec: NetSpec, params: Sequence[torch.Tensor], builtin: bool = False):
        super().__init__()
        self.spec, self.kernels = spec, "builtin" if builtin else "fast"
        self.params = nn.ParameterList(nn.Parameter(p.clone()) for p in params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.forward(list(self.params), x, self.kernels)


def resolve_kernels(kernels: str, device: str) -> str:
    """run.kernels on a device -> fast, builtin or generic (auto: fast on the CPU, where the
    hand-written double backward was measured faster, builtin elsewhere; bench/NOTES.md).
    Only the ConvNet has a choice; other networks always run the generic path."""
    if kernels == "auto":
        return "fast" if device == "cpu" else "builtin"
    return kernels
