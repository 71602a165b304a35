"""Shared fixtures: a tiny digits setup that runs the whole path on CPU in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
torch.set_num_threads(1)

TINY = [
    "net.width=8", "net.depth=1",
    "expert.num_experts=2", "expert.epochs=4", "expert.batch=256",
    "distill.iterations=4", "distill.syn_steps=3", "distill.max_start_epoch=2",
    "distill.expert_epochs=1", "distill.lr_img=10",
    "eval.every=2", "eval.num_eval=1", "eval.epochs=3",
    "run.progress=false",
]


# Each test file declares its tier with `pytestmark` (tests/test_markers.py checks that the
# declaration matches what the file does): exactly one of core, system, ray; slow and gpu
# where they apply. `pytest -m core` and `pytest -m "not slow"` are the fast tiers.
TIERS = {"core": "the pure core: no Ray, no subprocess, no server",
         "system": "subprocesses, servers or Ray's own library, but no Ray cluster",
         "ray": "starts or joins a Ray cluster"}
MARKERS = {**TIERS, "slow": "takes more than ~20 s on 2 cores",
           "gpu": "needs a CUDA device (skipped without one)"}


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


@pytest.fixture(scope="session")
def tiny_cfg():
    from mct_ray.config import load_config

    return load_config("digits", TINY)


@pytest.fixture(scope="session")
def tiny_ctx(tiny_cfg):
    from mct_ray.context import Context

    return Context.build(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_experts(tiny_ctx):
    """Two experts with full trajectories kept (for MTT and for checks against checkpoints)."""
    from mct_ray.experts import train_expert

    cfg = tiny_ctx.cfg.replace(**{"expert.keep_full": True, "expert.anchors": [2]})
    return [train_expert(tiny_ctx.net, tiny_ctx.data, cfg.expert, tiny_ctx.aug, 0, i)
            for i in range(2)]


@pytest.fixture(scope="session")
def ray_cluster():
    """One two-node Ray cluster on loopback for the whole session (2 CPUs per node)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 2, "object_store_memory": 150 * 2**20}
    cluster = Cluster(initialize_head=True,
                      head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
