"""One distillation split over a gang of workers (`ray.distill_workers`), data-parallel by
rows of the student's minibatch.

Every worker holds the whole synthetic set and draws the same plan from the same generator
(the same segment, rows and augmentation parameters); worker r takes the r-th contiguous
share of each minibatch's rows. Its loss is its rows' cross-entropy over the whole batch
size, so the inner gradient is the sum over workers (`Shard.sum`), and the parameters stay
the same on every worker.

The backward pass keeps one invariant: the cotangents of the parameters, summed over the
workers, are the one-worker cotangents. The matching loss's cotangent is split evenly
(`Shard.split`); the all-reduce's own backward is an all-reduce, which hands every worker
the whole cotangent of the inner gradient; each worker's images then get the gradient of its
rows, and `Shard.gather_grads` sums the image, step-size and label gradients, so one
identical update follows everywhere. With one worker every method here is the identity: the
single-worker path runs the same operations as before the gang existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Shard":
        """This process's place in the initialised torch.distributed group (alone without)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def alone(self) -> bool:
        return self.world == 1

    def share(self, num: int) -> slice:
        """This worker's rows of a batch of `num`: the r-th of `world` near-equal contiguous
        parts (as torch.tensor_split)."""
        size, extra = divmod(num, self.world)
        start = self.rank * size + min(self.rank, extra)
        return slice(start, start + size + (self.rank < extra))

    def sum(self, tensors: list[torch.Tensor], differentiable: bool) -> list[torch.Tensor]:
        """The sum over workers, one collective for the list; `differentiable`: the
        all-reduce's backward (an all-reduce of the cotangents) is recorded."""
        if self.alone:
            return tensors
        if not differentiable:
            tensors = [t.detach() for t in tensors]
        # each result waits for the collective at its first use
        return funcol.all_reduce_coalesced([t.contiguous() for t in tensors], "sum",
                                           dist.group.WORLD)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """This worker's share of a cotangent every worker holds in whole."""
        return t if self.alone else t / self.world

    def gather_grads(self, leaves: list[torch.Tensor]) -> None:
        """Sum each leaf's .grad over workers in place (a worker that has none adds zeros)."""
        if self.alone:
            return
        for leaf in leaves:
            leaf.grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad.contiguous()
            dist.all_reduce(leaf.grad)

    def broadcast(self, obj):
        """Worker 0's value of `obj` on every worker (a state between the gang's own
        processes, never a file)."""
        if self.alone:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
