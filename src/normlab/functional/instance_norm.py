"""``instance_norm`` with torch's signature (see :mod:`normlab.reference.instance_norm`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from normlab import _checks
from normlab._backend import use_triton
from normlab.functional._core import check_channel_input, cpu_half, kernels, use_kernel
from normlab.functional.batch_norm import _upcast


def instance_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Instance normalization of an (N, C, *spatial) input, exactly ``torch.nn.functional.instance_norm``."""
    op = "instance_norm"
    check_channel_input(input, op, None, "(N, C, *spatial)", min_dim=3, running_mean=running_mean,
                        running_var=running_var, weight=weight, bias=bias)
    if use_input_stats:
        # an input with no positions at all passes (an empty output, as torch gives)
        _checks.check_enough_values(input.shape, tuple(range(2, input.dim())), op, "per instance (spatial positions)",
                                    allow_empty=True, running_stats=running_mean is not None)
        if input.shape[0] == 0:
            # no instances: torch's update averages the instance statistics over 0 samples, which
            # writes NaN into the running buffers (every later evaluation output NaN); leave them
            # as they are, as batch norm does for an empty batch
            running_mean = running_var = None
        if running_mean is None and running_var is None:
            if use_kernel("instance_norm", input, weight, bias):
                return kernels().unchecked.instance_norm(input, weight, bias, eps)
        else:  # recorded, so last_choice() says why torch runs it
            use_triton("instance_norm", input, lambda: (False, "running statistics: the kernel has none"))
    else:
        use_triton("instance_norm", input, lambda: (False, "use_input_stats=False: normalizes with the running "
                                                           "statistics, which the kernel does not take"))
    if cpu_half(input):
        return _upcast(F.instance_norm, input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
