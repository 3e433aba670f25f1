"""Instance normalization layers, drop-in for ``torch.nn.InstanceNorm1d/2d/3d``."""
from __future__ import annotations

from typing import Optional

import torch

from normlab import _checks
from normlab import functional as NF
from normlab.nn.batch_norm import _NormBase


class _InstanceNorm(_NormBase):
    _spatial = 1

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        _checks.check_floating(input, name, "tensor")
        unbatched = self._spatial + 1
        _checks.check_rank(input.shape, (unbatched, unbatched + 1), name, self._layout)
        batched = input.dim() == unbatched + 1
        _checks.check_channels(input.shape, self.num_features, name, axis=1 if batched else 0)  # the shape given
        x = input if batched else input.unsqueeze(0)
        y = NF.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             self.training or not self.track_running_stats,
                             self.momentum if self.momentum is not None else 0.0, self.eps)
        return y if batched else y.squeeze(0)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a checkpoint without version metadata that holds running statistics for a layer that
        # does not track them was most likely saved before torch 0.4.0, when InstanceNorm tracked
        # them by default: refuse it with the explanation torch gives, not as a bare unexpected key
        if local_metadata.get("version", None) is None and not self.track_running_stats:
            keys = [prefix + k for k in ("running_mean", "running_var") if prefix + k in state_dict]
            if keys:
                name = type(self).__name__
                error_msgs.append(
                    f"Unexpected running stats buffer(s) {' and '.join(repr(k) for k in keys)} for {name} with "
                    f"track_running_stats=False. A checkpoint saved before torch 0.4.0 may hold them, because "
                    f"{name} no longer tracks running statistics by default: remove these keys from the "
                    f"state_dict, or build the layer with track_running_stats=True if they are needed.")
                for k in keys:
                    state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


_IN_DOC = r"""Instance normalization (Ulyanov et al. 2016): each sample's channel is normalized over its
    spatial positions. Input {layout} (or unbatched, without N).

    Args:
        num_features: C. eps: default 1e-5. momentum: default 0.1 (``None`` means 0, as in
        torch). affine: learn γ, β; default False. track_running_stats: default False; when
        True, evaluation uses running averages of the per-instance statistics.

    Note:
        Unlike torch, a channel count different from ``num_features`` is an error even without
        affine parameters (torch only warns).

    Examples::

        >>> m = normlab.nn.{name}(16, affine=True)
        >>> y = m(torch.randn({example}))
    """


class InstanceNorm1d(_InstanceNorm):
    _spatial, _layout = 1, "(N, C, L)"
    __doc__ = _IN_DOC.format(layout="(N, C, L)", name="InstanceNorm1d", example="8, 16, 10")


class InstanceNorm2d(_InstanceNorm):
    _spatial, _layout = 2, "(N, C, H, W)"
    __doc__ = _IN_DOC.format(layout="(N, C, H, W)", name="InstanceNorm2d", example="8, 16, 5, 5")


class InstanceNorm3d(_InstanceNorm):
    _spatial, _layout = 3, "(N, C, D, H, W)"
    __doc__ = _IN_DOC.format(layout="(N, C, D, H, W)", name="InstanceNorm3d", example="8, 16, 3, 5, 5")
