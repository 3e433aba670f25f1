"""Weight normalization as a parametrization, state-dict compatible with
``torch.nn.utils.parametrizations.weight_norm`` (keys ``parametrizations.weight.original0``
= g and ``original1`` = v), and loading the older ``torch.nn.utils.weight_norm``'s
``weight_g``/``weight_v`` checkpoints as torch's does."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from normlab import functional as NF


class WeightNorm(nn.Module):
    """``w = g * v / ||v||`` (Salimans & Kingma 2016), the norm over every dim but ``dim``.

    ``dim=None`` (or -1, as in torch) normalizes over the whole tensor.
    """

    def __init__(self, dim: Optional[int] = 0) -> None:
        super().__init__()
        self.dim = -1 if dim is None else dim

    def forward(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        return NF.weight_norm(weight_v, weight_g, self.dim)

    def right_inverse(self, weight: torch.Tensor):
        """Split a weight into ``(g, v)`` with ``g = ||weight||`` so that forward gives it back."""
        return NF.norm_except_dim(weight, self.dim), weight

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def weight_norm(module: nn.Module, name: str = "weight", dim: Optional[int] = 0) -> nn.Module:
    """Re-parametrize ``module.<name>`` as ``g * v / ||v||``; returns the module.

    Examples::

        >>> m = normlab.nn.weight_norm(torch.nn.Linear(20, 40))
        >>> m.parametrizations.weight.original0.shape  # g, one per output unit
        torch.Size([40, 1])
    """
    if not isinstance(getattr(module, name, None), torch.Tensor):
        raise ValueError(f"weight_norm: module {type(module).__name__} has no tensor attribute {name!r}")
    parametrize.register_parametrization(module, name, WeightNorm(dim), unsafe=True)
    module._register_load_state_dict_pre_hook(_legacy_keys_hook(name))
    return module


def _legacy_keys_hook(name: str):
    """A checkpoint of the older ``torch.nn.utils.weight_norm`` (keys ``<name>_g``, ``<name>_v``)
    loads into the parametrization (``original0`` = g, ``original1`` = v), as torch's does."""
    def hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        g, v = f"{prefix}{name}_g", f"{prefix}{name}_v"
        if g in state_dict and v in state_dict:
            state_dict[f"{prefix}parametrizations.{name}.original0"] = state_dict.pop(g)
            state_dict[f"{prefix}parametrizations.{name}.original1"] = state_dict.pop(v)

    return hook
