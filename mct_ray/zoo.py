"""The network zoo, as the DC/DSA/MTT benchmark family defines it: ConvNet and its variants,
ResNet-18, VGG-11, AlexNet, MLP; any of them can be the distillation network (`net.name`,
through nets.py's generic path) or judge a synthetic set (`eval.models`). A user's own
network is named `my_pkg.nets:make_net`: a function of (channels, num_classes, resolution)
that returns an nn.Module.

Each is an `nn.Module` built by `build(name, channels, num_classes, resolution, seed)` for
inputs of 8x8 to 64x64. At the papers' sizes they are the papers' networks; on smaller
inputs a downsampling (pool or stride) is skipped where it would leave a convolution's
normalisation a single pixel (instance norm of one pixel is zero: the network would output a
constant), and ResNet and VGG end in a global average over what is left. "Instance norm"
is GroupNorm(c, c) with affine parameters, as in that family's code. `convnet` here is the same network, with the same parameter names, as the
functional ConvNet of nets.py (tested).
"""

from __future__ import annotations

import importlib
import math
import re
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn

from mct_ray.errors import ConfigError


def default_depth(resolution: int) -> int:
    """MTT's choice: depth 3 at 32x32 (ConvNet), 4 at 64x64 (ConvNetD4); 2 at 8x8."""
    return max(1, int(round(math.log2(resolution))) - 2)


def first_padding(channels: int, resolution: int) -> int:
    """The ConvNet's first padding: 3 for one-channel 28x28 input (DC/DSA/MTT run MNIST at
    32x32), else 1."""
    return 3 if channels == 1 and resolution == 28 else 1


def _norm(kind: str, c: int) -> nn.Module:
    return {"instancenorm": lambda: nn.GroupNorm(c, c, affine=True),
            "batchnorm": lambda: nn.BatchNorm2d(c),
            "layernorm": lambda: nn.GroupNorm(1, c, affine=True),
            "groupnorm": lambda: nn.GroupNorm(4 if c % 4 == 0 else 1, c, affine=True),
            "none": lambda: nn.Identity()}[kind]()


def _act(kind: str) -> nn.Module:
    return {"relu": nn.ReLU, "leakyrelu": lambda: nn.LeakyReLU(0.01),
            "sigmoid": nn.Sigmoid}[kind]()


def convnet(channels: int, num_classes: int, resolution: int, width: int = 128,
            depth: int = 0, norm: str = "instancenorm", act: str = "relu",
            pool: str = "avg") -> nn.Module:
    """[conv3x3 -> norm -> act -> pool2] x depth -> linear; 28x28 one-channel input is
    padded by 3 in the first convolution (DC/DSA/MTT run MNIST at 32x32)."""
    return _ConvNet(channels, num_classes, resolution, width, depth or default_depth(resolution),
                    norm, act, pool)


class _ConvNet(nn.Module):
    # The owner of the ConvNet's parameter layout: nets.py's written-out forward reads it.
    def __init__(self, channels, num_classes, resolution, width, depth, norm, act, pool):
        super().__init__()
        self.blocks, side, in_ch = nn.ModuleList(), resolution, channels
        for i in range(depth):
            pad = first_padding(channels, resolution) if i == 0 else 1
            layers = OrderedDict(conv=nn.Conv2d(in_ch, width, 3, padding=pad),
                                 norm=_norm(norm, width), act=_act(act))
            side += 2 * pad - 2
            if pool != "none" and side >= 2:
                layers["pool"] = nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2)
                side //= 2
            self.blocks.append(nn.Sequential(layers))
            in_ch = width
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.classifier(x.flatten(1))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), _norm(norm, c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), _norm(norm, c_out))
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet18(channels: int, num_classes: int, resolution: int, norm: str = "instancenorm"
             ) -> nn.Module:
    """The CIFAR-style ResNet-18 of DC/DSA (3x3 stem, no stem pooling), global average."""
    layers = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), _norm(norm, 64), nn.ReLU()]
    c_in, side = 64, resolution
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stride = stride if side >= 4 else 1  # keep every normalised plane at 2x2 or more
        side = (side + 1) // stride if stride > 1 else side
        layers += [_Block(c_in, c_out, stride, norm), _Block(c_out, c_out, 1, norm)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, num_classes))


def vgg11(channels: int, num_classes: int, resolution: int, norm: str = "instancenorm"
          ) -> nn.Module:
    layers, side, c_in = [], resolution, channels
    plan = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
    for i, v in enumerate(plan):
        if v == "M":  # the last pool may reach 1 pixel; earlier ones leave 2x2 for the norms
            if side >= (2 if i == len(plan) - 1 else 4):
                layers.append(nn.MaxPool2d(2))
                side //= 2
            continue
        pad = first_padding(channels, resolution) if i == 0 else 1
        layers += [nn.Conv2d(c_in, v, 3, padding=pad), _norm(norm, v), nn.ReLU()]
        side += 2 * pad - 2
        c_in = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, num_classes))


def alexnet(channels: int, num_classes: int, resolution: int) -> nn.Module:
    """DC/DSA's AlexNet for small images (5x5 then 3x3 convolutions, three max-pools)."""
    pad = 4 if channels == 1 else 2
    feats = nn.Sequential(
        nn.Conv2d(channels, 128, 5, 1, pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 192, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(192, 256, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(256, 192, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(192, 192, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))
    with torch.no_grad():
        side = feats(torch.zeros(1, channels, resolution, resolution)).shape[-1]
    return nn.Sequential(feats, nn.Flatten(), nn.Linear(192 * side * side, num_classes))


def mlp(channels: int, num_classes: int, resolution: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * resolution**2, 128), nn.ReLU(),
                         nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, num_classes))


# name -> (factory, keyword arguments): every architecture `eval.models` may list.
MODELS = {
    "convnet": (convnet, {}),
    "convnet-w32": (convnet, {"width": 32}), "convnet-w64": (convnet, {"width": 64}),
    "convnet-w256": (convnet, {"width": 256}),
    "convnet-d1": (convnet, {"depth": 1}), "convnet-d2": (convnet, {"depth": 2}),
    "convnet-d4": (convnet, {"depth": 4}),
    "convnet-bn": (convnet, {"norm": "batchnorm"}), "convnet-ln": (convnet, {"norm": "layernorm"}),
    "convnet-gn": (convnet, {"norm": "groupnorm"}), "convnet-nn": (convnet, {"norm": "none"}),
    "convnet-sigmoid": (convnet, {"act": "sigmoid"}),
    "convnet-leakyrelu": (convnet, {"act": "leakyrelu"}),
    "convnet-maxpool": (convnet, {"pool": "max"}), "convnet-nopool": (convnet, {"pool": "none"}),
    "resnet18": (resnet18, {}), "resnet18-bn": (resnet18, {"norm": "batchnorm"}),
    "vgg11": (vgg11, {}), "vgg11-bn": (vgg11, {"norm": "batchnorm"}),
    "alexnet": (alexnet, {}), "mlp": (mlp, {}),
}


_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def check_name(name: str, key: str) -> None:
    """Syntax only (a zoo name or `pkg.module:function`); importing is `factory`'s."""
    if name not in MODELS and not _FACTORY.match(name):
        raise ConfigError(f"config key '{key}': unknown architecture '{name}' (known: "
                          f"{', '.join(MODELS)}; or a factory 'my_pkg.module:function')")


def factory(name: str, key: str = "net.name") -> tuple[Callable[..., nn.Module], dict]:
    """(function, keyword arguments) that build `name`; a factory is imported here."""
    check_name(name, key)
    if name in MODELS:
        return MODELS[name]
    module_name, attr = name.split(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (Exception, SystemExit) as exc:  # any failure of a user's import is bad input
        raise ConfigError(f"config key '{key}': cannot import '{name}' "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not callable(fn):
        raise ConfigError(f"config key '{key}': '{name}' is not a function")
    return fn, {}


def arguments(name: str, width: int, depth: int, norm: str) -> dict:
    """The keyword arguments `build` passes besides (channels, num_classes, resolution)."""
    return _arguments(*factory(name), width, depth, norm)


def _arguments(fn: Callable[..., nn.Module], kwargs: dict, width: int, depth: int,
               norm: str) -> dict:
    if fn is convnet:  # the ConvNets follow the distillation network's width, depth, norm
        return {"width": width, "depth": depth, "norm": norm, **kwargs}
    return dict(kwargs)


def check_models(names, key: str = "eval.models") -> None:
    for name in names:
        factory(name, key)


def build(name: str, channels: int, num_classes: int, resolution: int, seed: int,
          width: int = 128, depth: int = 0, norm: str = "instancenorm",
          key: str = "net.name") -> nn.Module:
    """A freshly initialised `name`, its initialisation drawn from `seed` alone. `width`,
    `depth` and `norm` are the distillation network's, which the ConvNets follow where
    their name does not say otherwise."""
    fn, kwargs = factory(name, key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            net = fn(channels, num_classes, resolution,
                     **_arguments(fn, kwargs, width, depth, norm))
        except (Exception, SystemExit) as exc:  # user code's sys.exit() is an error too
            raise ConfigError(f"config key '{key}': {name} cannot be built for "
                              f"{channels}x{resolution}x{resolution} inputs "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"config key '{key}': {name} returned {type(net).__name__}, "
                          "not a torch.nn.Module")
    return net


def check_fits(what: str, net: nn.Module, shape: tuple[int, int, int], num_classes: int
               ) -> None:
    """One forward pass on zeros: a network too deep for the resolution fails here."""
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, *shape, device=next(net.parameters()).device))
    except StopIteration:
        raise ConfigError(f"{what}: the network has no parameters to learn") from None
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"{what} does not fit {shape[0]}x{shape[1]}x{shape[2]} inputs "
                          f"(too deep for the resolution?): {type(exc).__name__}: "
                          f"{_first_line(exc)}") from None
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(f"{what} gives outputs of shape {tuple(out.shape[1:])} for "
                          f"{shape[0]}x{shape[1]}x{shape[2]} inputs, not ({num_classes},)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
