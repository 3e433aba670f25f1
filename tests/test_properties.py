"""Property tests (hypothesis) over shapes, eps and momentum: the reference against torch,
the moments of batch norm's output, layer norm's invariances, running statistics in closed form."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import assert_close, randn, running_closed_form, t, torch_grads
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

SETTINGS = settings(max_examples=30, deadline=None)
dims = st.integers(1, 5)
seeds = st.integers(0, 2**31 - 1)
eps_st = st.floats(1e-5, 1e-1)
momentum_st = st.one_of(st.none(), st.floats(0.0, 1.0))


@st.composite
def bn_shapes(draw):
    shape = (draw(dims), draw(dims)) + tuple(draw(st.lists(dims, max_size=3)))
    return shape if np.prod([shape[0], *shape[2:]]) > 1 else (shape[0] + 1,) + shape[1:]


@SETTINGS
@given(shape=bn_shapes(), eps=eps_st, momentum=momentum_st, seed=seeds, steps=st.integers(1, 3))
def test_reference_batch_norm_matches_torch(shape, eps, momentum, seed, steps):
    c = shape[1]
    g, b = randn(c, seed) + 1, randn(c, seed + 1)
    running = R.RunningStats(np.zeros(c), np.ones(c))
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    for k in range(steps):
        x, dy = randn(shape, seed + 2 + k, 3.0, 1.0), randn(shape, seed + 10 + k)
        y, cache, running = R.batch_norm_forward(x, g, b, running, momentum=momentum, eps=eps)
        f = momentum if momentum is not None else 1.0 / (k + 1)
        ty, tg = torch_grads(lambda x_, g_, b_, f=f: F.batch_norm(x_, rm, rv, g_, b_, True, f, eps), (x, g, b), dy)
        assert_close(y, ty)
        for got, want in zip(R.batch_norm_backward(dy, cache), tg, strict=True):
            assert_close(got, want, rtol=1e-8, atol=1e-8)
        assert_close(running.mean, rm)
        assert_close(running.var, rv)


@SETTINGS
@given(lead=st.lists(dims, min_size=1, max_size=2), trail=st.lists(dims, min_size=1, max_size=3), eps=eps_st,
       seed=seeds)
def test_reference_layer_norm_matches_torch(lead, trail, eps, seed):
    shape, ns = tuple(lead + trail), tuple(trail)
    g, b, x, dy = randn(ns, seed) + 1, randn(ns, seed + 1), randn(shape, seed + 2, 2.0, 1.0), randn(shape, seed + 3)
    y, cache = R.layer_norm_forward(x, ns, g, b, eps)
    ty, tg = torch_grads(lambda x_, g_, b_: F.layer_norm(x_, ns, g_, b_, eps), (x, g, b), dy)
    assert_close(y, ty)
    for got, want in zip(R.layer_norm_backward(dy, cache), tg, strict=True):
        assert_close(got, want, rtol=1e-8, atol=1e-8)


@SETTINGS
@given(n=dims, groups=st.integers(1, 4), per_group=st.integers(1, 3), spatial=st.lists(dims, max_size=2),
       eps=eps_st, seed=seeds)
def test_reference_group_norm_matches_torch(n, groups, per_group, spatial, eps, seed):
    c = groups * per_group
    shape = (n, c) + tuple(spatial)
    assume(per_group * np.prod(spatial) > 1)  # one value per group is refused (it normalizes to 0)
    g, b, x, dy = randn(c, seed) + 1, randn(c, seed + 1), randn(shape, seed + 2, 2.0, 1.0), randn(shape, seed + 3)
    y, cache = R.group_norm_forward(x, groups, g, b, eps)
    ty, tg = torch_grads(lambda x_, g_, b_: F.group_norm(x_, groups, g_, b_, eps), (x, g, b), dy)
    assert_close(y, ty)
    for got, want in zip(R.group_norm_backward(dy, cache), tg, strict=True):
        assert_close(got, want, rtol=1e-8, atol=1e-8)


@SETTINGS
@given(shape=bn_shapes(), eps=eps_st, seed=seeds, scale=st.floats(0.1, 100.0), shift=st.floats(-100.0, 100.0))
def test_training_batch_norm_output_moments(shape, eps, seed, scale, shift):
    """Per channel the output has mean 0 and (biased) variance var / (var + eps) = 1 / (1 + eps / var)."""
    x = randn(shape, seed, scale, shift)
    axes = (0,) + tuple(range(2, len(shape)))
    y = NF.batch_norm(t(x), None, None, training=True, eps=eps).numpy()
    v = x.var(axis=axes)
    assert_close(y.mean(axis=axes), np.zeros(shape[1]), atol=1e-10)
    assert_close(y.var(axis=axes), v / (v + eps), rtol=1e-8, atol=1e-12)


@SETTINGS
@given(lead=st.lists(dims, min_size=1, max_size=2), trail=st.lists(st.integers(2, 5), min_size=1, max_size=2),
       eps=eps_st, seed=seeds, log_scale=st.floats(-3, 3), shift=st.floats(-1e3, 1e3))
def test_layer_norm_invariant_to_scale_and_shift(lead, trail, eps, seed, log_scale, shift):
    """LN_{eps a^2}(a x + b) == LN_eps(x) exactly in real arithmetic; with per-sample a, b and
    eps=0 the output is the same for every sample's scaling."""
    shape, ns = tuple(lead + trail), tuple(trail)
    x = randn(shape, seed)
    a = 10.0 ** log_scale
    base = NF.layer_norm(t(x), ns, eps=eps)
    assert_close(NF.layer_norm(t(a * x + shift), ns, eps=eps * a * a), base, rtol=1e-6, atol=1e-7)
    per_sample = (10.0 ** rng_uniform(seed, lead, -2, 2)).reshape(tuple(lead) + (1,) * len(ns))
    offsets = rng_uniform(seed + 1, lead, -50, 50).reshape(per_sample.shape)
    assert_close(NN.LayerNorm(ns, eps=0.0, dtype=torch.float64)(t(per_sample * x + offsets)),
                 NF.layer_norm(t(x), ns, eps=0.0), rtol=1e-6, atol=1e-7)


def rng_uniform(seed, shape, lo, hi):
    return np.random.default_rng(seed).uniform(lo, hi, size=shape)


@SETTINGS
@given(shape=bn_shapes(), momentum=momentum_st, seed=seeds, k=st.integers(1, 5))
def test_running_stats_after_k_steps_equal_closed_form(shape, momentum, seed, k):
    bn = NN.BatchNorm1d if len(shape) <= 3 else (NN.BatchNorm2d if len(shape) == 4 else NN.BatchNorm3d)
    m = bn(shape[1], momentum=momentum, dtype=torch.float64)
    axes = (0,) + tuple(range(2, len(shape)))
    xs = [randn(shape, seed + i, 1.0 + i, i) for i in range(k)]
    for x in xs:
        m(t(x))
    assert_close(m.running_mean, running_closed_form([x.mean(axis=axes) for x in xs], np.zeros(shape[1]), momentum))
    assert_close(m.running_var, running_closed_form([x.var(axis=axes, ddof=1) for x in xs], np.ones(shape[1]),
                                                    momentum))
    assert int(m.num_batches_tracked) == k
