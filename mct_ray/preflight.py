"""Everything about a command's input that can be known before its work starts.

The config checked itself when it was built (keys, ranges, cross-key rules); the CLI has
proved the output writable and, for Ray, the cluster reachable, and loading the data set
proved it present. What is left needs the data or the stored experts: the synthetic set's
ipc against the smallest class, and the experts a distillation will read (present, of the
kind its method needs, of this network, long enough for the segments it samples; every
one of them is read here, so a corrupt one fails before anything is written), and a data set
of at least two classes.
"""

from __future__ import annotations

import logging
import math

import torch

from mct_ray import footprint, layout, starting, zoo
from mct_ray.config import check_expert_epochs
from mct_ray.context import Context
from mct_ray.errors import ConfigError, DataError
from mct_ray.experts import load_expert, missing_experts_message
from mct_ray.storage import Storage

log = logging.getLogger(__name__)


def check_run(ctx: Context, phases: tuple[str, ...], experts: Storage) -> None:
    cfg = ctx.cfg
    check_data(ctx, "distill" in phases)
    if "experts" in phases:  # experts already stored must be of this network and length
        stored = layout.expert_ids(experts, full=False)
        if stored:
            traj = load_expert(experts, stored[0], ctx.spec, full=False)
            if traj.num_epochs != cfg.expert.epochs:
                raise ConfigError(
                    f"{experts.uri_of(layout.expert_name(stored[0]))} has {traj.num_epochs} "
                    f"epochs but expert.epochs is {cfg.expert.epochs}: experts of another "
                    "length cannot be mixed in one folder")
    if "distill" in phases:
        report_memory(ctx)
    if "distill" in phases and "experts" not in phases:
        ids = layout.expert_ids(experts, cfg.needs_full)
        if not ids:
            raise DataError(missing_experts_message(experts, cfg.needs_full))
        for i in ids:  # each one read and checked now, not when the distillation needs it
            traj = load_expert(experts, i, ctx.spec, cfg.needs_full)
            check_expert_epochs(cfg.distill, traj.num_epochs,
                                experts.uri_of(layout.expert_name(i, cfg.needs_full)))


def check_data(ctx: Context, distill: bool = True) -> None:
    """What the config asks of the data set: two classes at least, the evaluation networks
    importable, and for a distillation ipc images in every class and a starting-images file
    (if given) of this data set and ipc. A grid checks each of its cells with it."""
    cfg = ctx.cfg
    if ctx.data.num_classes < 2:
        raise DataError(f"{ctx.data.name} has {ctx.data.num_classes} class; a classifier "
                        "(and a synthetic set per class) needs at least 2")
    zoo.check_models(cfg.eval.models)
    if distill:
        counts = torch.bincount(ctx.data.train_y, minlength=ctx.data.num_classes)
        smallest = int(counts.argmin())
        if cfg.distill.ipc > counts[smallest]:
            raise ConfigError(
                f"config key 'distill.ipc' is {cfg.distill.ipc}, but class {smallest} "
                f"('{ctx.data.class_names[smallest]}') of {ctx.data.name} has only "
                f"{int(counts[smallest])} training images")
        starting.given(ctx)  # a starting-images file: readable, of this data set and ipc


def report_memory(ctx: Context) -> None:
    """The distillation's memory per worker, logged before any work (footprint.estimate);
    on a GPU that the estimate does not fit, a warning with how many workers would fit."""
    cfg = ctx.cfg
    workers = cfg.ray.distill_workers
    images = cfg.distill.ipc * ctx.data.num_classes
    one = footprint.estimate(cfg.distill, ctx.net, ctx.data.shape, images)
    each = one if workers == 1 else footprint.estimate(cfg.distill, ctx.net, ctx.data.shape,
                                                       images, workers)
    log.info("distillation memory: about %s on one worker%s (grad_mode=%s, %d steps)", one,
             f", {each} per worker of ray.distill_workers={workers}" if workers > 1 else "",
             cfg.distill.grad_mode, cfg.distill.syn_steps)
    if ctx.device.startswith("cuda"):
        have = torch.cuda.get_device_properties(torch.device(ctx.device)).total_memory
        if one.total > have:
            log.warning("the distillation needs about %s, more than this GPU's %.1f GiB: "
                        "split it with ray.distill_workers=%d or more (on Ray), or use "
                        "distill.grad_mode=checkpoint", one, have / 2**30,
                        math.ceil(one.total / have))
