r"""RMS normalization (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", arXiv:1910.07467).

Layer normalization without centering: over the trailing ``normalized_shape`` dims,

.. math::

    y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \odot \gamma

``eps=None`` takes the machine epsilon of the computation dtype, as ``torch.nn.functional.rms_norm``:
float32's for float16 and float32 input, float64's for float64.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from normlab import _checks
from normlab.reference._core import acc_dtype, check_float_params, normalize_backward, normalize_forward


def rms_norm_forward(
    x: np.ndarray,
    normalized_shape: Sequence[int] | int,
    gamma: Optional[np.ndarray] = None,
    eps: Optional[float] = None,
):
    """Forward pass: ``(y, cache)``."""
    op = "rms_norm"
    _checks.check_floating(x, op, "array")
    ns = _checks.check_normalized_shape(x.shape, _checks.as_normalized_shape(normalized_shape, op), op)
    gamma = None if gamma is None else np.asarray(gamma)  # a list too, as the other forwards take
    _checks.check_param_shape(ns, op, gamma=gamma)
    check_float_params(op, gamma=gamma)
    if eps is None:
        eps = float(np.finfo(acc_dtype(x.dtype)).eps)
    _checks.check_eps(eps, op)
    axes = tuple(range(x.ndim - len(ns), x.ndim))
    y, cache, _ = normalize_forward(x, axes, gamma, None, eps, center=False)
    return y, cache


def rms_norm_backward(dy: np.ndarray, cache):
    """Backward pass: ``(dx, dgamma)``."""
    dx, dw, _ = normalize_backward(dy, cache)
    return dx, dw
