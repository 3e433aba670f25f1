"""``batch_renorm``: batch renormalization (see :mod:`normlab.reference.batch_renorm`).

Computed as torch's native batch norm without affine (one kernel gives ``xhat`` with the exact
backward through the batch statistics, the batch mean and ``1/sigma_B``, and the running
update), then ``y = xhat * (gamma r) + (gamma d + beta)`` with ``r`` and ``d`` computed without
gradient from the batch statistics and the running statistics before the update."""
from __future__ import annotations

from typing import Optional

import torch

from normlab import _checks
from normlab.functional._core import HALF, acc_dtype, check_channel_input
from normlab.functional.batch_norm import batch_norm


def batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    rmax: float = 3.0,
    dmax: float = 5.0,
) -> torch.Tensor:
    """Batch renormalization of an (N, C, *) input; ``rmax=1, dmax=0`` is batch norm exactly.

    Evaluation is batch norm with the running statistics. The running statistics are
    required (r and d compare the batch with them) and are updated as batch norm does.
    """
    op = "batch_renorm"
    if running_mean is None or running_var is None:
        raise ValueError(f"{op} needs running_mean and running_var (r and d compare the batch with them), got None")
    if rmax < 1 or dmax < 0:
        raise ValueError(f"{op}: rmax must be >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    c = check_channel_input(input, op, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    dims = (0,) + tuple(range(2, input.dim()))
    _checks.check_enough_values(input.shape, dims, op)
    if input.dtype in HALF and not input.is_cuda:  # float32 compute, running buffers written back
        f32 = lambda t: None if t is None else t.float()  # noqa: E731
        rm, rv = running_mean.float(), running_var.float()
        y = batch_renorm(input.float(), rm, rv, f32(weight), f32(bias), True, momentum, eps, rmax, dmax)
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
        return y.to(input.dtype)
    acc = acc_dtype(input.dtype)
    with torch.no_grad():  # r and d compare with the running statistics *before* this step's update
        mu_old = running_mean.to(acc, copy=True)
        sigma = (running_var.to(acc) + eps).sqrt_()
    # native batch norm without affine: xhat (differentiable through the batch statistics),
    # the batch mean and 1/sigma_B (not differentiable), and the running update, in one kernel
    xhat, mean, invstd = torch.native_batch_norm(input, None, None, running_mean, running_var, True, momentum, eps)
    with torch.no_grad():
        r = (invstd.reciprocal() / sigma).clamp_(1.0 / rmax, rmax)
        d = ((mean - mu_old) / sigma).clamp_(-dmax, dmax)
    scale = r if weight is None else weight.to(acc) * r
    shift = d if weight is None else weight.to(acc) * d
    if bias is not None:
        shift = shift + bias.to(acc)
    view = (1, c) + (1,) * (input.dim() - 2)
    return torch.addcmul(shift.view(view).to(xhat.dtype), xhat, scale.view(view).to(xhat.dtype))
