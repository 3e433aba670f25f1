"""Tools for normalization inside existing models.

- :func:`convert`: swap every normalization layer for another kind by name (``"group:32"``,
  ``"sync_batch"``, ``"batch"`` ...), keeping channels, device, dtype and what carries over.
- :func:`fold`: fold evaluation-mode batch norm into the Conv/Linear before it, for deployment.
"""
from normlab.tools.convert import Change, convert, norm_kind
from normlab.tools.fold import FoldReport, fold, fold_pair_

__all__ = ["Change", "FoldReport", "convert", "fold", "fold_pair_", "norm_kind"]
