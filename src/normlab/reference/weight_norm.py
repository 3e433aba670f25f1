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
from normlab.reference._core import acc_dtype, check_grad_shape


def _norm_axes(v: np.ndarray, dim: Optional[int]):
    if dim is None or dim == -1:  # torch's convention: -1 is the whole tensor, not the last dim
        return tuple(range(v.ndim))
    dim = _checks.check_dim(dim, v.ndim, "weight_norm")
    return tuple(a for a in range(v.ndim) if a != dim)


def _norm(va: np.ndarray, axes: tuple) -> np.ndarray:
    return np.sqrt((va * va).sum(axis=axes, keepdims=True))


def weight_norm_forward(v: np.ndarray, g: np.ndarray, dim: Optional[int] = 0):
    """``(w, cache)``; ``g`` has ``v``'s shape with size 1 on every normed axis (as torch's
    ``weight_g``; a 0-d or one-element ``g`` for the whole-tensor norm). The norm is taken in
    float32 for float16 input (``v * v`` overflows float16 from |v| = 256)."""
    op = "weight_norm"
    _checks.check_floating(v, op, "array")
    _checks.check_floating(np.asarray(g), f"{op} (g)", "array")
    axes = _norm_axes(v, dim)
    want = tuple(1 if a in axes else n for a, n in enumerate(v.shape))
    if np.shape(g) != want and not (len(axes) == v.ndim and np.size(g) == 1):
        raise ValueError(f"{op}: g must have shape {_checks.shape_str(want)} (v's shape {_checks.shape_str(v.shape)} "
                         f"with 1 on every normed axis), got {_checks.shape_str(np.shape(g))}")
    acc = acc_dtype(np.result_type(v, g))
    ga = np.asarray(g, acc).reshape(want)
    norm = _norm(v.astype(acc, copy=False), axes)
    vhat = v / norm
    return (ga * vhat).astype(v.dtype, copy=False), dict(vhat=vhat, norm=norm, g=ga, g_shape=np.shape(g),
                                                        axes=axes, dtypes=(v.dtype, np.asarray(g).dtype))


def weight_norm_backward(dw: np.ndarray, cache):
    """``(dv, dg)``."""
    vhat, norm, g, axes = cache["vhat"], cache["norm"], cache["g"], cache["axes"]
    check_grad_shape(dw, vhat.shape)
    dw = np.asarray(dw).astype(vhat.dtype, copy=False)
    dg = (dw * vhat).sum(axis=axes, keepdims=True)
    dv = (g / norm) * (dw - dg * vhat)
    v_dtype, g_dtype = cache["dtypes"]
    return dv.astype(v_dtype, copy=False), dg.reshape(cache["g_shape"]).astype(g_dtype, copy=False)


def norm_except_dim(v: np.ndarray, dim: Optional[int] = 0) -> np.ndarray:
    """``||v||`` over every axis but ``dim`` (the initial ``g`` that makes ``w == v``), in ``v``'s
    dtype (computed in float32 for float16)."""
    _checks.check_floating(v, "norm_except_dim", "array")
    return _norm(v.astype(acc_dtype(v.dtype), copy=False), _norm_axes(v, dim)).astype(v.dtype, copy=False)
