"""``batch_norm`` with torch's signature: input checks, then torch's native kernel, a Triton
kernel on a GPU, or float32 compute for half inputs on the CPU (whose native kernel loses
accuracy when the mean is large against the spread)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from normlab import _checks
from normlab.functional._core import HALF, check_channel_input, kernels, use_kernel


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
    if input.dtype in HALF and not input.is_cuda:
        return _upcast(F.batch_norm, input, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _upcast(fn, input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
    """Run ``fn`` (batch_norm or instance_norm) in float32 and write the running buffers back."""
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    rm, rv = f32(running_mean), f32(running_var)
    out = fn(input.float(), rm, rv, f32(weight), f32(bias), use_input_stats, momentum, eps)
    with torch.no_grad():
        for buf, new in ((running_mean, rm), (running_var, rv)):
            if buf is not None and new is not buf:
                buf.copy_(new)
    return out.to(input.dtype)
