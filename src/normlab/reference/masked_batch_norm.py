r"""Masked (padding-aware) batch normalization for sequences.

Plain batch norm over an (N, C, L) batch of padded sequences counts the ``<pad>`` positions
in its statistics: the mean and variance then depend on how much padding the batch holds,
not only on the data. Masked batch norm takes a boolean ``mask`` of shape (N, L), **True at
valid positions** and False at padding, and computes every statistic over the valid
positions only:

.. math::

    \mu_c = \frac{1}{n}\sum_{(i,t):\,m_{it}} x_{ict}, \quad
    \sigma_c^2 = \frac{1}{n}\sum_{(i,t):\,m_{it}} (x_{ict} - \mu_c)^2, \quad n = \sum m

The running variance takes ``sigma^2 * n / (n - 1)`` with the count of valid positions.
**Padded positions of the output hold 0** (so they stay inert for what follows) and receive
no gradient. With an all-True mask (or ``mask=None``) this is exactly batch norm.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from normlab import _checks
from normlab.reference._core import RunningStats, check_channel_params, given_shapes, param_grads, normalize_backward, normalize_forward, per_channel, update_running


def masked_batch_norm_forward(
    x: np.ndarray,
    mask: Optional[np.ndarray],
    gamma: Optional[np.ndarray] = None,
    beta: Optional[np.ndarray] = None,
    running: Optional[RunningStats] = None,
    *,
    training: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
):
    """Forward pass: ``(y, cache, running)``; ``x`` is (N, C, L), ``mask`` (N, L) bool or ``None``."""
    op = "masked_batch_norm"
    _checks.check_floating(x, op, "array")
    _checks.check_rank(x.shape, (3,), op, "(N, C, L)")
    check_channel_params(x, op, eps, gamma, beta, running, momentum)
    m3 = None
    if mask is not None:
        mask = np.asarray(mask)
        _checks.check_mask(x.shape, mask, op)
        _checks.check_no_empty_rows(mask.sum(axis=1), op)
        m3 = mask[:, None, :]
    w, b = per_channel(gamma, 3), per_channel(beta, 3)
    if training or running is None:
        count = x.shape[0] * x.shape[2] if mask is None else int(mask.sum())
        _checks.check_enough_valid(count, x.shape, op, running_stats=running is not None)
        y, cache, (mean, var, n) = normalize_forward(x, (0, 2), w, b, eps, mask=m3)
        if training and running is not None:
            running = update_running(running, mean, var, n, momentum)
    else:
        stats = (per_channel(running.mean, 3), per_channel(running.var, 3), None)
        y, cache, _ = normalize_forward(x, (0, 2), w, b, eps, mask=m3, stats=stats, batch_stats=False)
    cache.given_shapes = given_shapes(gamma, beta)
    return y, cache, running


def masked_batch_norm_backward(dy: np.ndarray, cache):
    """Backward pass: ``(dx, dgamma, dbeta)``; ``dx`` is 0 at padded positions."""
    dx, dw, db = normalize_backward(dy, cache)
    return (dx,) + param_grads((dw, db), cache.given_shapes)
