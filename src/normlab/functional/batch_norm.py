"""``batch_norm`` with torch's signature: input checks, then torch's native kernel, a Triton
kernel on a GPU, or float32 compute for half inputs on the CPU (whose native kernel loses
accuracy when the mean is large against the spread)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from normlab import _checks
from normlab.functional._core import as_float32, check_channel_input, cpu_half, kernels, pivot_of, pivoted, use_kernel


def _check_batch_norm(input, running_mean, running_var, weight, bias, training, eps, op):
    check_channel_input(input, op, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if training:  # torch's rules, also for the kernels
        _checks.check_training_eps(eps, op)
        # an empty batch passes (empty output), one value per channel does not
        _checks.check_enough_values(input.shape, (0,) + tuple(range(2, input.dim())), op, allow_empty=True,
                                    running_stats=running_mean is not None)


def batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalization, exactly ``torch.nn.functional.batch_norm`` (see :mod:`normlab.reference.batch_norm`).

    Training normalizes with the batch's biased variance and, when running buffers are given,
    updates them in place with ``momentum`` and the unbiased variance; evaluation normalizes
    with the running buffers.
    """
    _check_batch_norm(input, running_mean, running_var, weight, bias, training, eps, "batch_norm")
    if use_kernel("batch_norm", input, running_mean, running_var, weight, bias, training, momentum):
        return kernels().unchecked.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if cpu_half(input):
        return _upcast(F.batch_norm, input, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _upcast(fn, input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
    """Run ``fn`` (batch_norm or instance_norm) in float32 on the input less a per-group pivot
    (see :func:`~normlab.functional._core.pivoted`) and write the running buffers back.

    With batch statistics the pivot is each group's mean (per channel; per sample and channel
    for instance norm), and the running mean is passed less what the batch's mean moves by and
    gets it back after the update; in evaluation the pivot is the running mean itself, passed
    as 0. The buffers ``fn`` gets are fresh float32 copies, never the caller's (``F.batch_norm``
    keeps them for its backward, so they must not change in place after it)."""
    x = input.float()
    rm = None if running_mean is None else running_mean.float().clone()
    rv = None if running_var is None else running_var.float().clone()
    shift = None
    if use_input_stats:
        spatial = tuple(range(2, x.dim()))
        pivot = pivot_of(x, spatial if fn is F.instance_norm else (0,) + spatial)
        if pivot is not None and rm is not None:
            shift = pivot.mean(dim=0).reshape(rm.shape)  # what the running mean's new term moves by
            rm -= shift
    else:
        pivot = None if rm is None else rm.reshape((1, -1) + (1,) * (x.dim() - 2))
        rm = None if rm is None else torch.zeros_like(rm)
    out = fn(pivoted(x, pivot), rm, rv, as_float32(weight), as_float32(bias), use_input_stats, momentum, eps)
    if use_input_stats:
        with torch.no_grad():
            if running_mean is not None:
                running_mean.copy_(rm if shift is None else rm + shift)
            if running_var is not None:
                running_var.copy_(rv)
    return out.to(input.dtype)
