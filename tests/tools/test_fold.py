"""fold: every folded model is compared with the unfolded one (torch's batch norm in eval mode)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import normlab.nn as nlnn
from normlab.tools import fold
from normlab.tools.fold import fold_pair_
from helpers import randomize_bn_


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor, rel: float = 1e-5) -> None:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    err = (ya - yb).abs().max().item()
    assert err <= rel * ya.abs().max().item(), f"max |diff| {err:.3g} vs max |y| {ya.abs().max().item():.3g}"


LAYERS = {
    "Linear": (lambda g, b: nn.Linear(12, 6, bias=b), nn.BatchNorm1d, (5, 12)),
    "Conv1d": (lambda g, b: nn.Conv1d(4, 6, 3, groups=g, bias=b), nn.BatchNorm1d, (3, 4, 9)),
    "Conv2d": (lambda g, b: nn.Conv2d(4, 6, 3, groups=g, bias=b, padding=1), nn.BatchNorm2d, (3, 4, 7, 6)),
    "Conv3d": (lambda g, b: nn.Conv3d(4, 6, 2, groups=g, bias=b), nn.BatchNorm3d, (2, 4, 4, 5, 3)),
    "ConvTranspose1d": (lambda g, b: nn.ConvTranspose1d(4, 6, 3, groups=g, bias=b, stride=2), nn.BatchNorm1d,
                        (3, 4, 5)),
    "ConvTranspose2d": (lambda g, b: nn.ConvTranspose2d(4, 6, 3, groups=g, bias=b), nn.BatchNorm2d, (3, 4, 4, 5)),
    "ConvTranspose3d": (lambda g, b: nn.ConvTranspose3d(4, 6, 2, groups=g, bias=b), nn.BatchNorm3d, (2, 4, 3, 3, 2)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind, groups", [(k, g) for k in LAYERS for g in (1, 2) if not (k == "Linear" and g > 1)])
def test_every_layer_kind_folds_to_the_same_outputs(kind, groups, bias, dtype):
    make, bn_cls, shape = LAYERS[kind]
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(make(groups, bias), bn_cls(6), nn.ReLU())).to(dtype).eval()
    folded, report = fold(model)
    assert report.folded == [("1", "0")] and not report.left
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    assert_same_outputs(model, folded, torch.randn(shape, dtype=dtype) * 2)


@pytest.mark.parametrize("groups", [1, 3])
def test_transposed_conv_groups_with_more_outputs_than_inputs(groups):
    torch.manual_seed(1)
    layer = nn.ConvTranspose2d(6, 9, 3, groups=groups, bias=False).double()
    bn = randomize_bn_(nn.BatchNorm2d(9)).double().eval()
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(layer(x))
        fold_pair_(layer, bn)
        torch.testing.assert_close(layer(x), expected)


def test_random_sequential_mixes_folded_and_unfoldable_layers():
    torch.manual_seed(2)
    model = randomize_bn_(nn.Sequential(
        nn.BatchNorm2d(3),                                  # the model's first layer: nothing to fold into
        nn.Conv2d(3, 8, 3, padding=1), nlnn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8), nn.BatchNorm2d(8),  # both fold into the conv
        nn.ConvTranspose2d(8, 4, 2, stride=2), nlnn.BatchRenorm2d(4), nn.Tanh(),
        nn.Conv2d(4, 4, 1), nlnn.SyncBatchNorm(4),          # eval SyncBatchNorm is batch norm
        nn.ReLU(), nn.BatchNorm2d(4),                       # after a ReLU: left
        nn.Flatten(), nn.Linear(4 * 20 * 20, 7), nn.BatchNorm1d(7))).double().eval()
    folded, report = fold(model)
    assert sorted(b for b, _ in report.folded) == ["11", "16", "2", "5", "6", "8"]
    assert dict(report.folded)["6"] == "4"
    left = dict(report.left)
    assert set(left) == {"0", "13"}
    assert "model's input" in left["0"] and "ReLU" in left["13"]
    assert type(folded) is nn.Sequential  # fx found nothing more, so the model keeps its class
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    assert_same_outputs(model, folded, x)
    assert_same_outputs(model.float(), fold(model.float())[0], x.float())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nlnn.BatchNorm2d(4)
        self.proj, self.bn_proj = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.bn_out = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 25, 3), nn.BatchNorm1d(3))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + self.bn_proj(self.proj(x))
        return self.head(self.bn_out(torch.relu(y)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_residual_model_folds_through_fx(dtype):
    torch.manual_seed(3)
    model = randomize_bn_(Residual()).to(dtype).eval()
    folded, report = fold(model)
    assert report.method == "fx" and isinstance(folded, fx.GraphModule)
    assert sorted(b for b, _ in report.folded) == ["bn1", "bn2", "bn_proj", "head.2"]
    assert [b for b, _ in report.left] == ["bn_out"] and "relu" in report.left[0][1]
    assert not any(isinstance(m, nn.BatchNorm2d) and m is not folded.bn_out for m in folded.modules())
    assert_same_outputs(model, folded, torch.randn(6, 4, 5, 5, dtype=dtype))


def test_input_model_is_left_alone_unless_inplace():
    torch.manual_seed(4)
    model = randomize_bn_(nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3))).eval()
    w = model[0].weight.detach().clone()
    fold(model)
    assert torch.equal(model[0].weight, w) and isinstance(model[1], nn.BatchNorm1d)
    same, _ = fold(model, inplace=True)
    assert same is model and isinstance(model[1], nn.Identity) and not torch.equal(model[0].weight, w)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.stem(x)
        if y.sum() > 0:
            y = y * 2
        return self.bn(self.conv(y))


def test_untraceable_model_folds_its_sequentials_and_reports_the_rest():
    model = randomize_bn_(Branchy()).eval()
    folded, report = fold(model)
    assert report.folded == [("stem.1", "stem.0")] and type(folded) is Branchy
    assert [b for b, _ in report.left] == ["bn"] and "could not trace" in report.left[0][1]
    assert_same_outputs(model, folded, torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="cannot trace"):
        fold(model, method="fx")


def test_shared_conv_output_and_missing_running_stats_are_reported():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
            self.conv2, self.bn2 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y + self.bn2(self.conv2(x))

    model = randomize_bn_(Shared()).eval()
    folded, report = fold(model)
    left = dict(report.left)
    assert "also used" in left["bn"] and "track_running_stats=False" in left["bn2"] and not report.folded
    assert_same_outputs(model, folded, torch.randn(3, 2, 4, 4))


def test_training_mode_and_strict_errors_name_the_layers():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match=r"evaluation mode.*1, 3 are in training mode.*model.eval\(\)"):
        fold(model)
    model.eval()
    with pytest.raises(ValueError, match=r"could not be folded:\n  3: its input comes from 2 \(ReLU\)"):
        fold(model, strict=True)
    with pytest.raises(ValueError, match="method must be"):
        fold(model, method="graph")


# -- pairs that look foldable but are not: left in place, and the numbers stay right -------------

class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.b = nn.Conv2d(3, 3, 1)
        self.b.weight = self.a[0].weight  # tied: folding would rescale b too

    def forward(self, x):
        return self.a(x) + self.b(x)


class _SkipSequential(nn.Sequential):  # a Sequential with its own forward uses the conv output twice
    def forward(self, x):
        y = self[0](x)
        return self[1](y) + y


class _DirectCall(nn.Module):  # the Sequential's conv is also called on its own
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        return self.f(x) + self.f[0](x)


class _ReadsWeight(nn.Module):  # the forward also reads the conv's weight
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()


def _hooked(where: str) -> nn.Module:
    """A conv-bn pair with a hook between the two (activation clipping, an observer that scales)."""
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    if where == "conv forward":
        model[0].register_forward_hook(lambda m, args, out: out.clamp(min=0))
    elif where == "bn pre-forward":
        model[1].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    else:
        model[1].register_forward_hook(lambda m, args, out: out.clamp(max=0.5))
    return model


UNFOLDABLE = {
    "hook on the conv's output": (lambda: _hooked("conv forward"), "forward hook on its Conv2d"),
    "pre-hook on the bn": (lambda: _hooked("bn pre-forward"), "hook on the batch norm"),
    "hook on the bn's output": (lambda: _hooked("bn forward"), "hook on the batch norm"),
    "tied weight": (_Tied, "weight is shared with another module"),
    "torch spectral_norm": (lambda: nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3)),
                                                  nn.BatchNorm1d(3)), "weight is computed"),
    "normlab weight_norm": (lambda: nn.Sequential(nlnn.weight_norm(nn.Conv2d(3, 3, 1)), nn.BatchNorm2d(3)),
                            "weight is computed"),
    "Sequential with its own forward": (lambda: nn.Sequential(_SkipSequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))),
                                        "also used by add"),
    "conv called directly": (_DirectCall, "applied at more than one place"),
    "weight read in forward": (_ReadsWeight, "reads the parameters of conv"),
}


@pytest.mark.parametrize("method", ["auto", "fx"])
@pytest.mark.parametrize("case", list(UNFOLDABLE))
def test_pairs_that_cannot_fold_are_left_with_the_reason(case, method):
    make, why = UNFOLDABLE[case]
    torch.manual_seed(0)
    model = randomize_bn_(make()).double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)[:, :, 0, 0] if "spectral" in case else \
        torch.randn(2, 3, 4, 4, dtype=torch.float64)
    folded, report = fold(model, method=method)
    assert not report.folded and len(report.left) == 1 and why in report.left[0][1], report
    assert_same_outputs(model, folded, x, rel=1e-12)


def test_a_pre_hook_on_the_conv_does_not_block_the_fold():  # it acts before the pair: still the same model
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))).double().eval()
    model[0].register_forward_pre_hook(lambda m, args: (args[0].clamp(min=0),))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    folded, report = fold(model)
    assert report.folded == [("1", "0")]
    assert_same_outputs(model, folded, x, rel=1e-12)


def test_a_global_module_hook_blocks_every_fold():
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))).double().eval()
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: out.clamp(min=0) if isinstance(m, nn.Conv2d) else None)
    try:
        folded, report = fold(model)
        assert not report.folded and "global module forward or pre-forward hook" in report.left[0][1]
        assert_same_outputs(model, folded, torch.randn(2, 3, 4, 4, dtype=torch.float64), rel=1e-12)
    finally:
        handle.remove()


def test_inplace_fold_through_fx_leaves_the_model_itself_correct():
    class Block(nn.Module):  # no Sequential: only the graph finds the pair
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    torch.manual_seed(0)
    model = randomize_bn_(Block()).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    folded, report = fold(model, inplace=True)
    assert report.method == "fx" and report.folded == [("bn", "conv")]
    assert_same_outputs(model, folded, x, rel=1e-12)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # not half folded: conv's weights as they were, bn still applied


def test_a_model_that_is_one_batch_norm_is_reported_once():
    _, report = fold(nn.BatchNorm1d(3).eval())
    assert [bn for bn, _ in report.left] == ["<root>"]


class _Siamese(nn.Module):  # one Sequential applied to two inputs: every conv call feeds the bn
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.f(x) - self.f(x.flip(-1))


class _ReadsDtype(nn.Module):  # reads only what folding keeps: the weight's dtype and shape
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.f(x.to(self.f[0].weight.dtype)) * self.f[0].weight.shape[0]


@pytest.mark.parametrize("method", ["auto", "fx"])
@pytest.mark.parametrize("make", [_Siamese, _ReadsDtype], ids=["called twice", "reads dtype"])
def test_safe_pairs_the_graph_check_must_not_refuse(make, method):
    torch.manual_seed(0)
    model = randomize_bn_(make()).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    folded, report = fold(model, method=method, strict=True)
    assert report.folded == [("f.1", "f.0")] and not report.left
    assert_same_outputs(model, folded, x, rel=1e-12)


# -- low precision: computed in float64, rounded once; a pair that would overflow stays unfolded ----------

def _overflowing_linear(dtype: torch.dtype, big: float) -> nn.Sequential:
    """Linear(4, 2) of weight ``big`` and BatchNorm1d(2) of running variance 1e-4 - eps: s = 100, so
    the folded weight is 100 * big, past the dtype's largest value; the pair itself stays finite
    for small inputs (the Linear's output is small, s * that is not past it)."""
    model = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(big)
        model[0].bias.zero_()
        model[1].running_var.fill_(1e-4 - 1e-5)
    return model.to(dtype)


@pytest.mark.parametrize("method", ["auto", "modules", "fx"])
@pytest.mark.parametrize("dtype, big, x", [(torch.float16, 1000.0, 1e-3), (torch.bfloat16, 1e37, 1e-36)],
                         ids=["float16", "bfloat16"])
def test_a_fold_that_would_overflow_the_layer_dtype_is_left_with_the_reason(dtype, big, x, method):
    model = _overflowing_linear(dtype, big)
    x = torch.full((3, 4), x, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    assert torch.isfinite(expected).all()
    folded, report = fold(model, method=method)
    name = str(dtype).replace("torch.", "")
    assert not report.folded and [bn for bn, _ in report.left] == ["1"], report
    why = report.left[0][1]
    assert f"folding would overflow {name}" in why and "folded weight reaches" in why, why
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=0, atol=0)  # the pair is as it was
    with pytest.raises(ValueError, match=rf"could not be folded:\n  1: folding would overflow {name}"):
        fold(model, method=method, strict=True)


def test_only_the_overflowing_pair_is_left_and_fold_pair_changes_nothing():
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 3, 1), nn.BatchNorm2d(3))).eval()
    with torch.no_grad():
        model[0].weight[1, 2].fill_(3000.0)  # group 0's output channel 2: its weights fold to 3000 * 100
        model[1].running_var[2], model[1].running_mean[2], model[1].weight[2] = 1e-4 - 1e-5, 0.0, 1.0
    model = model.half()
    folded, report = fold(model, method="modules")
    assert report.folded == [("4", "3")] and [bn for bn, _ in report.left] == ["1"]
    assert "folded weight reaches 3e+05" in report.left[0][1] and "bias" not in report.left[0][1]
    x = torch.rand(2, 4, 5, 5, generator=torch.Generator().manual_seed(0)).half() * 1e-3
    with torch.no_grad():
        expected = model(x)
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(folded(x), expected, rtol=1e-2, atol=1e-2)
    layer, bn = model[0], model[1]
    before = layer.weight.detach().clone(), layer.bias.detach().clone()
    with pytest.raises(ValueError, match="fold_pair_: folding would overflow float16"):
        fold_pair_(layer, bn)
    assert torch.equal(layer.weight, before[0]) and torch.equal(layer.bias, before[1])  # nothing changed


def test_a_bias_that_would_overflow_is_left_too():
    # the Linear's output 1000 - 2 * 500 = 0 sits at the running mean; folded, the bias becomes
    # (1000 - 0) * 100 = 1e5, past float16, though the weight (-5e4) fits
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1)).eval()
    with torch.no_grad():
        model[0].weight.fill_(-500.0)
        model[0].bias.fill_(1000.0)
        model[1].running_var.fill_(1e-4 - 1e-5)
    model = model.half()
    x = torch.ones(3, 2, dtype=torch.float16)
    with torch.no_grad():
        expected = model(x)
    assert torch.isfinite(expected).all()
    folded, report = fold(model)
    assert not report.folded and len(report.left) == 1, report
    assert "folded bias reaches 1e+05" in report.left[0][1] and "weight" not in report.left[0][1]
    with torch.no_grad():
        assert torch.equal(folded(x), expected)


def test_low_precision_folds_in_float64_and_rounds_once():
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    half = copy.deepcopy(model).half()
    folded, report = fold(half)
    assert report.folded == [("1", "0")]
    w, b, bn = half[0].weight.double(), half[0].bias.double(), half[1]
    s = (bn.running_var.double() + bn.eps).rsqrt() * bn.weight.double()
    assert torch.equal(folded[0].weight, (w * s.view(-1, 1, 1, 1)).half())
    assert torch.equal(folded[0].bias, ((b - bn.running_mean.double()) * s + bn.bias.double()).half())


def test_values_that_were_not_finite_before_do_not_block_the_fold():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).eval()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")  # the pair already computes inf (or NaN) through it
    folded, report = fold(model)
    assert report.folded == [("1", "0")] and not report.left
    assert torch.isinf(folded[0].weight[0, 0]) and torch.isfinite(folded[0].weight[1]).all()


@pytest.mark.parametrize("frozen", [True, False])
def test_a_bias_fold_adds_follows_the_weights_requires_grad(frozen):
    conv, bn = nn.Conv2d(2, 3, 1, bias=False), randomize_bn_(nn.BatchNorm2d(3)).eval()
    conv.weight.requires_grad_(not frozen)
    fold_pair_(conv, bn)
    assert isinstance(conv.bias, nn.Parameter) and conv.bias.requires_grad is (not frozen)


class _WSConv2d(nn.Conv2d):
    """Weight standardization (BiT, GN+WS): the forward rescales whatever weight it holds."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _ScaledBN(nn.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


class _Untraceable(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.body = nn.Sequential(conv, nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > float("-inf"):  # data-dependent control flow: fx cannot trace it
            return self.body(x)
        return x


def _fold_a_random(make, method):
    """``(model, x, folded, report)``: ``make()`` with random batch-norm state, in eval, folded."""
    torch.manual_seed(0)
    model = make()
    randomize_bn_(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold(model, method=method)
    return model, x, folded, report


@pytest.mark.parametrize("make,method", [
    (lambda: nn.Sequential(_WSConv2d(3, 4, 3), nn.BatchNorm2d(4)), "modules"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), _ScaledBN(4)), "modules"),
    (lambda: _Untraceable(_WSConv2d(3, 4, 3)), "auto"),
], ids=["ws-conv", "scaled-bn", "untraceable-auto"])
def test_a_layer_with_its_own_forward_is_not_folded(make, method):
    """The folded weight goes through a subclass's own forward, where the formula does not hold:
    outputs were off by up to 38 while the report said every pair was folded."""
    model, x, folded, report = _fold_a_random(make, method)
    assert not report.folded and "defines its own forward" in report.left[0][1]
    torch.testing.assert_close(folded(x), model(x))


class _WSConvInner(nn.Conv2d):
    """Weight standardization through ``_conv_forward``, torch's ``forward`` kept."""

    def _conv_forward(self, x, w, b):
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, b)


class _Doubling(nn.Identity):
    def forward(self, x):
        return 2 * x


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def _hooked_identity(model):
    model[1].register_forward_hook(lambda m, args, out: out.clamp(min=0))
    return model


@pytest.mark.parametrize("method", ["auto", "modules", "fx"])
@pytest.mark.parametrize("make,why", [
    (lambda: _hooked_identity(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.BatchNorm2d(4))), "hook"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), _Doubling(), nn.BatchNorm2d(4)), "mul"),
    (lambda: nn.Sequential(_WSConvInner(3, 4, 3), nn.BatchNorm2d(4)), "conv2d"),
], ids=["hooked-identity", "identity-subclass", "conv-forward-override"])
def test_what_sits_between_or_computes_inside_the_pair_stops_the_fold(make, why, method):
    """An Identity with a hook (even one that only reads) or a forward of its own between the
    layer and the batch norm, and a conv subclass that overrides ``_conv_forward``: folding went
    past them (outputs 0.5 to 16 off, the report saying folded). Now the pair is left, with a
    reason where the method can give one."""
    model, x, folded, report = _fold_a_random(make, method)
    assert not report.folded and len(report.left) == 1
    if method != "modules":
        assert why in report.left[0][1]
    torch.testing.assert_close(folded(x), model(x))


@pytest.mark.parametrize("method", ["auto", "fx"])
@pytest.mark.parametrize("where", ["root-pre", "root", "block"])
def test_hooks_a_traced_graph_would_drop_keep_the_model_unfolded(where, method):
    """torch.fx runs the forward of the model itself and of every block it traces through: a
    pre-hook on the model (scaling its input) was gone from the folded graph, and a hook that
    records (features, a monitor) no longer fired. Such a model is left as it is, each batch norm
    reported with the hooks named; its hooks still work."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _Block()) if where == "block" else _Block()
    randomize_bn_(model)
    model.eval()
    seen = []
    hooked = model[1] if where == "block" else model
    if where == "root-pre":
        hooked.register_forward_pre_hook(lambda m, args: (args[0] * 10,))
    else:
        hooked.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    x = torch.randn(2, 3, 8, 8)
    want = model(x)
    folded, report = fold(model, method=method)
    assert not report.folded and report.method == "modules" and not isinstance(folded, fx.GraphModule)
    ((bn, why),) = report.left
    assert bn.endswith("bn") and "hooks on" in why and ("1" if where == "block" else "the model itself") in why
    seen.clear()
    torch.testing.assert_close(folded(x), want)
    assert len(seen) == (0 if where == "root-pre" else 1)


def test_hooks_on_leaf_layers_elsewhere_do_not_stop_a_traced_fold():
    """A hook on a layer the graph calls (a leaf) survives tracing: it does not block the fold."""
    class ReLUBlock(_Block):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)))
    torch.manual_seed(0)
    model = ReLUBlock()
    seen = []
    model.relu.register_forward_hook(lambda m, args, out: seen.append(1))
    randomize_bn_(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold(model, method="fx")
    assert report.folded == [("bn", "conv")]
    seen.clear()
    torch.testing.assert_close(folded(x), model(x))
    assert len(seen) == 2


class _IdentityTwice(nn.Module):
    def __init__(self, hook=False, relu=False):
        super().__init__()
        self.conv, self.id, self.bn = nn.Conv2d(3, 4, 3), nn.Identity(), nn.BatchNorm2d(4)
        self.relu = relu
        if hook:
            self.id.register_forward_hook(lambda m, args, out: None)

    def forward(self, x):
        h = self.conv(x)
        h = self.id(torch.relu(h) if self.relu else h)
        return self.bn(h) + h if not self.relu else self.bn(h)


@pytest.mark.parametrize("hook,relu,why", [
    (False, False, "its input comes from id (Identity)"),  # a plain Identity whose output is used twice
    (True, True, "its input comes from id (Identity)"),  # a hooked Identity that no layer feeds
], ids=["plain-identity-used-twice", "hooked-identity-after-relu"])
def test_the_hook_reason_is_given_only_where_a_hook_stops_a_layers_fold(hook, relu, why):
    """The Identity reason ("has a forward or pre-forward hook ... remove the hook") was given for
    a plain Identity the walk stopped at for another reason, and for one no layer feeds."""
    model = _IdentityTwice(hook, relu)
    randomize_bn_(model)
    model.eval()
    _, report = fold(model, method="fx")
    ((bn, reason),) = report.left
    assert bn == "bn" and why in reason and "hook" not in reason


# -- a computed bias, backward hooks, lazy and meta modules, batch norms the graph never calls -----------

def _pruned_bias_pair() -> nn.Sequential:
    """torch.nn.utils.prune on the conv's bias: ``bias`` is a plain tensor its pre-hook recomputes
    (bias_orig * bias_mask) before every forward; the weight is still a Parameter."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).double().eval()
    with torch.no_grad():  # (a computed bias with a gradient history could not be deep-copied)
        prune.l1_unstructured(model[0], "bias", amount=0.5)
    return model


@pytest.mark.parametrize("method", ["auto", "modules", "fx"])
def test_a_layer_whose_bias_is_computed_by_pruning_is_left(method):
    """The folded bias went into the tensor the pruning hook recomputes at the next call: the
    batch norm's shift was lost (outputs 4.8 off) while the report said folded."""
    model = _pruned_bias_pair()
    folded, report = fold(model, method=method)
    assert not report.folded and "its layer's bias is computed" in report.left[0][1], report
    assert_same_outputs(model, folded, torch.randn(2, 3, 4, 4, dtype=torch.float64), rel=1e-12)


def test_fold_pair_refuses_a_pair_it_would_not_compute():
    """fold_pair_ wrote into a weight_norm conv's computed weight (lost: outputs 3.6 off, silently)
    and failed with AttributeError/shape errors on a batch norm without running statistics or
    with other channels; each is now a ValueError, with nothing changed."""
    bn = randomize_bn_(nn.BatchNorm2d(4)).eval()
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 1))
    before = conv.parametrizations.weight.original1.detach().clone(), conv.bias.detach().clone()
    cases = [(conv, bn, "weight is computed"),
             (nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False).eval(), "no running statistics"),
             (nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5).eval(), "4 output channels but the batch norm has 5"),
             (nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), "training mode")]
    for layer, norm, why in cases:
        with pytest.raises(ValueError, match=f"fold_pair_: .*{why}"):
            fold_pair_(layer, norm)
    assert torch.equal(conv.parametrizations.weight.original1, before[0]) and torch.equal(conv.bias, before[1])


def _backward_hooked(where: str, seen: list) -> nn.Sequential:
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Identity(), nn.BatchNorm2d(4))).double().eval()

    def record(m, *grads):  # grads[-1]: grad_output, for a backward hook and a backward pre-hook alike
        seen.append(grads[-1][0].detach().clone())

    if where == "bn pre":
        model[2].register_full_backward_pre_hook(record)
    else:
        model[{"conv": 0, "identity": 1, "bn": 2}[where]].register_full_backward_hook(record)
    return model


@pytest.mark.parametrize("method", ["auto", "fx"])
@pytest.mark.parametrize("where", ["conv", "identity", "bn", "bn pre"])
def test_a_backward_hook_between_the_halves_stops_the_fold(where, method):
    """Folding dropped a backward hook on the batch norm, and a conv's (or an Identity's between
    them) got the gradient of the batch norm's output instead of its own: the same refusal as
    for forward hooks, and the hook sees what it saw before."""
    torch.manual_seed(0)
    seen = []
    model = _backward_hooked(where, seen)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    model(x).square().sum().backward()
    expected, seen[:] = list(seen), []
    folded, report = fold(model, method=method)
    assert not report.folded and "hook" in report.left[0][1], report
    folded(x).square().sum().backward()
    assert len(seen) == len(expected) == 1 and torch.equal(seen[0], expected[0])


def test_a_global_backward_hook_blocks_every_fold():
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))).eval()
    handle = nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None)
    try:
        _, report = fold(model)
    finally:
        handle.remove()
    assert not report.folded and "global module" in report.left[0][1], report


@pytest.mark.parametrize("lazy", ["conv", "bn"])
def test_a_lazy_module_not_yet_run_is_left_with_the_reason(lazy):
    """In place (a copy of a lazy module is refused by torch itself) an uninitialized LazyConv2d
    failed with a shape RuntimeError, and a LazyBatchNorm2d was left for having "0" channels."""
    model = nn.Sequential(nn.LazyConv2d(4, 1) if lazy == "conv" else nn.Conv2d(3, 4, 1),
                          nn.LazyBatchNorm2d() if lazy == "bn" else nn.BatchNorm2d(4)).eval()
    _, report = fold(model, inplace=True, method="modules")
    assert not report.folded and "lazy module with no parameters yet" in report.left[0][1], report


@pytest.mark.parametrize("method", ["auto", "modules", "fx"])
def test_a_model_on_the_meta_device_folds_its_structure(method):
    """Building on 'meta' to fold the structure before loading weights failed with "Tensor.item()
    cannot be called on meta tensors" (the overflow check): a meta model has no values to check."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).eval().to("meta")
    folded, report = fold(model, method=method)
    assert report.folded == [("1", "0")] and not report.left
    conv = folded.get_submodule("0")
    assert conv.bias.device.type == "meta" and conv.bias.shape == (4,)


class _TrainingOnlyBranch(nn.Module):
    """An auxiliary head used only in training (Inception's): the traced eval forward never calls it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.aux = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
        self.aux_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn(torch.relu(self.conv(x))))
        return (y, self.aux(self.aux_bn(y))) if self.training else y


def test_a_batch_norm_the_traced_forward_never_calls_is_reported_left():
    """When fx found nothing more to fold, its report (which knows only the graph's batch norms)
    replaced the walk's: batch norms still in the returned model went unreported, and strict did
    not raise."""
    model = randomize_bn_(_TrainingOnlyBranch()).eval()
    _, report = fold(model)
    left = dict(report.left)
    assert not report.folded and set(left) == {"bn", "aux.1", "aux_bn"}, report
    assert "never calls it" in left["aux.1"] and "never calls it" in left["aux_bn"]
    with pytest.raises(ValueError, match="aux_bn: the traced forward"):
        fold(model, strict=True)


def test_a_batch_norm_called_with_a_keyword_input_gets_that_reason():
    """``self.bn(input=y)`` was reported as fed by "the constant None"."""
    class Keyword(_Block):
        def forward(self, x):
            return self.bn(input=self.conv(x))

    _, report = fold(Keyword().eval(), method="fx")
    assert report.left == [("bn", "it is called with keyword or extra arguments")]


def test_a_hooked_identity_gets_the_hook_reason_only_if_removing_the_hook_would_let_the_pair_fold():
    """conv -> plain Identity (its output used twice) -> hooked Identity -> bn: removing the hook
    would not let the pair fold (the conv's output reaches more than the batch norm), so the
    reason names the input, not the hook."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.id1, self.id2, self.bn = nn.Conv2d(3, 4, 1), nn.Identity(), nn.Identity(), nn.BatchNorm2d(4)
            self.id2.register_forward_hook(lambda m, args, out: None)

        def forward(self, x):
            h = self.id1(self.conv(x))
            return self.bn(self.id2(h)) + h

    _, report = fold(Block().eval(), method="fx")
    ((bn, why),) = report.left
    assert bn == "bn" and "its input comes from id2 (Identity)" in why and "hook" not in why


class _TokenMLP(nn.Module):
    """A Linear applied to (N, L, features) and a BatchNorm1d(L) after it: the norm is over the
    L positions, not per output feature, so the pair is no per-feature affine map of the Linear."""

    def __init__(self, seq_len, features):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, features), nn.BatchNorm1d(seq_len))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("method", ["auto", "modules", "fx"])
def test_an_example_input_shows_a_linear_whose_batch_norm_gets_3d_inputs(method):
    model = _TokenMLP(seq_len=4, features=4).double()  # L equal to the features: the channel counts agree
    randomize_bn_(model.body[1])
    model.eval()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    folded, _ = fold(model, method=method)  # without shapes it cannot tell (the documented limit)
    assert not torch.allclose(folded(x), model(x))
    folded, report = fold(model, method=method, example_input=x)
    assert not report.folded and report.left[0][0] == "body.1" and "3-D" in report.left[0][1]
    torch.testing.assert_close(folded(x), model(x))
    # the same pair on (N, features) folds, and a tuple of forward arguments works as well
    flat = nn.Sequential(nn.Linear(5, 4), randomize_bn_(nn.BatchNorm1d(4))).double().eval()
    folded, report = fold(flat, method=method, example_input=(x[:, 0],))
    assert report.folded == [("1", "0")]
    torch.testing.assert_close(folded(x[:, 0]), flat(x[:, 0]))


# -- behaviours a mutation audit found unpinned -------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False])
def test_the_batch_norms_own_eps_and_affine_false_fold_exactly(affine):
    """s = gamma / sqrt(var + eps) with the layer's eps (not the default 1e-5), and s = 1 / sqrt(var + eps),
    beta = 0 for affine=False (no weight or bias to read)."""
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.5, affine=affine))).double()
    model.eval()
    folded, report = fold(model, method="modules", strict=True)
    assert report.folded == [("1", "0")]
    assert_same_outputs(model, folded, torch.randn(2, 3, 6, 6, dtype=torch.float64), rel=1e-12)


@pytest.mark.parametrize("where", ["bn weight", "layer bias", "bn bias", "running mean"])
def test_a_value_already_not_finite_anywhere_in_the_pair_does_not_block_the_fold(where):
    """The overflow check counts only non-finite results whose inputs were finite: an inf in the batch
    norm's scale, the layer's bias or the shift makes the pair itself non-finite there already."""
    model = randomize_bn_(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))).eval()
    with torch.no_grad():
        {"bn weight": model[1].weight, "layer bias": model[0].bias, "bn bias": model[1].bias,
         "running mean": model[1].running_mean}[where][0] = float("inf")
    folded, report = fold(model, method="modules")
    assert report.folded == [("1", "0")] and not report.left, report
    assert torch.isfinite(folded[0].bias[1]) and torch.isfinite(folded[0].weight[1]).all()


def test_a_layer_whose_bias_is_a_buffer_folds_into_it():
    """A bias held as a buffer (not computed) is written like a Parameter's."""
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).double().eval()
    bias = model[0].bias.detach().clone()
    del model[0].bias
    model[0].register_buffer("bias", bias)
    folded, report = fold(model, method="modules")
    assert report.folded == [("1", "0")] and "bias" in dict(folded[0].named_buffers())
    assert_same_outputs(model, folded, torch.randn(2, 3, 4, 4, dtype=torch.float64), rel=1e-12)


@pytest.mark.parametrize("method", ["auto", "modules", "fx"])
def test_a_tied_bias_is_left(method):
    model = _Tied()
    model.b.weight = nn.Parameter(torch.randn(3, 3, 1, 1))  # untie the weight, tie the bias
    model.b.bias = model.a[0].bias
    randomize_bn_(model)
    model.double().eval()
    folded, report = fold(model, method=method)
    assert not report.folded and "bias is shared with another module" in report.left[0][1], report
    assert_same_outputs(model, folded, torch.randn(2, 3, 4, 4, dtype=torch.float64), rel=1e-12)


@pytest.mark.parametrize("register", ["register_module_full_backward_hook", "register_module_full_backward_pre_hook"])
def test_every_kind_of_global_backward_hook_blocks_every_fold(register):
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))).eval()
    handle = getattr(nn.modules.module, register)(lambda m, *grads: None)
    try:
        _, report = fold(model)
    finally:
        handle.remove()
    assert not report.folded and "global module" in report.left[0][1], report


def test_a_hook_on_a_child_of_a_leaf_layer_does_not_stop_a_traced_fold():
    """The graph calls a leaf layer (torch's MultiheadAttention) as a whole, so hooks on its children
    stay: they do not block the fold the way hooks on a traced-through block do."""
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            y = self.bn(self.conv(x)).transpose(1, 2)
            return self.attn(y, y, y)[0]

    torch.manual_seed(0)
    model = randomize_bn_(Attn()).double().eval()
    model.attn.out_proj.register_forward_hook(lambda m, args, out: None)
    folded, report = fold(model, method="fx")
    assert report.folded == [("bn", "conv")] and not report.left, report
    assert_same_outputs(model, folded, torch.randn(2, 4, 5, dtype=torch.float64), rel=1e-12)


@pytest.mark.filterwarnings("ignore:For backward hooks to be called")
def test_a_backward_hook_on_a_block_fx_traces_through_keeps_the_model_unfolded():
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 3, 1), _Block())).eval()
    model[1].register_full_backward_hook(lambda m, gi, go: None)
    folded, report = fold(model, method="fx")
    assert not report.folded and "hooks on 1" in report.left[0][1], report
    assert not isinstance(folded, fx.GraphModule)


@pytest.mark.parametrize("method", ["auto", "modules", "fx"])
def test_an_example_input_does_not_stop_a_conv_whose_batch_norm_gets_3d_inputs(method):
    """Only a Linear's features are its output's last dim: a Conv1d -> BatchNorm1d pair on (N, C, L) folds."""
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4))).double().eval()
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    folded, report = fold(model, method=method, example_input=x)
    assert report.folded == [("1", "0")] and not report.left, report
    assert_same_outputs(model, folded, x, rel=1e-12)


def test_the_module_walk_leaves_a_sequential_subclass_with_its_own_forward():
    model = randomize_bn_(nn.Sequential(_SkipSequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))).double().eval()
    folded, report = fold(model, method="modules")
    assert not report.folded and [b for b, _ in report.left] == ["0.1"], report
    assert_same_outputs(model, folded, torch.randn(2, 3, 4, 4, dtype=torch.float64), rel=1e-12)


def test_the_module_walk_does_not_fold_past_a_batch_norm_it_left():
    """conv -> hooked bn (left) -> bn: the second batch norm's input is the first one's output."""
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3))).double().eval()
    model[1].register_forward_hook(lambda m, args, out: None)
    folded, report = fold(model, method="modules")
    assert not report.folded and [b for b, _ in report.left] == ["1", "2"], report
    assert_same_outputs(model, folded, torch.randn(2, 3, 4, 4, dtype=torch.float64), rel=1e-12)


def test_the_module_walk_leaves_a_batch_norm_shared_by_two_sequentials():
    """Documented: a batch norm used after several layers is left by "modules"."""
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 1), bn), nn.Sequential(nn.Conv2d(3, 3, 1), bn))
    randomize_bn_(model)
    model.double().eval()
    folded, report = fold(model, method="modules")
    assert not report.folded and "shared with another place" in report.left[0][1], report
    assert_same_outputs(model, folded, torch.randn(2, 3, 4, 4, dtype=torch.float64), rel=1e-12)


class _ConvTwiceTwoNorms(nn.Module):
    def __init__(self, keyword=False):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.keyword = keyword

    def forward(self, x):
        if self.keyword:
            return self.bn1(self.conv(x)) + self.bn1(input=self.conv(-x))
        return self.bn1(self.conv(x)) + self.bn2(self.conv(-x))


@pytest.mark.parametrize("keyword", [False, True], ids=["other-bn", "keyword-call"])
def test_a_layer_called_twice_folds_only_if_each_call_feeds_the_same_batch_norm_alone(keyword):
    torch.manual_seed(0)
    model = randomize_bn_(_ConvTwiceTwoNorms(keyword)).double().eval()
    folded, report = fold(model, method="fx")
    assert not report.folded, report
    assert any("applied at more than one place" in why for _, why in report.left), report
    assert_same_outputs(model, folded, torch.randn(2, 3, 4, 4, dtype=torch.float64), rel=1e-12)


def test_reading_a_weights_size_does_not_stop_the_fold():
    class ReadsSize(_Block):
        def forward(self, x):
            return self.bn(self.conv(x)) * self.conv.weight.size(0) + self.conv.weight.dim()

    torch.manual_seed(0)
    model = randomize_bn_(ReadsSize()).double().eval()
    folded, report = fold(model, method="fx", strict=True)
    assert report.folded == [("bn", "conv")]
    assert_same_outputs(model, folded, torch.randn(2, 3, 6, 6, dtype=torch.float64), rel=1e-12)


@pytest.mark.parametrize("method", ["modules", "fx"])
def test_the_folded_model_is_returned_in_evaluation_mode(method):
    """Documented: the model comes back in evaluation mode (a Dropout left in training included)."""
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.5))
    model[1].eval()
    folded, _ = fold(model, method=method)
    assert not any(m.training for m in folded.modules())


def test_the_module_walk_gives_a_reason_for_a_batch_norm_outside_a_sequential():
    model = randomize_bn_(_Block()).eval()
    _, report = fold(model, method="modules")
    assert report.left == [("bn", "not in a Sequential right after a Conv/ConvTranspose/Linear (method='modules')")]


def test_the_reports_text_lists_each_fold_and_each_reason():
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3))).eval()
    _, report = fold(model)
    assert str(report).splitlines() == [
        "folded 1 batch norm layer(s) (modules), left 1", "  1 -> 0",
        "  left 3: its input comes from 2 (ReLU), not from a Conv, ConvTranspose or Linear"]


def test_the_training_mode_error_names_at_most_five_layers():
    with pytest.raises(ValueError, match=r"but 0 is in training mode"):
        fold(nn.Sequential(nn.BatchNorm1d(2)))
    with pytest.raises(ValueError, match=r"but 0, 1, 2, 3, 4 and 2 more are in training mode"):
        fold(nn.Sequential(*[nn.BatchNorm1d(2) for _ in range(7)]))


@pytest.mark.parametrize("method", ["auto", "modules", "fx"])
def test_a_model_that_is_one_batch_norm_says_nothing_feeds_it(method):
    _, report = fold(nn.BatchNorm1d(3).eval(), method=method)
    assert report.left == [("<root>", "the model is a single batch norm layer; nothing feeds it")]


def test_a_batch_norm_with_only_one_running_buffer_is_left():
    model = randomize_bn_(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))).eval()
    model[1].running_mean = None
    _, report = fold(model, method="modules")
    assert not report.folded and "no running statistics" in report.left[0][1], report


@pytest.mark.parametrize("method", ["auto", "modules", "fx"])
@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, nn.BatchNorm3d, nlnn.BatchNorm2d, nlnn.BatchRenorm3d])
def test_a_linear_before_a_2d_or_3d_batch_norm_is_left(bn_cls, method):
    """A 2d/3d batch norm normalizes dim 1 of a 4-D/5-D tensor, never a Linear's output features (its last
    dim): with the channel counts equal (Linear(5, 4) on (N, 4, H, 5)) the pair was folded all the same,
    without example_input, and the outputs were up to 1.9 off."""
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Linear(5, 4), bn_cls(4))).double().eval()
    x = torch.randn((2, 4, 3, 5) if "2d" in bn_cls.__name__ else (2, 4, 3, 2, 5), dtype=torch.float64)
    folded, report = fold(model, method=method)
    assert not report.folded and "never the Linear's output features" in report.left[0][1], report
    assert_same_outputs(model, folded, x, rel=1e-12)
    with pytest.raises(ValueError, match="fold_pair_: .*never the Linear's output features"):
        fold_pair_(nn.Linear(5, 4), bn_cls(4).eval())
