"""Train on the synthetic set, test on real data (the MTT protocol).

A fresh network per evaluation, SGD with momentum 0.9 and weight decay 5e-4 at the learned
step size, lr x0.1 at half of the epochs, DSA on every batch; the test accuracy at the end.
Each network's initialisation and batches come from its own seed, so evaluations can run
anywhere (one process or Ray tasks) and give the same numbers.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from mct_ray.augment import Augmenter
from mct_ray.config import AugmentConfig, EvalConfig
from mct_ray.data import ImageData
from mct_ray.distill import init_synthetic
from mct_ray.experts import accuracy, train_epoch
from mct_ray.nets import ConvNet, NetSpec
from mct_ray.rng import derive_seed, generator


@dataclass(frozen=True)
class EvalResult:
    accs: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accs) if len(self.accs) > 1 else 0.0


def train_and_test(spec: NetSpec, images: torch.Tensor, labels: torch.Tensor, lr: float,
                   test_x: torch.Tensor, test_y: torch.Tensor, cfg: EvalConfig,
                   aug_cfg: AugmentConfig, seed: int, device: str = "cpu") -> float:
    """Train one fresh network on (images, labels) and return its test accuracy."""
    init = torch.Generator().manual_seed(derive_seed(seed, "eval-init"))
    net = ConvNet(spec, spec.init_params(init)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [cfg.epochs // 2], gamma=0.1)
    aug = Augmenter(aug_cfg if cfg.augment else AugmentConfig(enabled=False))
    gen = generator(seed, "eval-batches")
    images, labels = images.detach().to(device), labels.to(device)
    for _ in range(cfg.epochs):
        train_epoch(net, opt, images, labels, cfg.batch, aug, gen)
        sched.step()
    return accuracy(net, test_x, test_y)


def eval_seed(seed: int, tag: str, iteration: int, index: int) -> int:
    """The seed of evaluation network `index` at `iteration` (tag separates baselines)."""
    return derive_seed(seed, f"eval-{tag}", iteration, index)


def evaluate(spec: NetSpec, images: torch.Tensor, labels: torch.Tensor, lr: float,
             data: ImageData, cfg: EvalConfig, aug_cfg: AugmentConfig, seed: int,
             iteration: int, tag: str = "syn", device: str = "cpu") -> EvalResult:
    accs = tuple(train_and_test(spec, images, labels, lr, data.test_x, data.test_y, cfg,
                                aug_cfg, eval_seed(seed, tag, iteration, i), device)
                 for i in range(cfg.num_eval))
    return EvalResult(accs)


def random_real(data: ImageData, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ipc random real training images per class (the 'Random' row of the paper's Table 1)."""
    return init_synthetic(data.train_x, data.train_y, data.num_classes, ipc,
                          generator(seed, "baseline"))
