"""Spectral normalization as a parametrization, state-dict compatible with
``torch.nn.utils.parametrizations.spectral_norm`` (keys ``parametrizations.weight.original``,
``parametrizations.weight.0._u`` and ``._v``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from normlab import _checks
from normlab import functional as NF


class SpectralNorm(nn.Module):
    """``W / sigma(W)`` (Miyato et al. 2018) with ``sigma`` estimated by power iteration on the
    persistent buffers ``_u`` and ``_v``: 15 iterations at registration,
    ``n_power_iterations`` per training forward, none in evaluation."""

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12) -> None:
        super().__init__()
        ndim = weight.dim()
        _checks.check_dim(dim, ndim, "spectral_norm")
        _checks.check_eps(eps, "spectral_norm", "the smallest norm it divides by")  # NaN: NaN weights (torch)
        if n_power_iterations <= 0:
            raise ValueError(f"spectral_norm: n_power_iterations must be positive, got {n_power_iterations}")
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        self.n_power_iterations = n_power_iterations
        if ndim > 1:
            weight_mat = NF.weight_as_matrix(weight.detach(), self.dim)
            h, w = weight_mat.shape
            u = weight_mat.new_empty(h).normal_(0, 1)
            v = weight_mat.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))
            NF.power_iteration_(weight_mat, self._u, self._v, 15, eps)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        if self.training:
            NF.power_iteration_(NF.weight_as_matrix(weight.detach(), self.dim), self._u, self._v,
                                self.n_power_iterations, self.eps)
        # clones: the in-place updates of the next iteration must not touch what autograd saved
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return NF.spectral_norm(weight, u, v, self.dim, self.eps)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def extra_repr(self) -> str:
        return f"n_power_iterations={self.n_power_iterations}, dim={self.dim}, eps={self.eps}"


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: Optional[int] = None) -> nn.Module:
    """Re-parametrize ``module.<name>`` as ``W / sigma(W)``; returns the module. ``dim=None``
    is 1 for transposed convolutions (their output channels) and 0 otherwise, as in torch.

    Examples::

        >>> d = normlab.nn.spectral_norm(torch.nn.Linear(20, 40))
        >>> torch.linalg.matrix_norm(d.weight, 2)  # about 1 after a few training steps
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"spectral_norm: module {type(module).__name__} has no tensor attribute {name!r}")
    if dim is None:
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        dim = 1 if isinstance(module, transposed) else 0
    parametrize.register_parametrization(module, name, SpectralNorm(weight, n_power_iterations, dim, eps))
    return module
