"""Build any normalization layer from a short string, so models and experiments take a norm by name.

>>> make_norm("group:8", 64, dim=2)
GroupNorm(8, 64, eps=1e-05, affine=True, bias=True)

``dim`` is the number of spatial dims after (N, C): 0 for feature vectors (N, C), 1 for
sequences (N, C, L), 2 for images (N, C, H, W), 3 for volumes. With ``dim=0`` the layer-wise
norms ("layer", "rms") act on the last dim, so they also fit token features (N, L, C).

========================  ==============================================================
spec                      layer
========================  ==============================================================
``batch``                 BatchNorm1d/2d/3d
``layer``                 LayerNorm(C) for dim=0; GroupNorm(1, C) for dim>=1, i.e. layer
                          norm over (C, *spatial) with per-channel affine, as in Wu & He
                          (``affine`` and ``elementwise_affine`` both name its affine switch)
``instance``              InstanceNorm1d/2d/3d (affine=True unless told otherwise)
``group:G``               GroupNorm(G, C); ``group`` alone means G=32 (the paper's default)
``rms``                   RMSNorm(C), dim=0 only
``switchable``            SwitchableNorm1d (dim 0, 1) / SwitchableNorm2d
``batch_renorm``          BatchRenorm1d/2d/3d (keyword arguments such as rmax, warmup_steps pass on)
``masked_batch``          MaskedBatchNorm1d (dim=1; call it with ``(x, mask)``)
``lrn:size``              LocalResponseNorm(size) (dim>=1)
``sync_batch``            SyncBatchNorm: statistics over all processes of ``torch.distributed``
                          (registered by :mod:`normlab.nn.sync_batch_norm`)
``none``                  nn.Identity
========================  ==============================================================

Extra keyword arguments go to the layer's constructor. :func:`register_norm` adds a spec.
"""
from __future__ import annotations

import numbers
from typing import Callable, Dict, Optional

from torch import nn

from normlab.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from normlab.nn.group_norm import GroupNorm
from normlab.nn.instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.layer_norm import LayerNorm
from normlab.nn.local_response_norm import LocalResponseNorm
from normlab.nn.masked_batch_norm import MaskedBatchNorm1d
from normlab.nn.rms_norm import RMSNorm
from normlab.nn.switchable_norm import SwitchableNorm1d, SwitchableNorm2d

Builder = Callable[[int, int, Optional[str], dict], nn.Module]
_REGISTRY: Dict[str, Builder] = {}


def register_norm(name: str, builder: Builder) -> None:
    """Add (or replace) a spec: ``builder(num_channels, dim, arg, kwargs)`` returns the layer,
    where ``arg`` is the text after ``name:`` (or ``None``)."""
    _REGISTRY[name] = builder


def norm_specs() -> list:
    """The spec names :func:`make_norm` knows."""
    return sorted(_REGISTRY)


def _by_dim(spec: str, dim: int, table: dict):
    if dim not in table:
        raise ValueError(f"norm spec {spec!r} is not available for dim={dim} (spatial dims); "
                         f"it supports dim in {sorted(table)}")
    return table[dim]


def _int_arg(spec: str, arg: Optional[str], default: Optional[int], what: str) -> int:
    if arg is None:
        if default is None:
            raise ValueError(f"norm spec {spec!r} needs {what}, e.g. '{spec}:5'")
        return default
    try:
        value = int(arg)
    except ValueError:
        raise ValueError(f"norm spec '{spec}:{arg}': {what} must be an integer, got {arg!r}") from None
    if value <= 0:
        raise ValueError(f"norm spec '{spec}:{arg}': {what} must be positive")
    return value


def _no_arg(name, builder):
    def build(c, dim, arg, kw):
        if arg is not None:
            raise ValueError(f"norm spec {name!r} takes no argument, got '{name}:{arg}'")
        return builder(c, dim, kw)
    return build


register_norm("batch", _no_arg("batch", lambda c, dim, kw: _by_dim("batch", dim, {0: BatchNorm1d, 1: BatchNorm1d,
                                                                                     2: BatchNorm2d, 3: BatchNorm3d})(c, **kw)))
def _layer(c: int, dim: int, kw: dict) -> nn.Module:
    """LayerNorm names its affine switch ``elementwise_affine``, GroupNorm ``affine``: either name
    works for either class, so one set of keyword arguments builds "layer" at every ``dim``."""
    names = ("elementwise_affine", "affine") if dim == 0 else ("affine", "elementwise_affine")
    if names[1] in kw:
        if names[0] in kw:
            raise ValueError(f"norm spec 'layer' got both elementwise_affine and affine; pass one "
                             f"(they are the same switch), got {kw[names[0]]!r} and {kw[names[1]]!r}")
        kw = {names[0] if k == names[1] else k: v for k, v in kw.items()}
    return LayerNorm(c, **kw) if dim == 0 else GroupNorm(1, c, **kw)


register_norm("layer", _no_arg("layer", _layer))
register_norm("instance", _no_arg("instance", lambda c, dim, kw: _by_dim(
    "instance", dim, {1: InstanceNorm1d, 2: InstanceNorm2d, 3: InstanceNorm3d})(c, **{"affine": True, **kw})))
register_norm("group", lambda c, dim, arg, kw: GroupNorm(_int_arg("group", arg, 32, "the number of groups"), c, **kw))
register_norm("rms", _no_arg("rms", lambda c, dim, kw: _by_dim("rms", dim, {0: RMSNorm})(c, **kw)))
register_norm("switchable", _no_arg("switchable", lambda c, dim, kw: _by_dim(
    "switchable", dim, {0: SwitchableNorm1d, 1: SwitchableNorm1d, 2: SwitchableNorm2d})(c, **kw)))
register_norm("batch_renorm", _no_arg("batch_renorm", lambda c, dim, kw: _by_dim(
    "batch_renorm", dim, {0: BatchRenorm1d, 1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d})(c, **kw)))
register_norm("masked_batch", _no_arg("masked_batch", lambda c, dim, kw: _by_dim(
    "masked_batch", dim, {1: MaskedBatchNorm1d})(c, **kw)))
register_norm("lrn", lambda c, dim, arg, kw: _by_dim("lrn", dim, {1: 1, 2: 2, 3: 3}) and LocalResponseNorm(
    _int_arg("lrn", arg, None, "a size (channels summed over)"), **kw))
register_norm("none", _no_arg("none", lambda c, dim, kw: nn.Identity()))


def make_norm(spec: str, num_channels: int, dim: int = 0, **kwargs) -> nn.Module:
    """Build the normalization layer named by ``spec`` for ``num_channels`` channels.

    Args:
        spec: ``"batch"``, ``"layer"``, ``"instance"``, ``"group:G"``, ``"rms"``,
            ``"switchable"``, ``"batch_renorm"``, ``"masked_batch"``, ``"lrn:size"``,
            ``"sync_batch"``, ``"none"`` (see the module docstring), or one added with
            :func:`register_norm`. Not every spec exists for every ``dim``: ``"rms"`` normalizes
            the last dim (``dim=0``), ``"masked_batch"`` takes (N, C, L) (``dim=1``), and
            ``"layer"`` with spatial dims is ``GroupNorm(1, C)`` (over C and the spatial dims).
        num_channels: C.
        dim: spatial dims after (N, C): 0, 1, 2 or 3.
        **kwargs: passed to the layer (``eps``, ``momentum``, ``affine``, ``rmax`` ...).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"norm spec must be a non-empty string such as 'batch' or 'group:8', got {spec!r}")
    # bool is an int to Python (True == 1): refused, it is a mistake here, never a count
    if isinstance(dim, bool) or dim not in (0, 1, 2, 3):
        raise ValueError(f"dim is the number of spatial dims after (N, C) and must be 0, 1, 2 or 3, got {dim!r}")
    if isinstance(num_channels, bool) or not isinstance(num_channels, numbers.Integral) or num_channels <= 0:
        raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
    num_channels = int(num_channels)
    name, _, arg = spec.strip().lower().partition(":")
    if name not in _REGISTRY:
        raise ValueError(f"unknown norm spec {spec!r}; known: {', '.join(norm_specs())} "
                         f"(with an argument: 'group:G', 'lrn:size')")
    return _REGISTRY[name](num_channels, dim, arg or None, kwargs)
