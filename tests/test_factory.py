"""make_norm: every spec x dim builds the documented layer (and runs on a matching input) or
raises a ValueError naming the problem."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab.nn as NN
from normlab.nn import factory
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

ALL_DIMS = (0, 1, 2, 3)
# spec -> {dim: layer class}; a dim missing here must be rejected
EXPECTED = {
    "batch": {0: NN.BatchNorm1d, 1: NN.BatchNorm1d, 2: NN.BatchNorm2d, 3: NN.BatchNorm3d},
    "layer": {0: NN.LayerNorm, 1: NN.GroupNorm, 2: NN.GroupNorm, 3: NN.GroupNorm},
    "instance": {1: NN.InstanceNorm1d, 2: NN.InstanceNorm2d, 3: NN.InstanceNorm3d},
    "group:4": {d: NN.GroupNorm for d in ALL_DIMS},
    "rms": {0: NN.RMSNorm},
    "switchable": {0: NN.SwitchableNorm1d, 1: NN.SwitchableNorm1d, 2: NN.SwitchableNorm2d},
    "batch_renorm": {0: NN.BatchRenorm1d, 1: NN.BatchRenorm1d, 2: NN.BatchRenorm2d, 3: NN.BatchRenorm3d},
    "masked_batch": {1: NN.MaskedBatchNorm1d},
    "lrn:3": {1: NN.LocalResponseNorm, 2: NN.LocalResponseNorm, 3: NN.LocalResponseNorm},
    "none": {d: nn.Identity for d in ALL_DIMS},
    "sync_batch": {d: NN.SyncBatchNorm for d in ALL_DIMS},  # local batch norm without a process group
}
C = 8


def test_every_registered_spec_is_covered():
    assert factory.norm_specs() == sorted(s.partition(":")[0] for s in EXPECTED)


@pytest.mark.parametrize("dim", ALL_DIMS)
@pytest.mark.parametrize("spec", list(EXPECTED))
def test_spec_by_dim_builds_the_documented_layer_or_raises(spec, dim):
    want = EXPECTED[spec].get(dim)
    if want is None:
        name = spec.partition(":")[0]
        with pytest.raises(ValueError, match=rf"'{name}' is not available for dim={dim}.*supports dim in"):
            NN.make_norm(spec, C, dim=dim)
        return
    m = NN.make_norm(spec, C, dim=dim)
    assert type(m) is want
    x = torch.randn((4, C) + (5,) * dim)
    y = m(x, torch.ones(4, 5, dtype=torch.bool)) if spec == "masked_batch" else m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    if spec == "layer" and dim > 0:
        assert m.num_groups == 1 and m.num_channels == C  # layer norm over (C, *spatial)
    if spec == "group:4":
        assert m.num_groups == 4
    if spec == "instance":
        assert m.affine  # the documented default for the factory
    if spec == "lrn:3":
        assert m.size == 3
    if hasattr(m, "num_features"):
        assert m.num_features == C


def test_layer_on_token_features_normalizes_the_last_dim():
    m = NN.make_norm("layer", C)
    x = torch.randn(2, 5, C, dtype=torch.float64)
    torch.testing.assert_close(m.double()(x), torch.nn.functional.layer_norm(x, (C,)))


def test_group_default_is_32_groups():
    assert NN.make_norm("group", 64, dim=2).num_groups == 32
    with pytest.raises(ValueError, match=r"num_groups=32 must .*divide the number of channels 8"):
        NN.make_norm("group", 8, dim=2)


def test_kwargs_spec_case_and_whitespace():
    m = NN.make_norm(" Batch ", C, dim=2, momentum=0.3, eps=1e-3)
    assert (m.momentum, m.eps) == (0.3, 1e-3)
    m = NN.make_norm("batch_renorm", C, dim=2, rmax=2.0, warmup_steps=5)
    assert (m.rmax, m.dmax, m.warmup_steps) == (2.0, 5.0, 5)
    assert NN.make_norm("instance", C, dim=1, affine=False).affine is False
    assert NN.make_norm("GROUP:2", C, dim=1, affine=False).weight is None
    with pytest.raises(TypeError):
        NN.make_norm("rms", C, momentum=0.1)  # a keyword the layer does not take is not swallowed


@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("name", ["affine", "elementwise_affine"])
def test_layer_takes_either_name_of_its_affine_switch_at_every_dim(name, dim):
    """"layer" is LayerNorm at dim 0 (``elementwise_affine``) and GroupNorm(1, C) above
    (``affine``): the same keyword arguments build it at every dim, instead of a TypeError from the
    class the dim picked; both names at once are refused."""
    m = NN.make_norm("layer", C, dim=dim, **{name: False})
    assert m.weight is None and m.bias is None
    assert type(m).__name__ == ("LayerNorm" if dim == 0 else "GroupNorm")
    with pytest.raises(ValueError, match=r"both elementwise_affine and affine"):
        NN.make_norm("layer", C, dim=dim, affine=False, elementwise_affine=False)
    assert NN.make_norm("layer", C, dim=dim, **{name: True}).weight is not None


def test_register_norm_adds_a_spec():
    def build(c, dim, arg, kw):
        return nn.Dropout(float(arg or 0.5))
    NN.register_norm("dropout_test", build)
    try:
        assert "dropout_test" in NN.norm_specs()
        assert NN.make_norm("dropout_test:0.25", C).p == 0.25
    finally:
        del factory._REGISTRY["dropout_test"]
    with pytest.raises(ValueError, match="unknown norm spec 'dropout_test'"):
        NN.make_norm("dropout_test", C)
