"""``rms_norm`` with torch's signature (see :mod:`normlab.reference.rms_norm`)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from normlab.functional._core import autocast_float32, kernels, use_kernel
from normlab.functional.layer_norm import check_trailing


def rms_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
) -> torch.Tensor:
    """RMS normalization over the trailing dims; ``eps=None`` is the machine epsilon of the
    computation dtype, as torch (float32's for float16/bfloat16/float32 input, float64's for float64)."""
    ns = check_trailing(input, normalized_shape, weight, "rms_norm", params=("weight",))
    xk, wk = autocast_float32(input, weight)  # (the kernel's inputs: torch's autocast never sees them)
    if use_kernel("rms_norm", xk, ns, wk):
        return kernels().unchecked.rms_norm(xk, ns, wk, eps)
    return F.rms_norm(input, ns, weight, eps)
