r"""Instance normalization (Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization: The
Missing Ingredient for Fast Stylization", arXiv:1607.08022).

Each (sample, channel) pair is normalized over its spatial dims:

.. math::

    y_{nc} = \gamma_c \frac{x_{nc} - \mu_{nc}}{\sqrt{\sigma_{nc}^2 + \epsilon}} + \beta_c

With running statistics (PyTorch's ``track_running_stats=True``) each step moves the running
estimate towards the *average over the batch* of the per-instance mean and unbiased
variance, and evaluation normalizes with the running estimates.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from normlab import _checks
from normlab.reference._core import RunningStats, check_channel_params, given_shapes, param_grads, normalize_backward, normalize_forward, per_channel, update_running


def instance_norm_forward(
    x: np.ndarray,
    gamma: Optional[np.ndarray] = None,
    beta: Optional[np.ndarray] = None,
    running: Optional[RunningStats] = None,
    *,
    use_input_stats: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
):
    """Forward pass: ``(y, cache, running)``. ``use_input_stats=False`` normalizes with ``running``.

    ``momentum=None`` leaves ``running`` as it is, as torch's ``InstanceNorm*d(momentum=None)``
    does (it passes 0.0: instance norm has no cumulative average)."""
    op = "instance_norm"
    _checks.check_floating(x, op, "array")
    _checks.check_rank(x.shape, (3, 4, 5), op, "(N, C, *spatial)")
    check_channel_params(x, op, eps, gamma, beta, running, momentum)
    if not use_input_stats and running is None:
        raise ValueError(f"{op}: use_input_stats=False normalizes with the running statistics, got running=None")
    axes = tuple(range(2, x.ndim))
    w, b = per_channel(gamma, x.ndim), per_channel(beta, x.ndim)
    if use_input_stats or running is None:
        _checks.check_enough_values(x.shape, axes, op, "per instance (spatial positions)",
                                    running_stats=running is not None)
        y, cache, (mean, var, n) = normalize_forward(x, axes, w, b, eps)
        if use_input_stats and running is not None and momentum is not None:
            # average the per-instance statistics over the batch (every instance has the same
            # count n, so averaging biased variances and then unbiasing is the same thing)
            # torch's InstanceNorm leaves num_batches_tracked where it is (it never counts steps)
            running = update_running(running, mean.mean(axis=0), var.mean(axis=0), n, momentum)._replace(
                num_batches_tracked=running.num_batches_tracked)
    else:
        stats = (per_channel(running.mean, x.ndim), per_channel(running.var, x.ndim), None)
        y, cache, _ = normalize_forward(x, axes, w, b, eps, stats=stats, batch_stats=False)
    cache.given_shapes = given_shapes(gamma, beta)
    return y, cache, running


def instance_norm_backward(dy: np.ndarray, cache):
    """Backward pass: ``(dx, dgamma, dbeta)``."""
    dx, dw, db = normalize_backward(dy, cache)
    return (dx,) + param_grads((dw, db), cache.given_shapes)
