"""Low precision: float16 and bfloat16 inputs whose mean is large against their spread
(1000 + randn, then rounded) must give what float64 gives from the same rounded inputs (and
the same rounded parameters and buffers), within the dtype's tolerance (helpers.LOWP_ATOL).
This is where a one-pass variance or half-precision accumulation fails."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import LOWP_ATOL, assert_lowp_close, big_mean_input, lowp_error
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

HALVES = [torch.float16, torch.bfloat16]
SHAPE = (16, 8, 5, 5)


def _mask(n, L, seed=0):
    lengths = np.random.default_rng(seed).integers(2, L + 1, size=n)
    return torch.from_numpy(np.arange(L)[None, :] < lengths[:, None])


LAYERS = {
    "batch_norm": (lambda dt: NN.BatchNorm2d(8, dtype=dt), SHAPE),
    "batch_norm_1d": (lambda dt: NN.BatchNorm1d(8, dtype=dt), (64, 8)),
    "layer_norm": (lambda dt: NN.LayerNorm((8, 5, 5), dtype=dt), SHAPE),
    "group_norm": (lambda dt: NN.GroupNorm(4, 8, dtype=dt), SHAPE),
    "instance_norm": (lambda dt: NN.InstanceNorm2d(8, affine=True, track_running_stats=True, dtype=dt), SHAPE),
    "rms_norm": (lambda dt: NN.RMSNorm((5, 5), dtype=dt), SHAPE),
    "switchable_norm": (lambda dt: NN.SwitchableNorm2d(8, dtype=dt), SHAPE),
    "switchable_norm_1d": (lambda dt: NN.SwitchableNorm1d(8, dtype=dt), (64, 8)),
    "batch_renorm": (lambda dt: NN.BatchRenorm2d(8, dtype=dt), SHAPE),
    "masked_batch_norm": (lambda dt: NN.MaskedBatchNorm1d(8, dtype=dt), (16, 8, 20)),
}


def _randomize_affine(m):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.75)


def _call(m, x, name):
    return m(x, _mask(x.shape[0], x.shape[2])) if name == "masked_batch_norm" else m(x)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_in_half_matches_float64_of_the_same_inputs(name, dtype):
    """Two training steps then eval: outputs, input and parameter gradients (and running
    statistics) against a float64 copy given the same rounded parameters, buffers and inputs.
    (torch's CPU layer and group norm keep the statistics their backward uses in the half dtype:
    their gradients were 0.02-0.2 off here.)"""
    make, shape = LAYERS[name]
    m = make(dtype)
    _randomize_affine(m)
    m64 = copy.deepcopy(m).double()
    for step in range(3):
        training = step < 2
        m.train(training)
        m64.train(training)
        with torch.no_grad():  # the float64 copy starts each step from the rounded state
            for v, v64 in zip(m.state_dict().values(), m64.state_dict().values(), strict=True):
                v64.copy_(v)
        x = big_mean_input(shape, dtype, seed=step).requires_grad_()
        x64 = x.detach().double().requires_grad_()
        y = _call(m, x, name)
        y64 = _call(m64, x64, name)
        assert y.dtype == dtype
        assert_lowp_close(y, y64, dtype, f"{name} {'train' if training else 'eval'} step {step}")
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(step)).to(dtype)
        m.zero_grad()
        m64.zero_grad()
        y.backward(dy)
        y64.backward(dy.double())
        assert_lowp_close(x.grad, x64.grad, dtype, f"{name} dx step {step}")
        for (pname, p), p64 in zip(m.named_parameters(), m64.parameters(), strict=True):
            assert_lowp_close(p.grad, p64.grad, dtype, f"{name} d{pname} step {step}")
        if training and getattr(m, "running_mean", None) is not None:
            assert_lowp_close(m.running_mean, m64.running_mean, dtype, f"{name} running_mean")
            assert_lowp_close(m.running_var, m64.running_var, dtype, f"{name} running_var")


def _ref_calls(x):
    c = x.shape[1]
    running = R.RunningStats(np.zeros(c, x.dtype), np.ones(c, x.dtype))
    mask = _mask(x.shape[0], x.shape[2]).numpy() if x.ndim == 3 else None
    g, b = np.linspace(0.8, 1.2, c).astype(x.dtype), np.linspace(-0.2, 0.2, c).astype(x.dtype)
    w3 = np.ones(3, x.dtype)
    return {
        "batch_norm": lambda: R.batch_norm_forward(x, g, b, running)[0],
        "batch_norm_eval": lambda: R.batch_norm_forward(
            x, g, b, R.RunningStats(np.full(c, 1000.0, x.dtype), np.ones(c, x.dtype)), training=False)[0],
        "layer_norm": lambda: R.layer_norm_forward(x, x.shape[1:])[0],
        "group_norm": lambda: R.group_norm_forward(x, 2, g, b)[0],
        "instance_norm": lambda: R.instance_norm_forward(x, g, b, running)[0],
        "rms_norm": lambda: R.rms_norm_forward(x, x.shape[-1])[0],
        "switchable_norm": lambda: R.switchable_norm_forward(x, g, b, w3, w3, running)[0],
        "batch_renorm": lambda: R.batch_renorm_forward(x, g, b, running)[0],
        "masked_batch_norm": lambda: R.masked_batch_norm_forward(x, mask, g, b, running)[0],
    }


@pytest.mark.parametrize("name", list(_ref_calls(np.ones((2, 2, 2)))))
def test_numpy_tier_in_float16(name):
    shape = (16, 8, 20) if name == "masked_batch_norm" else (16, 8, 5, 5)
    x16 = big_mean_input(shape, torch.float16).numpy()
    y16 = _ref_calls(x16)[name]()
    y64 = _ref_calls(x16.astype(np.float64))[name]()
    assert y16.dtype == np.float16
    assert_lowp_close(y16, y64, np.float16, name)


@pytest.mark.parametrize("name", [n for n in _ref_calls(np.ones((2, 2, 2))) if n != "rms_norm"])
def test_numpy_tier_with_large_groups_at_a_large_mean(name):
    """Groups of 16384 to 32768 values near 1000: the float32 sum behind the mean lost digits,
    and every output carried that offset times rstd (float32 outputs 1e-4 to 2.4e-4 off, a
    constant channel up to 0.6 from its bias). The corrected two-pass mean recovers them:
    float32 within 1e-5 (1e-6 measured), the constant channel at its bias, float16 within its
    tolerance. Wrong version: reference/_core.py centered_moments without the ``r`` correction."""
    shape = (2, 2, 16384) if name == "masked_batch_norm" else (2, 2, 128, 128)
    x16 = big_mean_input(shape, torch.float16).numpy()
    assert_lowp_close(_ref_calls(x16)[name](), _ref_calls(x16.astype(np.float64))[name](), np.float16, name)
    x32 = big_mean_input(shape, torch.float32).numpy()
    err = np.abs(_ref_calls(x32)[name]().astype(np.float64) - _ref_calls(x32.astype(np.float64))[name]()).max()
    # (switchable norm mixes means near 1000 in float32 after this: 1.2e-4, as torch's float32 BN's 5e-5)
    assert err < (2e-4 if name == "switchable_norm" else 1e-5), f"{name}: float32 error {err:.3g}"
    if name not in ("batch_norm_eval", "layer_norm", "group_norm", "switchable_norm"):  # (these mix channels)
        x32[:, 1] = np.float32(1000.1)
        y = _ref_calls(x32)[name]()[:, 1].astype(np.float64)
        # the constant channel's output is its bias (renorm: plus gamma * d, d clipped to dmax = 5)
        want = 0.2 + (5 * 1.2 if name == "batch_renorm" else 0)
        if name == "masked_batch_norm":
            y = y[_mask(shape[0], shape[2]).numpy()]
        assert np.abs(y - want).max() < 1e-5, f"{name}: constant channel {np.abs(y - want).max():.3g}"


def test_numpy_tier_in_float64_at_a_very_large_mean_is_exact_to_rounding():
    """The corrected mean's threshold is in ulps of the accumulation dtype: a fixed 4e-6 (float32's
    32 ulps) left float64 outputs at 1e8 + randn ~1e-9 off; now ~1e-15 (exact rational truth).
    Wrong version: reference/_core.py ``_OFFSET_ULPS * np.finfo(d.dtype).eps`` -> ``4e-6``."""
    from fractions import Fraction

    x = np.random.default_rng(0).standard_normal((20000, 1)) + 1e8
    y = R.batch_norm_forward(x)[0][:, 0]
    mean = sum(map(Fraction, x[:, 0])) / len(x)
    d = [Fraction(v) - mean for v in x[:, 0]]
    rstd = 1 / np.sqrt(float(sum(t * t for t in d) / len(d)) + 1e-5)
    assert np.abs(y - np.array([float(t) for t in d]) * rstd).max() < 1e-13


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_functional_half_matches_float64(dtype):
    x = big_mean_input((8, 4, 6), dtype)
    w, b = torch.linspace(0.5, 1.5, 4).to(dtype), torch.linspace(-1, 1, 4).to(dtype)
    rm, rv = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
    for fn in (lambda x_, *p: NF.batch_norm(x_, None, None, *p, training=True),
               lambda x_, *p: NF.instance_norm(x_, None, None, *p),
               lambda x_, *p: NF.group_norm(x_, 2, *p),
               lambda x_, *p: NF.batch_renorm(x_, rm.clone().to(x_.dtype), rv.clone().to(x_.dtype), *p, training=True)):
        assert_lowp_close(fn(x, w, b), fn(x.double(), w.double(), b.double()), dtype)


def test_tolerance_rejects_a_one_pass_variance():
    """The failure the tolerance is for: E[x^2] - E[x]^2 accumulated in float32 on 1000 + randn."""
    x = big_mean_input((64, 16, 8, 8), torch.float16)
    xf = x.float()
    mean = xf.mean((0, 2, 3), keepdim=True)
    var = (xf * xf).mean((0, 2, 3), keepdim=True) - mean * mean
    y = ((xf - mean) / (var + 1e-5).sqrt()).half()
    assert lowp_error(y, F.batch_norm(x.double(), None, None, training=True)) > LOWP_ATOL[torch.float16]


@pytest.mark.parametrize("fn,ours", [(lambda x: F.batch_norm(x, None, None, training=True),
                                      lambda x: NF.batch_norm(x, None, None, training=True)),
                                     (F.instance_norm, NF.instance_norm)],
                         ids=["batch_norm", "instance_norm"])
def test_tolerance_rejects_torch_native_cpu_half(fn, ours):
    """torch's native CPU half batch/instance norm (measured with torch 2.13: errors ~0.03 and
    ~0.3 on this input) fails the tolerance that normlab's functions pass."""
    x = big_mean_input((64, 16, 8, 8), torch.float16)
    y64 = fn(x.double())
    err = lowp_error(fn(x), y64)
    if err <= LOWP_ATOL[torch.float16]:
        pytest.skip(f"this torch's native CPU half kernel is accurate now (error {err:.2g}); nothing to reject")
    assert err > 5 * LOWP_ATOL[torch.float16]
    assert_lowp_close(ours(x), y64, torch.float16, "normlab's version")


def _float32_forwards():
    import normlab.reference as R

    x4 = np.random.default_rng(0).standard_normal((4, 6, 3, 5)).astype(np.float32)
    x3 = x4[:, :, 0]
    mask = np.ones((4, 5), bool)
    mask[1, 3:] = False
    run = R.RunningStats(np.zeros(6, np.float32), np.ones(6, np.float32))
    g, b = np.ones(6, np.float32), np.zeros(6, np.float32)
    return {
        "batch_norm": lambda: R.batch_norm_forward(x4, g, b, run)[:2],
        "layer_norm": lambda: R.layer_norm_forward(x4, (3, 5)),
        "rms_norm": lambda: R.rms_norm_forward(x4, 5),
        "instance_norm": lambda: R.instance_norm_forward(x4, g, b)[:2],
        "group_norm": lambda: R.group_norm_forward(x4, 3, g, b),
        "masked_batch_norm": lambda: R.masked_batch_norm_forward(x3, mask, g, b, run)[:2],
        "batch_renorm": lambda: R.batch_renorm_forward(x4, g, b, run)[:2],
        "switchable_norm": lambda: R.switchable_norm_forward(x4, g, b, np.ones(3), np.ones(3), run)[:2],
    }


@pytest.mark.parametrize("name", list(_float32_forwards()))
def test_reference_float32_stays_float32(name):
    """No silent float64 promotion inside the NumPy tier (a Python float or a float64 count in
    the statistics would double the memory traffic of every later pass)."""
    y, cache = _float32_forwards()[name]()
    assert y.dtype == np.float32
    kept = cache.u if hasattr(cache, "u") else cache["centered"]  # what the backward reads
    assert kept.dtype == np.float32


def _reference_calls():
    """(forward(x), backward) pairs over every path of the shared core: with and without a
    weight, training and evaluation statistics, a mask, renorm's r and d."""
    import normlab.reference as R

    g, b = np.full(6, 1.5), np.full(6, 0.25)
    run = R.RunningStats(np.full(6, 0.1), np.full(6, 2.0))
    mask = np.ones((4, 5), bool)
    mask[1, 3:] = False
    return {
        "batch_norm": (lambda x: R.batch_norm_forward(x, g, b, run)[:2], R.batch_norm_backward),
        "batch_norm_eval": (lambda x: R.batch_norm_forward(x, g, b, run, training=False)[:2], R.batch_norm_backward),
        "batch_norm_no_affine": (lambda x: R.batch_norm_forward(x)[:2], R.batch_norm_backward),
        "layer_norm": (lambda x: R.layer_norm_forward(x, (3, 5), np.full((3, 5), 1.5), np.full((3, 5), 0.25)),
                       R.layer_norm_backward),
        "layer_norm_all_dims": (lambda x: R.layer_norm_forward(x, x.shape, None, np.full(x.shape, 0.25)),
                                R.layer_norm_backward),  # nothing to sum for dbeta: it must still be a copy
        "rms_norm": (lambda x: R.rms_norm_forward(x, 5, np.full(5, 1.5)), R.rms_norm_backward),
        "rms_norm_no_weight": (lambda x: R.rms_norm_forward(x, 5), R.rms_norm_backward),
        "instance_norm": (lambda x: R.instance_norm_forward(x, g, b)[:2], R.instance_norm_backward),
        "group_norm": (lambda x: R.group_norm_forward(x, 3, g, b), R.group_norm_backward),
        "masked_batch_norm": (lambda x: R.masked_batch_norm_forward(x[:, :, 0], mask, g, b, run)[:2],
                              R.masked_batch_norm_backward),
        "batch_renorm": (lambda x: R.batch_renorm_forward(x, g, b, run, rmax=1.5, dmax=0.5)[:2],
                         R.batch_renorm_backward),
        "switchable_norm": (lambda x: R.switchable_norm_forward(x, g, b, np.array([0.2, -0.1, 0.3]),
                                                                np.array([-0.3, 0.1, 0.2]), run)[:2],
                            lambda dy, cache: R.switchable_norm_backward(dy, cache)),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(_reference_calls()))
def test_reference_never_writes_into_its_inputs(name, dtype):
    """The core works in place on its own buffers only: x (which the cache may keep, for RMS
    norm without a weight) and dy come out of the forward and backward bit for bit unchanged,
    and a second backward from the same cache gives the same gradients."""
    forward, backward = _reference_calls()[name]
    x = (np.random.default_rng(1).standard_normal((4, 6, 3, 5)) * 3 + 2).astype(dtype)
    x0 = x.copy()
    y, cache = forward(x)
    dy = np.random.default_rng(2).standard_normal(y.shape).astype(dtype)
    dy0 = dy.copy()
    first = backward(dy, cache)
    second = backward(dy, cache)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)
    for a, b in zip(first, second):
        if a is not None:
            np.testing.assert_array_equal(a, b)
            assert not np.shares_memory(a, dy) and not np.shares_memory(a, x)  # gradients are fresh arrays


def test_reference_renorm_gradients_keep_the_input_dtype_with_float64_running_stats():
    import normlab.reference as R

    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    run = R.RunningStats(np.full(3, 0.1), np.full(3, 2.0))  # NumPy's default float64
    y, cache, _ = R.batch_renorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), run, rmax=1.5, dmax=0.5)
    grads = R.batch_renorm_backward(np.ones_like(x), cache)
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)


def test_reference_accumulates_longdouble_in_longdouble():
    """np.longdouble input keeps its own precision (it was accumulated in float32, which lost
    a spread of 1e-3 around 1e8 entirely)."""
    x = np.longdouble(1e8) + np.array([[0], [1e-3], [2e-3], [3e-3]], np.longdouble)
    y, _, _ = R.batch_norm_forward(x, eps=1e-12)
    assert y.dtype == np.longdouble
    np.testing.assert_allclose(y.ravel().astype(np.float64), [-1.3416, -0.4472, 0.4472, 1.3416], atol=1e-3)


NEAR_CONSTANT = {  # the layer and the input's spread around 10000
    "batch_norm": (lambda dt: NN.BatchNorm2d(4, dtype=dt), 30),
    "batch_norm_eval": (lambda dt: NN.BatchNorm2d(4, dtype=dt).eval(), 0.5),
    "instance_norm": (lambda dt: NN.InstanceNorm2d(4, affine=True, dtype=dt), 30),
    "group_norm": (lambda dt: NN.GroupNorm(4, 4, dtype=dt), 3),
    "layer_norm": (lambda dt: NN.LayerNorm((4, 3, 3), dtype=dt), 30),
    "batch_renorm": (lambda dt: NN.BatchRenorm2d(4, dtype=dt), 30),
    "sync_batch_norm": (lambda dt: NN.SyncBatchNorm(4, dtype=dt), 30),
}


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("name", list(NEAR_CONSTANT))
def test_a_near_constant_group_at_a_large_mean_in_half(name, dtype):
    """torch's CPU kernels fold the normalization into x * a + (b - mean * a), which cancels when
    |mean| * a is large: 10000 + randn rounds to a few values in half precision, and the output
    was 0.07 off, and a constant channel with eps 1e-20 or 1e-30 gave -1024 or -inf."""
    make, spread = NEAR_CONSTANT[name]
    m = make(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        if name == "batch_norm_eval":  # evaluation folds with the running statistics
            m.running_mean.fill_(10000.0)
            m.running_var.fill_(1e-3)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((6, 4, 3, 3)) * spread + 10000.0).to(dtype)
    x[:, 1] = x[0, 1, 0, 0]  # one channel exactly constant
    m64 = copy.deepcopy(m).double()
    assert_lowp_close(m(x), m64(x.double()), dtype, name)
    if name in ("batch_norm", "instance_norm", "batch_renorm", "sync_batch_norm"):
        # a constant channel with a tiny eps: x - mean is 0, so the output is the bias (plus renorm's
        # gamma * d, d clipped to dmax = 5 as the batch mean is far from the running mean of 0);
        # torch's float64 kernel folds too, so the truth is written out here
        m.eps = 1e-30
        want = m.bias[1] + (5 * m.weight[1] if name == "batch_renorm" else 0)
        assert_lowp_close(m(x)[:, 1], want.double().expand(6, 3, 3), dtype, f"{name}, eps=1e-30")


def test_batch_renorm_backward_under_autocast():
    """A float32 BatchRenorm under CPU autocast (bfloat16 input from the conv) copied its float32
    buffers onto themselves, a version bump that broke the backward of the batch norm it calls."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), NN.BatchRenorm2d(4))
    with torch.autocast("cpu", torch.bfloat16):
        y = model(torch.randn(4, 3, 6, 6) * 3 + 1)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _switchable_batch_variance(eps):
    """SwitchableNorm1d that mixes (almost) only the instance and batch branches, whose variance
    is 0 on a constant channel: with eps=1e-30, rstd is 1e15 there."""
    m = NN.SwitchableNorm1d(3, eps=eps)
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.0, -100.0, 0.0]))
        m.var_weight.copy_(torch.tensor([0.0, -100.0, 0.0]))
    return m


@pytest.mark.parametrize("make", [lambda: NN.MaskedBatchNorm1d(3, eps=1e-30), lambda: _switchable_batch_variance(1e-30),
                                  lambda: NN.SwitchableNorm1d(3)], ids=["masked", "switchable", "switchable-wide"])
def test_own_backward_at_extreme_scales_stays_finite_and_right(make):
    """rstd^3 was formed first: a constant channel with eps=1e-30 overflowed it (NaN dx), and an
    input spread of 1e15 underflowed it (the variance logits' gradient came out 0)."""
    m = make()
    wide = m.eps == 1e-5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 6, generator=g) * (1e15 if wide else 1.0)
    if not wide:
        x[:, 1] = 2.5  # a constant channel
    dy = torch.randn(4, 3, 6, generator=g)
    grads = []
    for mod, xi in ((m, x), (copy.deepcopy(m).double(), x.double())):
        xi = xi.clone().requires_grad_()
        args = (torch.ones(4, 6, dtype=torch.bool),) if isinstance(mod, NN.MaskedBatchNorm1d) else ()
        mod(xi, *args).backward(dy.to(xi.dtype))
        grads.append([xi.grad] + [p.grad for p in mod.parameters()])
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_numpy_tier_batch_mean_at_a_large_mean_keeps_its_digits():
    """The corrected two-pass mean is also the mean the running statistics take: 65536 float32
    values per channel near 1000 summed to a mean ~6e-4 off (10 ulps), and with momentum 1 the
    running mean carried it; the corrected mean is within an ulp of float64's (3e-5 measured).
    Wrong version: reference/_core.py centered_moments without ``mean = mean + r``."""
    x = (1000 + np.random.default_rng(0).standard_normal((4096, 3, 16))).astype(np.float32)
    want = x.astype(np.float64).mean(axis=(0, 2))
    running = R.RunningStats(np.zeros(3, np.float32), np.ones(3, np.float32))
    _, _, running = R.batch_norm_forward(x, running=running, momentum=1.0)
    assert np.abs(running.mean - want).max() < 1.2e-4  # two float32 ulps at 1000
    assert np.abs(R.moments(x, (0, 2))[0].ravel() - want).max() < 1.2e-4


def test_numpy_tier_masked_padding_stays_0_at_a_large_mean_without_beta():
    """Groups of 24576 valid float32 values near 1000 make the corrected two-pass mean centre a
    second time; that pass must leave padded positions at 0. Without beta nothing multiplies the
    output by the mask afterwards, so padding held -r * rstd (4.6e-4) instead of 0.
    Wrong version: reference/_core.py ``d -= r if m is None else r * m`` -> ``d -= r``."""
    x = (1000 + np.random.default_rng(0).standard_normal((2, 2, 16384))).astype(np.float32)
    mask = np.ones((2, 16384), bool)
    mask[0, 8192:] = False
    y = R.masked_batch_norm_forward(x, mask)[0]
    assert not np.any(y.transpose(0, 2, 1)[~mask])
