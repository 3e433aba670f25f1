"""NumPy reference: every technique's forward pass and hand-written backward pass (no autodiff).

Functions come in pairs, ``<technique>_forward(...) -> (y, cache[, running])`` and
``<technique>_backward(dy, cache) -> gradients``. Techniques with running statistics take a
:class:`RunningStats` and return the updated one as the third value: nothing is hidden in
globals. The batch/layer/instance/group/RMS/masked family is written once in
:mod:`normlab.reference._core`; each technique only says which axes it reduces.

Dtypes, as torch's autograd: ``y`` and ``dx`` in the input's dtype, each parameter's gradient
in that parameter's dtype and shape (per-channel ones may come in any shape with one value per
channel), running statistics in their own (integers become float64).
Statistics accumulate in float32 for float16 input. Nothing writes into the caller's arrays and
every gradient is a fresh array; a cache may keep references to the caller's ``x`` and
parameters, so change those in place between a forward and its backward and the gradients follow.
"""
from normlab.reference._core import RunningStats, moments, normalize_backward, normalize_forward, update_running
from normlab.reference.batch_norm import batch_norm_backward, batch_norm_forward
from normlab.reference.batch_renorm import batch_renorm_backward, batch_renorm_forward, renorm_limits
from normlab.reference.group_norm import group_norm_backward, group_norm_forward
from normlab.reference.instance_norm import instance_norm_backward, instance_norm_forward
from normlab.reference.layer_norm import layer_norm_backward, layer_norm_forward
from normlab.reference.local_response_norm import local_response_norm_backward, local_response_norm_forward
from normlab.reference.masked_batch_norm import masked_batch_norm_backward, masked_batch_norm_forward
from normlab.reference.rms_norm import rms_norm_backward, rms_norm_forward
from normlab.reference.selu import (
    ALPHA_PRIME,
    SELU_ALPHA,
    SELU_LAMBDA,
    alpha_dropout_backward,
    alpha_dropout_forward,
    lecun_normal,
    selu_backward,
    selu_forward,
)
from normlab.reference.spectral_norm import power_iteration, spectral_norm_backward, spectral_norm_forward
from normlab.reference.switchable_norm import switchable_norm_backward, switchable_norm_forward
from normlab.reference.weight_norm import norm_except_dim, weight_norm_backward, weight_norm_forward

__all__ = [name for name in dir() if not name.startswith("_")]
