"""Tools for normalization inside existing models.

- :func:`convert`: swap every normalization layer for another kind by name (``"group:32"``,
  ``"sync_batch"``, ``"batch"`` ...), keeping channels, device, dtype and what carries over.
"""
from normlab.tools.convert import Change, convert, norm_kind

__all__ = ["Change", "convert", "norm_kind"]
