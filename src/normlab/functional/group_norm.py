"""``group_norm`` with torch's signature (see :mod:`normlab.reference.group_norm`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from normlab import _checks
from normlab.functional._core import check_channel_input, kernels, use_kernel


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
    if use_kernel("group_norm", input, num_groups, weight, bias):
        return kernels().group_norm(input, num_groups, weight, bias, eps)
    return F.group_norm(input, num_groups, weight, bias, eps)
