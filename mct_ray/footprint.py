"""What one distillation iteration holds in memory on each worker, known before it runs.

The student's graph is measured, not modelled: one SGD step of the network with its graph
kept (as the exact modes keep it), on one image and on two, counting the bytes of every
tensor autograd saves for the backward pass (`saved_tensors_hooks`, each storage once). The
difference is one image's share, the rest the step's own. From these, per worker of
`ray.distill_workers` (each holds ceil(batch / workers) rows of every minibatch):

    unroll      N steps' graphs
    checkpoint  one segment's graphs (N / checkpoint_segments steps) + a parameter copy per
                segment boundary
    tesla       one step's graph
each plus one step's graph again (the temporaries of a step's backward pass), the synthetic
set three times (images, their gradient, momentum) and two parameter copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mct_ray.config import DistillConfig
from mct_ray.nets import Network


@dataclass(frozen=True)
class Footprint:
    graph_per_image: int  # bytes one image adds to one step's graph
    graph_per_step: int  # bytes one step's graph holds whatever its batch
    params: int  # bytes of one copy of the parameters
    total: int  # bytes of one iteration on one worker

    def __str__(self) -> str:
        if self.total < 2**30:
            return f"{self.total / 2**20:.0f} MiB"
        return f"{self.total / 2**30:.2f} GiB"


def saved_bytes(net: Network, shape: tuple[int, int, int], batch: int) -> int:
    """Bytes autograd saves for one SGD step on `batch` images, its graph kept."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    gen, device = torch.Generator().manual_seed(0), net.device
    params = [p.to(device).requires_grad_() for p in net.spec.init_params(gen)]
    x = torch.randn(batch, *shape, generator=gen).to(device).requires_grad_()
    y = torch.zeros(batch, dtype=torch.int64, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(net.forward(params, x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        sum((g * g).sum() for g in grads)  # the step's use of its gradient downstream
    return sum(seen.values())


def estimate(cfg: DistillConfig, net: Network, shape: tuple[int, int, int], num_images: int,
             workers: int = 1) -> Footprint:
    """One iteration's peak on one worker of `workers`, for a set of `num_images`."""
    one, two = (saved_bytes(net, shape, b) for b in (1, 2))
    per_image, per_step = two - one, max(2 * one - two, 0)
    params = 4 * net.spec.num_params
    rows = math.ceil((cfg.batch_syn or num_images) / workers)
    step = per_step + rows * per_image
    n = cfg.syn_steps
    if cfg.grad_mode == "unroll":
        graphs = n * step
    elif cfg.grad_mode == "checkpoint":
        segments = min(n, cfg.checkpoint_segments or n)
        graphs = math.ceil(n / segments) * step + segments * params
    else:
        graphs = step
    backward = step  # a step's backward pass holds temporaries of about its graph's size
    images = 3 * num_images * 4 * math.prod(shape)
    return Footprint(per_image, per_step, params, graphs + backward + images + 2 * params)
