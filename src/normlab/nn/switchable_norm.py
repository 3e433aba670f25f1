"""Switchable normalization layers (Luo et al. 2018); torch has no twin."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from normlab import functional as NF
from normlab.nn.batch_norm import _NormBase


class _SwitchableNorm(_NormBase):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        # logits of the (IN, LN, BN) mixes; equal logits start from a uniform mix, as in the paper
        self.mean_weight = nn.Parameter(torch.ones(3, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.ones(3, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "mean_weight"):
            nn.init.ones_(self.mean_weight)
            nn.init.ones_(self.var_weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        return self._step(lambda momentum, running_mean, running_var: NF.switchable_norm(
            input, running_mean, running_var, self.weight, self.bias, self.mean_weight, self.var_weight,
            self._use_batch_stats(), momentum, self.eps))

    def mixture(self) -> dict:
        """The current softmax weights, ``{"mean": {"IN": .., "LN": .., "BN": ..}, "var": {...}}``:
        the softmax of all three logits. On an (N, C) input the IN branch is left out and the
        layer mixes LN and BN with the softmax of their two logits alone."""
        names = ("IN", "LN", "BN")
        out = {}
        for key, logits in (("mean", self.mean_weight), ("var", self.var_weight)):
            w = torch.softmax(logits.detach().float(), 0).tolist()
            out[key] = dict(zip(names, w))
        return out


_SN_DOC = r"""Switchable normalization (Luo, Ren, Peng, Zhang & Li 2018) of a {layout} input.

    .. math:: y = \gamma \frac{{x - \sum_k w_k \mu_k}}{{\sqrt{{\sum_k w'_k \sigma^2_k + \epsilon}}}} + \beta,
              \quad k \in \{{IN, LN, BN\}}

    with ``w = softmax(mean_weight)``, ``w' = softmax(var_weight)`` learned (3 logits each,
    initialized equal). The BN branch uses batch statistics in training and the running ones
    in evaluation. {note}

    Args:
        num_features: C. eps: default 1e-5. momentum: default 0.1 (BN branch's running
        statistics, torch's convention). affine: default True. track_running_stats: default True.
        bias: keyword-only, default True; ``False`` learns γ without β (as BatchNorm's ``bias``).

    Shape:
        Input and output {layout}.

    Examples::

        >>> sn = normlab.nn.{name}(16)
        >>> y = sn(torch.randn({example}))
        >>> sn.mixture()["mean"]  # the learned importance of IN, LN and BN
    """


class SwitchableNorm1d(_SwitchableNorm):
    _ranks, _layout = (2, 3), "(N, C) or (N, C, L)"
    __doc__ = _SN_DOC.format(layout="(N, C) or (N, C, L)", name="SwitchableNorm1d", example="8, 16, 10",
                             note="For (N, C) input the IN branch is left out (weight 0).")


class SwitchableNorm2d(_SwitchableNorm):
    _ranks, _layout = (4,), "(N, C, H, W)"
    __doc__ = _SN_DOC.format(layout="(N, C, H, W)", name="SwitchableNorm2d", example="8, 16, 5, 5", note="")
