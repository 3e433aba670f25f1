"""SELU and alpha dropout: torch's native implementations, with input checks
(see :mod:`normlab.reference.selu` for the math)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from normlab import _checks


def selu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``lambda * (x if x > 0 else alpha * (exp(x) - 1))``."""
    _checks.check_floating(input, "selu", "tensor")
    return F.selu(input, inplace)


def alpha_dropout(input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False) -> torch.Tensor:
    """Dropout that keeps a SELU network's mean and variance (dropped units become ``-lambda alpha``)."""
    _checks.check_floating(input, "alpha_dropout", "tensor")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"alpha_dropout: p must be a probability in [0, 1], got {p}")
    return F.alpha_dropout(input, p, training, inplace)
