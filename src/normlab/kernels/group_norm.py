r"""GroupNorm and InstanceNorm, on the channel-statistics core of :mod:`._channel_norm`.

GroupNorm (Wu & He, 2018) splits the ``C`` channels of each sample into ``num_groups``
groups and normalizes each group over its channels and all positions:

.. math::

    y_{nc\cdot} = \frac{x_{nc\cdot} - \mu_{n,g(c)}}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}}\, w_c + b_c,
    \qquad g(c) = \lfloor c / (C/G) \rfloor

InstanceNorm (Ulyanov et al., 2016) is GroupNorm with one channel per group
(``num_groups = C``). Input ``(N, C, *)``, contiguous (NCHW) or channels-last
(``torch.channels_last``, ``channels_last_3d``, or ``(N, L, C)`` transposed), read in place.
The kernel path of ``instance_norm`` has no running statistics: with running statistics the
functional tier keeps torch's path (``supports`` says no).
"""
from __future__ import annotations

from normlab.kernels._channel_norm import ChannelNormFunction


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """``torch.nn.functional.group_norm`` on Triton kernels (see ``supports`` for what it takes)."""
    return ChannelNormFunction.apply(x, weight, bias, None, None, None, int(num_groups), False, True, 0.0, float(eps))


def instance_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """``torch.nn.functional.instance_norm`` with ``use_input_stats=True`` and no running statistics."""
    return ChannelNormFunction.apply(x, weight, bias, None, None, None, int(x.shape[1]), False, True, 0.0, float(eps))
