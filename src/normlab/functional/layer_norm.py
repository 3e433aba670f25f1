"""``layer_norm`` with torch's signature (see :mod:`normlab.reference.layer_norm`)."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from normlab import _checks
from normlab.functional._core import kernels, use_kernel


def _shape_tuple(normalized_shape) -> tuple:
    """``normalized_shape`` as a tuple of ints: an int (any integral type, e.g. np.int64) or a sequence."""
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


def check_trailing(input, normalized_shape, weight, op, params=("weight", "bias"), bias=None) -> tuple:
    _checks.check_floating(input, op, "tensor")
    ns = _checks.check_normalized_shape(input.shape, _shape_tuple(normalized_shape), op)
    for p, name in ((weight, params[0]), (bias, params[1] if len(params) > 1 else None)):
        if p is not None and tuple(p.shape) != ns:
            raise ValueError(f"{op}: {name} must have shape normalized_shape={_checks.shape_str(ns)}, got {_checks.shape_str(p.shape)}")
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
    if use_kernel("layer_norm", input, ns, weight, bias):
        return kernels().layer_norm(input, ns, weight, bias, eps)
    return F.layer_norm(input, ns, weight, bias, eps)
