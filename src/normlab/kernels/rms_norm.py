r"""RMSNorm over the trailing dims, on the row kernels of :mod:`normlab.kernels.layer_norm`.

.. math::

    y = x \, r \, w, \qquad r = 1 / \sqrt{\tfrac1N \textstyle\sum_j x_j^2 + \epsilon}

RMSNorm is LayerNorm without centering and without bias, so it runs the same kernels with
``RMS=True`` (a compile-time flag: no mean is computed, stored or read). Zhang & Sennrich,
"Root Mean Square Layer Normalization", 2019. ``eps=None`` means
``torch.finfo(x.dtype).eps``, as in ``torch.nn.functional.rms_norm``.
"""
from __future__ import annotations

import math

import torch

from normlab.kernels.layer_norm import as_rows, backward, forward


class RMSNormFunction(torch.autograd.Function):
    """Differentiable through x and weight; saves ``(x, weight, rstd)``."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        N = math.prod(normalized_shape)
        y, _, rstd = forward(as_rows(x, N), weight, None, eps, rms=True)
        ctx.save_for_backward(x, weight, rstd)
        ctx.N = N
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        need_dw = weight is not None and ctx.needs_input_grad[2]
        dx, dw, _ = backward(dy.reshape(-1, ctx.N), as_rows(x, ctx.N), weight, None, None, rstd, True, need_dw, False)
        return dx.view(x.shape), None, (dw.view(weight.shape) if dw is not None else None), None


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm`` on Triton kernels (see ``supports`` for what it takes)."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return RMSNormFunction.apply(x, tuple(normalized_shape), weight, float(eps))
