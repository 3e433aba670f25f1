r"""Spectral normalization (Miyato, Kataoka, Koyama & Yoshida 2018, "Spectral Normalization for
Generative Adversarial Networks", arXiv:1802.05957).

The weight, viewed as a matrix ``W`` (``dim`` first, the other dims flattened), is divided by
an estimate of its largest singular value, kept by power iteration on persistent vectors
``u`` and ``v``:

.. math::

    u \leftarrow \frac{W v}{\lVert W v \rVert}, \quad v \leftarrow \frac{W^\top u}{\lVert W^\top u \rVert},
    \quad \sigma = u^\top W v, \quad W_{SN} = W / \sigma

``n_power_iterations`` steps run per training forward and none in evaluation. The backward
pass treats ``u`` and ``v`` as constants (as PyTorch does), so with ``dsigma/dW = u v^T``:
``dW = dW_SN / sigma - (sum(dW_SN * W) / sigma^2) u v^T``. A 1-D weight is simply divided
by its norm.
"""
from __future__ import annotations

import numpy as np

from normlab import _checks
from normlab.reference._core import check_grad_shape


def _normalize(z, eps):
    return z / max(float(np.linalg.norm(z)), eps)


def as_matrix(w: np.ndarray, dim: int = 0) -> np.ndarray:
    """``w`` with ``dim`` moved first and the rest flattened: the matrix whose spectrum is normed."""
    return np.moveaxis(w, dim, 0).reshape(w.shape[dim], -1)


def power_iteration(wm: np.ndarray, u: np.ndarray, v: np.ndarray, n: int, eps: float = 1e-12):
    """``n`` power-iteration steps from ``(u, v)``; returns the new ``(u, v)``."""
    for _ in range(n):
        u = _normalize(wm @ v, eps)
        v = _normalize(wm.T @ u, eps)
    return u, v


def spectral_norm_forward(w: np.ndarray, u: np.ndarray, v: np.ndarray, *, n_power_iterations: int = 1,
                          training: bool = True, eps: float = 1e-12, dim: int = 0):
    """``(w_sn, cache, (u, v))``: the normalized weight and the updated power-iteration vectors
    (``u`` of the matrix's rows, ``v`` of its columns; unused for a 1-D weight)."""
    op = "spectral_norm"
    _checks.check_floating(w, op, "array")
    _checks.check_positive_int(n_power_iterations, op, "n_power_iterations")  # torch refuses 0 too
    _checks.check_eps(eps, op, "the smallest norm it divides by")
    dim = _checks.check_dim(dim, w.ndim, op)  # torch takes a negative dim too, and refuses one out of range, 1-D too
    if w.ndim == 1:  # the norm in float64 (float16 squares overflow from |w| = 256)
        raw = float(np.linalg.norm(w.astype(np.float64)))
        norm = max(raw, eps)
        return (w / norm).astype(w.dtype, copy=False), dict(w=w, norm=norm, clamped=raw < eps, one_d=True), (u, v)
    wm = as_matrix(w, dim).astype(np.float64)  # float16's squares overflow (sigma above ~256: NaN)
    for name, vec, n in (("u", u, wm.shape[0]), ("v", v, wm.shape[1])):
        if np.shape(vec) != (n,):
            raise ValueError(f"{op}: {name} must be a vector of {n} (the weight as a {wm.shape[0]}x{wm.shape[1]} "
                             f"matrix, dim={dim} first), got {'None' if vec is None else _checks.shape_str(np.shape(vec))}")
    if training:
        u, v = power_iteration(wm, u, v, n_power_iterations, eps)
    sigma = float(u @ wm @ v)
    return (w / sigma).astype(w.dtype, copy=False), dict(w=w, sigma=sigma, u=u, v=v, dim=dim, one_d=False), (u, v)


def spectral_norm_backward(dw_sn: np.ndarray, cache) -> np.ndarray:
    """``dW`` with ``u`` and ``v`` held constant."""
    w = cache["w"]
    check_grad_shape(dw_sn, w.shape)
    wa, dwa = w.astype(np.float64), np.asarray(dw_sn, np.float64)
    if cache["one_d"]:
        n = cache["norm"]
        if cache.get("clamped"):  # ||w|| below eps: the divisor is the constant eps, with no gradient
            return (dwa / n).astype(w.dtype)
        return (dwa / n - wa * (dwa * wa).sum() / n ** 3).astype(w.dtype)
    sigma, u, v, dim = cache["sigma"], cache["u"], cache["v"], cache["dim"]
    outer = np.outer(u, v).reshape((w.shape[dim],) + tuple(s for i, s in enumerate(w.shape) if i != dim))
    return (dwa / sigma - (dwa * wa).sum() / sigma ** 2 * np.moveaxis(outer, 0, dim)).astype(w.dtype)
