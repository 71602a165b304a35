"""Conv, instance norm and 2x2 average pooling with hand-written derivatives: the fast
ConvNet's ops (nets.py). Each equals its PyTorch builtin (tested) and is faster to
differentiate twice on a CPU (bench/NOTES.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Distillation differentiates the student's gradient (double backward). These ops compute
# the same bits whether or not autograd records a graph (the first backward is one Function
# either way), so a step replayed with create_graph=True equals the step computed without.
# Conv and norm call the same native kernels as F.conv2d / F.group_norm in the forward pass
# and the first backward; the backward of the backward is ours, for speed (bench/NOTES.md):
#   group norm: autograd's infinitely differentiable composite writes ~15 full-size
#     temporaries per call; ours needs 4 and three per-plane reductions.
#   conv: autograd computes d(grad_weight)/d(input) as a convolution with batch and channels
#     swapped, ~3x slower than the native weight-gradient kernel that we call instead; the
#     gradient w.r.t. a few-channel input (the images) is one GEMM and a col2im.
#   pool: two strided adds forward, its adjoint backward (no zero fill).

EPS = 1e-5


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int = 1
            ) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=padding)."""
    low = _autocast_dtype(x)
    if low is None:
        return _Conv3x3.apply(x, weight, bias, padding)
    # Under autocast, cast outside the Function so that the casts are on the graph (the
    # double backward must reach x and weight), then run at that precision.
    with torch.autocast(x.device.type, enabled=False):
        return _Conv3x3.apply(x.to(low), weight.to(low), bias.to(low), padding)


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.group_norm(x, channels, weight, bias, eps=1e-5): each (sample, channel) plane."""
    if _autocast_dtype(x) is None:
        return _InstanceNorm.apply(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):  # normalisation stays in float32
        return _InstanceNorm.apply(x.float(), weight.float(), bias.float())


def avg_pool2(x: torch.Tensor) -> torch.Tensor:
    """F.avg_pool2d(x, 2): the mean of each 2x2 block (odd sizes drop the last row/column)."""
    return _AvgPool2.apply(x)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _engine_uses(t: torch.Tensor) -> bool:
    """Whether the backward pass running now propagates a gradient into t."""
    try:
        node = torch.autograd.graph.get_gradient_edge(t).node
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # private API gone or no pass running: be safe
        return True


def _conv_backward(grad_out, x, weight, mask, pad):
    # (grad wrt x of conv(x, weight), grad wrt weight, grad wrt bias), each where mask says.
    grad_x = None
    if mask[0] and x.shape[1] <= _FEW_CHANNELS:
        grad_x, mask = _conv_grad_input_gemm(grad_out, weight, x.shape, pad), (False, *mask[1:])
    grads = torch.ops.aten.convolution_backward(
        grad_out, x, weight, [weight.shape[0]], [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
        list(mask))
    return (grads[0] if grad_x is None else grad_x, grads[1], grads[2])


# The gradient w.r.t. an input of few channels (the images) as one GEMM and a col2im: on
# CPU, oneDNN's kernel for 128 -> 3 channels runs at a quarter of the GEMM's speed.
_FEW_CHANNELS = 4


def _conv_grad_input_gemm(grad_out, weight, x_shape, pad):
    n, c_out, h, w = grad_out.shape
    cols = torch.matmul(weight.reshape(c_out, -1).t(), grad_out.reshape(n, c_out, h * w))
    return F.fold(cols, tuple(x_shape[-2:]), 3, padding=pad)  # (N, C_in, H, W)


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pad):
        ctx.save_for_backward(x, weight)
        ctx.pad = pad
        return F.conv2d(x, weight, bias, padding=pad)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # The student's inner gradient is w.r.t. the parameters only: the first layer's
        # input (the images) requires grad for the outer pass, not for this one.
        need_x = need_x and _engine_uses(x)
        return (*_Conv3x3Backward.apply(grad_out, x, weight, (need_x, need_w, need_b), ctx.pad),
                None)


class _Conv3x3Backward(torch.autograd.Function):
    """(gy, x, W) -> (gx, gW, gb); linear in gy, and in x and W separately."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, mask, pad):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_out, x, weight)
        ctx.pad = pad
        return _conv_backward(grad_out, x, weight, mask, pad)

    @staticmethod
    def backward(ctx, g_gx, g_gw, g_gb):
        # S = <g_gx, gx> + <g_gw, gW> + <g_gb, gb> with gx = conv^T(gy, W), gW = corr(x, gy),
        # gb = sum(gy):  dS/dgy = conv(g_gx, W) + conv(x, g_gw) + g_gb,
        #                dS/dW = corr(g_gx, gy),  dS/dx = conv^T(gy, g_gw).
        grad_out, x, weight = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        pad = ctx.pad
        d_gy = d_x = d_w = None
        if need_gy:
            if g_gw is not None or g_gb is not None:
                d_gy = F.conv2d(x, torch.zeros_like(weight) if g_gw is None else g_gw, g_gb,
                                padding=pad)
            if g_gx is not None:
                term = F.conv2d(g_gx, weight, padding=pad)
                d_gy = term if d_gy is None else d_gy.add_(term)
        mask = (need_x and g_gw is not None, need_w and g_gx is not None, False)
        if any(mask):
            d_x, d_w, _ = _conv_backward(grad_out, x if g_gx is None else g_gx,
                                         weight if g_gw is None else g_gw, mask, pad)
        return d_gy, d_x, d_w, None, None


def _pool2(x: torch.Tensor) -> torch.Tensor:
    # Two strided adds: 4x faster on CPU than F.avg_pool2d's kernel (bench/NOTES.md).
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    rows = x[..., 0:2 * h:2, :2 * w] + x[..., 1:2 * h:2, :2 * w]  # (N, C, h, 2w)
    return (rows[..., 0::2] + rows[..., 1::2]).mul_(0.25)


def _unpool2(g: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # The adjoint of _pool2: each value / 4 into its 2x2 block, zeros where it dropped.
    n, c, h, w = g.shape
    up = (g * 0.25).repeat_interleave(2, dim=3)  # (N, C, h, 2w)
    up = up[:, :, :, None, :].expand(n, c, h, 2, 2 * w).reshape(n, c, 2 * h, 2 * w)
    if tuple(size) != (2 * h, 2 * w):
        up = F.pad(up, (0, size[1] - 2 * w, 0, size[0] - 2 * h))
    return up


class _AvgPool2(torch.autograd.Function):
    """Linear, so its backward is its adjoint _Unpool2 and vice versa, to any order."""

    @staticmethod
    def forward(ctx, x):
        ctx.size = tuple(x.shape[-2:])
        return _pool2(x)

    @staticmethod
    def backward(ctx, grad_out):
        return _Unpool2.apply(grad_out, ctx.size)


class _Unpool2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, size):
        return _unpool2(g, size)

    @staticmethod
    def backward(ctx, grad_out):
        return _AvgPool2.apply(grad_out), None


class _InstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        n, c, h, w = x.shape
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, h * w, c, EPS)
        ctx.save_for_backward(x, weight, mean, rstd)  # mean, rstd: (N, C)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, rstd = ctx.saved_tensors
        return _InstanceNormBackward.apply(grad_out, x, weight, mean, rstd)


class _InstanceNormBackward(torch.autograd.Function):
    """(gy, x, w) -> (gx, gw, gb). Per plane, with xh = (x - mean) * rstd, a = mean(gy),
    c = mean(gy xh):  gx = w rstd (gy - a - xh c),  gw = sum_n M c,  gb = sum_n M a."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, mean, rstd):
        n, c, h, w = x.shape
        ctx.save_for_backward(grad_out, x, weight, mean, rstd)
        return tuple(torch.ops.aten.native_group_norm_backward(
            grad_out, x, mean, rstd, weight, n, c, h * w, c, [True, True, True]))

    @staticmethod
    def backward(ctx, g_gx, g_gw, g_gb):
        gy, x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        mean, rstd = mean.view(n, c, 1, 1), rstd.view(n, c, 1, 1)
        wr = rstd * weight[:, None, None]
        xh = (x - mean).mul_(rstd)
        scratch = torch.empty_like(x)

        def plane_mean(u, v):  # (N, C, 1, 1): mean of u * v over each plane
            return torch.mul(u, v, out=scratch).mean((2, 3), keepdim=True)

        a, c_ = gy.mean((2, 3), keepdim=True), plane_mean(gy, xh)
        s_g = g_gx.mean((2, 3), keepdim=True)
        s_gxh, s_gy = plane_mean(g_gx, xh), plane_mean(g_gx, gy)
        del scratch
        # S = <g_gx, gx> + <g_gw, gw> + <g_gb, gb>; d/dgy, d/dw directly; d/dx through xh
        # and rstd: dS/dx = rstd (G - mean(G) - xh (mean(G xh) + mean(g_gx gx))), where
        # G = dS/dxh at fixed rstd = gy alpha - g_gx w rstd c.
        alpha = g_gw[:, None, None] - wr * s_gxh
        inner = s_gy - a * s_g - c_ * s_gxh  # mean(g_gx (gy - a - xh c)) per plane
        d_w = (rstd * inner).sum((0, 2, 3)) * (h * w)
        wrc = wr * c_
        mean_g = a * alpha - s_g * wrc
        mean_g_xh = c_ * alpha - s_gxh * wrc
        d_x = torch.mul(gy, rstd * alpha)
        d_x.addcmul_(g_gx, -rstd * wrc).addcmul_(xh, -rstd * (mean_g_xh + wr * inner))
        d_x.sub_(rstd * mean_g)
        d_gy = xh.mul_(alpha).addcmul_(g_gx, wr).add_(g_gb[:, None, None] - wr * s_g)
        return d_gy, d_x, d_w, None, None
