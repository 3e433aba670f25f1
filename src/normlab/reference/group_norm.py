r"""Group normalization (Wu & He 2018, "Group Normalization", arXiv:1803.08494).

The C channels are split into ``num_groups`` groups of C/G consecutive channels; each
(sample, group) is normalized over its channels and spatial positions, then a per-channel
affine transform applies. ``num_groups=1`` is layer normalization over (C, *spatial) and
``num_groups=C`` is instance normalization.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from normlab import _checks
from normlab.reference._core import check_channel_params, check_grad_shape, given_shapes, param_grads, normalize_backward, normalize_forward


def _grouped_param(p, num_groups, ndim):
    return None if p is None else np.asarray(p).reshape((1, num_groups, -1) + (1,) * (ndim - 3))


def group_norm_forward(
    x: np.ndarray,
    num_groups: int,
    gamma: Optional[np.ndarray] = None,
    beta: Optional[np.ndarray] = None,
    eps: float = 1e-5,
):
    """Forward pass: ``(y, cache)``."""
    op = "group_norm"
    _checks.check_floating(x, op, "array")
    _checks.check_rank(x.shape, (2, 3, 4, 5), op, "(N, C, *spatial)")
    n, c = x.shape[:2]
    _checks.check_groups(c, num_groups, op)
    check_channel_params(x, op, eps, gamma, beta)
    _checks.check_group_size(x.shape, num_groups, op)
    xg = x.reshape((n, num_groups, c // num_groups) + x.shape[2:])
    axes = tuple(range(2, xg.ndim))
    y, cache, _ = normalize_forward(
        xg, axes, _grouped_param(gamma, num_groups, xg.ndim), _grouped_param(beta, num_groups, xg.ndim), eps
    )
    cache.shape = x.shape
    cache.given_shapes = given_shapes(gamma, beta)
    return y.reshape(x.shape), cache


def group_norm_backward(dy: np.ndarray, cache):
    """Backward pass: ``(dx, dgamma, dbeta)``."""
    check_grad_shape(dy, cache.shape)  # before the reshape, which would take any dy of the right size
    dx, dw, db = normalize_backward(np.asarray(dy).reshape(cache.u.shape), cache)
    return (dx.reshape(cache.shape),) + param_grads((dw, db), cache.given_shapes)
