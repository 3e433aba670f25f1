"""Tools for normalization inside existing models.

- :func:`convert`: swap every normalization layer for another kind by name (``"group:32"``,
  ``"sync_batch"``, ``"batch"`` ...), keeping channels, device, dtype and what carries over.
- :func:`fold`: fold evaluation-mode batch norm into the Conv/Linear before it, for deployment.
- :func:`precise_bn`: recompute exact population statistics for every batch-norm-like layer.
"""
from normlab.tools.convert import Change, convert, norm_kind
from normlab.tools.fold import FoldReport, fold, fold_pair_
from normlab.tools.precise_bn import precise_bn

__all__ = ["Change", "FoldReport", "convert", "fold", "fold_pair_", "norm_kind", "precise_bn"]
