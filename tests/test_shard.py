"""One distillation split over a gang of workers (distill.Shard) gives the one-worker
result: two gloo processes on this CPU against one process, float64, every gradient mode,
DSA on, hard and learned labels, minibatches smaller than the set, equal to it, and with a
part that leaves a worker no rows."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mct_ray.augment import Augmenter
from mct_ray.config import AugmentConfig, DistillConfig
from mct_ray.distill import Distiller
from mct_ray.nets import NetSpec, Network
from mct_ray.shard import Shard
from mct_ray.trajectory import ConvexTrajectory, beta_from_step_norms

pytestmark = pytest.mark.system

SPEC = NetSpec("convnet", channels=1, resolution=8, num_classes=3, width=4, depth=1,
               norm="instancenorm")
NUM_SYN = 6  # 2 images per class
# (grad_mode, batch_syn, labels): 4 < 6 (parts of 4 and 2), 0 = the whole set, 5 (parts of 5
# and 1: the 1-row part leaves the second worker none).
CASES = [(mode, batch, labels) for mode in ("unroll", "checkpoint", "tesla")
         for batch in (4, 0) for labels in ("hard", "learned")] + [("checkpoint", 5, "hard")]


def build(case, shard: Shard) -> Distiller:
    """A float64 distiller on two random convex trajectories, the same in every process."""
    mode, batch, labels = case
    gen = torch.Generator().manual_seed(0)
    trajectories = []
    for _ in range(2):
        start = torch.cat([p.flatten() for p in SPEC.init_params(gen)]).double()
        anchors = torch.stack([start + s * 0.05 * torch.randn(start.shape, generator=gen,
                                                              dtype=torch.float64)
                               for s in (0, 1, 2)])
        beta = beta_from_step_norms(torch.rand(4, len(SPEC.param_shapes()), generator=gen) + .1)
        trajectories.append(ConvexTrajectory(SPEC, (0, 2, 4), anchors, beta))
    images = torch.randn(NUM_SYN, 1, 8, 8, generator=gen, dtype=torch.float64)
    cfg = DistillConfig(grad_mode=mode, batch_syn=batch, labels=labels, syn_steps=3,
                        expert_epochs=1.5, max_start_epoch=2.5, lr_img=10.0, lr_lr=1e-3,
                        lr_label=5.0)
    return Distiller(Network(SPEC), trajectories, images, torch.tensor([0, 0, 1, 1, 2, 2]), cfg,
                     Augmenter(AugmentConfig(enabled=True, mode="all")), seed=3, shard=shard)


def distil(case, shard: Shard, iterations: int = 2) -> dict[str, torch.Tensor]:
    distiller = build(case, shard)
    distiller.sync()
    for _ in range(iterations):
        distiller.step()
    return {"images": distiller.images.detach().clone(),
            "step_size": distiller.step_size.detach().clone(),
            "labels": distiller.labels.detach().clone()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = [distil(case, Shard.current()) for case in CASES]
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Every case distilled by a gang of two gloo workers; each worker's results."""
    out = str(tmp_path_factory.mktemp("gang") / "results")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2)
    return [torch.load(f"{out}.{rank}") for rank in range(2)]


@pytest.mark.parametrize("index", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_two_workers_give_the_one_worker_synthetic_set(two_workers, index):
    alone = distil(CASES[index], Shard())
    for rank, results in enumerate(two_workers):
        for name, value in alone.items():
            got = results[index][name]
            assert torch.allclose(got, value, rtol=1e-10, atol=1e-12), (rank, name)
    # the workers hold the same bits, not just close ones
    for name in alone:
        assert torch.equal(two_workers[0][index][name], two_workers[1][index][name]), name


def test_the_set_moved():
    """The comparison above is not between two untouched copies of the starting set."""
    start = build(CASES[0], Shard()).images.detach()
    assert not torch.allclose(distil(CASES[0], Shard())["images"], start, atol=1e-3)


def test_shares_cover_the_batch_once():
    for num in range(0, 9):
        for world in (1, 2, 3, 4):
            rows = [r for rank in range(world)
                    for r in range(num)[Shard(rank, world).share(num)]]
            assert rows == list(range(num))
            sizes = [len(range(num)[Shard(rank, world).share(num)]) for rank in range(world)]
            assert max(sizes) - min(sizes) <= 1
