"""Group normalization, drop-in for ``torch.nn.GroupNorm``."""
from __future__ import annotations

import torch
from torch import nn

from normlab import _checks
from normlab import functional as NF
from normlab.nn._affine import register_affine, reset_affine


class GroupNorm(nn.Module):
    r"""Group normalization (Wu & He 2018): channels split into ``num_groups`` groups, each
    (sample, group) normalized over its channels and positions, then a per-channel affine.

    ``GroupNorm(1, C)`` is layer normalization over (C, *spatial) with per-channel affine;
    ``GroupNorm(C, C)`` is instance normalization. Independent of the batch size.

    Args:
        num_groups: G, must divide ``num_channels``.
        num_channels: C.
        eps: default 1e-5.
        affine: learn per-channel γ (ones) and β (zeros). Default True.
        bias: (keyword-only) learn β too when ``affine``, as torch >= 2.13. Default True.

    Shape:
        Input (N, C, *); output the same.

    Examples::

        >>> gn = normlab.nn.GroupNorm(8, 64)
        >>> y = gn(torch.randn(2, 64, 7, 7))
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        _checks.check_groups(num_channels, num_groups, "GroupNorm")
        _checks.check_eps(eps, "GroupNorm")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        register_affine(self, num_channels, affine, bias, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _checks.check_floating(input, "GroupNorm", "tensor")
        if input.dim() >= 2:
            _checks.check_channels(input.shape, self.num_channels, "GroupNorm", arg="num_channels")
        return NF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return "{num_groups}, {num_channels}, eps={eps}, affine={affine}, bias={use_bias}".format(
            **self.__dict__, use_bias=self.bias is not None)
