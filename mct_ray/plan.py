"""What a command is about to do and roughly how long it will take here, said before it
starts; and, at the end, where its outputs are and how to look at them.

The estimate times a few training steps of the run's network on this process's device at
the three batch sizes the phases use (an expert's minibatch, a student step on the
synthetic set, an evaluation network's minibatch) and scales them by the run's counts. A
distillation iteration is taken as three student steps' worth of work per unrolled step
(forward, the inner gradient, and the backward pass through it). It is rough (within a
factor of about two) and says so; on Ray, experts and evaluations run side by side, so they
take less.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mct_ray import layout
from mct_ray.loop import eval_iterations
from mct_ray.progress import duration

STUDENT_STEP_COST = 3  # a student step with its gradient and the outer backward, in steps


def seconds_per_step(ctx, batch: int, repeats: int = 2) -> float:
    """Seconds of one training step of the run's network on `batch` images: one untimed
    warm-up step, then the fastest of `repeats` timed ones."""
    net = ctx.net.module(ctx.spec.init_params(torch.Generator().manual_seed(0)))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    batch = max(1, min(batch, len(ctx.data.train_x)))
    x, y = ctx.data.train_x[:batch].to(ctx.device), ctx.data.train_y[:batch].to(ctx.device)
    best = math.inf
    for i in range(repeats + 1):
        if ctx.device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ctx.device != "cpu":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


@dataclass(frozen=True)
class Plan:
    lines: tuple[str, ...]
    seconds: dict[str, float]  # phase -> estimated seconds in one process

    def describe(self) -> str:
        times = ", ".join(f"{k} {duration(v)}" for k, v in self.seconds.items())
        return "\n".join(["plan:", *(f"  {line}" for line in self.lines),
                          f"  rough time on this machine, one piece after another: {times} "
                          f"(total {duration(sum(self.seconds.values()))}); on Ray, experts "
                          "and evaluations run side by side"])


def estimate(ctx, phases: tuple[str, ...], num_missing_experts: int) -> Plan:
    cfg, data = ctx.cfg, ctx.data
    lines, seconds, timed = [], {}, {}

    def step_s(batch: int) -> float:  # each batch size timed once (they often coincide)
        if batch not in timed:
            timed[batch] = seconds_per_step(ctx, batch)
        return timed[batch]

    net = f"{cfg.net.name} (width {cfg.net.width}, depth {cfg.net.depth})"
    lines.append(f"data set {data.name}: {len(data.train_x):,} training images "
                 f"{tuple(data.shape)}, {data.num_classes} classes; network {net} on "
                 f"{ctx.device}")
    if "experts" in phases:
        e = cfg.expert_training
        lines.append(f"experts: {num_missing_experts} to train of {e.num_experts}, "
                     f"{e.epochs} epochs each" + (" (full trajectories kept)"
                                                  if e.keep_full else ""))
        if num_missing_experts:
            steps = num_missing_experts * e.epochs * math.ceil(len(data.train_x) / e.batch)
            seconds["experts"] = steps * step_s(e.batch)
    if "distill" in phases:
        d, ev = cfg.distill, cfg.eval
        num_syn = d.ipc * data.num_classes
        lines.append(f"distillation: {cfg.distill.method}, {d.iterations} iterations of "
                     f"{d.syn_steps} student steps on {num_syn} synthetic images "
                     f"(ipc {d.ipc}), gradient {d.grad_mode}")
        seconds["distillation"] = d.iterations * d.syn_steps * STUDENT_STEP_COST * \
            step_s(d.batch_syn or num_syn)
        points = len(eval_iterations(ev.every, d.iterations)) + (1 if ev.baseline else 0)
        networks = points * ev.num_eval
        lines.append(f"evaluations: {points} points (every {ev.every} iterations"
                     f"{' and the random-real baseline' if ev.baseline else ''}) x "
                     f"{ev.num_eval} networks x {ev.epochs} epochs"
                     + (f", and the best set on {', '.join(ev.models)}" if ev.models else ""))
        seconds["evaluations"] = networks * ev.epochs * math.ceil(num_syn / ev.batch) * \
            step_s(min(ev.batch, num_syn))
    return Plan(tuple(lines), seconds)


def where_to_look(out: str, phases: tuple[str, ...]) -> str:
    """The closing lines of a command: where its outputs are and how to look at them."""
    lines = [f"outputs in {out}"]
    if "distill" in phases:
        lines += [f"  {layout.SYNTHETIC_PNG}: the synthetic images; {layout.CURVE_PNG}: accuracy "
                  f"against iteration; {layout.SUMMARY}: the figures",
                  f"  {layout.SYNTHETIC}: the best set (mct-ray eval --out {out} re-scores it)",
                  f"  tensorboard --logdir {out.rstrip('/')}/{layout.TENSORBOARD}"]
    elif "experts" in phases:
        lines.append(f"  {layout.EXPERTS}/: the trajectories "
                     f"(mct-ray distill --out <new folder> --experts {out})")
    return "\n".join(lines)
