"""Drop-in PyTorch layers with torch's class names, arguments, defaults and state_dict keys,
plus the layers torch lacks (switchable norm, batch renorm, masked batch norm), a
:class:`SyncBatchNorm` that runs on any device, and
:func:`make_norm` to build any of them by name."""
from normlab.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from normlab.nn.factory import make_norm, norm_specs, register_norm
from normlab.nn.group_norm import GroupNorm
from normlab.nn.instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.layer_norm import LayerNorm
from normlab.nn.local_response_norm import LocalResponseNorm
from normlab.nn.masked_batch_norm import MaskedBatchNorm1d
from normlab.nn.rms_norm import RMSNorm
from normlab.nn.selu import SELU, AlphaDropout, lecun_normal_
from normlab.nn.spectral_norm import SpectralNorm, spectral_norm
from normlab.nn.switchable_norm import SwitchableNorm1d, SwitchableNorm2d
from normlab.nn.sync_batch_norm import SyncBatchNorm
from normlab.nn.weight_norm import WeightNorm, weight_norm

__all__ = [
    "AlphaDropout", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "LocalResponseNorm",
    "MaskedBatchNorm1d", "RMSNorm", "SELU", "SpectralNorm", "SwitchableNorm1d", "SwitchableNorm2d", "SyncBatchNorm",
    "WeightNorm",
    "lecun_normal_", "make_norm", "norm_specs", "register_norm", "spectral_norm", "weight_norm",
]
