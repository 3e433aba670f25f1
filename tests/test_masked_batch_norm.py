"""Masked batch norm (no torch twin): statistics against boolean indexing, gradients against
central finite differences, padded outputs and gradients exactly 0, nn vs functional vs the
NumPy reference over training steps and eval."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import TOL_FD, assert_close, finite_diff, randn, run_against_reference, running_closed_form, t
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

EPS = 1e-3


def lengths_mask(lengths, L):
    return np.arange(L)[None, :] < np.asarray(lengths)[:, None]


def gathered(x, mask):
    """(C, n_valid): the valid positions of each channel, by boolean indexing."""
    return x.transpose(1, 0, 2)[:, mask]


CASES = [((3, 2, 5), [5, 2, 3]), ((2, 3, 7), [1, 7]), ((4, 1, 3), [3, 3, 1, 2]), ((1, 2, 6), [4])]


@pytest.mark.parametrize("shape,lengths", CASES, ids=str)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_reference_forward_uses_only_valid_positions(shape, lengths, affine):
    c = shape[1]
    mask = lengths_mask(lengths, shape[2])
    x = randn(shape, 0, 2.0, 1.0)
    x[~np.broadcast_to(mask[:, None, :], shape)] = 1e6  # padding holds garbage
    g = randn(c, 1) + 1 if affine in ("both", "weight") else None
    b = randn(c, 2) if affine in ("both", "bias") else None
    running = R.RunningStats(np.zeros(c), np.ones(c))
    y, _, new = R.masked_batch_norm_forward(x, mask, g, b, running, momentum=0.4, eps=EPS)
    v = gathered(x, mask)
    mean, var = v.mean(axis=1), v.var(axis=1)
    expect = (x - mean[None, :, None]) / np.sqrt(var[None, :, None] + EPS)
    expect = expect * (1 if g is None else g[None, :, None]) + (0 if b is None else b[None, :, None])
    m3 = np.broadcast_to(mask[:, None, :], shape)
    assert_close(y[m3], expect[m3])
    assert np.all(y[~m3] == 0)
    assert_close(new.mean, 0.4 * mean)
    assert_close(new.var, 0.6 + 0.4 * v.var(axis=1, ddof=1))


@pytest.mark.parametrize("shape,lengths", CASES, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_reference_gradients_match_finite_differences(shape, lengths, training):
    c = shape[1]
    mask = lengths_mask(lengths, shape[2])
    x, g, b = randn(shape, 3, 2.0), randn(c, 4) + 1, randn(c, 5)
    running = R.RunningStats(randn(c, 6), np.exp(randn(c, 7)))
    dy = randn(shape, 8)
    _, cache, _ = R.masked_batch_norm_forward(x, mask, g, b, running, training=training, eps=EPS)
    grads = R.masked_batch_norm_backward(dy, cache)
    fd = finite_diff(lambda *a: R.masked_batch_norm_forward(a[0], mask, a[1], a[2], running, training=training,
                                                            eps=EPS)[0], (x, g, b), dy)
    for name, got, want in zip(("dx", "dgamma", "dbeta"), grads, fd, strict=True):
        assert_close(got, want, **TOL_FD, what=name)
    assert np.all(grads[0][~np.broadcast_to(mask[:, None, :], shape)] == 0)


def test_functional_bias_without_weight_is_added():
    """As in F.batch_norm, a bias without a weight is still added (at valid positions)."""
    x, b = randn((3, 2, 4), 0), randn(2, 1)
    mask = torch.from_numpy(lengths_mask([4, 2, 3], 4))
    y = NF.masked_batch_norm(t(x), mask, None, None, None, t(b), True)
    ref, _, _ = R.masked_batch_norm_forward(x, mask.numpy(), None, b)
    assert_close(y, ref)
    xt = t(x, requires_grad=True)
    bt = t(b, requires_grad=True)
    NF.masked_batch_norm(xt, mask, None, None, None, bt, True).sum().backward()
    assert_close(bt.grad, mask.sum().double().expand(2))


def _ref_step(m, masks):
    def step(x, k, p, running, training, dy):
        y, cache, running = R.masked_batch_norm_forward(x, masks[k], p.get("weight"), p.get("bias"), running,
                                                        training=training, momentum=m.momentum, eps=m.eps)
        dx, dg, db = R.masked_batch_norm_backward(dy, cache)
        return y, dict(input=dx, weight=dg, bias=db), running
    return step


@pytest.mark.parametrize("kw", [dict(), dict(affine=False, momentum=None), dict(eps=1e-2, momentum=0.5),
                                dict(bias=False)], ids=str)
def test_module_matches_reference_over_steps_then_eval(kw):
    m = NN.MaskedBatchNorm1d(3, dtype=torch.float64, **kw)
    L = 6
    masks = [lengths_mask(lens, L) for lens in ([6, 2, 4, 1], [3, 3, 5, 6], [1, 6, 2, 2], [5, 1, 6, 3])]
    run_against_reference(m, _ref_step(m, masks), lambda s: randn((4, 3, L), s, 1.0 + s, s), steps=3, lr=0.3,
                          call=lambda mod, x, k: mod(x, torch.from_numpy(masks[k])))


def test_functional_matches_module():
    m = NN.MaskedBatchNorm1d(3, dtype=torch.float64)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x, mask = t(randn((2, 3, 5), 0)), torch.from_numpy(lengths_mask([5, 3], 5))
    y = NF.masked_batch_norm(x, mask, rm, rv, m.weight, m.bias, True, 0.1, 1e-5)
    assert torch.equal(y, m(x, mask))
    assert torch.equal(rm, m.running_mean) and torch.equal(rv, m.running_var)


def test_momentum_none_running_var_uses_valid_count():
    m = NN.MaskedBatchNorm1d(2, momentum=None, dtype=torch.float64)
    masks = [lengths_mask(lens, 4) for lens in ([4, 1], [2, 3], [1, 1])]
    xs = [randn((2, 2, 4), s, 1 + s, s) for s in range(3)]
    for x, mask in zip(xs, masks, strict=True):
        m(t(x), torch.from_numpy(mask))
    valid = [gathered(x, k) for x, k in zip(xs, masks, strict=True)]
    assert_close(m.running_mean, running_closed_form([v.mean(1) for v in valid], 0, None))
    assert_close(m.running_var, running_closed_form([v.var(1, ddof=1) for v in valid], 1, None))
    assert int(m.num_batches_tracked) == 3


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_non_finite_padding_is_ignored(value, training):
    """Whatever padded positions hold must not reach the statistics, the output or the gradients
    (a multiply by the mask would turn NaN * 0 into NaN); a NaN at a valid position still shows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    dy = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    dirty = x.clone()
    dirty[~mask[:, None, :].expand_as(x)] = value
    outs = []
    for inp in (x, dirty):
        m = NN.MaskedBatchNorm1d(4, dtype=torch.float64)
        with torch.no_grad():
            m.running_mean.copy_(torch.tensor([0.5, -0.25, 1.0, 0.0]))
        m.train(training)
        xi = inp.clone().requires_grad_()
        y = m(xi, mask)
        y.backward(dy)
        running = R.RunningStats(m.running_mean.detach().numpy().copy(), m.running_var.detach().numpy().copy())
        ry, cache, _ = R.masked_batch_norm_forward(inp.numpy(), mask.numpy(), np.ones(4), np.zeros(4), running,
                                                   training=training)
        rdx = R.masked_batch_norm_backward(dy.numpy(), cache)[0]
        outs.append((y.detach(), xi.grad, m.running_mean.clone(), m.running_var.clone(), ry, rdx))
    for clean, got in zip(*outs):
        assert_close(got, clean)
    poisoned = x.clone().requires_grad_()
    with torch.no_grad():
        poisoned[0, 1, 0] = float("nan")  # a valid position: the NaN propagates to its channel
    y = NN.MaskedBatchNorm1d(4, dtype=torch.float64)(poisoned, mask)
    y.backward(dy)
    pad = ~mask[:, None, :].expand_as(x)
    assert torch.isnan(y[:, 1][mask]).all() and torch.isfinite(y[:, [0, 2, 3]]).all()
    # padding still holds 0 and gets no gradient (NaN * 0 would be NaN), in every tier
    assert (y.detach()[pad] == 0).all() and (poisoned.grad[pad] == 0).all()
    ry, cache, _ = R.masked_batch_norm_forward(poisoned.detach().numpy(), mask.numpy(), np.ones(4), np.zeros(4))
    rdx = R.masked_batch_norm_backward(dy.numpy(), cache)[0]
    assert (ry[pad.numpy()] == 0).all() and (rdx[pad.numpy()] == 0).all()


@pytest.mark.parametrize("layer", ["masked", "switchable"])
@pytest.mark.parametrize("training", [True, False])
def test_double_backward_raises_instead_of_silent_zeros(layer, training):
    """The closed-form backward keeps the centred input, not the input, so there is no double
    backward: create_graph=True raises naming the layer, also for a constant incoming gradient,
    where once_differentiable returned gradients without a graph (second derivatives silently
    zero; BatchNorm1d's twin gives 5.1 where masked gave 0). A plain backward is unaffected."""
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 6, dtype=torch.bool)
    m = (NN.MaskedBatchNorm1d if layer == "masked" else NN.SwitchableNorm1d)(4, dtype=torch.float64)
    m.train(training)
    y = m(x, mask) if layer == "masked" else m(x)
    name = "MaskedBatchNorm1d" if layer == "masked" else "SwitchableNorm"
    with pytest.raises(RuntimeError, match=rf"{name} has no double backward \(create_graph=True"):
        torch.autograd.grad((y * torch.randn_like(y)).sum(), (x,), create_graph=True)
    (gx,) = torch.autograd.grad(y.sum(), (x,))
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("layer", ["masked", "switchable"])
def test_backward_keeps_one_full_size_tensor_and_allows_parameter_updates_before_it(layer):
    """Saved for backward: the input (as torch's batch norm), not a second full-size tensor; and
    an in-place update of beta (or the mixing logits) between forward and backward is no error."""
    x = torch.randn(4, 8, 32, requires_grad=True)
    mask = torch.ones(4, 32, dtype=torch.bool)
    mask[1, 20:] = False
    m = NN.MaskedBatchNorm1d(8) if layer == "masked" else NN.SwitchableNorm1d(8)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x, mask) if layer == "masked" else m(x)
    assert sum(n for n in saved if n >= x.numel()) == x.numel(), saved
    with torch.no_grad():
        m.bias.add_(1.0)
        if layer == "switchable":
            m.mean_weight.add_(0.1)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_non_finite_gradient_at_padding_is_ignored():
    """dy at padded positions never counts (padding gets no gradient): NaN or inf there left the
    parameter and input gradients NaN on the torch path (NaN * 0 is NaN), not on the kernel's."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, requires_grad=True)
    mask = torch.arange(6)[None, :] < torch.tensor([[6], [4], [2]])
    dy = torch.randn(3, 4, 6)
    clean = dy.masked_fill(~mask[:, None, :], 0)
    dy = dy.masked_fill(~mask[:, None, :], float("nan"))
    dy[1, 2, 5] = float("inf")
    grads = []
    for g in (dy, clean):
        bn = NN.MaskedBatchNorm1d(4)
        x.grad = None
        bn(x, mask).backward(g)
        grads.append((x.grad, bn.weight.grad, bn.bias.grad))
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)
    # the NumPy reference too, in training and in evaluation
    running = R.RunningStats(np.zeros(4, np.float32), np.ones(4, np.float32))
    for training in (True, False):
        _, cache, _ = R.masked_batch_norm_forward(x.detach().numpy(), mask.numpy(), np.ones(4, np.float32),
                                                  np.zeros(4, np.float32), running, training=training)
        got, want = (R.masked_batch_norm_backward(g.numpy(), cache) for g in (dy, clean))
        for a, b in zip(got, want):
            assert np.isfinite(a).all()
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_float32_at_a_large_mean_keeps_its_digits_forward_and_backward():
    """x and dy near 1000 in float32: the float32 sum behind the mean is off by ~1e-4, and the
    outputs carried that times rstd (1.7e-4 off) and backward's sum(dy * d) mean(dy) times it (dx
    0.65 off where |dx| ~ 5; torch's float32 BatchNorm1d: 0.12). The centred values' own mean
    corrects it: outputs ~4e-7, dx ~2e-4.
    Wrong version: functional/masked_batch_norm.py without ``r``."""
    torch.manual_seed(0)
    n, c, length = 32, 8, 1024
    mask = torch.arange(length)[None] < torch.randint(length // 2, length + 1, (n,))[:, None]
    m = NN.MaskedBatchNorm1d(c)
    m64 = copy.deepcopy(m).double()
    x = (1000 + torch.randn(n, c, length, dtype=torch.float64)).float().requires_grad_()
    dy = (1000 + torch.randn(n, c, length, dtype=torch.float64)).float()
    x64 = x.detach().double().requires_grad_()
    y, y64 = m(x, mask), m64(x64, mask)
    y.backward(dy)
    y64.backward(dy.double())
    assert (y.double() - y64).abs().max().item() < 5e-6
    assert (x.grad.double() - x64.grad).abs().max().item() < 2e-3
    torch.testing.assert_close(m.running_mean.double(), m64.running_mean, rtol=0, atol=1e-4)
    # the running mean takes the corrected mean: at momentum 1 it is the batch mean itself, within
    # one float32 ulp at 1000 (6e-5); the uncorrected float32 mean was 1.3e-4 off
    m1 = NN.MaskedBatchNorm1d(c, momentum=1.0)
    m1(x.detach(), mask)
    m164 = NN.MaskedBatchNorm1d(c, momentum=1.0, dtype=torch.float64)
    m164(x64.detach(), mask)
    torch.testing.assert_close(m1.running_mean.double(), m164.running_mean, rtol=0, atol=6e-5)


def _masked_bn_by_formula(x, mask, w, b, eps=1e-5):
    """Batch norm over the valid positions written out with autograd-able float64 ops: the truth."""
    m = mask[:, None, :].to(x.dtype)
    k = m.sum() * 1.0
    mean = (x * m).sum(dim=(0, 2), keepdim=True) / k
    var = (((x - mean) * m) ** 2).sum(dim=(0, 2), keepdim=True) / k
    y = (x - mean) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w.view(1, -1, 1)
    if b is not None:
        y = y + b.view(1, -1, 1)
    return y * m


@pytest.mark.parametrize("shift", [0.0, 30.0, 1000.0])
@pytest.mark.parametrize("affine", ["both", "none", "bias"])
def test_the_corrected_mean_path_matches_the_formula_with_any_affine(shift, affine):
    """The correction runs only for channels 4+ sd from 0 (shift 30 and 1000 here, not 0): with
    weight and bias, neither, or a bias alone (functional), outputs, dx and the parameter
    gradients, in float32 and float64, match batch norm over the valid positions written out in
    float64 (padding 0)."""
    torch.manual_seed(1)
    n, c, length = 6, 3, 40
    mask = torch.arange(length)[None] < torch.tensor([40, 3, 17, 40, 25, 1])[:, None]
    x = (shift + torch.randn(n, c, length, dtype=torch.float64))
    dy = torch.randn(n, c, length, dtype=torch.float64)
    w = torch.randn(c, dtype=torch.float64) if affine == "both" else None
    b = torch.randn(c, dtype=torch.float64) if affine != "none" else None

    def run(fn, dt):
        xs = x.to(dt).clone().requires_grad_()
        ps = [p.to(dt).clone().requires_grad_() if p is not None else None for p in (w, b)]
        y = fn(xs, ps[0], ps[1])
        y.backward(dy.to(dt))
        return [y.detach().double(), xs.grad.double()] + [p.grad.double() for p in ps if p is not None]
    want = run(lambda xs, ws, bs: _masked_bn_by_formula(xs, mask, ws, bs), torch.float64)
    for dt, tol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
        got = run(lambda xs, ws, bs: NF.masked_batch_norm(xs, mask, None, None, ws, bs, training=True), dt)
        for g, h in zip(got, want):
            torch.testing.assert_close(g, h, rtol=tol, atol=tol * max(1.0, h.abs().max().item()))


def test_float32_backward_with_a_large_mean_dy_and_a_small_mean_x_keeps_its_digits():
    """The rounding of the float32 mean hurts backward wherever dy's mean is large (sum(dy * d)
    takes sum(dy) times it), whatever x's mean: a version that corrected the mean only for x
    4+ sd from 0 had dweight 1.4e-2 off (relative) at x ~ 2 + randn, dy ~ 1000 + randn (torch's
    float32 BatchNorm: 3.7e-3). Wrong version: the correction gated on x's mean."""
    torch.manual_seed(0)
    n, c, length = 32, 4, 512
    mask = torch.ones(n, length, dtype=torch.bool)
    x = (2 + torch.randn(n, c, length, dtype=torch.float64))
    dy = (1000 + torch.randn(n, c, length, dtype=torch.float64))
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)

    def grads(fn, dt):
        xs, ws, bs = (t.to(dt).clone().requires_grad_() for t in (x, w, b))
        fn(xs, ws, bs).backward(dy.to(dt))
        return xs.grad.double(), ws.grad.double()
    want = grads(lambda a, ws, bs: F.batch_norm(a, None, None, ws, bs, True), torch.float64)
    got = grads(lambda a, ws, bs: NF.masked_batch_norm(a, mask, None, None, ws, bs, True), torch.float32)
    rel = [((g - h).abs().max() / h.abs().max()).item() for g, h in zip(got, want)]
    assert rel[0] < 1e-4 and rel[1] < 2e-3, rel


def test_functional_eval_without_running_statistics_uses_the_batch_statistics():
    """training=False with no running statistics normalizes with the batch's (as batch norm):
    unguarded, it read the missing running statistics."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(6)[None] < torch.tensor([6, 4, 2])[:, None]
    want = NF.masked_batch_norm(x, mask, None, None, training=True)
    torch.testing.assert_close(NF.masked_batch_norm(x, mask, None, None, training=False), want, rtol=0, atol=0)


@pytest.mark.parametrize("fixed", [False, True], ids=["batch", "running"])
def test_composite_matches_the_function(fixed):
    """masked_batch_norm_composite (what the kernel's double backward differentiates, so only
    checked on a GPU otherwise) is the same forward: padding 0, the bias at valid positions only."""
    from normlab.functional.masked_batch_norm import masked_batch_norm_composite

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(6)[None] < torch.tensor([6, 4, 2])[:, None]
    w, b = torch.tensor([1.5, 0.5], dtype=torch.float64), torch.tensor([0.3, -0.7], dtype=torch.float64)
    rm, rv = torch.tensor([0.2, -0.1], dtype=torch.float64), torch.tensor([1.5, 0.7], dtype=torch.float64)
    want = NF.masked_batch_norm(x, mask, rm.clone(), rv.clone(), w, b, training=not fixed)
    got = masked_batch_norm_composite(x, mask, w, b, (rm, rv) if fixed else None, 1e-5)
    torch.testing.assert_close(got, want)
    assert (got[~mask[:, None, :].expand_as(got)] == 0).all()
