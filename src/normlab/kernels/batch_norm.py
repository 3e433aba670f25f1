r"""BatchNorm, on the channel-statistics core of :mod:`._channel_norm`.

Ioffe & Szegedy, 2015. Statistics per channel over the batch and all positions:

.. math::

    y = \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon}}\, w_c + b_c, \qquad
    \hat r \leftarrow (1 - m)\,\hat r + m\,r_{\text{new}}

In training the batch statistics normalize (biased variance) and, when buffers are given,
``running_mean``/``running_var`` are updated in place with ``momentum`` ``m`` and the
*unbiased* variance (``count / (count - 1)``), inside the statistics kernel. In eval the
running statistics normalize and the op is elementwise. Inputs ``(N, C)``, ``(N, C, L)``,
``(N, C, H, W)``, ``(N, C, D, H, W)``, contiguous or channels-last; a channels-last input
folds its batch into its positions, so the statistics kernels see one long run per channel.
``momentum`` is a number, or None when nothing updates running statistics (the layers turn
``momentum=None``, the cumulative average, into a factor before the call).
"""
from __future__ import annotations

from normlab.kernels._channel_norm import ChannelNormFunction


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5):
    """``torch.nn.functional.batch_norm`` on Triton kernels (see ``supports`` for what it takes)."""
    return ChannelNormFunction.apply(
        x, weight, bias, None, running_mean, running_var, 0, True, bool(training),
        0.0 if momentum is None else float(momentum), float(eps),  # None: no running update to weigh
    )
