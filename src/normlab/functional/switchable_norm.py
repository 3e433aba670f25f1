"""``switchable_norm``: a learned softmax mix of instance, layer and batch statistics
(see :mod:`normlab.reference.switchable_norm` for the math and the two deliberate differences
from the official code).

Every statistic derives from the instance statistics (per sample and channel), so the only
work on full-size tensors is: the instance moments, one normalization pass, and in backward
two row reductions and two passes for ``dx``. The mixing happens on (N, C) tensors with
autograd, inside the custom backward (``torch.autograd.grad`` on that small graph).
"""
from __future__ import annotations

from typing import Optional

import torch

from normlab import _checks
from normlab.functional._core import (acc_dtype, check_channel_input, finite_or_zero, first_order_only,
                                     memory_format_of, outside_autocast, untraced, update_running_)


def _mix(mu_in, var_in, mean_weight, var_weight, running_mean, running_var, use_batch: bool, has_spatial: bool,
         ln_shift):
    """Mixed (mean, var) of shape (N, C) from the instance statistics, plus the BN branch's
    batch statistics (for the running update). Layer and batch statistics follow from the
    instance ones by the law of total variance (stable for large means).

    Means come relative to a per-channel pivot (``mu_in`` is the instance mean less its
    channel's pivot): the layer branch's mean, over channels, is then the mean of those plus
    ``ln_shift`` (1, C), the pivots' mean less each channel's pivot."""
    mu_ln = mu_in.mean(dim=1, keepdim=True) + ln_shift  # (N, C): each sample's one mean, in each channel's frame
    var_ln = (var_in + (mu_in - mu_ln).square()).mean(dim=1, keepdim=True)
    if use_batch:
        mu_bn = mu_in.mean(dim=0, keepdim=True)
        var_bn = (var_in + (mu_in - mu_bn).square()).mean(dim=0, keepdim=True)
    else:
        # the running mean relative to the pivot: (1, C)
        mu_bn = running_mean.to(mu_in.dtype).reshape(-1, mu_in.shape[1])
        var_bn = running_var.to(mu_in.dtype).view(1, -1)
    mw, vw = mean_weight.to(mu_in.dtype), var_weight.to(mu_in.dtype)
    if not has_spatial:  # no instance statistics without spatial positions
        off = torch.tensor([float("-inf"), 0.0, 0.0], dtype=mu_in.dtype, device=mu_in.device)
        mw, vw = mw + off, vw + off
    wm, wv = torch.softmax(mw, 0), torch.softmax(vw, 0)
    mean = wm[0] * mu_in + wm[1] * mu_ln + wm[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    return mean, var, mu_bn, var_bn


class _SwitchableNorm(torch.autograd.Function):
    @staticmethod
    @outside_autocast
    def forward(ctx, x, weight, bias, mean_weight, var_weight, running_mean, running_var, use_batch, training,
                momentum, eps):
        n, c = x.shape[:2]
        acc = acc_dtype(x.dtype)
        x2 = x.reshape(n * c, -1).to(acc)
        s = x2.shape[1]
        mu_in = x2.mean(dim=1, keepdim=True)
        d = x2 - mu_in  # centred rows, kept for backward (not x: so no double backward)
        # Corrected two-pass (as the NumPy reference's core): the float32 sum behind mu_in rounds
        # at a large mean, so d's rows do not sum to 0; every output shifted by that times rstd, and
        # backward's sum(dy * d) took mean(dy) times it (0.75 off at dy ~ 1000 + randn). The rows'
        # own mean r (a sum of small numbers) recovers it; d stays as it is (no pass to rewrite it):
        # x - mu_in is d - r, and r goes into the per-row terms below.
        r = d.mean(dim=1, keepdim=True)
        mu_in = mu_in + r
        var_in = (torch.linalg.vecdot(d, d, dim=1).unsqueeze(1) / s - r * r).clamp_min(0)
        # Mix means relative to a pivot per channel (the output does not depend on it): mixing
        # values near 1000 in float32 rounds them by ~1e-4, which rstd magnifies where a variance
        # is ~0 (half inputs rounded to a few distinct values); and one pivot for every channel
        # left a channel near 0.01 beside one at 10000 with 5e-4 of precision (and one NaN made
        # every channel's running statistics NaN). The pivot is the channel's batch mean, or in
        # evaluation its running mean: a constant, so no sample's values, however large, change
        # another's output. A non-finite pivot is taken as 0.
        with torch.no_grad():
            pivot = mu_in.view(n, c).mean(dim=0, keepdim=True) if use_batch else running_mean.to(acc).view(1, c)
            pivot = finite_or_zero(pivot)
            ln_shift = pivot.mean() - pivot
        mu_rel = mu_in.view(n, c) - pivot
        rm_rel = None if running_mean is None else running_mean.to(acc).view(1, c) - pivot
        # the small (N, C) mix: computed here without a graph, and again with one in backward
        # (a graph built here would save its tensors through whatever saved-tensor hooks are
        # active, e.g. a non-reentrant checkpoint's, whose unpacking reruns this forward). The
        # logits are copied: an optimizer step between this forward and its backward (retained
        # graph) must not change the mix the backward differentiates.
        small = (mu_rel, var_in.view(n, c), mean_weight.detach().clone(), var_weight.detach().clone(), rm_rel,
                 None if use_batch else running_var.detach().clone(), use_batch, s > 1 or x.dim() > 2, ln_shift)
        mean, var, mu_bn, var_bn = _mix(*small)
        if training and running_mean is not None:
            with untraced():
                update_running_(running_mean, running_var, mu_bn.detach() + pivot, var_bn.detach(), n * s, momentum)
        rstd = (var + eps).rsqrt()
        scale = rstd if weight is None else rstd * weight.to(acc)
        shift = mu_rel - mean - r.view(n, c)  # x - mean = (d - r) + (mu_in - mean): y = d * scale + offset + bias
        offset = shift * scale
        if bias is not None:
            offset = offset + bias.to(acc)
        y = torch.addcmul(offset.reshape(-1, 1), d, scale.reshape(-1, 1))
        ctx.save_for_backward(d, weight)
        ctx.small = (small, mean, rstd, scale, shift, r)
        fmt = memory_format_of(x)  # channels_last in, channels_last out (as BatchNorm2d)
        ctx.meta = (x.shape, x.dtype, fmt, None if bias is None else bias.dtype)
        return y.view(x.shape).to(x.dtype, memory_format=fmt)

    @staticmethod
    @first_order_only("SwitchableNorm")
    @outside_autocast
    def backward(ctx, dy):
        d, weight = ctx.saved_tensors
        small, mean, rstd, scale, shift, r = ctx.small
        shape, dtype, fmt, bias_dtype = ctx.meta
        n, c = shape[:2]
        s = d.shape[1]
        dy2 = dy.reshape(n * c, -1).to(d.dtype)
        s_dy = dy2.sum(dim=1).view(n, c)
        # sum over a row of dy * (x - mean) = sum(dy * d) + (mu_in - mean - r) * sum(dy)  (see forward)
        s_dyc = torch.linalg.vecdot(dy2, d, dim=1).view(n, c) + shift * s_dy
        dmean = -scale * s_dy
        dvar = -0.5 * (scale * rstd) * (rstd * s_dyc)  # not rstd^3 first: it overflows (tiny eps) or underflows
        with torch.enable_grad():  # the small (N, C) graph of the mix, rebuilt from what forward kept
            leaves = [t.detach().requires_grad_() for t in small[:4]]
            mix_mean, mix_var, _, _ = _mix(*leaves, *small[4:])
        grads = torch.autograd.grad((mix_mean, mix_var), leaves, (dmean, dvar), allow_unused=True)
        dmu_in, dvar_in, dmw, dvw = (torch.zeros_like(l) if g is None else g for g, l in zip(grads, leaves))
        # dx = dy * scale + d(mu_in)/s + 2 d(var_in) (x - mu_in)/s, with x - mu_in = d - r
        dx = torch.addcmul((dmu_in / s).reshape(-1, 1) - (2.0 / s * dvar_in).reshape(-1, 1) * r, d,
                           (2.0 / s * dvar_in).reshape(-1, 1))
        dx.addcmul_(dy2, scale.reshape(-1, 1))
        dweight = dbias = None
        if weight is not None:
            dweight = (rstd * s_dyc).sum(dim=0).to(weight.dtype)
        if bias_dtype is not None:  # a bias without a weight (the functional form allows it) learns too
            dbias = s_dy.sum(dim=0).to(bias_dtype)
        return (dx.view(shape).to(dtype, memory_format=fmt), dweight, dbias, dmw, dvw) + (None,) * 6


def switchable_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean_weight: torch.Tensor,
    var_weight: torch.Tensor,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Switchable normalization of an (N, C) or (N, C, *spatial) input.

    ``mean_weight``/``var_weight`` hold the three logits (IN, LN, BN) of each softmax mix. The
    BN branch uses batch statistics in training (updating the running ones) and the running
    statistics in evaluation; for (N, C) input the IN branch is left out.
    """
    op = "switchable_norm"
    check_channel_input(input, op, (2, 3, 4, 5), "(N, C, *spatial)", running_mean=running_mean,
                        running_var=running_var, weight=weight, bias=bias)
    _checks.check_mix_logits(op, mean_weight=mean_weight, var_weight=var_weight)
    _checks.check_running_args(running_mean, running_var, momentum, training, op)
    use_batch = training or running_mean is None
    if use_batch:
        _checks.check_training_eps(eps, op)  # as batch norm: a constant input would give 0/0
        _checks.check_enough_values(input.shape, (0,) + tuple(range(2, input.dim())), op, allow_empty=True,
                                    running_stats=running_mean is not None)
    if input.numel() == 0:
        # nothing to normalize (an empty batch, or no positions): as torch's batch norm, an empty
        # output whose gradients are zeros, the running statistics left as they are
        y = input * 0
        for p in (weight, bias, mean_weight, var_weight):
            if p is not None:
                y = y + p.sum().to(input.dtype) * 0
        return y
    return _SwitchableNorm.apply(input, weight, bias, mean_weight, var_weight, running_mean, running_var, use_batch,
                                 training, momentum, eps)
