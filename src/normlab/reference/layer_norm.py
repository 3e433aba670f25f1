r"""Layer normalization (Ba, Kiros & Hinton 2016, "Layer Normalization", arXiv:1607.06450).

Each sample is normalized over its trailing ``normalized_shape`` dims, the same statistics
in training and evaluation:

.. math::

    y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \odot \gamma + \beta

``gamma`` and ``beta`` have shape ``normalized_shape`` (elementwise affine).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from normlab import _checks
from normlab.reference._core import check_float_params, normalize_backward, normalize_forward


def layer_norm_forward(
    x: np.ndarray,
    normalized_shape: Sequence[int] | int,
    gamma: Optional[np.ndarray] = None,
    beta: Optional[np.ndarray] = None,
    eps: float = 1e-5,
):
    """Forward pass: ``(y, cache)``."""
    op = "layer_norm"
    _checks.check_floating(x, op, "array")
    ns = _checks.check_normalized_shape(x.shape, _checks.as_normalized_shape(normalized_shape, op), op)
    _checks.check_eps(eps, op)
    # lists too, as the other forwards take them
    gamma, beta = (None if p is None else np.asarray(p) for p in (gamma, beta))
    _checks.check_param_shape(ns, op, gamma=gamma, beta=beta)
    check_float_params(op, gamma=gamma, beta=beta)
    axes = tuple(range(x.ndim - len(ns), x.ndim))
    y, cache, _ = normalize_forward(x, axes, gamma, beta, eps)
    return y, cache


def layer_norm_backward(dy: np.ndarray, cache):
    """Backward pass: ``(dx, dgamma, dbeta)``."""
    return normalize_backward(dy, cache)
