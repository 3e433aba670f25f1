"""``switchable_norm``: a learned softmax mix of instance, layer and batch statistics
(see :mod:`normlab.reference.switchable_norm` for the math and the two deliberate differences
from the official code)."""
from __future__ import annotations

from typing import Optional

import torch

from normlab import _checks
from normlab.functional._core import HALF, acc_dtype, check_param, per_channel, update_running_


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
    _checks.check_floating(input, op)
    _checks.check_rank(input.shape, (2, 3, 4, 5), op, "(N, C, *spatial)")
    nd, c = input.dim(), input.shape[1]
    for p, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"), (bias, "bias")):
        check_param(p, name, c, op)
    for p, name in ((mean_weight, "mean_weight"), (var_weight, "var_weight")):
        if p.shape != (3,):
            raise ValueError(f"{op}: {name} must hold 3 logits (IN, LN, BN), got shape {tuple(p.shape)}")
    spatial = tuple(range(2, nd))
    use_batch = training or running_mean is None
    if use_batch:
        _checks.check_enough_values(input.shape, (0,) + spatial, op)
    x = input.to(acc_dtype(input.dtype))
    # work on x - pivot (one constant, no gradient; every statistic shifts with it and the output does
    # not depend on it): mixing means of values near 1000 rounds them by ~1e-4, which rstd multiplies
    # when a variance is ~0 (half inputs rounded to a few distinct values)
    pivot = x.detach()[:1].mean().reshape((1,) * nd)
    x = x - pivot
    if spatial:
        var_in, mu_in = torch.var_mean(x, dim=spatial, correction=0, keepdim=True)
    else:
        mu_in, var_in = x, torch.zeros_like(x)
    mu_ln = mu_in.mean(dim=1, keepdim=True)
    var_ln = (var_in + (mu_in - mu_ln).square()).mean(dim=1, keepdim=True)
    if use_batch:
        mu_bn = mu_in.mean(dim=0, keepdim=True)
        var_bn = (var_in + (mu_in - mu_bn).square()).mean(dim=0, keepdim=True)
        if training and running_mean is not None:
            update_running_(running_mean, running_var, (mu_bn + pivot).detach(), var_bn.detach(), input.numel() // c,
                            momentum)
    else:
        mu_bn, var_bn = per_channel(running_mean.to(x.dtype), nd) - pivot, per_channel(running_var.to(x.dtype), nd)
    mw, vw = mean_weight.to(x.dtype), var_weight.to(x.dtype)
    if not spatial:  # no instance statistics without spatial positions
        off = torch.tensor([float("-inf"), 0.0, 0.0], dtype=x.dtype, device=x.device)
        mw, vw = mw + off, vw + off
    wm, wv = torch.softmax(mw, 0), torch.softmax(vw, 0)
    mean = wm[0] * mu_in + wm[1] * mu_ln + wm[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    y = (x - mean) * (var + eps).rsqrt()
    if weight is not None:
        y = y * per_channel(weight.to(x.dtype), nd)
    if bias is not None:
        y = y + per_channel(bias.to(x.dtype), nd)
    return y.to(input.dtype)
