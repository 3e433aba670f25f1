r"""Batch normalization (Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift", arXiv:1502.03167).

For an input of shape (N, C) or (N, C, *spatial), per channel ``c``, over the batch and
spatial axes:

.. math::

    \mu_c = \mathrm{mean}(x_{:,c}), \quad \sigma_c^2 = \mathrm{mean}((x_{:,c} - \mu_c)^2)
    \quad\text{(biased)}, \quad y = \gamma_c \frac{x - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} + \beta_c

In training the batch statistics normalize and the running estimates move towards them
(PyTorch's convention, ``momentum`` = weight of the new value, the running variance takes
the *unbiased* ``sigma^2 * m / (m - 1)``; ``momentum=None`` is a cumulative average). In
evaluation the running estimates normalize and no gradient flows through them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from normlab import _checks
from normlab.reference._core import RunningStats, check_channel_params, given_shapes, param_grads, normalize_backward, normalize_forward, per_channel, update_running


def batch_norm_forward(
    x: np.ndarray,
    gamma: Optional[np.ndarray] = None,
    beta: Optional[np.ndarray] = None,
    running: Optional[RunningStats] = None,
    *,
    training: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
):
    """Forward pass. Returns ``(y, cache, running)``: ``running`` is the updated
    :class:`RunningStats` (training) or the one passed in (evaluation), ``None`` if none was given.
    With ``training=False`` and no running statistics, batch statistics are used (as PyTorch does).
    """
    op = "batch_norm"
    _checks.check_floating(x, op, "array")
    _checks.check_rank(x.shape, (2, 3, 4, 5), op, "(N, C, *spatial)")
    check_channel_params(x, op, eps, gamma, beta, running, momentum)
    axes = (0,) + tuple(range(2, x.ndim))
    w, b = per_channel(gamma, x.ndim), per_channel(beta, x.ndim)
    if training or running is None:
        _checks.check_enough_values(x.shape, axes, op, running_stats=running is not None)
        y, cache, (mean, var, n) = normalize_forward(x, axes, w, b, eps)
        if training and running is not None:
            running = update_running(running, mean, var, n, momentum)
    else:
        stats = (per_channel(running.mean, x.ndim), per_channel(running.var, x.ndim), None)
        y, cache, _ = normalize_forward(x, axes, w, b, eps, stats=stats, batch_stats=False)
    cache.given_shapes = given_shapes(gamma, beta)
    return y, cache, running


def batch_norm_backward(dy: np.ndarray, cache):
    """Backward pass: ``(dx, dgamma, dbeta)`` (``dgamma``/``dbeta`` are ``None`` without affine)."""
    dx, dw, db = normalize_backward(dy, cache)
    return (dx,) + param_grads((dw, db), cache.given_shapes)
