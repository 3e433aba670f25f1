"""RMS normalization, drop-in for ``torch.nn.RMSNorm``."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from normlab import _checks
from normlab import functional as NF


class RMSNorm(nn.Module):
    r"""Root-mean-square normalization over the trailing dims (Zhang & Sennrich 2019).

    .. math:: y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \odot \gamma

    Args:
        normalized_shape: the trailing shape to normalize over.
        eps: default ``None``: the machine epsilon of the computation dtype, as torch (float32's
            for float16/bfloat16/float32 input, float64's for float64).
        elementwise_affine: learn γ (ones). Default True.

    Shape:
        Input (*, *normalized_shape); output the same.

    Examples::

        >>> rms = normlab.nn.RMSNorm(64)
        >>> y = rms(torch.randn(8, 10, 64))
    """

    def __init__(self, normalized_shape: Sequence[int] | int, eps: Optional[float] = None,
                 elementwise_affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.normalized_shape = _checks.as_normalized_shape(normalized_shape, "RMSNorm")
        if eps is not None:
            _checks.check_eps(eps, "RMSNorm")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # torch names this argument x, not input
        return NF.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}".format(**self.__dict__)
