"""Self-normalizing networks: SELU, AlphaDropout (drop-in for torch's) and LeCun-normal init."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from normlab import functional as NF


class SELU(nn.Module):
    r"""``selu(x) = lambda * (x if x > 0 else alpha * (exp(x) - 1))`` with lambda ~ 1.0507 and
    alpha ~ 1.6733 (Klambauer et al. 2017). Use with :func:`lecun_normal_` weights and
    :class:`AlphaDropout`.

    Examples::

        >>> y = normlab.nn.SELU()(torch.randn(4, 8))
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return NF.selu(input, self.inplace)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class AlphaDropout(nn.Module):
    r"""Dropout for SELU networks: dropped units are set to ``-lambda alpha`` and an affine map
    keeps the mean and variance. Identity in evaluation.

    Args:
        p: drop probability. Default 0.5.
        inplace: default False. Kept and shown, but ignored, as in torch (its ``AlphaDropout``
            never passes it on): the output is always a new tensor, so the usual
            ``SELU(inplace=True)`` then ``AlphaDropout(inplace=True)`` still has a backward.
            ``normlab.functional.alpha_dropout(..., inplace=True)`` does work in place, as
            ``torch.nn.functional.alpha_dropout`` does.

    Examples::

        >>> y = normlab.nn.AlphaDropout(0.1)(torch.randn(4, 8))
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"AlphaDropout: p must be a probability in [0, 1], got {p}")
        self.p, self.inplace = p, inplace

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return NF.alpha_dropout(input, self.p, self.training)  # inplace ignored, as torch does

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


def lecun_normal_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill ``tensor`` in place from ``N(0, 1 / fan_in)`` (the initialization SELU networks need).
    A tensor with no elements (e.g. ``nn.Linear(0, 8).weight``, fan_in 0) is left as it is, with
    torch's warning, as ``torch.nn.init``'s initializers do."""
    if tensor.numel() == 0:  # fan_in may be 0: 1 / sqrt(0) raised ZeroDivisionError; checked first, as
        warnings.warn("Initializing zero-element tensors is a no-op")  # torch's: a (0,) tensor has no fan_in at all
        return tensor
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(tensor)
    with torch.no_grad():
        return tensor.normal_(0.0, 1.0 / math.sqrt(fan_in))
