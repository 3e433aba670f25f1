"""The learned per-feature affine (γ, β) of BatchNorm, GroupNorm and LayerNorm, registered as
torch registers it: ``weight`` and ``bias`` parameters, or ``None`` entries in their place, so
``state_dict`` keys and ``module.bias is None`` checks match torch's layers."""
from __future__ import annotations

import torch
from torch import nn


def register_affine(module: nn.Module, shape, affine: bool, bias: bool, device=None, dtype=None) -> None:
    """``weight`` (and ``bias`` unless ``bias=False``) of ``shape`` when ``affine``, else ``None``;
    left uninitialized: call :func:`reset_affine`."""
    weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype)) if affine else None
    module.register_parameter("weight", weight)
    b = nn.Parameter(torch.empty(shape, device=device, dtype=dtype)) if affine and bias else None
    module.register_parameter("bias", b)


def reset_affine(module: nn.Module) -> None:
    """γ = 1, β = 0 (torch's initialization)."""
    if module.weight is not None:
        nn.init.ones_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
