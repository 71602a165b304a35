"""Train on the synthetic set, test on real data (the MTT protocol).

A fresh network per evaluation, SGD with momentum 0.9 and weight decay 5e-4 at the learned
step size, lr x0.1 at half of the epochs, DSA on every batch; the test accuracy at the end.
Each network's initialisation and batches come from its own seed, so evaluations can run
anywhere (one process or Ray tasks) and give the same numbers.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

import torch

from mct_ray.augment import Augmenter
from mct_ray.config import AugmentConfig, Config
from mct_ray.data import ImageData
from mct_ray.nets import Network
from mct_ray.progress import Progress
from mct_ray.rng import derive_seed, generator
from mct_ray.synthetic import SyntheticSet, init_synthetic
from mct_ray.training import accuracy, train_epoch


@dataclass(frozen=True)
class EvalResult:
    accs: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accs) if len(self.accs) > 1 else 0.0


def train_and_test(cfg: Config, network: Network, syn: SyntheticSet, test_x: torch.Tensor,
                   test_y: torch.Tensor, seed: int, model: str | None = None) -> float:
    """Train one fresh network (the distillation's, or `model` of the zoo) on the synthetic
    set and return its test accuracy."""
    e, spec, device = cfg.eval, network.spec, network.device
    init = derive_seed(seed, "eval-init")
    if model is None:
        net = network.module(spec.init_params(torch.Generator().manual_seed(init)))
    else:  # the same input and classes; the ConvNets of the zoo follow width, depth, norm
        net = dataclasses.replace(spec, name=model).build(init, "eval.models").to(device)
    opt = torch.optim.SGD(net.parameters(), lr=syn.step_size, momentum=e.momentum,
                          weight_decay=e.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [e.epochs // 2], gamma=0.1)
    aug = Augmenter(cfg.augment if e.augment else AugmentConfig(enabled=False))
    gen = generator(seed, "eval-batches")
    images, labels = syn.images.detach().to(device), syn.labels.to(device)
    progress = Progress(f"evaluation of iteration {syn.iteration} on {model or spec.name}",
                        e.epochs, unit="epochs")
    for _ in range(e.epochs):
        train_epoch(net, opt, images, labels, e.batch, aug, gen)
        sched.step()
        progress.update(1)
    return accuracy(net, test_x, test_y)


def eval_seed(seed: int, tag: str, iteration: int, index: int) -> int:
    """The seed of evaluation network `index` at `iteration` (tag separates baselines)."""
    return derive_seed(seed, f"eval-{tag}", iteration, index)


def evaluate(cfg: Config, network: Network, data: ImageData, syn: SyntheticSet,
             tag: str = "syn", model: str | None = None) -> EvalResult:
    """eval.num_eval fresh networks trained on `syn`, seeded by its iteration and `tag`."""
    return EvalResult(tuple(
        train_and_test(cfg, network, syn, data.test_x, data.test_y,
                       eval_seed(cfg.seed, tag, syn.iteration, i), model)
        for i in range(cfg.eval.num_eval)))


def random_real(cfg: Config, data: ImageData) -> SyntheticSet:
    """ipc random real training images per class (the 'Random' row of the paper's Table 1),
    trained at the experts' learning rate: the baseline every run scores beside its own."""
    images, labels = init_synthetic(data.train_x, data.train_y, data.num_classes,
                                    cfg.distill.ipc, generator(cfg.seed, "baseline"))
    return SyntheticSet(images, labels, cfg.expert.lr, {"iteration": 0, "baseline": True})
