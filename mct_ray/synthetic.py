"""The synthetic set: what it holds as it travels between the distiller, evaluation, files
and workers, and how its starting images are drawn from the training set."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from mct_ray.errors import FormatError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticSet:
    """A synthetic set as it travels between the distiller, evaluation, files and workers:
    images (num_classes * ipc, C, H, W), the labels networks train on, the learned step
    size, what is recorded with it (`info`: iteration, data set, normalisation, method), and
    with soft labels the class of each image.

    `labels` are the class of each image (int64, (n,): hard) or a distribution over the
    classes per image (float, (n, num_classes): soft, with `classes` set)."""

    images: torch.Tensor
    labels: torch.Tensor
    step_size: float
    info: dict = field(default_factory=dict)
    classes: torch.Tensor | None = None

    @property
    def iteration(self) -> int:
        return int(self.info.get("iteration", 0))

    @property
    def soft(self) -> bool:
        return self.labels.ndim == 2

    def hard(self) -> SyntheticSet:
        """The same images with the class of each as its label."""
        if not self.soft:
            return self
        return SyntheticSet(self.images, self.classes, self.step_size,
                            {**self.info, "labels": "hard"})


def draw_init_indices(train_y: torch.Tensor, num_classes: int, ipc: int,
                      gen: torch.Generator) -> torch.Tensor:
    """(num_classes * ipc,) indices into the training set: ipc per class, drawn without
    replacement, class-major (the synthetic set's starting images)."""
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(train_y == c).flatten()
        if len(idx) < ipc:
            raise FormatError(f"class {c} has {len(idx)} training images, fewer than ipc={ipc}")
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:ipc]])
    return torch.cat(picks)


def draw_correct_indices(train_y: torch.Tensor, num_classes: int, ipc: int,
                         gen: torch.Generator, predicts: list[Callable], batch: int = 256
                         ) -> torch.Tensor:
    """DATM's filter of starting images: per class, its images in a random order, the first
    ipc that the first network of `predicts` classifies correctly, read in chunks of
    `batch`; where a class runs out, the next network goes on from the same order (images
    kept stay kept); past the last network, the class's next images in that order."""
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(train_y == c).flatten()
        if len(idx) < ipc:
            raise FormatError(f"class {c} has {len(idx)} training images, fewer than ipc={ipc}")
        order = idx[torch.randperm(len(idx), generator=gen)]
        chosen: list[int] = []
        for predict in predicts:
            for chunk in order.split(batch):
                hits = chunk[predict(chunk).cpu() == c].tolist()
                chosen += [i for i in hits if i not in chosen][:ipc - len(chosen)]
                if len(chosen) == ipc:
                    break
            if len(chosen) == ipc:
                break
        if len(chosen) < ipc:
            log.warning("class %d: only %d of its images are classified correctly by the "
                        "experts; the others are its next images", c, len(chosen))
            chosen += [i for i in order.tolist() if i not in chosen][:ipc - len(chosen)]
        picks.append(torch.tensor(chosen, dtype=torch.long))
    return torch.cat(picks)


def init_synthetic(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, ipc: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ipc real images per class, drawn without replacement; labels class-major."""
    idx = draw_init_indices(train_y, num_classes, ipc, gen)
    return train_x[idx].clone(), train_y[idx].clone()
