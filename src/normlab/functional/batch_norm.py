"""``batch_norm`` with torch's signature: input checks, then torch's native kernel, a Triton
kernel on a GPU, or float32 compute for half inputs on the CPU (whose native kernel loses
accuracy when the mean is large against the spread)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from normlab import _checks
from normlab.functional._core import check_channel_input, cpu_half, kernels, pivot_of, pivoted, use_kernel


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
    if use_kernel("batch_norm", input, running_mean, running_var, weight, bias, training):
        return kernels().batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if cpu_half(input):
        return _upcast(F.batch_norm, input, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _upcast(fn, input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
    """Run ``fn`` (batch_norm or instance_norm) in float32 on the input less a per-group pivot
    (see :func:`~normlab.functional._core.pivoted`) and write the running buffers back.

    With batch statistics the pivot is each group's mean (per channel; per sample and channel
    for instance norm), and the running mean is passed less what the batch's mean moves by and
    gets it back after the update; in evaluation the pivot is the running mean itself."""
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    x = input.float()
    c, view = x.shape[1], (1, x.shape[1]) + (1,) * (x.dim() - 2)
    pivot = shift = None
    if use_input_stats:
        spatial = tuple(range(2, x.dim()))
        pivot = pivot_of(x, spatial if fn is F.instance_norm else (0,) + spatial)
        if pivot is not None and running_mean is not None:
            shift = pivot.mean(dim=0).reshape(c)  # what the running mean's new term moves by
    elif running_mean is not None:
        with torch.no_grad():
            pivot = running_mean.float().reshape(view)
    # fresh float32 buffers (never the caller's, which F.batch_norm may keep for its backward)
    rm = None if running_mean is None else running_mean.float().clone() if shift is None else running_mean.float() - shift
    if not use_input_stats and rm is not None:
        rm = torch.zeros_like(rm)  # evaluation normalizes x - running_mean with a running mean of 0
    rv = None if running_var is None else running_var.float().clone()
    out = fn(pivoted(x, pivot), rm, rv, f32(weight), f32(bias), use_input_stats, momentum, eps)
    if use_input_stats:
        with torch.no_grad():
            if running_mean is not None:
                running_mean.copy_(rm if shift is None else rm + shift)
            if running_var is not None:
                running_var.copy_(rv)
    return out.to(input.dtype)
