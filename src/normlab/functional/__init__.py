"""PyTorch functions with torch's signatures for every technique.

Where torch has the operation, the call is checked (clear errors for wrong shapes, dtypes
and batch sizes) and dispatched to torch's native kernel, or to a Triton kernel on a GPU
(see :func:`normlab.set_backend`). What torch lacks (masked batch norm, batch renorm,
switchable norm) is implemented here.
"""
from normlab.functional.batch_norm import batch_norm
from normlab.functional.batch_renorm import batch_renorm
from normlab.functional.group_norm import group_norm
from normlab.functional.instance_norm import instance_norm
from normlab.functional.layer_norm import layer_norm
from normlab.functional.local_response_norm import local_response_norm
from normlab.functional.masked_batch_norm import masked_batch_norm
from normlab.functional.rms_norm import rms_norm
from normlab.functional.selu import alpha_dropout, selu
from normlab.functional.spectral_norm import power_iteration_, spectral_norm, weight_as_matrix
from normlab.functional.switchable_norm import switchable_norm
from normlab.functional.weight_norm import norm_except_dim, weight_norm

__all__ = [
    "alpha_dropout", "batch_norm", "batch_renorm", "group_norm", "instance_norm", "layer_norm",
    "local_response_norm", "masked_batch_norm", "norm_except_dim", "power_iteration_", "rms_norm", "selu",
    "spectral_norm", "switchable_norm", "weight_as_matrix", "weight_norm",
]
