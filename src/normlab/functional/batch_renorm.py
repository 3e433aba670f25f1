"""``batch_renorm``: batch renormalization (see :mod:`normlab.reference.batch_renorm`).

With ``r`` and ``d`` held constant, ``y = gamma (r xhat + d) + beta`` is batch norm with weight
``gamma r`` and bias ``gamma d + beta``: after one statistics pass for ``r`` and ``d`` (no
gradient), a single batch-norm call does the rest, forward, backward and running update."""
from __future__ import annotations

from typing import Optional

import torch

from normlab import _checks
from normlab.functional._core import acc_dtype, check_channel_input, cpu_half
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
    if not isinstance(rmax, torch.Tensor):  # 0-D tensors: nn.BatchRenorm's traced warm-up (checked there)
        _checks.check_renorm_limits(rmax, dmax, op)
    # checked here in evaluation too, so that a wrong input is refused under batch_renorm's name
    c = check_channel_input(input, op, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    dims = (0,) + tuple(range(2, input.dim()))
    _checks.check_enough_values(input.shape, dims, op, allow_empty=True)
    if input.numel() == 0:  # no statistics, so no r and d: batch norm on an empty batch
        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    acc = acc_dtype(input.dtype)
    with torch.no_grad():
        # r and d from the batch statistics (two-pass; no gradient) and the running statistics
        # *before* this step's update
        xa = input.to(acc)
        mean = xa.mean(dim=dims, keepdim=True)
        var = (xa - mean).square_().mean(dim=dims)
        mean = mean.view(c)
        sigma = (running_var.to(acc) + eps).sqrt()
        r = ((var + eps).sqrt_() / sigma).clamp_(1.0 / rmax, rmax)
        d = ((mean - running_mean.to(acc)) / sigma).clamp_(-dmax, dmax)
    # y = gamma (r xhat + d) + beta is batch norm with weight gamma r and bias gamma d + beta, and
    # r, d are constants: one native batch-norm call gives the output, the exact backward through
    # the batch statistics (dx, and dgamma = r sum(dy xhat) + d sum(dy) through autograd) and the
    # running update
    # on the CPU, half input is computed in float32 (batch_norm upcasts it): w and b stay float32
    # there (r and d rounded to float16 moved the output by 1e-3 of its size)
    pdtype = acc if cpu_half(input) or weight is None else weight.dtype
    wa = None if weight is None else weight.to(pdtype)  # one cast: dgamma's two terms add up before rounding
    w = r if weight is None else wa * r.to(pdtype)
    b = d if weight is None else wa * d.to(pdtype)
    if bias is not None:
        b = b + bias.to(pdtype)
    return batch_norm(input, running_mean, running_var, w, b, True, momentum, eps)
