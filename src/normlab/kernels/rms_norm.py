r"""RMSNorm over the trailing dims, on the row kernels of :mod:`normlab.kernels.layer_norm`.

.. math::

    y = x \, r \, w, \qquad r = 1 / \sqrt{\tfrac1N \textstyle\sum_j x_j^2 + \epsilon}

RMSNorm is LayerNorm without centering and without bias, so it runs the same kernels with
``RMS=True`` (a compile-time flag: no mean is computed, stored or read). Zhang & Sennrich,
"Root Mean Square Layer Normalization", 2019. ``eps=None`` means the machine epsilon of the
computation dtype, as in ``torch.nn.functional.rms_norm``: float32's for float16, bfloat16 and
float32 input, float64's for float64 (not float16's own, 8000 times larger).
"""
from __future__ import annotations

import math

import torch

from normlab.functional._core import twice_differentiable
from normlab.kernels._common import acc_torch
from normlab.kernels.layer_norm import _backward, _forward, _recompute, plan


class RMSNormFunction(torch.autograd.Function):
    """Differentiable through x and weight; saves ``(x, weight, rstd)``."""

    @staticmethod
    def forward(ctx, x, N, weight, eps):
        r = plan(x, N, weight, None, True)
        y, rstd = _forward(r, x, weight, None, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.plan = r
        ctx.plan_n, ctx.eps, ctx.rms, ctx.bias = N, eps, True, None
        return y

    @staticmethod
    @twice_differentiable(_recompute)
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw, _ = _backward(ctx.plan, dy, x, weight, rstd, ctx.needs_input_grad[2])
        return dx, None, dw, None


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm`` on Triton kernels (see ``supports`` for what it takes)."""
    N = math.prod(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else int(normalized_shape)
    if eps is None:  # torch's rule: the epsilon of the type the statistics are computed in
        eps = torch.finfo(acc_torch(x.dtype)).eps
    return RMSNormFunction.apply(x, N, weight, float(eps))
