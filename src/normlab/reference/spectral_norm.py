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
    """``(w_sn, cache, (u, v))``: the normalized weight and the updated power-iteration vectors."""
    if w.ndim == 1:
        norm = max(float(np.linalg.norm(w)), eps)
        return w / norm, dict(w=w, norm=norm, one_d=True), (u, v)
    dim = _checks.check_dim(dim, w.ndim, "spectral_norm")  # torch takes a negative dim too
    wm = as_matrix(w, dim)
    if training:
        u, v = power_iteration(wm, u, v, n_power_iterations, eps)
    sigma = float(u @ wm @ v)
    return w / sigma, dict(w=w, sigma=sigma, u=u, v=v, dim=dim, one_d=False), (u, v)


def spectral_norm_backward(dw_sn: np.ndarray, cache) -> np.ndarray:
    """``dW`` with ``u`` and ``v`` held constant."""
    w = cache["w"]
    if cache["one_d"]:
        n = cache["norm"]
        return dw_sn / n - w * (dw_sn * w).sum() / n ** 3
    sigma, u, v, dim = cache["sigma"], cache["u"], cache["v"], cache["dim"]
    outer = np.outer(u, v).reshape((w.shape[dim],) + tuple(s for i, s in enumerate(w.shape) if i != dim))
    return dw_sn / sigma - (dw_sn * w).sum() / sigma ** 2 * np.moveaxis(outer, 0, dim)
