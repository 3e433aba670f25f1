"""``local_response_norm`` with torch's signature (see :mod:`normlab.reference.local_response_norm`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from normlab import _checks
from normlab.functional._core import autocast_enabled


def local_response_norm(input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> torch.Tensor:
    """Local response normalization across channels, exactly ``torch.nn.functional.local_response_norm``."""
    op = "local_response_norm"
    _checks.check_floating(input, op, "tensor")
    if input.dim() < 3:
        raise ValueError(f"{op} expects an input of 3 or more dims (N, C, *), got a {input.dim()}-D input of shape "
                         f"{_checks.shape_str(input.shape)}")
    _checks.check_positive_int(size, op, "size (a number of channels)")
    if (input.device.type == "cpu" and input.dtype in (torch.float16, torch.bfloat16)
            and not autocast_enabled("cpu")):  # under autocast torch's own pools in float32 (and so returns float32)
        # torch has no CPU half/bfloat16 average pool ("avg_pool3d_out_frame not implemented"):
        # compute in float32 and round once at the end, as the NumPy reference does for float16
        return F.local_response_norm(input.float(), size, alpha, beta, k).to(input.dtype)
    return F.local_response_norm(input, size, alpha, beta, k)
