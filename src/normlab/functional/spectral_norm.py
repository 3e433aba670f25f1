"""Spectral normalization as functions (see :mod:`normlab.reference.spectral_norm`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from normlab import _checks


def weight_as_matrix(weight: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The weight with ``dim`` first (a negative ``dim`` counts from the end) and the other dims flattened."""
    dim = _checks.check_dim(dim, weight.dim(), "spectral_norm")
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.dim()) if d != dim))
    return weight.flatten(1)


@torch.no_grad()
def power_iteration_(weight_mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n: int, eps: float = 1e-12) -> None:
    """``n`` steps of ``u = normalize(W v)``, ``v = normalize(W^T u)``, in place on ``u`` and ``v``.

    Written through ``out=`` rather than ``copy_``: under a ``torch.func`` transform (grad, jvp,
    vmap) ``copy_`` into the captured buffers is refused, ``out=`` is not, as with torch's own
    spectral_norm."""
    for _ in range(n):
        F.normalize(torch.mv(weight_mat, v), dim=0, eps=eps, out=u)
        F.normalize(torch.mv(weight_mat.H, u), dim=0, eps=eps, out=v)


def spectral_norm(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int = 0, eps: float = 1e-12) -> torch.Tensor:
    """``weight / sigma`` with ``sigma = u^T W v`` (``u``, ``v`` held constant); a 1-D weight is
    divided by its norm."""
    if weight.dim() == 1:
        _checks.check_dim(dim, 1, "spectral_norm")  # as torch's parametrization and the 2-D path: out of range is refused
        return F.normalize(weight, dim=0, eps=eps)
    sigma = torch.vdot(u, torch.mv(weight_as_matrix(weight, dim), v))
    return weight / sigma
