"""Masked (padding-aware) batch normalization; torch has no twin. State dicts are batch norm's."""
from __future__ import annotations

from typing import Optional

import torch

from normlab import functional as NF
from normlab.nn.batch_norm import _NormBase


class MaskedBatchNorm1d(_NormBase):
    r"""Batch normalization of padded sequences (N, C, L) over their valid positions only.

    ``forward(input, mask)`` with a boolean ``mask`` of shape (N, L), **True at valid
    positions**, False at padding (note: the opposite of ``key_padding_mask`` in
    ``torch.nn.MultiheadAttention``, where True marks padding). Mean and variance per channel
    are taken over the valid positions, so they do not depend on how much padding a batch
    holds; the running variance uses the valid count for its unbiased correction. **Padded
    positions of the output are 0** and receive no gradient. ``mask=None`` or an all-True
    mask is exactly ``BatchNorm1d``.

    Errors: a mask of the wrong shape, dtype or device, a sequence or a whole batch that is all
    padding, a single valid position in training.

    Args:
        num_features: C. eps: default 1e-5. momentum: default 0.1 (``None`` = cumulative
        average). affine: default True. track_running_stats: default True.

    Shape:
        Input (N, C, L), mask (N, L); output (N, C, L).

    Examples::

        >>> mbn = normlab.nn.MaskedBatchNorm1d(16)
        >>> x = torch.randn(4, 16, 12)
        >>> lengths = torch.tensor([12, 7, 3, 9])
        >>> mask = torch.arange(12)[None, :] < lengths[:, None]
        >>> y = mbn(x, mask)
    """

    _ranks, _layout = (3,), "(N, C, L)"

    def forward(self, input: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input(input)
        return self._step(lambda momentum, running_mean, running_var: NF.masked_batch_norm(
            input, mask, running_mean, running_var, self.weight, self.bias, self._use_batch_stats(), momentum,
            self.eps))
