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
in the input's precision otherwise, with a corrected two-pass variance (mean first, then the
mean of the deviations, which recovers what the first sum rounded away, and the mean of their
squares), which stays accurate when the mean is large against the spread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np

from normlab import _checks


def acc_dtype(dtype) -> np.dtype:
    """Accumulation dtype: float32 for float16 and float32 input, the input's own for float64 and
    wider (``np.longdouble``)."""
    return np.promote_types(dtype, np.float32)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def reduce_sum(a: np.ndarray, axes: Sequence[int], b: Optional[np.ndarray] = None) -> np.ndarray:
    """``sum(a * b)`` (or ``sum(a)``) over ``axes``, keeping them as size-1 dims.

    Written with ``np.einsum`` so the product is never materialized: one read of each
    operand, which is what makes the reference fast enough to compare with torch.
    """
    axes = set(ax % a.ndim for ax in axes)
    sub = _LETTERS[:a.ndim]
    kept = "".join(ch for i, ch in enumerate(sub) if i not in axes)
    if b is None:
        r = np.einsum(f"{sub}->{kept}", a)
    else:
        r = np.einsum(f"{sub},{sub}->{kept}", a, np.broadcast_to(b, a.shape))
    return np.asarray(r).reshape([1 if i in axes else n for i, n in enumerate(a.shape)])


def centered_moments(x: np.ndarray, axes: Sequence[int], *, mask: Optional[np.ndarray] = None, center: bool = True,
                     copy: bool = True):
    """``(mean, var, count, d)``: :func:`moments` plus the centred input ``d = (x - mean) * mask``
    (a fresh array in the accumulation dtype that callers may overwrite). With ``center=False``,
    no mask and ``copy=False``, ``d`` may be ``x`` itself (read-only to the caller): no copy pass."""
    axes = tuple(axes)
    xa = x.astype(acc_dtype(x.dtype), copy=False)
    m = None
    if mask is None:
        count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
        mean = reduce_sum(xa, axes) / count if center else np.zeros((), xa.dtype)
        d = xa - mean if center else xa.copy() if copy else xa
    else:
        m = mask.astype(xa.dtype, copy=False)
        # count on the mask itself (not on its broadcast to x's shape): the mask's own reduced
        # axes, times x's extent along the reduced axes the mask is broadcast over (an int, so
        # the statistics keep their dtype)
        count = reduce_sum(m, axes) * math.prod(x.shape[a] for a in axes if m.shape[a] == 1)
        # NaN * 0 is NaN: a NaN or inf where the mask is 0 must not count. A non-finite sum says
        # one may be there (the sum is taken without centring too, where only the squares use it)
        total = reduce_sum(xa, axes, m)
        if not np.all(np.isfinite(total)):
            xa = np.where(m != 0, xa, 0)
            total = reduce_sum(xa, axes, m)
        mean = total / count if center else np.zeros((), xa.dtype)
        d = xa - mean
        d *= m
    if not center:
        return mean, reduce_sum(d, axes, d) / count, count, d
    # Corrected two-pass (Chan, Golub & LeVeque 1983): the sum behind ``mean`` rounds (in float32,
    # 65536 values near 1000 sum to a mean ~1e-3 off, and every output inherits that offset times
    # rstd: a constant channel came out at 0.6 instead of 0). The deviations' own mean ``r`` is a
    # sum of small numbers and recovers what was lost; the variance is then E[d^2] - r^2.
    r = reduce_sum(d, axes) / count
    mean = mean + r
    var = reduce_sum(d, axes, d) / count
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.abs(r) / np.sqrt(np.maximum(var - r * r, 0) + np.finfo(d.dtype).tiny)  # the offset in outputs
    if np.any(off > _OFFSET_ULPS * np.finfo(d.dtype).eps):  # (NaN input: off is NaN, so no correction)
        # visible in the outputs: centre again, and take the variance of what is now centred
        # (E[d^2] - r^2 cancels when r is large against the spread)
        d -= r if m is None else r * m
        var = reduce_sum(d, axes, d) / count
    else:
        var = np.maximum(var - r * r, 0)
    return mean, var, count, d


# an offset of the centred input below this many ulps (of the accumulation dtype) of its spread
# stays: 32 ulps of an output of size 1, about what rounding the outputs costs (float32: 4e-6,
# float64: 7e-15); above it, one more pass removes it
_OFFSET_ULPS = 32


def moments(x: np.ndarray, axes: Sequence[int], *, mask: Optional[np.ndarray] = None, center: bool = True):
    """Mean, biased variance and count over ``axes`` (kept as size-1 dims), accumulated in :func:`acc_dtype`.

    ``mask`` (broadcastable to ``x``, 1 = counted, 0 = ignored) restricts the statistics to the
    selected elements. With ``center=False`` the "variance" is the mean square and the mean is 0.
    """
    mean, var, count, _ = centered_moments(x, axes, mask=mask, center=center)
    return mean, var, count


@dataclass
class NormCache:
    """What the backward pass needs: ``xhat`` (as ``u * xfactor``), ``rstd``, the broadcast
    ``weight``, the reduced axes.

    ``u`` is the centred input ``(x - mean) * mask`` with ``xfactor = rstd`` when the forward
    never had to form ``xhat`` (a weight constant along the reduced axes folds ``rstd`` into one
    multiply, ``y = u * (rstd * gamma) + beta``: one pass over the tensor saved), or ``xhat``
    itself with ``xfactor = 1``. Either way ``xfactor`` is one number per normalized group, so
    sums such as ``sum(dy * xhat) = xfactor * sum(dy * u)`` cost no extra pass. For RMS norm
    without a weight ``u`` is the input array itself (read, never written): change ``x`` in
    place between the forward and the backward and the gradients are wrong, as with any cache
    that keeps the input.
    """

    u: np.ndarray
    xfactor: object
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
    bias_dtype: Optional[np.dtype] = None  # a parameter's gradient has the parameter's dtype
    given_shapes: tuple = (None, None)  # gamma's and beta's shapes as the caller gave them (see param_grads)

    @property
    def xhat(self) -> np.ndarray:
        """The normalized input ``(x - mean) * rstd`` (formed on demand when only ``u`` was kept)."""
        f = self.xfactor
        return self.u if np.ndim(f) == 0 and f == 1.0 else self.u * f  # u is xhat itself when f is 1

    def z(self) -> np.ndarray:
        """What the affine transform acts on: ``xhat``, or ``r * xhat + d`` in batch renorm."""
        return self.xhat if self.scale is None else self.xhat * self.scale + self.shift


def constant_along(shape: tuple, ndim: int, axes: Sequence[int]) -> bool:
    """Whether a tensor of (broadcast) ``shape`` holds one value per normalized group of an
    ``ndim``-D input reduced over ``axes``: size 1 along every reduced axis."""
    lead = ndim - len(shape)
    return all(shape[a - lead] == 1 for a in axes if a >= lead)


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
    centered: Optional[np.ndarray] = None,
):
    """``y = gamma * (scale * (x - mean) * rstd + shift) + beta`` and its cache.

    ``weight``/``bias`` must already be shaped to broadcast against ``x`` (``None`` = 1 / 0).
    Statistics come from ``x`` over ``axes`` unless ``stats=(mean, var, count)`` passes them in:
    precomputed batch statistics (``batch_stats=True``: the gradient flows through them) or
    fixed ones such as running estimates in evaluation (``batch_stats=False``: it does not).
    ``scale``/``shift`` are batch renorm's r and d (constants for the backward pass).
    ``centered`` (with ``stats``) is ``(x - mean) * mask`` already computed, e.g. by
    :func:`centered_moments`; the cache keeps it, and may overwrite it with ``xhat`` (saves a pass). Returns
    ``(y, cache, (mean, var, count))``; with a mask, masked-out elements of ``y`` are 0.
    """
    axes = tuple(axes)
    acc = acc_dtype(x.dtype)
    m = None if mask is None else mask.astype(acc, copy=False)
    if stats is None:
        mean, var, count, u = centered_moments(x, axes, mask=m, center=center, copy=False)
    else:
        mean, var, count = stats
        mean, var = (np.asarray(t, dtype=acc) for t in (mean, var))
        if centered is not None:
            u = centered
        else:
            u = x.astype(acc, copy=False)
            if center:
                u = u - mean
            if m is not None:
                u = np.where(m != 0, u, 0)  # not u * m: a NaN or inf where the mask is 0 must give 0
    if batch_stats:
        check_zero_variance(var, eps, center)
    rstd = inv_std(var, eps)
    renorm = scale is not None
    if weight is None or constant_along(weight.shape, x.ndim, axes):
        # y = gamma * (r * (u * rstd) + d) + beta = u * (rstd * r * gamma) + (gamma * d + beta):
        # every factor is one number per group, so one multiply and one add over the tensor
        a, offset = rstd, bias
        if renorm:
            a = a * scale
            offset = shift if weight is None else shift * weight
            offset = offset if bias is None else offset + bias
        if weight is not None:
            a = a * weight
        y = u * a
        if offset is not None:
            y += offset
        xfactor = rstd
    else:  # gamma varies inside a group (layer, group, RMS norm): xhat itself is needed
        xhat = u * rstd if u is x else np.multiply(u, rstd, out=u)  # never write into the caller's x
        z = xhat * scale + shift if renorm else xhat
        y = z * weight
        if bias is not None:
            y += bias
        u, xfactor = xhat, 1.0
    if m is not None and (bias is not None or renorm):
        y *= m
    if m is not None and not np.all(np.isfinite(rstd)):
        y = zero_masked_out(y, m, rstd)
    cache = NormCache(u, xfactor, rstd, weight, axes, None if weight is None else weight.shape, center, batch_stats,
                      m, count, x.dtype, scale, shift, None if bias is None else bias.shape,
                      None if bias is None else bias.dtype)
    return y.astype(x.dtype, copy=False), cache, (mean, var, count)


def check_grad_shape(dy, shape: tuple) -> None:
    """A backward's ``dy`` has the forward output's shape (a broadcastable one would give wrong sums)."""
    if np.shape(dy) != tuple(shape):
        raise ValueError(f"backward: dy must have the forward output's shape {_checks.shape_str(shape)}, "
                         f"got {_checks.shape_str(np.shape(dy))}")


def inv_std(var: np.ndarray, eps) -> np.ndarray:
    """``1 / sqrt(var + eps)`` in ``var``'s dtype (an ``eps`` given as ``np.float64`` would widen float32
    statistics to float64, and every gradient with them)."""
    return 1.0 / np.sqrt(var + np.asarray(eps, dtype=var.dtype))


def check_zero_variance(var: np.ndarray, eps, center: bool = True) -> None:
    """A clear error instead of NaN outputs: with ``eps=0`` a group whose values are all equal
    (variance 0) divides 0 by 0; without centring (RMS norm, where ``var`` is the mean square)
    a group of zeros does."""
    if eps == 0 and np.any(var == 0):
        what = "values are all equal (variance 0)" if center else "values are all 0 (mean square 0)"
        raise ValueError(f"eps=0 divides 0 by 0 where a normalized group's {what}: "
                         f"{int(np.sum(var == 0))} of {var.size} groups here; pass eps > 0")


def zero_masked_out(a: np.ndarray, mask: np.ndarray, rstd) -> np.ndarray:
    """``a`` with 0 where ``mask`` is 0: a multiply (in place), or, when a NaN or inf at a counted
    position made some group's factors (``rstd``) non-finite, ``np.where`` (NaN * 0 is NaN, and
    masked-out positions must still hold 0)."""
    if np.all(np.isfinite(rstd)):
        a *= mask
        return a
    return np.where(mask != 0, a, 0)


def sum_to_shape(a: np.ndarray, shape: tuple, b: Optional[np.ndarray] = None) -> np.ndarray:
    """Sum ``a`` (or ``a * b``) over the axes where ``shape`` has size 1: the reverse of broadcasting."""
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, s in enumerate(shape) if s == 1 and a.shape[i + lead] != 1)
    if not axes:  # a fresh array either way: a gradient must not alias the caller's dy
        return a.copy() if b is None else a * b
    return reduce_sum(a, axes, b).reshape(shape)


def normalize_backward(dy: np.ndarray, cache: NormCache):
    """Gradients ``(dx, dweight, dbias)`` of :func:`normalize_forward` (``dweight``/``dbias`` in the
    broadcast shape of the weight, ``None`` when there was none).

    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * weight * r`` and the
    means over the reduced (valid) elements. When the weight is constant along the reduced
    axes (batch, instance and masked norm) it factors out, and the two sums ``sum(dy)`` and
    ``sum(dy * xhat)`` serve both ``dx`` and the parameter gradients: two reads of ``dy``.
    """
    c = cache
    check_grad_shape(dy, c.u.shape)
    dy = np.asarray(dy).astype(c.rstd.dtype, copy=False)
    u, f, axes = c.u, c.xfactor, c.axes  # xhat = u * f, f one number per group (see NormCache)

    def constant_along_axes(shape) -> bool:  # a parameter of this (broadcast) shape is one value per group
        return constant_along(shape, u.ndim, axes)

    factor = c.rstd if c.scale is None else c.rstd * c.scale  # per-group factors of dx
    w_const = c.weight is None or constant_along_axes(c.weight.shape)
    # Masked-out entries of dy must not count. With gamma and beta one number per group (masked
    # batch norm) every sum below reads dy against u (0 where masked out) or the mask itself and
    # dx is masked at the end, so dy needs no masked copy (one pass saved); otherwise it gets one.
    sum_mask = None
    if c.mask is not None:
        if w_const and (c.bias_shape is None or constant_along_axes(c.bias_shape)):
            sum_mask = c.mask
        else:
            dy = np.where(c.mask != 0, dy, 0)  # not dy * mask: a NaN in dy where the mask is 0 must give 0
    if w_const:
        s_dy, s_dyx = reduce_sum(dy, axes, sum_mask), reduce_sum(dy, axes, u) * f
        if sum_mask is not None and not (np.all(np.isfinite(s_dy)) and np.all(np.isfinite(s_dyx))):
            # NaN * 0 is NaN: a NaN or inf in dy where the mask is 0 must not count (finite sums
            # mean every product was finite, so this copy is made only when one was not)
            dy = np.where(sum_mask != 0, dy, 0)
            s_dy, s_dyx = reduce_sum(dy, axes, sum_mask), reduce_sum(dy, axes, u) * f
        if c.weight is not None:
            factor = factor * c.weight
    dweight = dbias = None
    if c.bias_shape is not None:
        dbias = sum_to_shape(s_dy, c.bias_shape) if w_const and constant_along_axes(c.bias_shape) else \
            sum_to_shape(dy, c.bias_shape)
    if dbias is not None:
        dbias = dbias.astype(c.bias_dtype, copy=False)  # a gradient has its parameter's dtype, as in torch
    if c.weight is not None:
        if w_const:  # with batch renorm, z = r * xhat + d (r, d per group): sum(dy z) = r sum(dy xhat) + d sum(dy)
            dweight = sum_to_shape(s_dyx if c.scale is None else s_dyx * c.scale + s_dy * c.shift, c.param_shape)
        else:
            dweight = sum_to_shape(dy, c.param_shape, c.z())
        dweight = dweight.astype(c.weight.dtype, copy=False)
    if not c.batch_stats:
        dx = dy * (factor if w_const else factor * c.weight)
        if sum_mask is not None:
            dx = zero_masked_out(dx, sum_mask, c.rstd)
        return dx.astype(c.dtype, copy=False), dweight, dbias
    n = c.count
    if w_const:
        g, mean_g, mean_gx = dy, s_dy / n, s_dyx / n
    else:
        g = dy * c.weight
        mean_g, mean_gx = reduce_sum(g, axes) / n, reduce_sum(g, axes, u) * f / n  # g is 0 where masked out
    t = u * (mean_gx * f)
    if c.center:
        t += mean_g
    dx = np.subtract(g, t, out=t)
    dx *= factor
    if c.mask is not None:
        dx = zero_masked_out(dx, c.mask, c.rstd)
    return dx.astype(c.dtype, copy=False), dweight, dbias


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
    running = running._replace(mean=np.asarray(running.mean), var=np.asarray(running.var))  # lists too
    count = np.asarray(count, dtype=np.float64)
    unbiased = np.asarray(batch_var, np.float64) * (count / np.maximum(count - 1, 1))
    mean = (1 - f) * np.asarray(running.mean, np.float64) + f * np.asarray(batch_mean, np.float64).reshape(running.mean.shape)
    var = (1 - f) * np.asarray(running.var, np.float64) + f * unbiased.reshape(running.var.shape)
    # the buffers keep their dtype (float32 stays float32); integers (RunningStats([0, 0], [1, 1]))
    # would round every update away, so they become float64
    return RunningStats(mean.astype(_float_or_64(running.mean.dtype)), var.astype(_float_or_64(running.var.dtype)),
                        tracked)


def _float_or_64(dtype) -> np.dtype:
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def check_channel_params(x: np.ndarray, op: str, eps, gamma=None, beta=None, running: Optional[RunningStats] = None,
                         momentum=None) -> None:
    """The argument checks every per-channel reference forward makes: eps >= 0, momentum None or
    in [0, 1], gamma, beta and the running statistics one value per channel of ``x``, and gamma
    and beta floating-point."""
    _checks.check_eps(eps, op)
    _checks.check_momentum(momentum, op)
    stats = {} if running is None else dict(running_mean=running.mean, running_var=running.var)
    _checks.check_per_channel(x.shape[1], op, any_shape=True, gamma=gamma, beta=beta, **stats)
    check_float_params(op, gamma=gamma, beta=beta)


def check_float_params(op: str, **params) -> None:
    """TypeError for a learnable parameter that does not hold floating-point numbers: its gradient
    comes back in its own dtype, so an integer gamma's would be truncated to integers (torch
    refuses an integer tensor that requires grad). Running statistics are not parameters: they
    are updated as floats (see :func:`update_running`)."""
    for name, p in params.items():
        if p is not None:
            _checks.check_floating(np.asarray(p), f"{op} ({name})")


def per_channel(p: Optional[np.ndarray], ndim: int, axis: int = 1) -> Optional[np.ndarray]:
    """A per-channel vector reshaped to broadcast along ``axis`` of an ``ndim``-D input."""
    if p is None:
        return None
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(p).reshape(shape)


def given_shapes(*params) -> tuple:
    """The shapes per-channel parameters came in (``None`` for one not given): any shape with one
    value per channel is taken, and :func:`param_grads` gives each gradient that shape back."""
    return tuple(None if p is None else np.shape(p) for p in params)


def param_grads(grads, shapes) -> tuple:
    """Per-channel gradients in their parameters' own shapes (as :func:`given_shapes` recorded them;
    1-D where none was recorded), so ``gamma -= lr * dgamma`` updates gamma and nothing else: a
    (1, C, 1, 1) gamma minus a (C,) gradient would broadcast to (1, C, 1, C)."""
    return tuple(None if g is None else g.reshape(-1 if s is None else s) for g, s in zip(grads, shapes))
