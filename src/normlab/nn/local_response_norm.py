"""Local response normalization, drop-in for ``torch.nn.LocalResponseNorm``."""
from __future__ import annotations

import torch
from torch import nn

from normlab import _checks
from normlab import functional as NF


class LocalResponseNorm(nn.Module):
    r"""Local response normalization across channels (Krizhevsky et al. 2012), torch's formula:

    .. math:: b_c = a_c \left(k + \frac{\alpha}{n} \sum_{c'} a_{c'}^2\right)^{-\beta}

    over ``n = size`` neighbouring channels, zero-padded; no parameters.

    Args:
        size: neighbouring channels summed over. alpha: default 1e-4. beta: default 0.75.
        k: default 1.

    Shape:
        Input (N, C, *) with at least 3 dims; output the same.

    Examples::

        >>> lrn = normlab.nn.LocalResponseNorm(5)
        >>> y = lrn(torch.randn(2, 16, 7, 7))
    """

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        _checks.check_positive_int(size, "LocalResponseNorm", "size (a number of channels)")
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return NF.local_response_norm(input, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return "{size}, alpha={alpha}, beta={beta}, k={k}".format(**self.__dict__)
