r"""Weight normalization (Salimans & Kingma 2016, "Weight Normalization: A Simple
Reparameterization to Accelerate Training of Deep Neural Networks", arXiv:1602.07868).

A weight is re-parametrized by a direction ``v`` and a magnitude ``g``:

.. math::

    w = g \, \frac{v}{\lVert v \rVert}

where the norm runs over every dim except ``dim`` (default 0: one norm per output unit),
and over the whole tensor when ``dim`` is ``None`` or ``-1`` (torch's convention; other
negative dims count from the end). Backward, with
``dg = sum(dw * v / ||v||)``: ``dv = (g / ||v||) (dw - dg * v / ||v||)``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from normlab import _checks


def _norm_axes(v: np.ndarray, dim: Optional[int]):
    if dim is None or dim == -1:  # torch's convention: -1 is the whole tensor, not the last dim
        return tuple(range(v.ndim))
    dim = _checks.check_dim(dim, v.ndim, "weight_norm")
    return tuple(a for a in range(v.ndim) if a != dim)


def weight_norm_forward(v: np.ndarray, g: np.ndarray, dim: Optional[int] = 0):
    """``(w, cache)``; ``g`` has ``v``'s shape with size 1 on every normed axis (as torch's ``weight_g``)."""
    axes = _norm_axes(v, dim)
    norm = np.sqrt((v * v).sum(axis=axes, keepdims=True))
    vhat = v / norm
    return g * vhat, dict(vhat=vhat, norm=norm, g=g, axes=axes)


def weight_norm_backward(dw: np.ndarray, cache):
    """``(dv, dg)``."""
    vhat, norm, g, axes = cache["vhat"], cache["norm"], cache["g"], cache["axes"]
    dg = (dw * vhat).sum(axis=axes, keepdims=True)
    dv = (g / norm) * (dw - dg * vhat)
    return dv, dg.reshape(g.shape)


def norm_except_dim(v: np.ndarray, dim: Optional[int] = 0) -> np.ndarray:
    """``||v||`` over every axis but ``dim`` (the initial ``g`` that makes ``w == v``)."""
    return np.sqrt((v * v).sum(axis=_norm_axes(v, dim), keepdims=True))
