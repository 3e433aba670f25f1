r"""Masked (padding-aware) BatchNorm for ``(N, C, L)`` sequences, on :mod:`._channel_norm`.

``mask`` is ``(N, L)`` bool, **True at valid positions**. Statistics per channel over the
valid positions only (count ``n = mask.sum()``), the biased variance normalizes, the running
variance takes ``var * n / (n - 1)``. Output at padded positions is exactly 0 and the input
gradient there is 0; in eval the running statistics normalize the valid positions.
``mask=None`` is plain batch norm. Same semantics as ``normlab.reference.masked_batch_norm``.
The mask rides along the statistics, apply and gradient kernels as a per-position flag, so
this costs one extra byte read per position over batch norm.
"""
from __future__ import annotations

from normlab.kernels._channel_norm import ChannelNormFunction


def masked_batch_norm(x, mask, running_mean, running_var, weight=None, bias=None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5):
    """Masked batch norm of ``x`` ``(N, C, L)`` with ``mask`` ``(N, L)`` (True = valid) on Triton kernels."""
    return ChannelNormFunction.apply(
        x, weight, bias, mask, running_mean, running_var, 0, True, bool(training),
        0.0 if momentum is None else float(momentum), float(eps),  # None: no running update to weigh
    )
