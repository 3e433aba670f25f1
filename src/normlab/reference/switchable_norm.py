r"""Switchable normalization (Luo, Ren, Peng, Zhang & Li 2018, "Differentiable Learning-to-
Normalize via Switchable Normalization", arXiv:1806.10779).

Instance, layer and batch statistics are mixed with learned softmax weights, separately
for the mean and the variance:

.. math::

    \mu = \sum_{k \in \{IN, LN, BN\}} w_k \mu_k, \quad
    \sigma^2 = \sum_k w'_k \sigma_k^2, \quad
    w = \mathrm{softmax}(\text{mean\_weight}), \; w' = \mathrm{softmax}(\text{var\_weight}),
    \quad y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

As in the official code the instance statistics come first and the others are derived from
them (per sample over channels for LN, per channel over the batch for BN), here with the
law of total variance, ``var_LN = mean_c(var_IN) + mean_c((mu_IN - mu_LN)^2)``, which stays
accurate for large means. Two deliberate differences from the official code: every branch
uses the *biased* variance (so a one-hot mix is exactly IN, LN or BN), and the BN branch
keeps PyTorch's running-statistics convention (momentum 0.1, unbiased running variance),
used in evaluation. For a 2-D input (N, C) there are no spatial positions: the IN branch is
left out (its weight is 0 and the softmax runs over LN and BN), as in the official
``SwitchNorm1d``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from normlab import _checks
from normlab.reference._core import RunningStats, check_channel_params, check_float_params, given_shapes, param_grads, check_grad_shape, check_zero_variance, acc_dtype, centered_moments, inv_std, per_channel, reduce_sum, update_running


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def _branch_logits(logits, ndim):
    z = np.asarray(logits, dtype=np.float64).copy()
    if ndim == 2:
        z[0] = -np.inf  # no instance statistics without spatial positions
    return z


def switchable_norm_forward(
    x: np.ndarray,
    gamma: Optional[np.ndarray],
    beta: Optional[np.ndarray],
    mean_weight: np.ndarray,
    var_weight: np.ndarray,
    running: Optional[RunningStats] = None,
    *,
    training: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
):
    """Forward pass: ``(y, cache, running)``. ``mean_weight``/``var_weight`` are the 3 logits
    (IN, LN, BN) of the mean and variance mixes."""
    op = "switchable_norm"
    _checks.check_floating(x, op, "array")
    _checks.check_rank(x.shape, (2, 3, 4, 5), op, "(N, C, *spatial)")
    check_channel_params(x, op, eps, gamma, beta, running, momentum)
    _checks.check_mix_logits(op, mean_weight=np.asarray(mean_weight), var_weight=np.asarray(var_weight))
    check_float_params(op, mean_weight=mean_weight, var_weight=var_weight)
    nd = x.ndim
    spatial = tuple(range(2, nd))
    if nd > 2:
        # no positions (evaluation): 0/0, for an empty output, and nothing to warn about
        with np.errstate(invalid="ignore" if 0 in x.shape[2:] else np.geterr()["invalid"]):
            mu_in, var_in, n_in, centered = centered_moments(x, spatial)
    else:  # (N, C): each "instance" is a single value
        mu_in, var_in, n_in = x.astype(acc_dtype(x.dtype)), np.zeros(x.shape, acc_dtype(x.dtype)), 1
        centered = np.zeros(x.shape, acc_dtype(x.dtype))
    c = x.shape[1]
    mu_ln = mu_in.mean(axis=1, keepdims=True)
    var_ln = (var_in + (mu_in - mu_ln) ** 2).mean(axis=1, keepdims=True)
    use_batch = training or running is None
    if use_batch:
        _checks.check_enough_values(x.shape, (0,) + spatial, op, running_stats=running is not None)
        mu_bn = mu_in.mean(axis=0, keepdims=True)
        var_bn = (var_in + (mu_in - mu_bn) ** 2).mean(axis=0, keepdims=True)
        if training and running is not None:
            running = update_running(running, mu_bn, var_bn, x.shape[0] * n_in, momentum)
    else:
        mu_bn, var_bn = per_channel(running.mean, nd).astype(mu_in.dtype), per_channel(running.var, nd).astype(mu_in.dtype)
    wm = softmax(_branch_logits(mean_weight, nd)).astype(mu_in.dtype)
    wv = softmax(_branch_logits(var_weight, nd)).astype(mu_in.dtype)
    mean = wm[0] * mu_in + wm[1] * mu_ln + wm[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    check_zero_variance(var, eps)
    rstd = inv_std(var, eps)
    # xhat = (x - mean) * rstd = (centered + shift) * rstd, with centered = x - mu_in and
    # shift = mu_in - mean one number per (sample, channel); y = gamma * xhat + beta is then
    # one multiply and one add over the tensor, and xhat is never formed (the backward needs
    # only sums of dy * xhat, which it gets from centered and shift)
    shift = mu_in - mean
    a = rstd if gamma is None else rstd * per_channel(gamma, nd)
    offset = shift * a if beta is None else shift * a + per_channel(beta, nd)
    y = centered * a
    y += offset
    # a parameter's gradient has the parameter's dtype, as in torch
    dtypes = [None if p is None else np.asarray(p).dtype for p in (gamma, beta, mean_weight, var_weight)]
    cache = dict(x=x, centered=centered, shift=shift, rstd=rstd, gamma=gamma, has_beta=beta is not None, wm=wm,
                 wv=wv, dtypes=dtypes, shapes=given_shapes(gamma, beta), use_batch=use_batch, n_in=n_in, stats=((mu_in, var_in), (mu_ln, var_ln), (mu_bn, var_bn)), c=c)
    return y.astype(x.dtype, copy=False), cache, running


def switchable_norm_backward(dy: np.ndarray, cache):
    """Backward pass: ``(dx, dgamma, dbeta, dmean_weight, dvar_weight)``.

    ``dL/dmu`` and ``dL/dvar`` of the mixed statistics flow into each branch's statistics
    (weighted by its softmax weight, summed over the axes it was broadcast along). A branch k
    with mean ``mu_k`` and biased variance over ``n_k`` elements sends
    ``(dmu_k + 2 dvar_k (x - mu_k)) / n_k`` to each of its elements: an affine function of
    ``x``, so the three branches add up to ``A + B x`` with per-(sample, channel) ``A``, ``B``,
    and ``dx = g * rstd + A + B x``. The softmax logits get ``w * (g_k - sum(w * g))`` with
    ``g_k = sum(dL/dmu * mu_k)`` (and likewise for the variance); for the means, ``mu_k`` is taken
    less the mixed mean, which changes nothing but the rounding.
    """
    c = cache
    x, rstd = c["x"], c["rstd"]
    nd = x.ndim
    spatial = tuple(range(2, nd))
    check_grad_shape(dy, x.shape)
    dt = c["dtypes"]
    if x.size == 0:  # an empty output (evaluation): every gradient is a sum of nothing
        return ((np.zeros(x.shape, x.dtype),) + param_grads((None if c["gamma"] is None else np.zeros(c["c"], dt[0]),
                                                            np.zeros(c["c"], dt[1]) if c["has_beta"] else None), c["shapes"])
                + (np.zeros(3, dt[2]), np.zeros(3, dt[3])))
    dy = np.asarray(dy).astype(rstd.dtype, copy=False)
    # per (sample, channel): sum(dy) and sum(dy * xhat), with xhat = (centered + shift) * rstd
    s_dy = reduce_sum(dy, spatial) if spatial else dy
    s_dyx = (reduce_sum(dy, spatial, c["centered"]) if spatial else dy * c["centered"]) + c["shift"] * s_dy
    s_dyx *= rstd
    dbeta = s_dy.sum(axis=0).reshape(-1) if c["has_beta"] else None
    if c["gamma"] is not None:
        dgamma = s_dyx.sum(axis=0).reshape(-1)
        gscale = rstd * per_channel(c["gamma"], nd)  # dL/dxhat * dxhat/dx, the direct path
    else:
        dgamma = None
        gscale = rstd
    # y depends on x directly and through (mean, var) of shape (N, C, 1, ...)
    dmean = -gscale * s_dy
    dvar = -0.5 * gscale * rstd * s_dyx  # sum(g (x - mu)) (-1/2) rstd^3, with x - mu = xhat / rstd
    (mu_in, var_in), (mu_ln, var_ln), (mu_bn, var_bn) = c["stats"]
    wm, wv = c["wm"], c["wv"]
    n_in, ch, n = c["n_in"], c["c"], x.shape[0]
    branches = [(mu_ln, ch * n_in, wm[1] * dmean.sum(axis=1, keepdims=True), wv[1] * dvar.sum(axis=1, keepdims=True))]
    if nd > 2:
        branches.append((mu_in, n_in, wm[0] * dmean, wv[0] * dvar))
    if c["use_batch"]:
        branches.append((mu_bn, n * n_in, wm[2] * dmean.sum(axis=0, keepdims=True),
                         wv[2] * dvar.sum(axis=0, keepdims=True)))
    a = sum((dmu - 2.0 * dv * mu) / cnt for mu, cnt, dmu, dv in branches)
    b = sum(2.0 * dv / cnt for mu, cnt, dmu, dv in branches)
    dx = dy * gscale
    dx += b * x.astype(rstd.dtype, copy=False)
    dx += a
    # softmax: d/dlogit_k = w_k (g_k - sum_j w_j g_j), and sum_j w_j g_j = sum(dL/dmu * mean) for
    # the mixed mean; so the means' g_k are taken as sum(dL/dmu * (mu_k - mean)) (sums of values
    # near a large mean, subtracted afterwards, lost their digits)
    gm = np.array([(dmean * ((s[0] - mu_in) + c["shift"])).sum() for s in c["stats"]])  # shift = mu_in - mean
    dmean_weight = wm * (gm - (wm * gm).sum())  # the sum is ~0: it takes out what rounding left of the mean
    gv = np.array([(dvar * s[1]).sum() for s in c["stats"]])
    dvar_weight = wv * (gv - (wv * gv).sum())
    grads = param_grads((dgamma, dbeta), c["shapes"]) + (dmean_weight, dvar_weight)
    return (dx.astype(x.dtype, copy=False),) + tuple(None if g is None else g.astype(t, copy=False)
                                                     for g, t in zip(grads, dt))
