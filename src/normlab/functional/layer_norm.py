"""``layer_norm`` with torch's signature (see :mod:`normlab.reference.layer_norm`)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from normlab import _checks
from normlab.functional._core import as_float32, autocast_float32, cpu_half, kernels, pivot_of, pivoted, use_kernel


def check_trailing(input, normalized_shape, weight, op, params=("weight", "bias"), bias=None) -> tuple:
    _checks.check_floating(input, op, "tensor")
    ns = _checks.check_normalized_shape(input.shape, _checks.as_normalized_shape(normalized_shape, op), op)
    _checks.check_param_shape(ns, op, **{params[0]: weight}, **({params[1]: bias} if len(params) > 1 else {}))
    return ns


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims, exactly ``torch.nn.functional.layer_norm``."""
    ns = check_trailing(input, normalized_shape, weight, "layer_norm", bias=bias)
    xk, wk, bk = autocast_float32(input, weight, bias)  # (the kernel's inputs: torch's autocast never sees them)
    if use_kernel("layer_norm", xk, ns, wk, bk):
        return kernels().unchecked.layer_norm(xk, ns, wk, bk, eps)
    if cpu_half(input):
        # torch's CPU kernel keeps the mean and rstd its backward uses in the half dtype (dx and
        # dweight 0.02-0.2 off at mean 1000): float32, less a per-row pivot (see pivoted)
        x = input.float()
        x = pivoted(x, pivot_of(x, tuple(range(x.dim() - len(ns), x.dim()))))
        return F.layer_norm(x, ns, as_float32(weight), as_float32(bias), eps).to(input.dtype)
    return F.layer_norm(input, ns, weight, bias, eps)
