"""CUDA checks (`pytest -m gpu`), skipped without a GPU; `python -m bench.gpu` runs them on a
lent device. Every gradient mode on CUDA, with the hand-written and the builtin kernels,
against the CPU float64 reference; the bf16 path; DSA applied on the device against the CPU.
"""

from __future__ import annotations

import pytest
import torch

from mct_ray.augment import Augmenter
from mct_ray.config import AugmentConfig, DistillConfig
from mct_ray.distill import GRAD_MODES, Segment, Student, plan_unroll
from mct_ray.nets import NetSpec, Network

pytestmark = [pytest.mark.core, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

SPEC = NetSpec("convnet", channels=3, resolution=32, num_classes=10, width=32, depth=3,
               norm="instancenorm")


def problem(dtype, device):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(20, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels = torch.arange(20) % 10
    start = SPEC.init_params(gen)
    target = [p + 0.01 * torch.randn(p.shape, generator=gen) for p in start]
    aug = Augmenter(AugmentConfig())
    plans = plan_unroll(20, 10, 6, 32, aug, gen)
    move = lambda ts: [t.to(device, dtype) for t in ts]  # noqa: E731
    seg = Segment(0, 0.0, 1.0, move(start), move(target))
    return images.to(device, dtype), labels.to(device), seg, aug, plans


def grads(mode, device, dtype, kernels="fast", autocast="none"):
    images, labels, seg, aug, plans = problem(dtype, device)
    x = images.clone().requires_grad_()
    lr = torch.tensor(0.01, dtype=dtype, device=device, requires_grad=True)
    student = Student(Network(SPEC, kernels=kernels), labels, aug, autocast)
    loss = GRAD_MODES[mode](student, x, lr, seg, plans, DistillConfig())
    return float(loss), x.grad.double().cpu(), float(lr.grad)


@pytest.mark.parametrize("kernels", ["fast", "builtin", "generic"])
@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_every_mode_on_cuda_matches_the_cpu_float64_reference(mode, kernels):
    ref_loss, ref_x, ref_lr = grads(mode, "cpu", torch.float64)
    loss, gx, glr = grads(mode, "cuda", torch.float64, kernels)
    assert loss == pytest.approx(ref_loss, rel=1e-9)
    torch.testing.assert_close(gx, ref_x, rtol=1e-7, atol=1e-10)
    assert glr == pytest.approx(ref_lr, rel=1e-7, abs=1e-12)
    loss32, gx32, _ = grads(mode, "cuda", torch.float32, kernels)  # float32: close
    cos = torch.nn.functional.cosine_similarity(gx32.flatten(), ref_x.flatten(), dim=0)
    assert loss32 == pytest.approx(ref_loss, rel=1e-3) and float(cos) > 0.999


def test_bf16_autocast_on_cuda_is_close_to_float32():
    _, g32, _ = grads("checkpoint", "cuda", torch.float32)
    _, g16, _ = grads("checkpoint", "cuda", torch.float32, autocast="bf16")
    cos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
    assert 0.97 < float(cos) <= 1.0


def test_dsa_on_the_device_equals_the_cpu():
    aug = Augmenter(AugmentConfig())
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plan = aug.sample(64, 32, torch.Generator().manual_seed(2))
    torch.testing.assert_close(aug.apply(x.cuda(), plan).cpu(), aug.apply(x, plan),
                               rtol=1e-5, atol=1e-5)


def test_data_lives_on_the_device_and_experts_train_there():
    from mct_ray.config import load_config
    from mct_ray.context import Context
    from mct_ray.experts import train_expert

    cfg = load_config("digits", ["expert.epochs=2", "net.width=16", "run.device=cuda"])
    ctx = Context.build(cfg)
    assert ctx.data.train_x.is_cuda and ctx.net.kernels == "builtin"
    result = train_expert(ctx.net, ctx.data, cfg.expert, ctx.aug, 0, 0)
    assert result.test_acc > 0.5
