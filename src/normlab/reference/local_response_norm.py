r"""Local response normalization (Krizhevsky, Sutskever & Hinton 2012, "ImageNet Classification
with Deep Convolutional Neural Networks", section 3.3), with PyTorch's formula:

.. math::

    b_c = a_c \left(k + \frac{\alpha}{n} \sum_{c' = c - \lfloor n/2 \rfloor}^{c + \lfloor (n-1)/2 \rfloor}
          a_{c'}^2\right)^{-\beta}

over ``n = size`` neighbouring channels, zero-padded at the ends, the sum always divided by
``n`` (TensorFlow's LRN does not divide). Input (N, C, *), at least 3-D as in PyTorch.
"""
from __future__ import annotations

import numpy as np

from normlab import _checks
from normlab.reference._core import acc_dtype, check_grad_shape


def _window_sum(a: np.ndarray, before: int, after: int) -> np.ndarray:
    """``out[:, c] = sum(a[:, c - before : c + after + 1])`` with zero padding, along axis 1
    (``a`` already in the accumulation dtype).

    Summed window by window (one shifted add per neighbour). A difference of running totals
    would be one pass, but its totals grow over all earlier channels: float16 overflowed to
    inf (then inf - inf = NaN), and small channels after large ones lost their digits."""
    c = a.shape[1]
    out = np.zeros_like(a)
    for shift in range(-before, after + 1):  # out[:, c] += a[:, c + shift] where c + shift is a channel
        lo, hi = max(0, -shift), min(c, c - shift)
        if lo < hi:
            out[:, lo:hi] += a[:, lo + shift:hi + shift]
    return out


def local_response_norm_forward(a: np.ndarray, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
    """Forward pass: ``(b, cache)``."""
    op = "local_response_norm"
    _checks.check_floating(a, op, "array")
    if a.ndim < 3:
        raise ValueError(f"{op} expects an input of 3 or more dims (N, C, *), got a {a.ndim}-D input of shape "
                         f"{_checks.shape_str(a.shape)}")
    _checks.check_positive_int(size, op, "size (a number of channels)")
    before, after = size // 2, (size - 1) // 2
    aa = a.astype(acc_dtype(a.dtype), copy=False)  # float32 arithmetic for float16
    s = k + (alpha / size) * _window_sum(aa * aa, before, after)
    b = aa * s ** -beta
    return b.astype(a.dtype, copy=False), dict(a=aa, s=s, size=size, alpha=alpha, beta=beta, before=before,
                                               after=after, dtype=a.dtype)


def local_response_norm_backward(db: np.ndarray, cache):
    r"""Backward pass: ``da``. Each ``a_c`` enters its own output and the window sums of the
    channels ``j`` whose window holds it, so
    ``da_c = db_c s_c^{-beta} - (2 alpha beta / n) a_c sum_{j: c in win(j)} db_j a_j s_j^{-beta-1}``,
    the transposed window running from ``c - after`` to ``c + before``."""
    a, s, n, alpha, beta = cache["a"], cache["s"], cache["size"], cache["alpha"], cache["beta"]
    check_grad_shape(db, a.shape)
    db = np.asarray(db).astype(a.dtype, copy=False)
    t = db * a * s ** (-beta - 1)
    da = db * s ** -beta - (2 * alpha * beta / n) * a * _window_sum(t, cache["after"], cache["before"])
    return da.astype(cache["dtype"], copy=False)
