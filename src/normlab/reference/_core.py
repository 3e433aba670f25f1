r"""The one computation behind batch, layer, instance, group, RMS and masked normalization.

.. math::

    \mu = \frac{1}{n}\sum_{i \in S} x_i, \qquad
    \sigma^2 = \frac{1}{n}\sum_{i \in S} (x_i - \mu)^2, \qquad
    \hat x = (x - \mu)\,/\sqrt{\sigma^2 + \epsilon}, \qquad
    y = \gamma \hat x + \beta

The techniques differ only in the set ``S`` (the reduced axes, optionally restricted by a
mask), in where the statistics come from (the batch, or fixed running estimates) and in the
shape of ``gamma`` / ``beta``. RMS normalization skips the centering (``mu = 0``).

Backward, with ``g = dy * gamma`` and means taken over ``S``:

.. math::

    \frac{\partial L}{\partial x} = \frac{1}{\sqrt{\sigma^2+\epsilon}}
        \left(g - \overline{g} - \hat x\,\overline{g \hat x}\right)

(without the ``mean(g)`` term for RMS, and just ``g / sqrt(var + eps)`` when the statistics
are fixed, as in evaluation). Statistics are accumulated in float32 for float16 input and
in the input's precision otherwise, with a two-pass variance (mean first, then the mean of
squared deviations), which stays accurate when the mean is large against the spread.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np


def acc_dtype(dtype) -> np.dtype:
    """Accumulation dtype: float64 for float64 input, float32 for everything narrower."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def moments(x: np.ndarray, axes: Sequence[int], *, mask: Optional[np.ndarray] = None, center: bool = True):
    """Mean, biased variance and count over ``axes`` (kept as size-1 dims), accumulated in :func:`acc_dtype`.

    ``mask`` (broadcastable to ``x``, 1 = counted, 0 = ignored) restricts the statistics to the
    selected elements. With ``center=False`` the "variance" is the mean square and the mean is 0.
    """
    axes = tuple(axes)
    xa = x.astype(acc_dtype(x.dtype), copy=False)
    if mask is None:
        count = np.prod([x.shape[a] for a in axes], dtype=np.int64)
        mean = xa.mean(axis=axes, keepdims=True) if center else np.zeros((), xa.dtype)
        d = xa - mean
        var = (d * d).mean(axis=axes, keepdims=True)
        return mean, var, count
    m = mask.astype(xa.dtype, copy=False)
    count = np.broadcast_to(m, np.broadcast_shapes(m.shape, x.shape)).sum(axis=axes, keepdims=True)
    mean = (xa * m).sum(axis=axes, keepdims=True) / count if center else np.zeros((), xa.dtype)
    d = (xa - mean) * m
    var = (d * d).sum(axis=axes, keepdims=True) / count
    return mean, var, count


@dataclass
class NormCache:
    """What the backward pass needs: ``xhat``, ``rstd``, the broadcast ``weight``, the reduced axes."""

    xhat: np.ndarray
    rstd: np.ndarray
    weight: Optional[np.ndarray]
    axes: tuple
    param_shape: Optional[tuple]
    center: bool
    batch_stats: bool
    mask: Optional[np.ndarray]
    count: object
    dtype: np.dtype
    scale: Optional[np.ndarray] = None  # batch renorm's r: z = r * xhat + d, no gradient through r, d
    shift: Optional[np.ndarray] = None
    bias_shape: Optional[tuple] = None  # None: there was no bias (and no gradient for one)

    def z(self) -> np.ndarray:
        """What the affine transform acts on: ``xhat``, or ``r * xhat + d`` in batch renorm."""
        return self.xhat if self.scale is None else self.xhat * self.scale + self.shift


def normalize_forward(
    x: np.ndarray,
    axes: Sequence[int],
    weight: Optional[np.ndarray],
    bias: Optional[np.ndarray],
    eps: float,
    *,
    center: bool = True,
    mask: Optional[np.ndarray] = None,
    stats: Optional[tuple] = None,
    batch_stats: bool = True,
    scale: Optional[np.ndarray] = None,
    shift: Optional[np.ndarray] = None,
):
    """``y = gamma * (scale * (x - mean) * rstd + shift) + beta`` and its cache.

    ``weight``/``bias`` must already be shaped to broadcast against ``x`` (``None`` = 1 / 0).
    Statistics come from ``x`` over ``axes`` unless ``stats=(mean, var, count)`` passes them in:
    precomputed batch statistics (``batch_stats=True``: the gradient flows through them) or
    fixed ones such as running estimates in evaluation (``batch_stats=False``: it does not).
    ``scale``/``shift`` are batch renorm's r and d (constants for the backward pass). Returns
    ``(y, cache, (mean, var, count))``; with a mask, masked-out elements of ``y`` are 0.
    """
    if stats is None:
        mean, var, count = moments(x, axes, mask=mask, center=center)
    else:
        mean, var, count = stats
        mean, var = (np.asarray(s, dtype=acc_dtype(x.dtype)) for s in (mean, var))
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x.astype(mean.dtype, copy=False) - mean) * rstd if center else x.astype(rstd.dtype, copy=False) * rstd
    if mask is not None:
        xhat *= mask
    renorm = scale is not None
    z = xhat * scale + shift if renorm else xhat
    y = z * weight if weight is not None else (z.copy() if z is xhat else z)
    if bias is not None:
        y += bias
    if mask is not None and (bias is not None or renorm):
        y *= mask
    cache = NormCache(xhat, rstd, weight, tuple(axes), None if weight is None else weight.shape, center, batch_stats,
                      mask, count, x.dtype, scale, shift, None if bias is None else bias.shape)
    return y.astype(x.dtype, copy=False), cache, (mean, var, count)


def sum_to_shape(a: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum ``a`` over the axes where ``shape`` has size 1 (the reverse of broadcasting)."""
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, s in enumerate(shape) if s == 1 and a.shape[i + lead] != 1)
    return a.sum(axis=axes, keepdims=True).reshape(shape) if axes else a


def normalize_backward(dy: np.ndarray, cache: NormCache):
    """Gradients ``(dx, dweight, dbias)`` of :func:`normalize_forward` (``dweight``/``dbias`` in the
    broadcast shape of the weight, ``None`` when there was none)."""
    c = cache
    dy = dy.astype(c.rstd.dtype, copy=False)
    if c.mask is not None:
        dy = dy * c.mask
    dweight = dbias = None
    if c.bias_shape is not None:
        dbias = sum_to_shape(dy, c.bias_shape)
    if c.weight is not None:
        dweight = sum_to_shape(dy * c.z(), c.param_shape)
        g = dy * c.weight
    else:
        g = dy
    if c.scale is not None:
        g = g * c.scale
    if not c.batch_stats:
        dx = g * c.rstd
    else:
        n = c.count
        mean_gx = (g * c.xhat).sum(axis=c.axes, keepdims=True) / n
        inner = g - c.xhat * mean_gx
        if c.center:
            inner -= g.sum(axis=c.axes, keepdims=True) / n  # g is 0 where masked out
        dx = inner * c.rstd
    if c.mask is not None:
        dx *= c.mask
    return dx.astype(c.dtype, copy=False), dweight, dbias


def moments_backward(x: np.ndarray, axes: Sequence[int], mean: np.ndarray, count, dmean, dvar) -> np.ndarray:
    """Gradient on ``x`` of a loss through ``(mean, biased var)`` over ``axes``:
    ``dx = dmean / n + dvar * 2 (x - mean) / n`` (used where statistics are mixed, as in
    switchable normalization)."""
    xa = x.astype(mean.dtype, copy=False)
    return (dmean + 2.0 * dvar * (xa - mean)) / count


class RunningStats(NamedTuple):
    """Running estimates carried between training steps (explicit, never hidden state)."""

    mean: np.ndarray
    var: np.ndarray
    num_batches_tracked: int = 0


def update_running(running: RunningStats, batch_mean, batch_var, count, momentum: Optional[float]) -> RunningStats:
    """PyTorch's rule: ``r <- (1 - f) r + f * new`` with the *unbiased* batch variance
    (``var * n / (n - 1)``), ``f = momentum``, or ``1 / num_batches_tracked`` when
    ``momentum is None`` (a cumulative average)."""
    tracked = running.num_batches_tracked + 1
    f = 1.0 / tracked if momentum is None else momentum
    count = np.asarray(count, dtype=np.float64)
    unbiased = np.asarray(batch_var, np.float64) * (count / np.maximum(count - 1, 1))
    mean = (1 - f) * np.asarray(running.mean, np.float64) + f * np.asarray(batch_mean, np.float64).reshape(running.mean.shape)
    var = (1 - f) * np.asarray(running.var, np.float64) + f * unbiased.reshape(running.var.shape)
    return RunningStats(mean.astype(running.mean.dtype), var.astype(running.var.dtype), tracked)


def per_channel(p: Optional[np.ndarray], ndim: int, axis: int = 1) -> Optional[np.ndarray]:
    """A per-channel vector reshaped to broadcast along ``axis`` of an ``ndim``-D input."""
    if p is None:
        return None
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(p).reshape(shape)


def flat(p: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if p is None else p.reshape(-1)
