"""convert: kinds, what carries over (checked by computing with torch's own layers), and the errors."""
from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from helpers import randomize_norms_
from normlab.tools import convert, norm_kind


def cnn(norm=nn.BatchNorm2d) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), norm(8), nn.ReLU(), nn.Conv2d(8, 4, 3), norm(4), nn.Flatten(),
                         nn.Linear(4, 6), nn.BatchNorm1d(6))


def test_batch_to_group_keeps_channels_dtype_mode_and_gamma_beta():
    model = randomize_norms_(cnn()).double()
    model[4].eval()
    old = [model[1], model[4]]
    out, changes = convert(model, "group:2", only="batch", dim=None)
    assert out is model
    assert [type(m) for m in (model[1], model[4], model[7])] == [nlnn.GroupNorm] * 3
    assert (model[1].num_groups, model[1].num_channels, model[4].num_channels, model[7].num_channels) == (2, 8, 4, 6)
    for new, src in zip((model[1], model[4]), old):
        assert new.weight.dtype == torch.float64 and new.eps == src.eps
        torch.testing.assert_close(new.weight, src.weight)
        torch.testing.assert_close(new.bias, src.bias)
    assert model[1].training and not model[4].training
    assert [c.name for c in changes] == ["1", "4", "7"]
    assert changes[0].copied == ("weight", "bias") and changes[0].source.startswith("BatchNorm2d(8")
    assert any("running statistics" in s for s in changes[0].not_copied)
    assert "GroupNorm(2, 8" in str(changes[0])


def test_converted_group_norm_computes_torch_group_norm_with_the_old_gamma_beta():
    torch.manual_seed(0)
    model = randomize_norms_(nn.Sequential(nn.Conv2d(2, 6, 1), nn.BatchNorm2d(6)))
    gamma, beta = model[1].weight.detach().clone(), model[1].bias.detach().clone()
    convert(model, "group:3")
    x = torch.randn(4, 2, 5, 5)
    expected = nn.functional.group_norm(model[0](x), 3, gamma, beta, 1e-5)
    torch.testing.assert_close(model(x), expected)


def test_sync_batch_and_back_is_the_identity_on_state_and_outputs():
    torch.manual_seed(1)
    model = randomize_norms_(cnn())
    reference = randomize_norms_(cnn())  # same values: same seed, same layout
    reference.load_state_dict(model.state_dict())
    synced, changes = convert(model, "sync_batch")
    assert [type(m).__name__ for m in synced if norm_kind(m)] == ["SyncBatchNorm"] * 3
    assert all(c.copied == ("weight", "bias", "running_mean", "running_var", "num_batches_tracked") for c in changes)
    back, _ = convert(synced, "batch")  # torch cannot do this (pytorch#22538); the dims were remembered
    assert [type(m) for m in back if norm_kind(m)] == [nlnn.BatchNorm2d, nlnn.BatchNorm2d, nlnn.BatchNorm1d]
    assert list(back.state_dict()) == list(reference.state_dict())
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    x = torch.randn(5, 3, 5, 5)
    torch.testing.assert_close(back(x), reference(x))  # training mode: batch statistics, running updates
    back.eval()
    reference.eval()
    torch.testing.assert_close(back(x), reference(x))


def test_torch_sync_batch_norm_needs_its_dims_from_dim_or_an_example():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4))
    with pytest.raises(ValueError, match=r"'1' \(SyncBatchNorm\).*spatial dims.*dim=.*example_input="):
        convert(model, "batch")
    assert type(model[1]) is nn.SyncBatchNorm  # untouched
    out, _ = convert(model, "batch", example_input=torch.randn(2, 3, 5, 5))
    assert type(out[1]) is nlnn.BatchNorm2d
    assert type(convert(nn.Sequential(nn.SyncBatchNorm(4)), "batch", dim=3)[0][0]) is nlnn.BatchNorm3d


def test_running_statistics_carry_between_batch_statistics_layers():
    torch.manual_seed(2)
    bn = randomize_norms_(nn.Sequential(nn.BatchNorm1d(5))).eval()
    brn, changes = convert(bn, "batch_renorm")
    assert "running_var" in changes[0].copied
    x = torch.randn(7, 5, 3)
    torch.testing.assert_close(brn(x), bn(x))  # in evaluation batch renorm is batch norm with the running stats


def test_layer_norm_over_features_and_rms_norm():
    torch.manual_seed(3)
    model = randomize_norms_(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 6), nn.LayerNorm(6, bias=False)))
    out, changes = convert(model, "rms")
    assert [type(m) for m in (out[1], out[3])] == [nlnn.RMSNorm, nlnn.RMSNorm]
    assert changes[0].copied == ("weight",) and "bias: RMSNorm has none" in changes[0].not_copied[0]
    x = torch.randn(3, 4)
    h = model[0](x)
    expected = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-5) * out[1].weight
    torch.testing.assert_close(out[1](h), expected)
    # a LayerNorm(C) on (N, C) features becomes BatchNorm1d(C) with its gamma/beta
    bn, changes = convert(nn.Sequential(nn.LayerNorm(6)), "batch")
    assert type(bn[0]) is nlnn.BatchNorm1d and changes[0].copied == ("weight", "bias")


def test_layer_norm_over_channels_and_positions_becomes_group_norm_without_copying_elementwise_gamma():
    model = randomize_norms_(nn.Sequential(nn.Conv2d(1, 4, 1), nn.LayerNorm([4, 3, 3])))
    x = torch.randn(2, 1, 3, 3)
    expected = model(x)
    out, changes = convert(model, "layer")  # torch's LayerNorm -> normlab's: the same shape, gamma and beta
    assert type(out[1]) is nlnn.LayerNorm and changes[0].copied == ("weight", "bias")
    torch.testing.assert_close(out(x), expected)
    assert convert(out, "layer")[1] == []  # already what "layer" builds: left alone
    out, changes = convert(model, "group:2", example_input=torch.randn(2, 1, 3, 3))
    assert type(out[1]) is nlnn.GroupNorm and changes[0].copied == ()
    assert "element-wise" in changes[0].not_copied[0]
    # GroupNorm(1, C) is layer norm over (C, H, W): the same numbers as torch's LayerNorm without affine
    x = torch.randn(2, 4, 3, 3)
    gn, _ = convert(nn.Sequential(nn.LayerNorm([4, 3, 3], elementwise_affine=False)), "group:1",
                    example_input=x)
    torch.testing.assert_close(gn(x), nn.functional.layer_norm(x, (4, 3, 3)))


def test_layers_with_no_equivalent_say_why_and_leave_the_model_whole():
    tokens = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"'1' \(LayerNorm\).*trailing dims \(8,\) of an input of shape \(2, 5, 8\)"):
        convert(tokens, "batch", example_input=torch.randn(2, 5, 3))
    assert type(tokens[1]) is nn.LayerNorm
    lrn = nn.Sequential(nn.Conv2d(1, 4, 1), nn.LocalResponseNorm(2))
    with pytest.raises(ValueError, match="LocalResponseNorm works for any channel count"):
        convert(lrn, "batch")
    out, _ = convert(lrn, "batch", example_input=torch.randn(2, 1, 3, 3))
    assert type(out[1]) is nlnn.BatchNorm2d and out[1].num_features == 4
    with pytest.raises(ValueError, match=r"mask"):
        convert(nn.Sequential(nlnn.MaskedBatchNorm1d(4)), "batch")
    with pytest.raises(ValueError, match=r"'rms' is not available for dim=2"):
        convert(nn.Sequential(nn.BatchNorm2d(4)), "rms")


@pytest.mark.parametrize("source", [lambda: nn.GroupNorm(2, 4), lambda: nn.SyncBatchNorm(4), lambda: nlnn.GroupNorm(2, 4)],
                         ids=["torch-group", "torch-sync", "normlab-group"])
@pytest.mark.parametrize("spec, needs", [("rms", 0), ("masked_batch", 1), ("lrn:3", 1)])
def test_a_target_that_exists_for_some_spatial_dims_only_is_not_guessed_for_a_layer_whose_dims_are_unknown(
        source, spec, needs):
    """A GroupNorm stores no number of spatial dims: 'rms' (dim 0 only) on an image model built
    RMSNorm(C), which normalizes the last dim W of (N, C, H, W), silently when W == C: refused
    without dim= or example_input=. masked_batch and lrn are built: they refuse every input of a
    rank they do not take, loudly (nothing wrong comes out of the guess)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), source())
    if spec == "rms":
        with pytest.raises(ValueError, match=rf"spatial dims of its input is unknown and '{spec}' exists only for dim"):
            convert(model, spec)
        assert type(model[1]) is type(source())  # left as it was
    else:
        assert norm_kind(convert(model, spec)[0][1]) == spec.partition(":")[0]
    out, _ = convert(model, spec, dim=needs)  # said, it is built
    assert norm_kind(out[1]) == spec.partition(":")[0]
    if spec != "lrn:3":  # seen on images, it is refused as before
        with pytest.raises(ValueError, match="not available for dim=2"):
            convert(nn.Sequential(nn.Conv2d(3, 4, 1), source()), spec, example_input=torch.randn(2, 3, 5, 4))
    # a local response norm stays one without an example input (it takes any input of 3 or more dims)
    assert type(convert(nn.Sequential(nn.LocalResponseNorm(3)), "lrn:5")[0][0]) is nlnn.LocalResponseNorm


def test_nothing_is_half_converted_when_a_later_layer_fails():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6))
    before = list(model)
    with pytest.raises(ValueError, match=r"'3' \(BatchNorm2d\).*num_groups=4 must .* divide .* 6"):
        convert(model, "group:4")
    assert list(model) == before  # the same module objects, the first BN included


def test_unknown_spec_and_kind():
    with pytest.raises(ValueError, match=r"unknown norm spec 'groop:4'; known: batch, .*group"):
        convert(cnn(), "groop:4")
    with pytest.raises(ValueError, match="unknown kind 'bn'"):
        convert(cnn(), "group:2", only="bn")
    with pytest.raises(ValueError, match="dim is the number of spatial dims"):
        convert(cnn(), "batch", dim=5)


def test_selection_sharing_root_none_and_frozen_parameters():
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), shared, nn.Conv2d(4, 4, 1), shared, nn.GroupNorm(2, 4))
    model[1].weight.requires_grad_(False)
    out, changes = convert(model, "instance", only=["batch"])
    assert out[1] is out[3] and isinstance(out[1], nlnn.InstanceNorm2d) and len(changes) == 1
    assert out[1].affine and not out[1].weight.requires_grad and isinstance(out[4], nn.GroupNorm)
    root, changes = convert(nn.BatchNorm1d(3), "layer")
    assert isinstance(root, nlnn.GroupNorm) and root.num_groups == 1 and changes[0].name == ""
    gone, changes = convert(cnn(), "none")
    assert not any(norm_kind(m) for m in gone.modules()) and len(changes) == 3
    picked, _ = convert(cnn(), "group:2", only=lambda name, m: name == "4")
    assert isinstance(picked[4], nlnn.GroupNorm) and isinstance(picked[1], nn.BatchNorm2d)


def test_normlab_and_torch_layers_are_both_recognized():
    kinds = {nn.BatchNorm2d(2): "batch", nlnn.BatchNorm2d(2): "batch", nn.SyncBatchNorm(2): "sync_batch",
             nlnn.SyncBatchNorm(2): "sync_batch", nlnn.BatchRenorm2d(2): "batch_renorm",
             nlnn.SwitchableNorm2d(2): "switchable", nlnn.MaskedBatchNorm1d(2): "masked_batch",
             nn.InstanceNorm1d(2): "instance", nlnn.InstanceNorm3d(2): "instance", nn.GroupNorm(1, 2): "group",
             nlnn.GroupNorm(1, 2): "group", nn.LayerNorm(2): "layer", nlnn.LayerNorm(2): "layer",
             nn.RMSNorm(2): "rms", nlnn.RMSNorm(2): "rms", nn.LocalResponseNorm(2): "lrn",
             nlnn.LocalResponseNorm(2): "lrn", nn.Linear(2, 2): None, nlnn.SELU(): None}
    assert {type(m).__name__ + ("(nl)" if "normlab" in type(m).__module__ else ""): norm_kind(m)
            for m in kinds} == {type(m).__name__ + ("(nl)" if "normlab" in type(m).__module__ else ""): k
                                for m, k in kinds.items()}


def test_same_kind_keeps_its_own_settings():
    gn, _ = convert(nn.Sequential(nn.GroupNorm(4, 8, eps=1e-3)), "group")
    assert (gn[0].num_groups, gn[0].eps) == (4, 1e-3) and type(gn[0]) is nlnn.GroupNorm
    lrn, _ = convert(nn.Sequential(nn.LocalResponseNorm(3, alpha=2e-4, beta=0.5, k=2.0)), "lrn")
    assert (lrn[0].size, lrn[0].alpha, lrn[0].beta, lrn[0].k) == (3, 2e-4, 0.5, 2.0)
    brn, _ = convert(nn.Sequential(nlnn.BatchRenorm2d(4, rmax=2.0, dmax=1.0, warmup_steps=50)), "batch_renorm",
                     momentum=0.2)
    assert (brn[0].rmax, brn[0].dmax, brn[0].warmup_steps, brn[0].momentum) == (2.0, 1.0, 50, 0.2)
    ln, _ = convert(nn.Sequential(nn.LayerNorm(6, bias=False)), "layer")
    assert type(ln[0]) is nlnn.LayerNorm and ln[0].bias is None


def test_untracked_batch_norm_to_a_layer_with_running_statistics_says_evaluation_changes():
    model = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False))
    _, changes = convert(model, "batch_renorm")
    assert changes[0].copied == ("weight", "bias")
    assert any("normalized with batch statistics in evaluation" in s for s in changes[0].not_copied), changes[0]
    _, changes = convert(nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)), "batch")
    assert changes[0].not_copied == ()  # the same behaviour: nothing to say


def test_instance_to_instance_keeps_running_statistics_and_evaluates_the_same():
    torch.manual_seed(4)
    src = randomize_norms_(nn.Sequential(nn.Conv2d(2, 4, 1), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)))
    src.eval()
    x = torch.randn(3, 2, 5, 5)
    expected = src(x)
    old = src[1]
    out, changes = convert(src, "instance")
    assert type(out[1]) is nlnn.InstanceNorm2d and out[1].track_running_stats
    assert changes[0].copied == ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert changes[0].not_copied == ()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(out[1], name), getattr(old, name))
    torch.testing.assert_close(out(x), expected)  # evaluation normalizes with the running statistics


def test_same_kind_keeps_momentum_none_with_its_meaning():
    # momentum=None: in torch's instance norm the running statistics never move (it means 0), in batch norm they
    # are a cumulative average; converting to the same kind keeps None (not the default 0.1) and so the behaviour
    for torch_layer, spec in ((nn.InstanceNorm2d(3, track_running_stats=True, momentum=None), "instance"),
                              (nn.BatchNorm2d(3, momentum=None), "batch")):
        theirs = randomize_norms_(nn.Sequential(torch_layer))
        ours, _ = convert(randomize_norms_(nn.Sequential(type(torch_layer)(3, track_running_stats=True, momentum=None))),
                          spec)
        assert type(ours[0]).__module__.startswith("normlab") and ours[0].momentum is None, ours[0]
        torch.testing.assert_close(ours[0].running_mean, theirs[0].running_mean)
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            x = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1
            torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours[0].running_mean, theirs[0].running_mean)
        torch.testing.assert_close(ours[0].running_var, theirs[0].running_var)
    kept = convert(nn.Sequential(nn.InstanceNorm1d(3, momentum=None, track_running_stats=True)), "instance")[0]
    before = kept[0].running_mean.clone()
    kept(torch.randn(2, 3, 7) + 5)
    torch.testing.assert_close(kept[0].running_mean, before)  # never updated, as in torch


# every spec make_norm knows, with the dim it needs for a (N, 4) / (N, 4, L) input
ALL_TARGETS = [("batch", None), ("layer", 0), ("layer", None), ("instance", None), ("group:2", None), ("rms", 0),
               ("switchable", None), ("batch_renorm", None), ("masked_batch", None), ("lrn:3", None), ("none", None),
               ("sync_batch", None)]


@pytest.mark.parametrize("spec, dim", ALL_TARGETS, ids=[f"{s}-dim{d}" for s, d in ALL_TARGETS])
def test_bias_false_gains_no_trainable_bias_in_any_target(spec, dim):
    from normlab.nn.factory import norm_specs

    assert {s.partition(":")[0] for s, _ in ALL_TARGETS} == set(norm_specs())  # a new spec gets checked too
    torch.manual_seed(6)
    src = randomize_norms_(nn.Sequential(nn.BatchNorm1d(4, bias=False))).eval()
    x = torch.randn(5, 4, 3) if dim is None else torch.randn(5, 4)
    expected = src(x)
    out, changes = convert(src, spec, dim=dim)
    new, change = out[0], changes[0]
    trainable = {n for n, p in new.named_parameters() if p.requires_grad}
    assert "bias" not in trainable, (str(change), trainable)
    bias = getattr(new, "bias", None)
    if bias is not None:  # its class cannot be built with bias=False: zero, frozen, and said
        assert "bias" not in inspect.signature(type(new).__init__).parameters
        assert not bias.requires_grad and not bias.any()
        assert any(n.startswith("bias:") and "frozen" in n for n in change.notes), str(change)
        assert "frozen" in str(change)
    else:
        assert not any(n.startswith("bias:") for n in change.notes), str(change)
    if spec in ("batch", "batch_renorm", "sync_batch"):  # the same computation in evaluation
        torch.testing.assert_close(out(x), expected)


def test_layer_norm_without_an_example_input_is_assumed_to_normalize_channels_and_the_change_says_so():
    out, changes = convert(nn.Sequential(nn.LayerNorm(8)), "batch")
    assert type(out[0]) is nlnn.BatchNorm1d and out[0].num_features == 8  # assumed (N, 8), as documented
    (note,) = [n for n in changes[0].notes if n.startswith("layout:")]
    assert "assumed its input is (N, 8)" in note and "example_input=" in note and "note: layout:" in str(changes[0])
    # with an input to look at there is nothing assumed (and an (N, L, 8) input is refused, tested above)
    _, changes = convert(nn.Sequential(nn.LayerNorm(8)), "batch", example_input=torch.randn(2, 8))
    assert changes[0].notes == ()
    # layer <-> RMS norm and removal do not depend on the layout: nothing to note
    assert convert(nn.Sequential(nn.LayerNorm(8)), "rms")[1][0].notes == ()
    assert convert(nn.Sequential(nn.RMSNorm(8)), "layer")[1][0].notes == ()
    assert convert(nn.Sequential(nn.LayerNorm(8)), "none")[1][0].notes == ()
    assert convert(nn.Sequential(nn.BatchNorm2d(8)), "group:2")[1][0].notes == ()


def test_a_batch_norm_1d_converted_to_a_kind_without_an_n_c_form_notes_the_assumed_sequence_layout():
    """BatchNorm1d takes (N, C) and (N, C, L); instance, masked batch and local response norm take only
    the second. Without example_input= convert assumes it (the class says 1d), and says so as it does
    for LayerNorm: on (N, C) features the new layer refuses them or, with N == C, normalizes each sample."""
    for spec in ("instance", "masked_batch", "lrn:3"):
        _, changes = convert(nn.Sequential(nn.BatchNorm1d(4)), spec)
        (note,) = [n for n in changes[0].notes if n.startswith("layout:")]
        assert "assumed its input is (N, 4, L)" in note and "example_input=" in note, note
    mlp_ = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    instance, _ = convert(copy.deepcopy(mlp_), "instance")
    assert instance(torch.randn(4, 5)).shape == (4, 4)  # a batch of N == C passes: what the note warns of
    with pytest.raises(ValueError, match="'instance' is not available for dim=0"):  # seen, it is refused
        convert(copy.deepcopy(mlp_), "instance", example_input=torch.randn(4, 5))
    # nothing assumed where it matters not: targets with an (N, C) form, a dim given, an input seen
    for spec in ("batch", "layer", "group:2", "switchable", "batch_renorm", "sync_batch", "none"):
        assert not any(n.startswith("layout:") for n in convert(nn.Sequential(nn.BatchNorm1d(4)), spec)[1][0].notes)
    assert convert(nn.Sequential(nn.BatchNorm1d(4)), "instance", dim=1)[1][0].notes == ()
    assert convert(nn.Sequential(nn.BatchNorm1d(4)), "instance", example_input=torch.randn(2, 4, 3))[1][0].notes == ()
    assert convert(nn.Sequential(nn.BatchNorm2d(4)), "instance")[1][0].notes == ()


def test_a_registered_target_without_a_bias_argument_gets_its_bias_zeroed_frozen_and_said():
    """Every built-in spec takes bias=False; a norm added with register_norm may not: then the
    converted layer's beta is 0 and frozen (it computes as the source did) and the Change says so."""
    from normlab.nn import factory

    class Scale(nn.Module):
        def __init__(self, num_features):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.full((num_features,), 0.5))  # not 0: convert zeroes it

        def forward(self, x):
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return x * self.weight.view(shape) + self.bias.view(shape)

    nlnn.register_norm("scale_test", lambda c, dim, arg, kw: Scale(c))
    try:
        out, changes = convert(nn.Sequential(nn.BatchNorm1d(4, bias=False)), "scale_test")
    finally:
        del factory._REGISTRY["scale_test"]
    bias = out[0].bias
    assert not bias.requires_grad and not bias.any()
    assert any(n.startswith("bias:") and "frozen" in n for n in changes[0].notes), str(changes[0])


@pytest.mark.parametrize("spec", ["group:4", "sync_batch", "batch_renorm", "instance"])
def test_an_optimizer_built_before_the_conversion_still_trains_the_new_layers(spec):
    """gamma/beta carry over as the source's own Parameters (as after torch's
    convert_sync_batchnorm): copies would leave an optimizer built before updating orphans."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[1].weight
    model, changes = convert(model, spec)
    assert model[1].weight is before and "weight" in changes[0].copied
    model(torch.randn(4, 3, 6, 6)).square().sum().backward()
    old = model[1].weight.detach().clone()
    opt.step()
    assert not torch.equal(model[1].weight, old)


def test_a_non_layer_norm_inside_a_transformer_encoder_layer_notes_torchs_fast_path():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    _, changes = convert(layer, "rms", only="layer")
    assert len(changes) == 2 and all("set_fastpath_enabled(False)" in " ".join(c.notes) for c in changes)
    _, changes = convert(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), "layer", only="layer")
    assert all("fast path" not in " ".join(c.notes) for c in changes)  # torch's -> normlab's LayerNorm: the same


def test_hooks_on_a_replaced_layer_are_noted_as_not_carried_over():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    model[1].register_forward_hook(lambda m, a, out: None)
    _, changes = convert(model, "group:4")
    assert any("forward hook(s) are not carried over" in n for n in changes[0].notes)
    _, changes = convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "group:4")
    assert not any("hook" in n for n in changes[0].notes)


def test_a_change_between_classes_of_the_same_name_says_which_library():
    _, changes = convert(nn.Sequential(nn.BatchNorm2d(4)), "batch")
    assert changes[0].source.startswith("torch.nn.BatchNorm2d(4") and changes[0].target.startswith(
        "normlab.nn.BatchNorm2d(4")
    _, changes = convert(nn.Sequential(nn.BatchNorm2d(4)), "group:2")
    assert changes[0].source.startswith("BatchNorm2d(4") and changes[0].target.startswith("GroupNorm(2, 4")


def test_switchable_norms_mixing_logits_are_reported_when_dropped():
    """The Change read as a clean conversion while the learned mix of IN, LN and BN was thrown away."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nlnn.SwitchableNorm2d(4))
    _, changes = convert(model, "batch")
    dropped = " ".join(changes[0].not_copied)
    assert "mean_weight: BatchNorm2d has no counterpart" in dropped and "var_weight" in dropped


class _TwoLayouts(nn.Module):
    """One norm applied to two views of the same activations."""

    def __init__(self, norm, second):
        super().__init__()
        self.norm, self.second = norm, second

    def forward(self, x):
        return self.norm(x).mean() + self.norm(self.second(x)).mean()


@pytest.mark.parametrize("norm,shape,second,to,dim,why", [
    (lambda: nn.GroupNorm(2, 4), (3, 4, 5), lambda x: x.unsqueeze(-1), "batch", None,
     "the BatchNorm1d it would build takes 2-D or 3-D inputs only"),
    (lambda: nn.GroupNorm(2, 4), (3, 4, 5), lambda x: x.unsqueeze(-1), "batch", 2,
     "the BatchNorm2d it would build takes 4-D inputs only"),
    (lambda: nn.LayerNorm(4), (3, 4), lambda x: x[:, None].expand(3, 2, 4), "batch", None,
     "it normalizes the channels of some and trailing dims of others"),
], ids=["groupnorm-3d-and-4d", "groupnorm-dim-2", "layernorm-channels-and-tokens"])
def test_a_layer_seen_in_layouts_its_replacement_cannot_take_is_refused(norm, shape, second, to, dim, why):
    """example_input showing a layer called on two layouts: convert used the first one and built a
    BatchNorm1d that the 4-D call then refused (or took a LayerNorm over tokens for a channel
    norm); now it says so, naming the shapes, before changing anything."""
    model = _TwoLayouts(norm(), second)
    x = torch.randn(shape)
    before = model.norm
    with pytest.raises(ValueError, match=re.escape(f"called it on inputs of shapes {tuple(shape)}, (3, ")) as err:
        convert(model, to, example_input=x, dim=dim)
    assert why in str(err.value)
    assert model.norm is before


@pytest.mark.parametrize("norm,second,to,want", [
    (lambda: nn.GroupNorm(2, 4), lambda x: x.unsqueeze(-1), "group:2", nlnn.GroupNorm),
    (lambda: nn.GroupNorm(2, 4), lambda x: x.unsqueeze(-1), "sync_batch", nlnn.SyncBatchNorm),
    (lambda: nn.LayerNorm(5), lambda x: x[:, :1], "rms", nlnn.RMSNorm),  # tokens of two lengths
], ids=["group", "sync_batch", "layernorm-two-lengths-to-rms"])
def test_a_layer_seen_in_layouts_its_replacement_takes_converts(norm, second, to, want):
    """Several input shapes are fine when the replacement takes them all: GroupNorm and
    SyncBatchNorm take any rank, and a token-wise norm any leading dims (a LayerNorm over
    (N, L, C) called at two lengths was refused by a first version of the check above)."""
    model = _TwoLayouts(norm(), second)
    x = torch.randn(3, 4, 5)
    out, _ = convert(model, to, example_input=x)
    assert isinstance(out.norm, want)
    out(x)


@pytest.mark.parametrize("source, kwargs", [(nn.GroupNorm(2, 4), {"dim": 2}), (nn.InstanceNorm2d(4), {}),
                                            (nn.LayerNorm(4), {})], ids=["group", "instance", "layer"])
def test_a_target_with_running_statistics_from_a_layer_without_them_says_evaluation_changes(source, kwargs):
    """GroupNorm -> BatchNorm2d said nothing about the new running statistics (mean 0, var 1),
    which evaluation then uses: only an untracked batch norm as the source got that note."""
    out, changes = convert(nn.Sequential(source).eval(), "batch", **kwargs)
    assert norm_kind(out[0]) == "batch" and not out[0].training
    assert any(s.startswith("running statistics:") and "start at mean 0, var 1" in s and "precise_bn" in s
               for s in changes[0].not_copied), changes[0]


@pytest.mark.parametrize("source, want", [(nn.InstanceNorm1d(4), nlnn.BatchNorm1d),
                                          (nn.InstanceNorm2d(4), nlnn.BatchNorm2d),
                                          (nn.InstanceNorm3d(4), nlnn.BatchNorm3d)], ids=["1d", "2d", "3d"])
def test_the_spatial_dims_come_from_the_source_class(source, want):
    assert type(convert(nn.Sequential(source), "batch")[0][0]) is want


@pytest.mark.parametrize("to", ["switchable", "layer"])
def test_a_target_that_depends_on_the_unknown_dims_is_refused_even_with_two_candidates(to):
    """GroupNorm stores no rank; 'switchable' (SwitchableNorm1d or 2d) and 'layer' (LayerNorm at dim 0,
    GroupNorm(1, C) with spatial dims) have two possible builds: convert asks for dim= rather than guess."""
    model = nn.Sequential(nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="pass dim="):
        convert(model, to)
    assert type(model[0]) is nn.GroupNorm


def test_example_input_leaves_every_modules_mode_as_it_was():
    """The example runs in eval mode; afterwards every module (not only the converted ones) is back in its mode."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.GroupNorm(2, 4))
    model[2].eval()
    out, _ = convert(model, "group:2", only="batch", example_input=torch.randn(2, 3, 5, 5))
    assert [m.training for m in out] == [True, True, False, True] and out.training


def test_a_layer_norm_over_trailing_dims_has_no_local_response_norm_twin():
    """LocalResponseNorm works for any channel count, but over dim 1 of (N, L, C) it would normalize across
    positions, not the LayerNorm's features: refused like every other channel-wise target."""
    model = nn.Sequential(nn.LayerNorm(8))
    with pytest.raises(ValueError, match="no 'lrn:3' equivalent.*trailing dims"):
        convert(model, "lrn:3", example_input=torch.randn(2, 5, 8))
    assert type(model[0]) is nn.LayerNorm
