"""The distillation's memory estimate (footprint.estimate) against the peak of tensor bytes
that torch.profiler records during a real iteration of the Distiller, in every mode."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mct_ray.augment import Augmenter
from mct_ray.config import AugmentConfig, DistillConfig, NetConfig
from mct_ray.distill import Distiller
from mct_ray.footprint import estimate
from mct_ray.nets import Network, make_spec
from mct_ray.trajectory import ConvexTrajectory, beta_from_step_norms

pytestmark = pytest.mark.core


def peak_tensor_bytes(fn, tmp_path) -> int:
    """The most bytes held by tensors allocated while `fn` runs (torch.profiler's trace)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


@pytest.mark.parametrize("mode,shape,depth,ipc,steps,batch", [
    ("unroll", (3, 32, 32), 3, 2, 6, 0), ("checkpoint", (3, 32, 32), 3, 2, 6, 0),
    ("tesla", (3, 32, 32), 3, 2, 6, 0), ("unroll", (1, 28, 28), 3, 5, 8, 20),
    ("checkpoint", (3, 64, 64), 4, 1, 4, 0)])
def test_the_estimate_is_within_a_third_of_the_measured_peak(tmp_path, mode, shape, depth,
                                                              ipc, steps, batch):
    spec = make_spec(NetConfig(width=32, depth=depth), shape, 10)
    gen = torch.Generator().manual_seed(0)
    start = torch.cat([p.flatten() for p in spec.init_params(gen)])
    end = start + 0.01 * torch.randn(start.shape, generator=gen)
    beta = beta_from_step_norms(torch.rand(4, len(spec.param_shapes()), generator=gen))
    cfg = DistillConfig(grad_mode=mode, syn_steps=steps, batch_syn=batch, expert_epochs=2,
                        max_start_epoch=2)
    distiller = Distiller(Network(spec), [ConvexTrajectory(spec, (0, 4), torch.stack([start, end]),
                                                  beta)],
                          torch.randn(10 * ipc, *shape, generator=gen),
                          torch.arange(10).repeat_interleave(ipc), cfg,
                          Augmenter(AugmentConfig()), seed=0)
    distiller.step()  # optimiser states exist before the measured iteration, as in a run
    measured = peak_tensor_bytes(distiller.step, tmp_path)
    estimated = estimate(cfg, Network(spec), shape, 10 * ipc).total
    assert 0.9 <= estimated / measured <= 1.35, (estimated, measured)


def test_workers_share_the_rows_of_each_step():
    spec = make_spec(NetConfig(width=16, depth=2), (3, 16, 16), 10)
    cfg = DistillConfig(grad_mode="unroll", syn_steps=10)
    one, two = (estimate(cfg, Network(spec), (3, 16, 16), 100, w) for w in (1, 2))
    rows = 11 * 50 * one.graph_per_image  # (N + the backward's step) x the rows moved
    assert one.total - two.total == rows
    assert one.graph_per_image > 0 and one.params == 4 * spec.num_params
