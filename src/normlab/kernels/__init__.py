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

Called directly, each refuses (ValueError, with ``supports``'s reason) a call it has no kernel
for, which ``normlab.functional`` runs on torch instead: a strided weight read as a contiguous
one would give wrong numbers. ``unchecked.<op>`` skips that check, for callers that asked
``supports`` already (the functional tier).

Files: ``layer_norm.py`` (row kernels, also RMSNorm), ``rms_norm.py``, ``_channel_norm.py``
(one statistics core for batch, group, instance and masked batch norm), ``group_norm.py``
(also instance norm), ``batch_norm.py``, ``masked_batch_norm.py``, ``_supports.py``.
Importing this package works without Triton; calling a kernel then raises.
"""
from __future__ import annotations

import functools
import types

from normlab import _backend
from normlab.kernels._supports import OPS, supports

__all__ = ["OPS", "supports", "unchecked", *OPS]

if _backend.triton_available():
    from normlab.kernels.batch_norm import batch_norm as _batch_norm
    from normlab.kernels.group_norm import group_norm as _group_norm
    from normlab.kernels.group_norm import instance_norm as _instance_norm
    from normlab.kernels.layer_norm import layer_norm as _layer_norm
    from normlab.kernels.masked_batch_norm import masked_batch_norm as _masked_batch_norm
    from normlab.kernels.rms_norm import rms_norm as _rms_norm

    unchecked = types.SimpleNamespace(layer_norm=_layer_norm, rms_norm=_rms_norm, group_norm=_group_norm,
                                      instance_norm=_instance_norm, batch_norm=_batch_norm,
                                      masked_batch_norm=_masked_batch_norm)
else:  # pragma: no cover - depends on the machine

    def _missing(op):
        def f(*args, **kwargs):
            raise RuntimeError(f"normlab.kernels.{op} needs the package triton, which cannot be imported here")

        f.__name__ = op
        return f

    unchecked = types.SimpleNamespace(**{op: _missing(op) for op in OPS})


def _checked(op):
    fn = getattr(unchecked, op)
    if not _backend.triton_available():  # pragma: no cover - depends on the machine
        return fn  # (it says that Triton is missing)

    @functools.wraps(fn)
    def run(x, *args, **kwargs):
        ok, why = supports(op, x, *args, **kwargs)
        if not ok:
            raise ValueError(f"normlab.kernels.{op}: no kernel for this call: {why} "
                             f"(normlab.functional.{op} runs such a call on torch)")
        return fn(x, *args, **kwargs)

    return run


layer_norm = _checked("layer_norm")
rms_norm = _checked("rms_norm")
group_norm = _checked("group_norm")
instance_norm = _checked("instance_norm")
batch_norm = _checked("batch_norm")
masked_batch_norm = _checked("masked_batch_norm")
