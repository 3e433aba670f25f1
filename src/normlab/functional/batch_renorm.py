"""``batch_renorm``: batch renormalization (see :mod:`normlab.reference.batch_renorm`).

Computed as native batch norm without affine (its backward treats the batch statistics
exactly), then ``y = xhat * (gamma r) + (gamma d + beta)`` with ``r`` and ``d`` computed
without gradient from the batch and running statistics."""
from __future__ import annotations

from typing import Optional

import torch

from normlab import _checks
from normlab.functional._core import HALF, acc_dtype, check_param, update_running_
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
    _checks.check_floating(input, op)
    if input.dim() < 2:
        raise ValueError(f"{op} expects an input of shape (N, C, *), got a {input.dim()}-D input of shape "
                         f"{_checks.shape_str(input.shape)}")
    c = input.shape[1]
    for p, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"), (bias, "bias")):
        check_param(p, name, c, op)
    dims = (0,) + tuple(range(2, input.dim()))
    _checks.check_enough_values(input.shape, dims, op)
    x = input.float() if input.dtype in HALF and not input.is_cuda else input
    acc = acc_dtype(x.dtype)
    with torch.no_grad():
        var, mean = torch.var_mean(x.to(acc), dim=dims, correction=0)
        sigma = (running_var.to(acc) + eps).sqrt()
        r = ((var + eps).sqrt() / sigma).clamp_(1.0 / rmax, rmax)
        d = ((mean - running_mean.to(acc)) / sigma).clamp_(-dmax, dmax)
        update_running_(running_mean, running_var, mean, var, input.numel() // c, momentum)
    xhat = batch_norm(x, None, None, None, None, True, 0.0, eps)
    scale = r if weight is None else weight.to(acc) * r
    shift = d if weight is None else weight.to(acc) * d
    if bias is not None:
        shift = shift + bias.to(acc)
    view = (1, c) + (1,) * (input.dim() - 2)
    return torch.addcmul(shift.view(view), xhat, scale.view(view).to(xhat.dtype)).to(input.dtype)
