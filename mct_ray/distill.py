"""The matching loop, one for both methods (MCT: convex trajectories, continuous start
sampling, fractional M; MTT: full trajectories, whole-epoch sampling).

One iteration, in named steps:
    sample_segment   expert k, start c, target c+M (clamped to K)
    plan_unroll      every random choice of the N student steps (minibatches, DSA params)
    unroll           N SGD steps of the student on the synthetic set, and the gradient of
                     match_loss = ||theta_N - target||^2 / ||start - target||^2
                     w.r.t. the images and the step size, by one of three modes:
                       unroll      keep the graph of all N steps (exact, memory O(N))
                       checkpoint  keep the parameters at segment boundaries (default: every
                                   step), recompute each segment's graph in the backward
                                   pass (exact; memory N parameter copies + one segment)
                       tesla       treat each step's parameters as constant in the images and
                                   replay the steps one at a time (approximate, O(1))
    update           SGD with momentum on images and step size; a non-finite loss or gradient
                     skips the update, and `max_bad_steps` in a row raise DivergenceError.

Every random draw of iteration i comes from generator(seed, "distill", i), so the state to
resume exactly is just images, step size, optimiser states and the iteration counter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mct_ray.augment import Augmenter, AugPlan
from mct_ray.config import METHODS, DistillConfig, start_bounds
from mct_ray.errors import DivergenceError, FormatError
from mct_ray.nets import NetSpec, Network
from mct_ray.rng import generator
from mct_ray.shard import Shard
from mct_ray.synthetic import SyntheticSet
from mct_ray.trajectory import Trajectory, unflatten

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    expert: int
    start_epoch: float
    target_epoch: float
    start: list[torch.Tensor]  # per-tensor parameters
    target: list[torch.Tensor]


@dataclass(frozen=True)
class StepPlan:
    indices: torch.Tensor  # (B,) rows of the synthetic set
    aug: AugPlan


@dataclass(frozen=True)
class StepResult:
    iteration: int
    loss: float
    step_size: float
    start_epoch: float
    skipped: bool


def sample_segment(trajectories: list[Trajectory], cfg: DistillConfig, gen: torch.Generator,
                   device: str, iteration: int = 0) -> Segment:
    """Which expert, and the (start, target) pair on it: the start drawn from the window
    of `iteration` (`config.start_bounds`: [0, max_start_epoch) without a window)."""
    k = int(torch.randint(len(trajectories), (1,), generator=gen))
    traj = trajectories[k]
    low, high = start_bounds(cfg, iteration)
    if METHODS[cfg.method].continuous:  # MCT: c ~ U[low, high), as np.random.uniform
        c = low + float(torch.rand((), generator=gen, dtype=torch.float64)) * (high - low)
    else:  # MTT: a whole epoch in low .. high - 1, as np.random.randint in MTT's code
        c = low + float(torch.randint(int(high - low), (1,), generator=gen))
    target_epoch = min(c + cfg.expert_epochs, traj.num_epochs)
    start = unflatten(traj.spec, traj.point(c).to(device))
    target = unflatten(traj.spec, traj.point(target_epoch).to(device))
    return Segment(k, c, target_epoch, start, target)


def teacher_labels(net: Network, trajectory: Trajectory, epoch: float, images: torch.Tensor,
                   batch: int = 256) -> torch.Tensor:
    """The MCT authors' teacher labels: the softmax of the expert's network at `epoch` of
    its trajectory, on the synthetic images as they are (no augmentation, no gradient)."""
    return torch.softmax(_logits_at(net, trajectory, min(epoch, trajectory.num_epochs),
                                    images, batch), dim=1)


@torch.no_grad()
def _logits_at(net: Network, trajectory: Trajectory, epoch: float, images: torch.Tensor,
               batch: int) -> torch.Tensor:
    """The raw logits of the network at `epoch` of a trajectory, in batches of `batch`."""
    params = unflatten(net.spec, trajectory.point(epoch).to(images.device, images.dtype))
    return torch.cat([net.forward(params, x) for x in images.split(batch)])


def initial_label_logits(net: Network, trajectories: list[Trajectory], images: torch.Tensor,
                         classes: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """DATM's initial labels: per image, the mean of the raw logits of the experts' final
    networks that classify it correctly (of all of them, for an image none gets right)."""
    total = torch.zeros(len(images), net.spec.num_classes, dtype=images.dtype,
                        device=images.device)
    right = torch.zeros(len(images), 1, dtype=images.dtype, device=images.device)
    every = torch.zeros_like(total)
    for traj in trajectories:
        logits = _logits_at(net, traj, traj.num_epochs, images, batch)
        hit = (logits.argmax(1) == classes).to(images.dtype)[:, None]
        total += hit * logits
        right += hit
        every += logits
    return torch.where(right > 0, total / right.clamp_min(1), every / len(trajectories))


def plan_unroll(num_syn: int, batch_syn: int, num_steps: int, size: int, aug: Augmenter,
                gen: torch.Generator) -> list[StepPlan]:
    """Minibatches walk shuffled passes over the synthetic set, as in MTT."""
    batch = batch_syn or num_syn
    plans: list[StepPlan] = []
    chunks: list[torch.Tensor] = []
    for _ in range(num_steps):
        if not chunks:
            chunks = list(torch.randperm(num_syn, generator=gen).split(batch))
        idx = chunks.pop(0)
        plans.append(StepPlan(idx, aug.sample(len(idx), size, gen)))
    return plans


def match_loss(final: list[torch.Tensor], seg: Segment) -> torch.Tensor:
    """||theta_N - target||^2 / ||start - target||^2, summed over all tensors."""
    num = sum(((p - t) ** 2).sum() for p, t in zip(final, seg.target))
    den = sum(((s - t) ** 2).sum() for s, t in zip(seg.start, seg.target))
    return num / den


# On CPU the student's batch is processed in chunks whose first-block activations stay
# under this size: glibc serves blocks above 32 MiB with a fresh mmap (a page fault per 4 KiB
# on every call) and reuses smaller ones from its heap. bench/NOTES.md has the measurement.
CPU_CHUNK_BYTES = 16 * 2**20


def num_chunks(spec: NetSpec, x: torch.Tensor) -> int:
    """How many pieces the student's batch x (B, C, H, W) is split into (1 off the CPU)."""
    if x.device.type != "cpu" or not spec.functional:  # batch norm needs the whole batch
        return 1
    per_sample = spec.width * x.shape[-2] * x.shape[-1] * x.element_size()
    return min(len(x), math.ceil(len(x) * per_sample / CPU_CHUNK_BYTES))


class Student:
    """The student's SGD step as a function of (parameters, images, step size); in a gang
    (`shard`), on this worker's rows of each minibatch, the gradient summed over workers."""

    def __init__(self, net: Network, labels: torch.Tensor, aug: Augmenter,
                 autocast: str = "none", shard: Shard = Shard()):
        self.net, self.labels, self.aug, self.autocast = net, labels, aug, autocast
        self.shard = shard

    def loss(self, params: list[torch.Tensor], images: torch.Tensor, plan: StepPlan
             ) -> torch.Tensor:
        """Cross-entropy of this worker's rows of the augmented minibatch over the whole
        minibatch's size (its mean with one worker), summed chunk by chunk."""
        rows = self.shard.share(len(plan.indices))
        x = self.aug.apply(images[plan.indices[rows]], plan.aug.rows(rows))  # (B, C, H, W)
        y = self.labels[plan.indices[rows]]
        pieces = num_chunks(self.net.spec, x)
        use_bf16 = self.autocast == "bf16"  # on a CPU: slower, but the same numerics
        total = 0.0
        for xc, yc in zip(x.tensor_split(pieces), y.tensor_split(pieces)):
            with torch.autocast(x.device.type, torch.bfloat16, enabled=use_bf16):
                logits = self.net.forward(params, xc)
            logits = logits.to(params[-1].dtype)  # the loss in the parameters' precision
            total = total + F.cross_entropy(logits, yc, reduction="sum")
        return total / len(plan.indices)

    def step(self, params: list[torch.Tensor], images: torch.Tensor, step_size: torch.Tensor,
             plan: StepPlan, create_graph: bool = True
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One SGD step; returns (new parameters, gradients), differentiable w.r.t.
        (params, images, step size) when create_graph is set.

        The step computes the same bits with and without create_graph (the net's ops run the
        same kernels on both paths, see nets.py), so the recomputing modes replay exactly.
        """
        rows = self.shard.share(len(plan.indices))
        if rows.stop > rows.start:
            grads = torch.autograd.grad(self.loss(params, images, plan), params,
                                        create_graph=create_graph)
        else:  # no rows for this worker: zeros that depend on the parameters as a gradient
            # does, so the all-reduce of the backward pass runs here as on the other workers
            grads = [0.0 * (p if create_graph else p.detach()) for p in params]
        grads = self.shard.sum(list(grads), differentiable=create_graph)
        return [p - step_size * g for p, g in zip(params, grads)], list(grads)

    def run(self, params: list[torch.Tensor], images: torch.Tensor, step_size: torch.Tensor,
            plans: list[StepPlan], keep_graph: bool) -> list[torch.Tensor]:
        """N steps; with keep_graph=False no graph is built beyond one step's first order."""
        for plan in plans:
            if not keep_graph:  # a fresh leaf each step, sharing storage (no copy)
                params = [p.detach().requires_grad_() for p in params]
            params, _ = self.step(params, images, step_size, plan, create_graph=keep_graph)
        return params if keep_graph else [p.detach() for p in params]


def _leaves(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def _loss_and_grad(final: list[torch.Tensor], seg: Segment, shard: Shard
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The matching loss and this worker's share of its gradient w.r.t. theta_N (start and
    target are constants)."""
    final = _leaves(final)
    loss = match_loss(final, seg)
    return loss.detach(), list(torch.autograd.grad(shard.split(loss), final))


def grad_unroll(student: Student, images: torch.Tensor, step_size: torch.Tensor, seg: Segment,
                plans: list[StepPlan]) -> torch.Tensor:
    final = student.run(_leaves(seg.start), images, step_size, plans, keep_graph=True)
    loss = match_loss(final, seg)
    student.shard.split(loss).backward(inputs=_inputs(student, images, step_size))
    return loss.detach()


def grad_checkpoint(student: Student, images: torch.Tensor, step_size: torch.Tensor,
                    seg: Segment, plans: list[StepPlan], num_segments: int = 0) -> torch.Tensor:
    # Memory is num_segments parameter copies plus one segment's graph (n / num_segments
    # steps); compute is the same for any count (one first-order sweep, then every step once
    # with its graph). A ConvNet's parameters are far smaller than one step's graph (1.3 MB
    # against ~290 MB at the CIFAR-10 shape, ipc 10), so the default keeps every step's
    # parameters: the textbook sqrt(n) balances the two only when they are of a size.
    n = len(plans)
    num_segments = min(n, num_segments or n) or 1
    bounds = [round(i * n / num_segments) for i in range(num_segments + 1)]
    boundary_params = []
    params = [p.detach() for p in seg.start]
    for a, b in zip(bounds[:-1], bounds[1:]):  # forward: keep only the boundary parameters
        boundary_params.append(params)
        params = student.run(params, images.detach(), step_size.detach(), plans[a:b],
                             keep_graph=False)
    loss, upstream = _loss_and_grad(params, seg, student.shard)
    for (a, b), start in reversed(list(zip(zip(bounds[:-1], bounds[1:]), boundary_params))):
        leaves = _leaves(start)
        out = student.run(leaves, images, step_size, plans[a:b], keep_graph=True)
        inputs = _inputs(student, images, step_size)
        grads = torch.autograd.grad(out, [*inputs, *leaves], upstream, allow_unused=True)
        for leaf, grad in zip(inputs, grads):
            _accumulate(leaf, grad)
        upstream = list(grads[len(inputs):])
    return loss


def grad_tesla(student: Student, images: torch.Tensor, step_size: torch.Tensor, seg: Segment,
               plans: list[StepPlan]) -> torch.Tensor:
    final = student.run(seg.start, images.detach(), step_size.detach(), plans,
                        keep_graph=False)
    loss, upstream = _loss_and_grad(final, seg, student.shard)
    params = [p.detach() for p in seg.start]
    for plan in plans:  # replay; each step's parameters are constants w.r.t. the images
        leaves = _leaves(params)
        _, grads = student.step(leaves, images, step_size, plan)
        # theta_N depends on this step through -step_size * g(images): chain with upstream.
        inner = -step_size * sum((g * u).sum() for g, u in zip(grads, upstream))
        inner.backward(inputs=_inputs(student, images, step_size))
        params = [p - step_size.detach() * g.detach() for p, g in zip(params, grads)]
    return loss


# distill.grad_mode -> fn(student, images, step_size, segment, plans, cfg): fills images.grad
# and step_size.grad for one segment and returns the matching loss.
GradMode = Callable[[Student, torch.Tensor, torch.Tensor, Segment, list, DistillConfig],
                    torch.Tensor]
GRAD_MODES: dict[str, GradMode] = {
    "unroll": lambda st, x, lr, seg, plans, cfg: grad_unroll(st, x, lr, seg, plans),
    "checkpoint": lambda st, x, lr, seg, plans, cfg: grad_checkpoint(
        st, x, lr, seg, plans, cfg.checkpoint_segments),
    "tesla": lambda st, x, lr, seg, plans, cfg: grad_tesla(st, x, lr, seg, plans),
}


def _inputs(student: Student, images: torch.Tensor, step_size: torch.Tensor
            ) -> list[torch.Tensor]:
    """What a mode differentiates: the images, the step size and, when they are learned,
    the labels (the student's distributions, a leaf that requires grad)."""
    learned = student.labels.requires_grad
    return [images, step_size, *([student.labels] if learned else [])]


def _accumulate(leaf: torch.Tensor, grad: torch.Tensor | None) -> None:
    if grad is None:
        return
    leaf.grad = grad.clone() if leaf.grad is None else leaf.grad + grad


class Distiller:
    """Holds the synthetic set and its optimisers; `step()` runs one iteration."""

    def __init__(self, net: Network, trajectories: list[Trajectory], images: torch.Tensor,
                 labels: torch.Tensor, cfg: DistillConfig, aug: Augmenter, seed: int,
                 shard: Shard = Shard()):
        if not trajectories:
            raise FormatError("no expert trajectories to distill from")
        self.net, self.trajectories, self.cfg, self.seed = net, trajectories, cfg, seed
        self.aug, self.shard, device = aug, shard, net.device
        self.images = images.detach().clone().to(device).requires_grad_()
        self.classes = labels.to(device)  # the class of each image
        self.labels = self.classes  # what the student trains on: soft once a teacher labels
        self.step_size = torch.tensor(cfg.lr_teacher, dtype=images.dtype,
                                      device=device).requires_grad_()
        self.opt_img = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum)
        self.opt_lr = torch.optim.SGD([self.step_size], lr=cfg.lr_lr, momentum=cfg.momentum)
        self.student = Student(net, self.labels, aug, cfg.autocast, shard)
        self.label_logits: torch.Tensor | None = None  # learned labels (DATM), as logits
        if cfg.labels == "learned":
            self.label_logits = initial_label_logits(net, trajectories, self.images.detach(),
                                                     self.classes).requires_grad_()
            self.opt_label = torch.optim.SGD([self.label_logits], lr=cfg.lr_label,
                                             momentum=cfg.momentum_label)
            self.set_labels(torch.softmax(self.label_logits.detach(), 1))
        self.iteration = 0
        self.bad_streak = 0

    def compute_grads(self, seg: Segment, plans: list[StepPlan]) -> torch.Tensor:
        """Fill images.grad and step_size.grad (and, when learned, the label logits') for
        one segment; returns the loss."""
        if self.label_logits is not None:  # the modes differentiate the distributions
            self.set_labels(torch.softmax(self.label_logits.detach(), 1).requires_grad_())
        loss = GRAD_MODES[self.cfg.grad_mode](self.student, self.images, self.step_size, seg,
                                              plans, self.cfg)
        learned = () if self.label_logits is None else (self.labels,)
        self.shard.gather_grads([self.images, self.step_size, *learned])
        if self.cfg.image_grad_scale != 1.0 and self.images.grad is not None:
            self.images.grad.mul_(self.cfg.image_grad_scale)
        if self.label_logits is not None:  # then through the softmax to the logits
            probs = self.labels
            if probs.grad is not None:
                self.label_logits.grad = torch.autograd.grad(
                    torch.softmax(self.label_logits, 1), self.label_logits, probs.grad)[0]
            self.set_labels(probs.detach())
        return loss

    def step(self) -> StepResult:
        gen = generator(self.seed, "distill", self.iteration)
        seg = sample_segment(self.trajectories, self.cfg, gen, self.net.device, self.iteration)
        if self.cfg.labels == "teacher":
            self.set_labels(teacher_labels(self.net, self.trajectories[seg.expert],
                                           self.cfg.max_start_epoch, self.images))
        plans = plan_unroll(len(self.images), self.cfg.batch_syn, self.cfg.syn_steps,
                            self.images.shape[-1], self.aug, gen)
        learned = () if self.label_logits is None else (self.label_logits,)
        for p in (self.images, self.step_size, *learned):
            p.grad = None
        loss = self.compute_grads(seg, plans)
        finite = bool(torch.isfinite(loss)) and all(
            p.grad is not None and bool(torch.isfinite(p.grad).all())
            for p in (self.images, self.step_size, *learned))
        if finite:
            self.opt_img.step()
            self.opt_lr.step()
            if learned:
                self.opt_label.step()
                self.set_labels(torch.softmax(self.label_logits.detach(), 1))
            with torch.no_grad():
                self.step_size.clamp_(min=self.cfg.min_step_size)
            self.bad_streak = 0
        else:
            self.bad_streak += 1
            log.warning("iteration %d: non-finite matching loss or gradient; update skipped "
                        "(%d in a row)", self.iteration, self.bad_streak)
            if self.bad_streak >= self.cfg.max_bad_steps:
                raise DivergenceError(
                    f"distillation diverged: {self.bad_streak} non-finite matching losses in a "
                    f"row at iteration {self.iteration}; the last good synthetic set is kept "
                    "(try a smaller distill.lr_img or distill.lr_teacher)")
        result = StepResult(self.iteration, float(loss), float(self.step_size.detach()),
                            seg.start_epoch, not finite)
        self.iteration += 1
        return result

    def sync(self) -> None:
        """Every worker of a gang takes worker 0's state (after worker 0 resumed)."""
        if self.shard.alone:
            return
        state = self.shard.broadcast(self.state_dict() if self.shard.rank == 0 else None)
        if self.shard.rank != 0:
            self.load_state_dict(state)

    def set_labels(self, labels: torch.Tensor) -> None:
        self.labels = self.student.labels = labels

    def snapshot(self) -> SyntheticSet:
        soft = self.labels.ndim == 2
        return SyntheticSet(self.images.detach().cpu().clone(), self.labels.cpu().clone(),
                            float(self.step_size.detach()), {"iteration": self.iteration},
                            self.classes.cpu().clone() if soft else None)

    def state_dict(self) -> dict:
        learned = {} if self.label_logits is None else {
            "label_logits": self.label_logits.detach().cpu().clone(),
            "opt_label": self.opt_label.state_dict()}
        return {"iteration": self.iteration, "bad_streak": self.bad_streak,
                "images": self.images.detach().cpu().clone(),
                "labels": self.labels.cpu().clone(),
                "step_size": self.step_size.detach().cpu().clone(),
                "opt_img": self.opt_img.state_dict(), "opt_lr": self.opt_lr.state_dict(),
                "seed": self.seed, **learned}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["images"].shape) != tuple(self.images.shape):
            raise FormatError(f"distillation state has images {tuple(state['images'].shape)}, "
                              f"the config makes {tuple(self.images.shape)}")
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.step_size.copy_(state["step_size"])
        labels = state["labels"]
        n, k = len(self.images), self.net.spec.num_classes
        if tuple(labels.shape) not in ((n,), (n, k)):
            raise FormatError(f"distillation state has labels {tuple(labels.shape)}, the "
                              f"config makes ({n},) or ({n}, {k})")
        self.set_labels(labels.to(self.net.device, self.images.dtype if labels.ndim == 2
                                  else self.classes.dtype))
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        if self.label_logits is not None:
            logits = state.get("label_logits")
            if logits is None or tuple(logits.shape) != tuple(self.label_logits.shape):
                raise FormatError("distillation state has no learned labels of shape "
                                  f"{tuple(self.label_logits.shape)} (distill.labels=learned)")
            with torch.no_grad():
                self.label_logits.copy_(logits)
            self.opt_label.load_state_dict(state["opt_label"])
        self.iteration = int(state["iteration"])
        self.bad_streak = int(state["bad_streak"])
        self.seed = int(state["seed"])
