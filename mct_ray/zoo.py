"""Networks that judge a synthetic set (cross-architecture evaluation), as the DC/DSA/MTT
benchmark family defines them: ConvNet and its variants, ResNet-18, VGG-11, AlexNet, MLP.

Each is an `nn.Module` built by `build(name, channels, num_classes, resolution, seed)` for
inputs of 8x8 to 64x64. At the papers' sizes they are the papers' networks; on smaller
inputs a downsampling (pool or stride) is skipped where it would leave a convolution's
normalisation a single pixel (instance norm of one pixel is zero: the network would output a
constant), and ResNet and VGG end in a global average over what is left. "Instance norm" is GroupNorm(c, c) with affine parameters, as in that
family's code. `convnet` here is the same network as the distillation's `nets.ConvNet`
(tested), built as a module.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mct_ray.errors import ConfigError
from mct_ray.nets import default_depth


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
    depth = depth or default_depth(resolution)
    layers, side, in_ch = [], resolution, channels
    for i in range(depth):
        pad = 3 if i == 0 and channels == 1 and resolution == 28 else 1
        layers += [nn.Conv2d(in_ch, width, 3, padding=pad), _norm(norm, width), _act(act)]
        side += 2 * pad - 2
        if pool != "none" and side >= 2:
            layers.append(nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2))
            side //= 2
        in_ch = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * side * side, num_classes))


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
        pad = 3 if i == 0 and channels == 1 and resolution == 28 else 1
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


def check(names) -> None:
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ConfigError(f"config key 'eval.models': unknown architecture '{unknown[0]}' "
                          f"(known: {', '.join(MODELS)})")


def build(name: str, channels: int, num_classes: int, resolution: int, seed: int,
          width: int = 128, depth: int = 0, norm: str = "instancenorm") -> nn.Module:
    """A freshly initialised `name`, its initialisation drawn from `seed` alone. `width`,
    `depth` and `norm` are the distillation network's, which the ConvNets follow where
    their name does not say otherwise."""
    check([name])
    factory, kwargs = MODELS[name]
    if factory is convnet:
        kwargs = {"width": width, "depth": depth, "norm": norm, **kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(channels, num_classes, resolution, **kwargs)
