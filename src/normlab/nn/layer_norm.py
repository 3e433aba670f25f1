"""Layer normalization, drop-in for ``torch.nn.LayerNorm``."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from normlab import _checks
from normlab import functional as NF
from normlab.nn._affine import register_affine, reset_affine


class LayerNorm(nn.Module):
    r"""Layer normalization over the trailing ``normalized_shape`` dims (Ba, Kiros & Hinton 2016).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \odot \gamma + \beta

    The same per-sample statistics in training and evaluation.

    Args:
        normalized_shape: the trailing shape to normalize over (an int for the last dim).
        eps: default 1e-5.
        elementwise_affine: learn γ (ones) of shape ``normalized_shape``. Default True.
        bias: learn β (zeros) too (only with ``elementwise_affine``). Default True.

    Shape:
        Input (*, *normalized_shape); output the same.

    Examples::

        >>> ln = normlab.nn.LayerNorm(64)
        >>> y = ln(torch.randn(8, 10, 64))
    """

    def __init__(self, normalized_shape: Sequence[int] | int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.normalized_shape = _checks.as_normalized_shape(normalized_shape, "LayerNorm")
        if eps is not None:
            _checks.check_eps(eps, "LayerNorm")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        register_affine(self, self.normalized_shape, elementwise_affine, bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return NF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}, bias={use_bias}".format(
            **self.__dict__, use_bias=self.bias is not None)
