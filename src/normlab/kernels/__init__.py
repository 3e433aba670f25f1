"""Triton kernels for the normalizations, with torch's functional signatures.

Each public function is differentiable (input, weight, bias), returns the input's dtype and
accumulates in float32 (float64 for float64 input). The functional tier calls them through
``normlab._backend.use_triton`` after asking :func:`supports`:

    layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5)
    rms_norm(x, normalized_shape, weight=None, eps=None)
    group_norm(x, num_groups, weight=None, bias=None, eps=1e-5)
    instance_norm(x, weight=None, bias=None, eps=1e-5)
    batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5)
    masked_batch_norm(x, mask, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5)
    supports(op, x, *args, **kwargs) -> (ok, reason)

Files: ``layer_norm.py`` (row kernels, also RMSNorm), ``rms_norm.py``, ``_channel_norm.py``
(one statistics core for batch, group, instance and masked batch norm), ``group_norm.py``
(also instance norm), ``batch_norm.py``, ``masked_batch_norm.py``, ``_supports.py``.
Importing this package works without Triton; calling a kernel then raises.
"""
from __future__ import annotations

from normlab import _backend
from normlab.kernels._supports import OPS, supports

__all__ = ["OPS", "supports", *OPS]

if _backend.triton_available():
    from normlab.kernels.batch_norm import batch_norm
    from normlab.kernels.group_norm import group_norm, instance_norm
    from normlab.kernels.layer_norm import layer_norm
    from normlab.kernels.masked_batch_norm import masked_batch_norm
    from normlab.kernels.rms_norm import rms_norm
else:  # pragma: no cover - depends on the machine

    def _missing(op):
        def f(*args, **kwargs):
            raise RuntimeError(f"normlab.kernels.{op} needs the package triton, which cannot be imported here")

        f.__name__ = op
        return f

    layer_norm = _missing("layer_norm")
    rms_norm = _missing("rms_norm")
    group_norm = _missing("group_norm")
    instance_norm = _missing("instance_norm")
    batch_norm = _missing("batch_norm")
    masked_batch_norm = _missing("masked_batch_norm")
