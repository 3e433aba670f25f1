"""precise_bn: the running statistics become the population statistics of everything each layer saw,
computed here directly (one var_mean over the concatenation of its inputs)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from normlab.tools import precise_bn

SIZES = (7, 2, 13, 5)  # batches of different sizes: count-weighted, not averaged per batch


def batches(offset=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 3, 6, 6, generator=g, dtype=dtype) * 2 + offset, torch.zeros(n)) for n in SIZES]


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, momentum=0.3), nn.ReLU(), nn.Dropout(0.3),
                         nn.Conv2d(5, 4, 3), nlnn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(4 * 2 * 2, 6),
                         nlnn.BatchRenorm1d(6), nn.Sigmoid(), nn.Linear(6, 6), nlnn.SwitchableNorm1d(6))


def population(xs):
    """Per-channel mean and unbiased variance over dim 0 and every position, of all xs together."""
    x = torch.cat([t.detach().double() for t in xs])
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True), flat.shape[1]


def captured_inputs(m, data):
    """Run ``m`` over the batches as precise_bn does (norm layers in training mode) and keep every
    input of every layer with running statistics: the ground truth to compare with."""
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, a, n=name: seen.setdefault(n, []).append(a[0]))
             for name, layer in m.named_modules() if getattr(layer, "running_mean", None) is not None]
    with torch.no_grad():
        for x, _ in data:
            m(x)
    for h in hooks:
        h.remove()
    return seen


def test_running_statistics_are_the_population_statistics():
    # the ground truth: the same model, dropout off, norm layers on batch statistics (momentum 0 keeps
    # the running buffers out of it), every norm layer's inputs kept and reduced in one go
    probe = model().eval()
    for layer in probe.modules():
        if getattr(layer, "running_mean", None) is not None:
            layer.train()
            layer.momentum = 0.0
    expected = {n: population(xs) for n, xs in captured_inputs(probe, batches()).items()}
    m = model().eval()
    counts = precise_bn(m, batches())
    assert set(counts) == set(expected) == {"1", "5", "8", "11"}
    layers = dict(m.named_modules())
    for name, (mean, var, n) in expected.items():
        torch.testing.assert_close(layers[name].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layers[name].running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert counts[name] == n
    # the first layer's input does not depend on any normalization: check it from scratch too
    with torch.no_grad():
        mean, var, _ = population([model()[0](x) for x, _ in batches()])
    torch.testing.assert_close(m[1].running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_modes_momentum_and_step_counts_are_restored():
    m = model()
    m.eval()
    m[5].train()  # a mixed state must come back as it was
    m[1].num_batches_tracked.fill_(42)
    precise_bn(m, batches())
    assert [m[i].training for i in (1, 3, 5, 8)] == [False, False, True, False]
    assert (m[1].momentum, m[5].momentum, m[8].momentum) == (0.3, None, 0.1)
    assert int(m[1].num_batches_tracked) == 42 and int(m[5].num_batches_tracked) == 0


def test_large_offset_keeps_float32_statistics_exact():
    m = nn.Sequential(nn.BatchNorm2d(3))
    data = batches(offset=1e4)
    precise_bn(m, data)
    mean, var, _ = population([x for x, _ in data])
    torch.testing.assert_close(m[0].running_mean.double(), mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(m[0].running_var.double(), var, rtol=1e-5, atol=0)


def test_num_batches_callables_dicts_and_custom_forward():
    data = batches()
    m = nn.Sequential(nn.BatchNorm2d(3))
    counts = precise_bn(m, lambda: iter(data), num_batches=2)
    assert counts == {"0": (SIZES[0] + SIZES[1]) * 36}
    mean, _, _ = population([x for x, _ in data[:2]])
    torch.testing.assert_close(m[0].running_mean.double(), mean, rtol=1e-6, atol=1e-6)

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, image, scale=1.0):
            return self.bn(image * scale)

    k = Kw()
    precise_bn(k, [{"image": x, "scale": 2.0} for x, _ in data])
    mean, _, _ = population([2 * x for x, _ in data])
    torch.testing.assert_close(k.bn.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    precise_bn(k, [x for x, _ in data], forward=lambda mod, b: mod(b, scale=3.0))
    mean, _, _ = population([3 * x for x, _ in data])
    torch.testing.assert_close(k.bn.running_mean.double(), mean, rtol=1e-6, atol=1e-6)


def test_masked_batch_norm_counts_only_valid_positions():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 4, 9, generator=g) for n in (3, 6)]
    masks = [torch.arange(9)[None, :] < torch.randint(1, 10, (x.shape[0], 1), generator=g) for x in xs]

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nlnn.MaskedBatchNorm1d(4)

        def forward(self, x, mask):
            return self.bn(x, mask)

    m = Masked()
    counts = precise_bn(m, list(zip(xs, masks)), forward=lambda mod, b: mod(*b))
    valid = torch.cat([x.transpose(1, 2)[mk] for x, mk in zip(xs, masks)])  # (valid positions, C)
    torch.testing.assert_close(m.bn.running_mean, valid.mean(0))
    torch.testing.assert_close(m.bn.running_var, valid.var(0, unbiased=True))
    assert counts == {"bn": valid.shape[0]}


def test_layers_without_running_statistics_are_skipped_and_errors_are_clear():
    m = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), nn.GroupNorm(1, 3))
    with pytest.warns(UserWarning, match="no layer with running statistics"):
        assert precise_bn(m, [torch.randn(4, 3)]) == {}
    with pytest.raises(ValueError, match="yielded no batch"):
        precise_bn(nn.Sequential(nn.BatchNorm1d(3)), iter([]))
    with pytest.raises(ValueError, match="num_batches must be at least 1"):
        precise_bn(nn.Sequential(nn.BatchNorm1d(3)), [torch.randn(4, 3)], num_batches=0)
    with pytest.raises(TypeError, match="forward=lambda"):
        precise_bn(nn.Sequential(nn.BatchNorm1d(3)), ["text"])
    bn = nn.Sequential(nn.BatchNorm1d(3, momentum=0.5))
    with pytest.raises(TypeError):
        precise_bn(bn, [torch.randn(4, 3), "oops"])
    assert bn[0].momentum == 0.5 and bn[0].training  # restored after the failure
    torch.testing.assert_close(bn[0].running_mean, torch.zeros(3))  # and untouched


@pytest.mark.parametrize("bn", [nn.BatchNorm1d(3), nlnn.BatchNorm1d(3)], ids=["torch", "normlab"])
def test_a_batch_with_the_wrong_channel_count_names_the_layer(bn):
    model = nn.Sequential(nn.Identity(), bn)
    with pytest.raises(ValueError, match=r"precise_bn: 1 \(BatchNorm1d\) was built for 3 channels.*shape \(4, 5\)"):
        precise_bn(model, [torch.randn(4, 3), torch.randn(4, 5)])
    torch.testing.assert_close(bn.running_mean, torch.zeros(3))  # untouched


def test_an_empty_batch_adds_nothing():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    m = nn.Sequential(nn.BatchNorm1d(3))
    assert precise_bn(m, [torch.randn(0, 3), x, torch.randn(0, 3)]) == {"0": 6}
    torch.testing.assert_close(m[0].running_mean, x.mean(0))
    torch.testing.assert_close(m[0].running_var, x.var(0, unbiased=True))


def test_float64_statistics_far_from_zero_keep_their_variance():
    """Each batch's M2 is summed around its own mean: x^2 - n mean^2 would cancel to noise at an offset of 1e8."""
    data = batches(offset=1e8, dtype=torch.float64)
    m = nn.Sequential(nn.BatchNorm2d(3).double())
    precise_bn(m, data)
    _, var, _ = population([x for x, _ in data])
    torch.testing.assert_close(m[0].running_var, var, rtol=1e-6, atol=0)


def test_runs_without_gradients_and_feeds_dict_batches_by_keyword():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, image, offset=0.0):
            return self.bn(image - offset)

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    k, grad_enabled = Kw(), []
    k.bn.register_forward_pre_hook(lambda mod, args: grad_enabled.append(torch.is_grad_enabled()))
    precise_bn(k, [{"offset": 1.0, "image": x}])  # keys in another order than forward's arguments
    torch.testing.assert_close(k.bn.running_mean, (x - 1.0).mean(0))
    assert grad_enabled == [False]


def test_a_one_dimensional_batch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"precise_bn: 0 \(BatchNorm1d\) was built for 3 channels.*shape \(3,\)"):
        precise_bn(nn.Sequential(nn.BatchNorm1d(3)), [torch.randn(3)])
