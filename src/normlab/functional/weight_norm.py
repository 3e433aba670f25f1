"""Weight reparametrizations as functions: weight norm and spectral norm
(see :mod:`normlab.reference.weight_norm` and :mod:`normlab.reference.spectral_norm`)."""
from __future__ import annotations

from typing import Optional

import torch

from normlab import _checks


def norm_axes(ndim: int, dim: Optional[int]) -> tuple:
    """Axes a weight norm reduces: every axis but ``dim``; all of them for ``dim`` None or -1
    (PyTorch's convention: -1 means "the whole tensor" here, not the last axis)."""
    if dim is None or dim == -1:
        return tuple(range(ndim))
    dim = _checks.check_dim(dim, ndim, "weight_norm")
    return tuple(a for a in range(ndim) if a != dim)


def norm_except_dim(v: torch.Tensor, dim: Optional[int] = 0) -> torch.Tensor:
    """``||v||`` over every axis but ``dim``, shaped like PyTorch's ``weight_g``
    (size 1 on the reduced axes; a 0-d tensor for the whole-tensor norm)."""
    if dim is None or dim == -1:
        return torch.linalg.vector_norm(v)
    axes = norm_axes(v.dim(), dim)
    if not axes:  # a 1-D weight normed along its own dim: one norm per element (torch's too), while
        return v.abs()  # vector_norm would read dim=() as "every axis"
    return torch.linalg.vector_norm(v, dim=axes, keepdim=True)


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: Optional[int] = 0) -> torch.Tensor:
    """``w = g * v / ||v||`` with the norm over every axis but ``dim``."""
    return v * (g / norm_except_dim(v, dim))
