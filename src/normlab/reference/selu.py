r"""Self-normalizing networks (Klambauer, Unterthiner, Mayr & Hochreiter 2017, "Self-Normalizing
Neural Networks", arXiv:1706.02515).

.. math::

    \mathrm{selu}(x) = \lambda \begin{cases} x & x > 0 \\ \alpha (e^x - 1) & x \le 0 \end{cases}

with the fixed point constants below: activations of a deep net with LeCun-normal weights
(``N(0, 1/fan_in)``) are driven towards mean 0 and variance 1 with no normalization layer.
Alpha dropout sets dropped units to the SELU's negative saturation ``alpha' = -lambda alpha``
and applies ``a x + b`` so that mean and variance are kept:
``a = ((1 - p)(1 + p alpha'^2))^{-1/2}``, ``b = -a alpha' p``.
"""
from __future__ import annotations

import numpy as np

from normlab import _checks
from normlab.reference._core import acc_dtype, check_grad_shape

SELU_LAMBDA = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
ALPHA_PRIME = -SELU_LAMBDA * SELU_ALPHA


def selu_forward(x: np.ndarray):
    """``(y, cache)``; float16 is computed in float32."""
    _checks.check_floating(x, "selu", "array")
    xa = x.astype(acc_dtype(x.dtype), copy=False)
    y = np.where(xa > 0, SELU_LAMBDA * xa, SELU_LAMBDA * SELU_ALPHA * np.expm1(np.minimum(xa, 0)))
    return y.astype(x.dtype, copy=False), dict(x=x)


def selu_backward(dy: np.ndarray, cache):
    """``dx``: ``lambda`` where x > 0, ``lambda alpha e^x`` elsewhere (from ``e^x`` itself, not as
    the negative branch plus ``lambda alpha``: that difference cancels to 0 for x below about -17
    in float32)."""
    x = cache["x"]
    check_grad_shape(dy, x.shape)
    xa = x.astype(acc_dtype(x.dtype), copy=False)
    slope = np.where(xa > 0, SELU_LAMBDA, SELU_LAMBDA * SELU_ALPHA * np.exp(np.minimum(xa, 0)))
    return (dy * slope).astype(x.dtype, copy=False)  # a gradient has its input's dtype, as everywhere here


def alpha_dropout_affine(p: float):
    """``(a, b)`` of alpha dropout for drop probability ``p``."""
    a = ((1 - p) * (1 + p * ALPHA_PRIME ** 2)) ** -0.5
    return a, -a * ALPHA_PRIME * p


def alpha_dropout_forward(x: np.ndarray, p: float = 0.5, training: bool = True, rng=None, keep=None):
    """``(y, cache)``. ``keep`` (bool, x's shape) chooses kept units; otherwise drawn from ``rng``
    (a ``numpy.random.Generator``) with probability ``1 - p``. Identity when not training or p = 0."""
    _checks.check_floating(x, "alpha_dropout", "array")
    if not 0 <= p <= 1:
        raise ValueError(f"alpha_dropout: p must be a probability in [0, 1], got {p}")
    if not training or p == 0:
        return x, dict(a=1.0, keep=None, shape=x.shape, dtype=x.dtype)
    if p == 1:
        return np.zeros_like(x), dict(a=0.0, keep=np.zeros(x.shape, bool), shape=x.shape, dtype=x.dtype)
    if keep is None:
        rng = np.random.default_rng() if rng is None else rng
        keep = rng.random(x.shape) >= p
    else:  # a bool per unit: an int or float array (probabilities by mistake) would scale the gradient
        keep = np.asarray(keep)
        if keep.dtype != np.bool_ or keep.shape != x.shape:
            raise ValueError(f"alpha_dropout: keep must be a bool array of x's shape {_checks.shape_str(x.shape)} "
                             f"(True = kept), got {keep.dtype} of shape {_checks.shape_str(keep.shape)}")
    a, b = alpha_dropout_affine(p)
    y = a * np.where(keep, x, ALPHA_PRIME) + b
    return y.astype(x.dtype, copy=False), dict(a=a, keep=keep, shape=x.shape, dtype=x.dtype)


def alpha_dropout_backward(dy: np.ndarray, cache):
    """``dx = a * dy`` on kept units, 0 on dropped ones (``dy`` itself, copied, when the forward was the
    identity); in x's dtype, a fresh array."""
    check_grad_shape(dy, cache["shape"])
    dy = np.asarray(dy)
    dx = dy.astype(cache["dtype"]) if cache["keep"] is None else cache["a"] * dy * cache["keep"]
    return dx.astype(cache["dtype"], copy=False)


def lecun_normal(shape, fan_in: int | None = None, rng=None) -> np.ndarray:
    """LeCun-normal weights ``N(0, 1 / fan_in)``; ``fan_in`` defaults to the product of ``shape[1:]``."""
    rng = np.random.default_rng() if rng is None else rng
    fan_in = int(np.prod(shape[1:])) if fan_in is None else fan_in
    return rng.standard_normal(shape) / np.sqrt(fan_in)
