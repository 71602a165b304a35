"""Plain supervised training, shared by the experts and the evaluation networks: one epoch
of shuffled, augmented minibatches, and test accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mct_ray.augment import Augmenter
from mct_ray.progress import Progress


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    net.eval()
    device = next(net.parameters()).device
    correct = sum(int((net(x[i:i + batch].to(device)).argmax(1) == y[i:i + batch].to(device))
                      .sum()) for i in range(0, len(x), batch))
    net.train()
    return correct / len(x)


def train_epoch(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                batch: int, aug: Augmenter, gen: torch.Generator,
                progress: Progress | None = None) -> float:
    """One pass over (x, y) in shuffled minibatches; returns the mean loss. `progress`
    counts the images."""
    device = next(net.parameters()).device
    order = torch.randperm(len(x), generator=gen)
    total = 0.0
    for idx in order.split(batch):
        xb = aug(x[idx], gen).to(device)
        loss = F.cross_entropy(net(xb), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        if progress is not None:
            progress.update(len(idx))
    return total / len(x)
