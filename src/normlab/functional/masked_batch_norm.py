"""``masked_batch_norm``: batch norm over the valid positions of padded (N, C, L) sequences
(see :mod:`normlab.reference.masked_batch_norm` for the math and the conventions: the mask is
True at valid positions, padded outputs are 0 and get no gradient)."""
from __future__ import annotations

from typing import Optional

import torch

from normlab import _checks
from normlab.functional._core import acc_dtype, check_param, kernels, update_running_, use_kernel
from normlab.functional.batch_norm import batch_norm


class _MaskedBatchNorm(torch.autograd.Function):
    """Forward and the closed-form backward ``dx = rstd (g - mean(g) - xhat mean(g xhat))`` over
    valid positions: three passes instead of autograd's graph of a dozen ops."""

    @staticmethod
    def forward(ctx, x, m, weight, bias, running_mean, running_var, training, momentum, eps, count):
        xa = x.to(acc_dtype(x.dtype))
        if training:
            mean = (xa * m).sum(dim=(0, 2), keepdim=True) / count
            xhat = (xa - mean).mul_(m)
            var = (xhat * xhat).sum(dim=(0, 2), keepdim=True) / count
            rstd = (var + eps).rsqrt_()
            xhat.mul_(rstd)
            if running_mean is not None:
                update_running_(running_mean, running_var, mean, var, count, momentum)
        else:
            rstd = (running_var.to(xa.dtype) + eps).rsqrt_().view(1, -1, 1)
            xhat = (xa - running_mean.to(xa.dtype).view(1, -1, 1)).mul_(rstd).mul_(m)
        y = xhat
        if weight is not None:
            y = xhat * weight.to(xa.dtype).view(1, -1, 1)
        if bias is not None:  # also without a weight, as F.batch_norm (xhat itself is saved: not in place)
            b = bias.to(xa.dtype).view(1, -1, 1)
            y = torch.addcmul(y, b, m) if y is xhat else y.addcmul_(b, m)
        ctx.save_for_backward(xhat, rstd, weight, m)
        ctx.training, ctx.count, ctx.in_dtype = training, count, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype) if y.dtype != x.dtype else (y.clone() if y is xhat else y)

    @staticmethod
    def backward(ctx, dy):
        xhat, rstd, weight, m = ctx.saved_tensors
        dy = dy.to(xhat.dtype) * m
        dweight = dbias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            dbias = dy.sum(dim=(0, 2)).to(ctx.bias_dtype)
        if weight is not None:
            if ctx.needs_input_grad[2]:
                dweight = (dy * xhat).sum(dim=(0, 2)).to(weight.dtype)
            g = dy * weight.to(dy.dtype).view(1, -1, 1)
        else:
            g = dy
        dx = None
        if ctx.needs_input_grad[0]:
            if ctx.training:
                n = ctx.count
                mean_g = g.sum(dim=(0, 2), keepdim=True) / n
                mean_gx = (g * xhat).sum(dim=(0, 2), keepdim=True) / n
                dx = (g - mean_g).sub_(xhat * mean_gx).mul_(rstd).mul_(m)
            else:
                dx = g * rstd
        dx = None if dx is None else dx.to(ctx.in_dtype)
        return dx, None, dweight, dbias, None, None, None, None, None, None


def masked_batch_norm(
    input: torch.Tensor,
    mask: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalization of an (N, C, L) input over the positions where ``mask`` (N, L) is True.

    ``mask=None`` is plain :func:`normlab.functional.batch_norm`. Raises if the mask has the
    wrong shape or dtype, if a sequence (or the whole batch) is all padding, or if training
    sees a single valid position.
    """
    op = "masked_batch_norm"
    _checks.check_floating(input, op)
    _checks.check_rank(input.shape, (3,), op, "(N, C, L)")
    if mask is None:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    _checks.check_mask(input.shape, mask, op)
    c = input.shape[1]
    for p, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"), (bias, "bias")):
        check_param(p, name, c, op)
    valid_per_row = mask.sum(dim=1).tolist()
    _checks.check_no_empty_rows(valid_per_row, op)
    count = int(sum(valid_per_row))
    batch_stats = training or running_mean is None
    if batch_stats and count <= 1:
        raise ValueError(f"{op} in training needs more than 1 valid position per channel, got {count} "
                         f"(input shape {_checks.shape_str(input.shape)})")
    if use_kernel("masked_batch_norm", input, mask, running_mean, running_var, weight, bias, training):
        return kernels().masked_batch_norm(input, mask, running_mean, running_var, weight, bias, training, momentum, eps)
    m = mask.to(acc_dtype(input.dtype)).unsqueeze(1)
    return _MaskedBatchNorm.apply(input, m, weight, bias, running_mean, running_var, batch_stats, momentum, eps, count)
