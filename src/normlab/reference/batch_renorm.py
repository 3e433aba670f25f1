r"""Batch renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
Dependence in Batch-Normalized Models", arXiv:1702.03275).

In training, with batch statistics :math:`\mu_B, \sigma_B = \sqrt{\mathrm{var}_B + \epsilon}`
and running estimates :math:`\mu, \sigma = \sqrt{\mathrm{running\_var} + \epsilon}`:

.. math::

    r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\!\left(\frac{\sigma_B}{\sigma}\right), \quad
    d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\!\left(\frac{\mu_B - \mu}{\sigma}\right), \quad
    y = \gamma \left(\frac{x - \mu_B}{\sigma_B}\, r + d\right) + \beta

``r`` and ``d`` are treated as constants by the backward pass (no gradient through them).
With ``rmax = 1`` and ``dmax = 0`` this is batch normalization; evaluation is batch norm's
(running estimates). The running estimates follow batch norm's rule (momentum, unbiased
variance), so checkpoints and the identity above hold exactly.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from normlab import _checks
from normlab.reference._core import (
    RunningStats,
    centered_moments,
    check_channel_params,
    given_shapes,
    normalize_backward,
    normalize_forward,
    param_grads,
    per_channel,
    update_running,
)


def renorm_limits(step: int, rmax: float, dmax: float, warmup_steps: int = 0):
    """``(rmax, dmax)`` at training step ``step``: a linear ramp from (1, 0) to ``(rmax, dmax)``
    over ``warmup_steps`` steps (the paper relaxes them gradually); constant when ``warmup_steps=0``."""
    _checks.check_renorm_limits(rmax, dmax, "renorm_limits", warmup_steps)
    if step < 0:
        raise ValueError(f"renorm_limits: step must be >= 0 (training steps taken), got {step!r}")
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(rmax), float(dmax)
    t = step / warmup_steps
    return 1.0 + t * (rmax - 1.0), t * dmax


def batch_renorm_forward(
    x: np.ndarray,
    gamma: Optional[np.ndarray],
    beta: Optional[np.ndarray],
    running: RunningStats,
    *,
    training: bool = True,
    rmax: float = 3.0,
    dmax: float = 5.0,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
):
    """Forward pass: ``(y, cache, running)``. ``running`` is required (r and d need it)."""
    op = "batch_renorm"
    _checks.check_floating(x, op, "array")
    _checks.check_rank(x.shape, (2, 3, 4, 5), op, "(N, C, *spatial)")
    if running is None:
        raise ValueError(f"{op} needs running statistics (r and d compare the batch with them), got running=None")
    _checks.check_renorm_limits(rmax, dmax, op)
    check_channel_params(x, op, eps, gamma, beta, running, momentum)
    axes = (0,) + tuple(range(2, x.ndim))
    w, b = per_channel(gamma, x.ndim), per_channel(beta, x.ndim)
    rm, rv = per_channel(running.mean, x.ndim), per_channel(running.var, x.ndim)
    if not training:
        y, cache, _ = normalize_forward(x, axes, w, b, eps, stats=(rm, rv, None), batch_stats=False)
        cache.given_shapes = given_shapes(gamma, beta)
        return y, cache, running
    _checks.check_enough_values(x.shape, axes, op)
    mean, var, n, centered = centered_moments(x, axes)
    sigma = np.sqrt(rv.astype(mean.dtype) + eps)
    # r and d in the statistics' dtype (an eps, rmax or dmax given as np.float64 would widen them)
    r = np.clip(np.sqrt(var + eps) / sigma, 1.0 / rmax, rmax).astype(mean.dtype, copy=False)
    d = np.clip((mean - rm.astype(mean.dtype)) / sigma, -dmax, dmax).astype(mean.dtype, copy=False)
    y, cache, _ = normalize_forward(x, axes, w, b, eps, stats=(mean, var, n), scale=r, shift=d, centered=centered)
    cache.given_shapes = given_shapes(gamma, beta)
    return y, cache, update_running(running, mean, var, n, momentum)


def batch_renorm_backward(dy: np.ndarray, cache):
    """Backward pass: ``(dx, dgamma, dbeta)`` with r and d held constant."""
    dx, dw, db = normalize_backward(dy, cache)
    return (dx,) + param_grads((dw, db), cache.given_shapes)
