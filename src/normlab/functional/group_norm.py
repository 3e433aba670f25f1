"""``group_norm`` with torch's signature (see :mod:`normlab.reference.group_norm`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from normlab import _checks
from normlab.functional._core import (as_float32, autocast_float32, check_channel_input, cpu_half, kernels,
                                     memory_format_of, pivot_of, pivoted, use_kernel)


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Group normalization of an (N, C, *) input, exactly ``torch.nn.functional.group_norm``."""
    op = "group_norm"
    c = check_channel_input(input, op, weight=weight, bias=bias)
    _checks.check_groups(c, num_groups, op)
    # F.group_norm refuses an input that is a single value per group in all ("Expected more than
    # 1 value per channel when training"); normlab refuses one value per group at any batch size
    _checks.check_group_size(input.shape, num_groups, op)
    xk, wk, bk = autocast_float32(input, weight, bias)  # (the kernel's inputs: torch's autocast never sees them)
    if use_kernel("group_norm", xk, num_groups, wk, bk):
        return kernels().unchecked.group_norm(xk, num_groups, wk, bk, eps)
    if (not input.is_cuda and not input.requires_grad and not input.is_contiguous() and torch.is_grad_enabled()
            and any(p is not None and p.requires_grad for p in (weight, bias))):
        # torch's CPU group_norm backward crashes the process (a segfault, torch 2.13) on a
        # channels-last input that needs no gradient when the weight or bias needs one (a
        # GroupNorm first in a model fed a channels-last batch): it runs on a contiguous copy,
        # and the output keeps the input's layout, as torch's does
        fmt = memory_format_of(input)
        return _on_torch(input.contiguous(), num_groups, weight, bias, eps).contiguous(memory_format=fmt)
    return _on_torch(input, num_groups, weight, bias, eps)


def _on_torch(input, num_groups, weight, bias, eps):
    """The torch path of :func:`group_norm`, for a checked call."""
    c = input.shape[1]
    if weight is None and bias is not None and torch.is_grad_enabled() and (input.requires_grad or bias.requires_grad):
        # torch's group_norm backward fails on a bias without a weight ("tensor does not have a
        # device"): a weight of ones gives the same output and the gradients it should
        weight = torch.ones_like(bias)
    if type(input) is not torch.Tensor:  # a tensor subclass sees the call torch's way
        return F.group_norm(input, num_groups, weight, bias, eps)
    if cpu_half(input):
        # torch's CPU kernel keeps the statistics its backward uses in the half dtype (dx and
        # dweight 0.02-0.2 off at mean 1000): float32, less a per-group pivot (see pivoted)
        x = input.float()
        if x.numel():
            x = pivoted(x, pivot_of(x.reshape(x.shape[0], num_groups, -1), 2).reshape(
                (x.shape[0], num_groups) + (1,) * (x.dim() - 2)).repeat_interleave(c // num_groups, dim=1))
        return torch.group_norm(x, num_groups, as_float32(weight), as_float32(bias), eps,
                                torch.backends.cudnn.enabled).to(input.dtype)
    # torch's native op directly: F.group_norm's wrapper repeats the checks above (~10 us a
    # call, a measurable share of a 1 ms CPU kernel)
    return torch.group_norm(input, num_groups, weight, bias, eps, torch.backends.cudnn.enabled)
