"""Tools for normalization inside existing models.

- :func:`convert`: swap every normalization layer for another kind by name (``"group:32"``,
  ``"sync_batch"``, ``"batch"`` ...), keeping channels, device, dtype and what carries over.
- :func:`fold`: fold evaluation-mode batch norm into the Conv/Linear before it, for deployment.
- :func:`precise_bn`: recompute exact population statistics for every batch-norm-like layer.
- :func:`monitor`: record per-layer activation and gradient statistics while training, as
  JSON Lines and a plot of per-layer histograms over time.
"""
from normlab.tools.convert import Change, convert, norm_kind
from normlab.tools.fold import FoldReport, fold, fold_pair_
from normlab.tools.monitor import Monitor, load_records, monitor, plot_records
from normlab.tools.precise_bn import precise_bn

__all__ = ["Change", "FoldReport", "Monitor", "convert", "fold", "fold_pair_", "load_records", "monitor", "norm_kind",
           "plot_records", "precise_bn"]
