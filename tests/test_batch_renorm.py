"""Batch renorm (no torch twin): forward against a direct computation, gradients against
central finite differences, nn vs functional vs the NumPy reference, the warm-up schedule,
and state dicts that load into torch.nn.BatchNorm and back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import (TOL_FD, assert_close, assert_state_dict_roundtrip, finite_diff, randn, run_against_reference,
                     running_closed_form, t)
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

EPS = 1e-3


def direct(x, gamma, beta, rm, rv, rmax, dmax, r=None, d=None):
    """Batch renorm written out; ``r``/``d`` given = held fixed (what the backward assumes)."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    sigma_b, sigma = np.sqrt(var + EPS), np.sqrt(rv.reshape(shape) + EPS)
    if r is None:
        r = np.clip(sigma_b / sigma, 1 / rmax, rmax)
        d = np.clip((mu - rm.reshape(shape)) / sigma, -dmax, dmax)
    return gamma.reshape(shape) * ((x - mu) / sigma_b * r + d) + beta.reshape(shape), r, d


SHAPES = [(5, 3), (3, 2, 4), (2, 3, 2, 1), (1, 2, 3, 1, 2)]


def _setup(shape, seed=0):
    c = shape[1]
    return randn(shape, seed, 2.0, 1.0), randn(c, seed + 1) * 0.3 + 1, randn(c, seed + 2)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rmax,dmax", [(3.0, 5.0), (1.2, 0.1), (1.0, 0.0)])
def test_reference_forward_matches_direct(shape, rmax, dmax):
    x, g, b = _setup(shape)
    c = shape[1]
    running = R.RunningStats(randn(c, 5), np.exp(randn(c, 6)))
    y, _, new = R.batch_renorm_forward(x, g, b, running, rmax=rmax, dmax=dmax, momentum=0.2, eps=EPS)
    assert_close(y, direct(x, g, b, running.mean, running.var, rmax, dmax)[0])
    axes = (0,) + tuple(range(2, x.ndim))
    assert_close(new.mean, 0.8 * running.mean + 0.2 * x.mean(axis=axes))
    assert_close(new.var, 0.8 * running.var + 0.2 * x.var(axis=axes, ddof=1))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_gradients_match_finite_differences_when_clipped(shape):
    """With r and d both clipped they are locally constant, so the hand-written gradient (which
    treats them as constants) must equal the true gradient of the forward pass."""
    x, g, b = _setup(shape, 3)
    c = shape[1]
    running = R.RunningStats(np.full(c, 50.0), np.full(c, 400.0))  # far from the batch: r, d clip
    kw = dict(rmax=1.5, dmax=0.5, eps=EPS)
    _, cache, _ = R.batch_renorm_forward(x, g, b, running, **kw)
    assert np.allclose(cache.scale, 1 / 1.5) and np.allclose(cache.shift, -0.5)
    dy = randn(shape, 9)
    fd = finite_diff(lambda *a: R.batch_renorm_forward(*a, running, **kw)[0], (x, g, b), dy)
    for name, got, want in zip(("dx", "dgamma", "dbeta"), R.batch_renorm_backward(dy, cache), fd, strict=True):
        assert_close(got, want, **TOL_FD, what=name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_gradients_match_finite_differences_with_r_d_held(shape):
    """Unclipped r, d: the gradient is that of the forward with r and d frozen at their values."""
    x, g, b = _setup(shape, 4)
    c = shape[1]
    running = R.RunningStats(randn(c, 5) * 0.3 + 1, np.exp(randn(c, 6) * 0.3) * 4)
    _, cache, _ = R.batch_renorm_forward(x, g, b, running, rmax=10.0, dmax=10.0, eps=EPS)
    _, r, d = direct(x, g, b, running.mean, running.var, 10.0, 10.0)
    assert np.all((r > 1 / 10) & (r < 10)) and np.all(np.abs(d) < 10)
    assert not np.allclose(r, 1) and not np.allclose(d, 0)
    dy = randn(shape, 9)
    fd = finite_diff(lambda *a: direct(*a, running.mean, running.var, 0, 0, r=r, d=d)[0], (x, g, b), dy)
    for name, got, want in zip(("dx", "dgamma", "dbeta"), R.batch_renorm_backward(dy, cache), fd, strict=True):
        assert_close(got, want, **TOL_FD, what=name)


def _ref_step(m):
    def step(x, k, p, running, training, dy):
        rmax, dmax = R.renorm_limits(running.num_batches_tracked, m.rmax, m.dmax, m.warmup_steps)
        y, cache, running = R.batch_renorm_forward(x, p.get("weight"), p.get("bias"), running, training=training,
                                                   rmax=rmax, dmax=dmax, momentum=m.momentum, eps=m.eps)
        dx, dg, db = R.batch_renorm_backward(dy, cache)
        return y, dict(input=dx, weight=dg, bias=db), running
    return step


@pytest.mark.parametrize("cls,shape", [(NN.BatchRenorm1d, (6, 3)), (NN.BatchRenorm1d, (3, 2, 5)),
                                       (NN.BatchRenorm2d, (2, 3, 2, 3)), (NN.BatchRenorm3d, (2, 2, 1, 2, 3))],
                         ids=["1d-NC", "1d-NCL", "2d", "3d"])
@pytest.mark.parametrize("kw", [dict(), dict(rmax=1.5, dmax=0.3, momentum=0.5), dict(affine=False, momentum=None),
                                dict(warmup_steps=3), dict(eps=0.5)], ids=str)
def test_module_matches_reference_over_steps_then_eval(cls, shape, kw):
    m = cls(shape[1], dtype=torch.float64, **kw)
    # batches whose statistics drift, so r and d leave (1, 0) and clip at times
    run_against_reference(m, _ref_step(m), lambda s: randn(shape, s, 1.0 + 2 * s, 3 * s), steps=4, lr=0.3)


def test_functional_matches_module():
    m = NN.BatchRenorm2d(3, rmax=2.0, dmax=1.0, dtype=torch.float64)
    with torch.no_grad():
        m.running_mean.fill_(0.5)
        m.running_var.fill_(3.0)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x = t(randn((2, 3, 2, 2), 0))
    y = NF.batch_renorm(x, rm, rv, m.weight, m.bias, True, 0.1, 1e-5, 2.0, 1.0)
    assert torch.equal(y, m(x))
    assert torch.equal(rm, m.running_mean) and torch.equal(rv, m.running_var)
    m.eval()
    assert torch.equal(NF.batch_renorm(x, rm, rv, m.weight, m.bias, False), m(x))


def test_warmup_schedule_ramps_from_identity():
    assert R.renorm_limits(0, 3.0, 5.0, 4) == (1.0, 0.0)
    assert R.renorm_limits(2, 3.0, 5.0, 4) == (2.0, 2.5)
    assert R.renorm_limits(4, 3.0, 5.0, 4) == (3.0, 5.0)
    assert R.renorm_limits(100, 3.0, 5.0, 4) == (3.0, 5.0)
    assert R.renorm_limits(0, 3.0, 5.0, 0) == (3.0, 5.0)
    m = NN.BatchRenorm1d(2, rmax=3.0, dmax=5.0, warmup_steps=4, dtype=torch.float64)
    seen = []
    for s in range(6):
        seen.append(m.limits())
        m(t(randn((4, 2), s)))
    assert seen == [(1.0, 0.0), (1.5, 1.25), (2.0, 2.5), (2.5, 3.75), (3.0, 5.0), (3.0, 5.0)]


def test_warmup_first_step_is_batch_norm_even_far_from_running_stats():
    m = NN.BatchRenorm2d(3, warmup_steps=10, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        for mod in (m, bn):
            mod.running_mean.fill_(30.0)
            mod.running_var.fill_(0.01)
    x = t(randn((2, 3, 2, 2), 0, 5.0))
    assert_close(m(x), bn(x))
    # without the warm-up the same step is not batch norm
    m2 = NN.BatchRenorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        m2.running_mean.fill_(30.0)
        m2.running_var.fill_(0.01)
    assert not torch.allclose(m2(x), bn(x))


def test_running_stats_closed_form_over_steps():
    m = NN.BatchRenorm1d(2, momentum=0.3, dtype=torch.float64)
    xs = [randn((5, 2), s, 1 + s, s) for s in range(4)]
    for x in xs:
        m(t(x))
    assert_close(m.running_mean, running_closed_form([x.mean(0) for x in xs], np.zeros(2), 0.3))
    assert_close(m.running_var, running_closed_form([x.var(0, ddof=1) for x in xs], np.ones(2), 0.3))


@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_loads_into_batch_norm_and_back(affine):
    ours = NN.BatchRenorm2d(4, affine=affine, dtype=torch.float64)
    theirs = torch.nn.BatchNorm2d(4, affine=affine, dtype=torch.float64)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert_state_dict_roundtrip(ours, theirs)
    # evaluation is batch norm's with the running statistics
    ours.eval()
    theirs.eval()
    x = t(randn((2, 4, 3, 2), 0))
    assert_close(ours(x), theirs(x))


def test_repr():
    assert repr(NN.BatchRenorm2d(4, rmax=2.0, warmup_steps=7)) == (
        "BatchRenorm2d(4, eps=1e-05, momentum=0.1, affine=True, rmax=2.0, dmax=5.0, warmup_steps=7)")


def test_bias_false_learns_gamma_only_and_matches_batch_norm_at_the_identity_limits():
    """bias=False as BatchNorm's: no beta, and with rmax=1, dmax=0 the same outputs, gradients and state dict keys."""
    ours = NN.BatchRenorm2d(3, rmax=1.0, dmax=0.0, bias=False, dtype=torch.float64)
    theirs = torch.nn.BatchNorm2d(3, bias=False, dtype=torch.float64)
    assert ours.bias is None and "bias=False" in repr(ours)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert_close(ours(x), theirs(x))
