"""Switchable norm (no torch twin): forward against statistics computed directly, gradients
(x, gamma, beta and both logit vectors) against central finite differences, and
nn vs functional vs the NumPy reference over training steps and eval."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import TOL_FD, assert_close, finite_diff, randn, run_against_reference, t
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

EPS = 1e-3


def softmax(z):
    e = np.exp(z - np.max(z))
    return e / e.sum()


def direct_forward(x, gamma, beta, mw, vw, running=None):
    """Switchable norm written out plainly: np.mean/np.var over each branch's axes."""
    nd = x.ndim
    sp = tuple(range(2, nd))
    stats = []
    if nd > 2:
        stats.append((x.mean(axis=sp, keepdims=True), x.var(axis=sp, keepdims=True)))
    stats.append((x.mean(axis=(1,) + sp, keepdims=True), x.var(axis=(1,) + sp, keepdims=True)))
    if running is None:
        stats.append((x.mean(axis=(0,) + sp, keepdims=True), x.var(axis=(0,) + sp, keepdims=True)))
    else:
        shape = (1, -1) + (1,) * (nd - 2)
        stats.append((running.mean.reshape(shape), running.var.reshape(shape)))
    wm, wv = (softmax(np.asarray(z)) if nd > 2 else softmax(np.asarray(z)[1:]) for z in (mw, vw))
    mean = sum(w * s[0] for w, s in zip(wm, stats, strict=True))
    var = sum(w * s[1] for w, s in zip(wv, stats, strict=True))
    y = (x - mean) / np.sqrt(var + EPS)
    shape = (1, -1) + (1,) * (nd - 2)
    return y * gamma.reshape(shape) + beta.reshape(shape)


SHAPES = [(3, 2, 4), (4, 3), (2, 3, 2, 1), (5, 2, 1)]


def _inputs(shape, seed=0):
    c = shape[1]
    return (randn(shape, seed, 2.0, 1.0), randn(c, seed + 1) * 0.3 + 1, randn(c, seed + 2),
            np.array([0.3, -0.5, 0.8]), np.array([-0.2, 0.6, 0.1]))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_reference_forward_matches_direct_statistics(shape, training):
    x, g, b, mw, vw = _inputs(shape)
    c = shape[1]
    running = R.RunningStats(randn(c, 7), np.exp(randn(c, 8)))
    y, _, _ = R.switchable_norm_forward(x, g, b, mw, vw, running, training=training, eps=EPS)
    assert_close(y, direct_forward(x, g, b, mw, vw, None if training else running))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_reference_backward_matches_finite_differences(shape, training):
    x, g, b, mw, vw = _inputs(shape, 3)
    c = shape[1]
    running = R.RunningStats(randn(c, 7), np.exp(randn(c, 8)))
    dy = randn(shape, 9)
    _, cache, _ = R.switchable_norm_forward(x, g, b, mw, vw, running, training=training, eps=EPS)
    grads = R.switchable_norm_backward(dy, cache)

    def f(*a):
        return R.switchable_norm_forward(*a, running, training=training, eps=EPS)[0]

    fd = finite_diff(f, (x, g, b, mw, vw), dy)
    for name, got, want in zip(("dx", "dgamma", "dbeta", "dmean_weight", "dvar_weight"), grads, fd, strict=True):
        assert_close(got, want, **TOL_FD, what=name)
    if len(shape) == 2:  # no IN branch for (N, C): its logits get no gradient
        assert grads[3][0] == 0 and grads[4][0] == 0


def test_reference_running_stats_are_bn_branch_with_unbiased_variance():
    x = randn((3, 2, 5), 0, 2.0, 1.0)
    running = R.RunningStats(np.zeros(2), np.ones(2))
    _, _, running = R.switchable_norm_forward(x, None, None, np.zeros(3), np.zeros(3), running, momentum=0.25)
    assert_close(running.mean, 0.75 * 0 + 0.25 * x.mean(axis=(0, 2)))
    assert_close(running.var, 0.75 * 1 + 0.25 * x.var(axis=(0, 2), ddof=1))


def _ref_step(eps, momentum):
    def step(x, _, p, running, training, dy):
        y, cache, running = R.switchable_norm_forward(x, p.get("weight"), p.get("bias"), p["mean_weight"],
                                                      p["var_weight"], running, training=training,
                                                      momentum=momentum, eps=eps)
        dx, dg, db, dmw, dvw = R.switchable_norm_backward(dy, cache)
        return y, dict(input=dx, weight=dg, bias=db, mean_weight=dmw, var_weight=dvw), running
    return step


@pytest.mark.parametrize("cls,shape", [(NN.SwitchableNorm1d, (4, 3)), (NN.SwitchableNorm1d, (3, 2, 5)),
                                       (NN.SwitchableNorm2d, (2, 3, 2, 3))], ids=["1d-NC", "1d-NCL", "2d"])
@pytest.mark.parametrize("kw", [dict(), dict(affine=False, momentum=0.3, eps=1e-3)], ids=str)
def test_module_matches_reference_over_steps_then_eval(cls, shape, kw):
    m = cls(shape[1], dtype=torch.float64, **kw)
    with torch.no_grad():  # start away from the uniform mix
        m.mean_weight.copy_(torch.tensor([0.5, -0.3, 0.1]))
        m.var_weight.copy_(torch.tensor([-0.4, 0.2, 0.7]))
    run_against_reference(m, _ref_step(m.eps, m.momentum), lambda s: randn(shape, s, 1.0 + s, s), steps=3, lr=0.3)


def test_momentum_none_is_cumulative():
    m = NN.SwitchableNorm2d(2, momentum=None, dtype=torch.float64)
    xs = [randn((3, 2, 2, 2), s, 1 + s, s) for s in range(3)]
    for x in xs:
        m(t(x))
    assert_close(m.running_mean, np.mean([x.mean(axis=(0, 2, 3)) for x in xs], axis=0))
    assert int(m.num_batches_tracked) == 3


def test_functional_matches_module_and_mixture():
    m = NN.SwitchableNorm2d(3, dtype=torch.float64)
    x = t(randn((2, 3, 2, 2), 0))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = NF.switchable_norm(x, rm, rv, m.weight, m.bias, m.mean_weight, m.var_weight, True, 0.1, 1e-5)
    assert torch.equal(y, m(x))
    assert torch.equal(rm, m.running_mean) and torch.equal(rv, m.running_var)
    mix = m.mixture()
    assert set(mix) == {"mean", "var"} and all(abs(v - 1 / 3) < 1e-7 for v in mix["mean"].values())


@pytest.mark.parametrize("affine", ["gamma only", "beta only"])
def test_reference_gradients_follow_which_of_gamma_and_beta_were_given(affine):
    x, g, b, mw, vw = _inputs((3, 2, 4), 3)
    g, b = (g, None) if affine == "gamma only" else (None, b)
    dy = randn(x.shape, 9)
    _, cache, _ = R.switchable_norm_forward(x, g, b, mw, vw, eps=EPS)
    dx, dgamma, dbeta, _, _ = R.switchable_norm_backward(dy, cache)
    assert (dgamma is None) == (g is None) and (dbeta is None) == (b is None)
    if b is not None:
        assert_close(dbeta, dy.sum(axis=(0, 2)), what="dbeta")
    fd = finite_diff(lambda x_: R.switchable_norm_forward(x_, g, b, mw, vw, eps=EPS)[0], (x,), dy)
    assert_close(dx, fd[0], **TOL_FD, what="dx")


@pytest.mark.parametrize("cls,shape", [(NN.SwitchableNorm1d, (1, 3)), (NN.SwitchableNorm1d, (1, 3, 5)),
                                       (NN.SwitchableNorm2d, (1, 3, 4, 4))], ids=["1d-NC", "1d-NCL", "2d"])
@pytest.mark.parametrize("other", [1e6, 1e8, float("nan"), float("inf")], ids=str)
def test_eval_output_of_a_sample_does_not_depend_on_the_others(cls, shape, other):
    """In evaluation every branch is per sample (IN, LN) or fixed (running BN): a neighbour in the
    batch, however large or broken, must not move a sample's output or its gradient."""
    g = torch.Generator().manual_seed(0)
    m = cls(shape[1]).eval()
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(shape[1], generator=g))
        m.running_var.uniform_(0.5, 2.0, generator=g)
    x1 = torch.randn(shape, generator=g).requires_grad_()
    alone = m(x1)
    alone.sum().backward()
    grad_alone = x1.grad.clone()
    x1.grad = None
    y = m(torch.cat([torch.full(shape, other) + torch.randn(shape, generator=g), x1]))
    assert torch.equal(y[1:], alone)
    y[1:].sum().backward()
    assert torch.equal(x1.grad, grad_alone)


def test_bias_false_learns_gamma_only():
    m = NN.SwitchableNorm2d(3, bias=False, dtype=torch.float64)
    assert m.bias is None and "bias=False" in repr(m) and "bias" not in m.state_dict()
    x = t(randn((2, 3, 2, 2), 0))
    ref = NN.SwitchableNorm2d(3, dtype=torch.float64)
    assert torch.allclose(m(x), ref(x))  # beta starts at 0
    m(x).sum().backward()
    assert m.weight.grad is not None


def test_logits_changed_in_place_before_backward_do_not_change_the_gradients():
    """An optimizer step between a forward and its backward (a retained graph: GAN and
    multi-loss loops) must leave the gradients those of the forward that ran, as autograd's
    saved softmax output does; the backward had rebuilt the mix from the new logits."""
    torch.manual_seed(0)
    x, dy = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    grads = []
    for step in (False, True):
        m = NN.SwitchableNorm1d(3)
        y = m(x)
        if step:
            with torch.no_grad():
                m.mean_weight.copy_(torch.tensor([5.0, -5.0, 0.0]))
                m.var_weight.copy_(torch.tensor([-5.0, 5.0, 0.0]))
        y.backward(dy)
        grads.append((m.mean_weight.grad, m.var_weight.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_reference_mean_logit_gradient_keeps_its_digits_at_a_large_mean():
    """sum(dL/dmu * mu_k) - sum_j w_j (...) subtracted sums of values near the mean: at mean 1000
    in float32 the mean logits' gradient was off by 1e-3 of its size (now about 5e-5)."""
    rng = np.random.default_rng(0)
    z, dy = rng.standard_normal((8, 4, 6)), rng.standard_normal((8, 4, 6))
    mw, vw = np.array([0.3, -0.2, 0.5]), np.array([-0.1, 0.4, 0.2])
    x = (z + 1000).astype(np.float32)
    got = R.switchable_norm_backward(dy.astype(np.float32), R.switchable_norm_forward(x, None, None, mw, vw)[1])[3]
    want = R.switchable_norm_backward(dy, R.switchable_norm_forward(x.astype(np.float64), None, None, mw, vw)[1])[3]
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 2e-4


def test_a_small_channel_beside_a_large_one_keeps_its_digits():
    """One pivot for every channel (the mean over all of them) left a channel near 0.01 beside
    one at 10000 with 5e-4 of absolute precision in float32: its running mean 2% off, outputs
    0.2 off with batch-leaning logits."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, 6, generator=g)
    x[:, 0] = x[:, 0] * 0.001 + 0.01
    x[:, 1] = x[:, 1] * 30 + 10000
    m = NN.SwitchableNorm1d(2, momentum=1.0)
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.0, -12.0, 3.0]))
        m.var_weight.copy_(torch.tensor([0.0, -12.0, 3.0]))
    m64 = copy.deepcopy(m).double()
    for train in (True, False):
        m.train(train)
        m64.train(train)
        torch.testing.assert_close(m(x)[:, 0].double(), m64(x.double())[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_mean.double(), m64.running_mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(m.running_var.double(), m64.running_var, rtol=1e-4, atol=0)


def test_a_nan_in_one_channel_leaves_the_others_running_statistics():
    """The shared pivot turned NaN and every channel's running statistics with it."""
    x = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(1))
    x[2, 0, 1] = float("nan")
    m = NN.SwitchableNorm1d(3)
    m(x)
    assert torch.isnan(m.running_mean[0]) and torch.isfinite(m.running_mean[1:]).all()
    assert torch.isfinite(m.running_var[1:]).all()
    bn = torch.nn.BatchNorm1d(3)  # the batch branch's running statistics are batch norm's
    bn(x)
    torch.testing.assert_close(m.running_mean[1:], bn.running_mean[1:])
    torch.testing.assert_close(m.running_var[1:], bn.running_var[1:])



def test_a_nan_in_one_channel_does_not_spread_to_other_samples_and_channels():
    """A NaN in sample 2, channel 0 reaches that sample (its layer branch mixes all its channels)
    and channel 0 (its batch branch), nothing else; nor, in evaluation, does the NaN running mean
    of channel 0. A non-finite per-channel pivot is taken as 0: kept, it went into every channel's
    layer-branch shift and made every output NaN."""
    x = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(1))
    x[2, 0, 1] = float("nan")
    m = NN.SwitchableNorm1d(3)
    y = m(x)
    assert torch.isfinite(y[[0, 1, 3, 4, 5]][:, 1:]).all()
    m.eval()
    y = m(torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2)))
    assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1:]).all()


@pytest.mark.parametrize("branch", [0, 2, None], ids=["in", "bn", "mix"])
def test_float32_backward_with_a_large_mean_dy_keeps_its_digits(branch):
    """x and dy both near 1000 in float32: the rows' float32 mean is off by ~1e-4, so the centred
    rows summed to s * 1e-4 instead of 0, and backward's sum(dy * d) took mean(dy) times that: dx
    0.75 off (one-hot IN) where it is ~4 (torch's float32 BatchNorm: 0.1). The rows' own mean
    corrects it (corrected two-pass): now within 1e-4 of max |dx| (2e-4 for the default mix,
    whose LN branch cancels like torch's own layer norm does).
    Wrong version: functional/switchable_norm.py without ``r`` (the rows' own mean)."""
    torch.manual_seed(0)
    m = NN.SwitchableNorm2d(8)
    if branch is not None:
        with torch.no_grad():
            for logits in (m.mean_weight, m.var_weight):
                logits.fill_(-100.0)
                logits[branch] = 100.0
    m64 = copy.deepcopy(m).double()
    x = (1000 + torch.randn(16, 8, 5, 5, dtype=torch.float64)).float().requires_grad_()
    dy = (1000 + torch.randn(16, 8, 5, 5, dtype=torch.float64)).float()
    x64 = x.detach().double().requires_grad_()
    m(x).backward(dy)
    m64(x64).backward(dy.double())
    err = (x.grad.double() - x64.grad).abs().max().item() / x64.grad.abs().max().item()
    assert err < (2e-4 if branch is None else 1e-4), err


def test_mixture_names_each_branch_its_own_weight():
    """mixture() labels the softmax weights IN, LN, BN in the logits' order (uniform logits could not
    tell a reversed order)."""
    m = NN.SwitchableNorm2d(3)
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.0, 1.0, 2.0]))
        m.var_weight.copy_(torch.tensor([2.0, 0.0, 1.0]))
    mix = m.mixture()
    for key, logits in (("mean", [0.0, 1.0, 2.0]), ("var", [2.0, 0.0, 1.0])):
        want = torch.softmax(torch.tensor(logits), 0).tolist()
        assert list(mix[key]) == ["IN", "LN", "BN"]
        assert list(mix[key].values()) == pytest.approx(want)


@pytest.mark.parametrize("shape", [(8, 4, 32), (64, 4)], ids=["NCL", "NC"])
def test_reference_mean_logit_gradient_sums_to_0_at_a_large_mean(shape):
    """The mix is invariant to adding a constant to all three logits, so their gradient sums to
    0. The mean logits' ``g_k`` are sums of dL/dmu times means near 1000; in float32 what rounding
    leaves of ``sum(w * g)`` must be taken out, or the gradient summed to -1.8e-3 (0.3% of its
    largest entry; 0 with it). Wrong version: reference/switchable_norm.py
    ``wm * (gm - (wm * gm).sum())`` -> ``wm * gm``."""
    rng = np.random.default_rng(0)
    x = (1000 + rng.standard_normal(shape)).astype(np.float32)
    logits = np.array([0.3, -0.2, 0.5], np.float32), np.array([-0.1, 0.4, 0.2], np.float32)
    _, cache, _ = R.switchable_norm_forward(x, None, None, *logits)
    dmw = R.switchable_norm_backward(rng.standard_normal(shape).astype(np.float32), cache)[3]
    assert abs(float(dmw.sum())) < 1e-5 * np.abs(dmw).max()


def test_functional_bias_without_weight_gets_its_gradient():
    """The functional form takes a bias without a weight, and that bias learns: its gradient is dy
    summed over every axis but the channel (no test reached this branch of the backward)."""
    g = torch.Generator().manual_seed(6)
    x, dy = torch.randn(4, 3, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    mw, vw = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    y = NF.switchable_norm(x, None, None, None, b, mw, vw, training=True)
    y.backward(dy)
    torch.testing.assert_close(b.grad, dy.sum(dim=(0, 2)))


def test_float32_dx_at_a_large_mean_keeps_the_rows_mean_correction():
    """x near 1000 in float32, dy of mean 0, the IN branch alone: dx's variance term takes
    x - mu_in as d - r (r the centred rows' own mean); without r it was 1.4e-5 of max |dx| off,
    with it ~1e-7."""
    torch.manual_seed(0)
    m = NN.SwitchableNorm2d(8)
    with torch.no_grad():
        for logits in (m.mean_weight, m.var_weight):
            logits.fill_(-100.0)
            logits[0] = 100.0
    m64 = copy.deepcopy(m).double()
    x = (1000 + torch.randn(16, 8, 5, 5, dtype=torch.float64)).float().requires_grad_()
    dy = torch.randn(16, 8, 5, 5, dtype=torch.float64).float()
    x64 = x.detach().double().requires_grad_()
    m(x).backward(dy)
    m64(x64).backward(dy.double())
    err = (x.grad.double() - x64.grad).abs().max().item() / x64.grad.abs().max().item()
    assert err < 1e-6, err


def test_functional_eval_without_running_statistics_uses_the_batch_statistics():
    """training=False with no running statistics mixes the batch's statistics into the BN branch
    (as batch norm): unguarded, it read the missing running statistics."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    mw = torch.tensor([0.2, -0.3, 0.5], dtype=torch.float64)
    vw = torch.tensor([-0.1, 0.4, 0.2], dtype=torch.float64)
    want = NF.switchable_norm(x, None, None, None, None, mw, vw, training=True)
    torch.testing.assert_close(NF.switchable_norm(x, None, None, None, None, mw, vw, training=False), want,
                               rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_channels_last_3d_input_keeps_its_layout(training):
    """The functional form takes 5-D input (there is no SwitchableNorm3d): a channels_last_3d
    input gives a channels_last_3d output and gradient, as torch's batch norm does, with the
    values of a contiguous input."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, 2, 3, 3, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last_3d)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    mw, vw = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    x.requires_grad_()
    y = NF.switchable_norm(x, rm.clone(), rv.clone(), None, None, mw, vw, training=training)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y) + y.detach())
    assert dx.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, NF.switchable_norm(x.detach().contiguous(), rm.clone(), rv.clone(), None, None, mw,
                                                     vw, training=training))
