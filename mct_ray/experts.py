"""Train one expert on real data and return its convex trajectory (and, optionally, the full one);
store experts in a run folder and load them back.

Only the per-epoch, per-tensor step norms ||theta_l(k+1) - theta_l(k)|| are accumulated
(paper sec. 4.1): the previous epoch's parameters are the one copy kept, so memory does not
grow with K. Anchor epochs (for a piecewise path) and, with `keep_full`, every epoch are
the only extra copies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mct_ray import formats, layout
from mct_ray.augment import Augmenter
from mct_ray.config import ExpertConfig
from mct_ray.data import ImageData
from mct_ray.errors import DataError
from mct_ray.nets import NetSpec, Network
from mct_ray.progress import Progress
from mct_ray.rng import derive_seed, generator
from mct_ray.storage import Storage
from mct_ray.training import accuracy, train_epoch
from mct_ray.trajectory import (ConvexTrajectory, FullTrajectory, Trajectory, beta_from_step_norms,
                                flatten)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertResult:
    expert_id: int
    convex: ConvexTrajectory
    full: FullTrajectory | None
    init_seed: int  # regenerates theta(0) through spec.init_params
    test_acc: float


def init_seed(seed: int, expert_id: int) -> int:
    return derive_seed(seed, "expert-init", expert_id)


def smoothing_epochs(cfg: ExpertConfig) -> tuple[int, ...]:
    """With smooth_anchors, the epochs whose parameters make the smoothed anchors: each
    interior anchor e becomes the mean of epochs e-1 and e+1, the end the mean of K-1 and K
    (the authors' exps/trajectory_compression.py); theta(0) stays. Empty without smoothing."""
    if not cfg.smooth_anchors:
        return ()
    near = {n for e in cfg.anchors for n in (e - 1, e + 1)}
    return tuple(sorted(near | {0, cfg.epochs - 1, cfg.epochs}))


def anchor_points(cfg: ExpertConfig, snapshots: dict[int, torch.Tensor]) -> torch.Tensor:
    """(num_anchors, P): theta at 0, each interior anchor and K, smoothed when configured.

    Smoothing follows the authors' compression script step by step: the checkpoints are
    smoothed in place, one anchor after another in increasing order (an anchor next to an
    earlier one sees that one already smoothed), then the end becomes the mean of the
    (possibly smoothed) second-last checkpoint and the last: with an anchor at K-1 the end
    is 1/4 theta(K-2) + 3/4 theta(K)."""
    if not cfg.smooth_anchors:
        return torch.stack([snapshots[e] for e in (0, *cfg.anchors, cfg.epochs)])
    t = dict(snapshots)  # epoch -> parameters, smoothed in place as the script does
    for e in cfg.anchors:  # increasing (config)
        t[e] = (t[e - 1] + t[e + 1]) / 2
    end = (t[cfg.epochs - 1] + t[cfg.epochs]) / 2
    return torch.stack([t[0], *(t[e] for e in cfg.anchors), end])


def train_expert(network: Network, data: ImageData, cfg: ExpertConfig, aug: Augmenter,
                 seed: int, expert_id: int) -> ExpertResult:
    spec = network.spec
    theta_seed = init_seed(seed, expert_id)
    net = network.module(spec.init_params(torch.Generator().manual_seed(theta_seed)))
    params = list(net.parameters())  # in spec.param_shapes() order
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    gen = generator(seed, "expert-batches", expert_id)
    anchor_epochs = (0, *cfg.anchors, cfg.epochs)
    kept = set(smoothing_epochs(cfg) or anchor_epochs)  # the epochs the anchors are made of

    def snapshot() -> torch.Tensor:
        return flatten([p.detach() for p in params]).cpu().clone()

    prev = [p.detach().clone() for p in params]
    snapshots = {0: snapshot()}
    checkpoints = [snapshots[0]] if cfg.keep_full else []
    step_norms = torch.zeros(cfg.epochs, len(prev), dtype=torch.float64)  # (K, T)
    epoch = 0
    progress = Progress(f"expert {expert_id}", cfg.epochs * len(data.train_x), unit="images",
                        detail=lambda: f"epoch {epoch + 1}/{cfg.epochs}")
    for epoch in range(cfg.epochs):
        loss = train_epoch(net, opt, data.train_x, data.train_y, cfg.batch, aug, gen, progress)
        with torch.no_grad():
            for i, (p, q) in enumerate(zip(params, prev)):
                step_norms[epoch, i] = torch.linalg.vector_norm((p - q).double())
                q.copy_(p)
        if epoch + 1 in kept:
            snapshots[epoch + 1] = snapshot()
        if cfg.keep_full:
            checkpoints.append(snapshot())
        log.debug("expert %d epoch %d loss %.4f", expert_id, epoch, loss)
    acc = accuracy(net, data.test_x, data.test_y)
    info = {"expert_id": expert_id, "seed": seed, "test_acc": acc, "data": data.name,
            "smooth_anchors": cfg.smooth_anchors}
    convex = ConvexTrajectory(spec, anchor_epochs, anchor_points(cfg, snapshots),
                              beta_from_step_norms(step_norms).float(), info)
    full = FullTrajectory(spec, torch.stack(checkpoints), info) if cfg.keep_full else None
    return ExpertResult(expert_id, convex, full, theta_seed, acc)


# ---------------------------------------------------------------------------------------
# An experts folder.

def save_expert(store: Storage, result: ExpertResult, store_init_as_seed: bool) -> None:
    seed = result.init_seed if store_init_as_seed else None
    store.write_bytes(layout.expert_name(result.expert_id),
                      formats.save_trajectory(result.convex, init_seed=seed))
    if result.full is not None:
        store.write_bytes(layout.expert_name(result.expert_id, full=True),
                          formats.save_trajectory(result.full))


def load_expert(store: Storage, expert_id: int, spec: NetSpec, full: bool) -> Trajectory:
    name = layout.expert_name(expert_id, full)
    return formats.load_trajectory(store.read_bytes(name), store.uri_of(name), spec)


def load_experts(store: Storage, spec: NetSpec, full: bool) -> list[Trajectory]:
    """Every expert of a run folder: convex files (MCT) or full ones (MTT)."""
    ids = layout.expert_ids(store, full)
    if not ids:
        raise DataError(missing_experts_message(store, full))
    return [load_expert(store, i, spec, full) for i in ids]


def missing_experts_message(store: Storage, full: bool) -> str:
    kind = "full (MTT) trajectories; train experts with expert.keep_full=true" if full \
        else "expert trajectories; run `mct-ray experts` first"
    return f"no {kind} under {store.uri_of(layout.EXPERTS)}"
