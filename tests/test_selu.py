"""SELU and alpha dropout: NumPy reference vs torch, nn twins (same seed -> same dropout mask)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import assert_close, randn, t, torch_grads
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)


def test_constants_match_torch():
    x = np.array([-1.0, 1.0])
    y = F.selu(t(x)).numpy()
    assert np.isclose(y[1], R.SELU_LAMBDA, rtol=1e-15)
    assert np.isclose(y[0], R.SELU_LAMBDA * R.SELU_ALPHA * np.expm1(-1.0), rtol=1e-15)
    assert np.isclose(R.ALPHA_PRIME, -1.7580993408473766, rtol=1e-15)


def test_reference_selu_matches_torch():
    x, dy = np.concatenate([randn(50, 0, 3.0), [0.0, -0.0, 1e-300, -40.0]]), randn(54, 1)
    y, cache = R.selu_forward(x)
    ty, (tdx,) = torch_grads(F.selu, (x,), dy)
    assert_close(y, ty)
    assert_close(R.selu_backward(dy, cache), tdx)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_reference_alpha_dropout_matches_torch_given_its_mask(p):
    """torch's output reveals its mask (dropped units all equal a * alpha' + b); with that mask
    the reference must give the same output and gradient."""
    x, dy = randn((40, 30), 0), randn((40, 30), 1)
    torch.manual_seed(3)
    ty, (tdx,) = torch_grads(lambda x_: F.alpha_dropout(x_, p, True), (x,), dy)
    a, b = R.selu.alpha_dropout_affine(p)
    keep = ~np.isclose(ty.numpy(), a * R.ALPHA_PRIME + b, rtol=0, atol=1e-12)
    assert 0 < keep.mean() < 1
    y, cache = R.alpha_dropout_forward(x, p, keep=keep)
    assert_close(y, ty)
    assert_close(R.alpha_dropout_backward(dy, cache), tdx)


def test_alpha_dropout_keeps_mean_and_variance():
    x = np.random.default_rng(0).standard_normal(400_000)
    y, _ = R.alpha_dropout_forward(x, 0.2, rng=np.random.default_rng(1))
    assert abs(y.mean()) < 0.01 and abs(y.var() - 1) < 0.01
    a, b = R.selu.alpha_dropout_affine(0.2)
    assert abs((y == a * R.ALPHA_PRIME + b).mean() - 0.2) < 0.01  # the dropped fraction is p


def test_alpha_dropout_identity_in_eval_and_edges():
    x = randn((3, 4), 0)
    assert R.alpha_dropout_forward(x, 0.5, training=False)[0] is x
    assert np.array_equal(R.alpha_dropout_forward(x, 1.0)[0], np.zeros_like(x))
    assert_close(NF.alpha_dropout(t(x), 1.0, True), F.alpha_dropout(t(x), 1.0, True))


@pytest.mark.parametrize("inplace", [False, True])
def test_selu_module_matches_torch(inplace):
    ours, theirs = NN.SELU(inplace), torch.nn.SELU(inplace)
    assert repr(ours) == repr(theirs)
    x = randn((4, 5), 0, 2.0)
    assert_close(ours(t(x)), theirs(t(x)))
    ty, (g1,) = torch_grads(NN.SELU(), (x,), x)
    _, (g2,) = torch_grads(torch.nn.SELU(), (x,), x)
    assert_close(g1, g2)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_alpha_dropout_module_same_seed_same_output(p):
    ours, theirs = NN.AlphaDropout(p), torch.nn.AlphaDropout(p)
    assert repr(ours) == repr(theirs)
    x, dy = randn((6, 7), 0), randn((6, 7), 1)
    torch.manual_seed(11)
    y1, (g1,) = torch_grads(ours, (x,), dy)
    torch.manual_seed(11)
    y2, (g2,) = torch_grads(theirs, (x,), dy)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    ours.eval()
    assert torch.equal(ours(t(x)), t(x))


def test_alpha_dropout_module_ignores_inplace_as_torch_does():
    """torch's AlphaDropout keeps ``inplace`` but never passes it on, so SELU(inplace=True) then
    AlphaDropout(inplace=True), the usual self-normalizing block, has a backward, and a leaf
    input is not written to. Writing in place broke both ("modified by an inplace operation")."""
    for make in (NN, torch.nn):
        torch.manual_seed(3)
        net = torch.nn.Sequential(torch.nn.Linear(8, 8), make.SELU(inplace=True),
                                  make.AlphaDropout(0.2, inplace=True), torch.nn.Linear(8, 2)).double()
        net(t(randn((4, 8), 0))).sum().backward()  # torch's runs; ours must too
    x = t(randn((3, 5), 1)).requires_grad_()
    before = x.detach().clone()
    torch.manual_seed(5)
    y1 = NN.AlphaDropout(0.4, inplace=True)(x)
    torch.manual_seed(5)
    y2 = torch.nn.AlphaDropout(0.4, inplace=True)(x)
    assert torch.equal(y1, y2) and torch.equal(x.detach(), before)
    assert repr(NN.AlphaDropout(0.4, inplace=True)) == repr(torch.nn.AlphaDropout(0.4, inplace=True))


def test_lecun_normal_variance():
    w = torch.empty(400, 250, dtype=torch.float64)
    NN.lecun_normal_(w)
    assert abs(w.var().item() * 250 - 1) < 0.02 and abs(w.mean().item()) < 0.003
    conv = torch.empty(64, 8, 3, 3)
    NN.lecun_normal_(conv)
    assert abs(conv.var().item() * 72 - 1) < 0.1
    r = R.lecun_normal((300, 200), rng=np.random.default_rng(0))
    assert abs(r.var() * 200 - 1) < 0.02


@pytest.mark.parametrize("dtype,xs", [(np.float16, [-6.0, -8.0, -10.0]), (np.float32, [-20.0, -40.0]),
                                      (np.float64, [-40.0, -300.0])], ids=["float16", "float32", "float64"])
def test_reference_selu_gradient_keeps_its_precision_far_in_the_negative_tail(dtype, xs):
    """lambda alpha e^x, not (negative branch) + lambda alpha: the difference cancelled to 0 (or
    to float16's rounding) for large negative x, where torch keeps every digit."""
    x = np.array(xs, dtype)
    _, cache = R.selu_forward(x)
    dx = R.selu_backward(np.ones_like(x), cache)
    exact = R.SELU_LAMBDA * R.SELU_ALPHA * np.exp(x.astype(np.float64))
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx.astype(np.float64), exact, rtol=2e-3 if dtype == np.float16 else 1e-6)
    tx = torch.tensor(x, requires_grad=True)
    F.selu(tx).sum().backward()
    np.testing.assert_allclose(dx.astype(np.float64), tx.grad.double().numpy(), rtol=2e-3 if dtype == np.float16 else 1e-6)


@pytest.mark.parametrize("keep", [np.array([[1, 0, 2]]), np.array([[0.9, 0.0, 0.4]]), np.array([[True], [False]])],
                         ids=["int", "probabilities", "wrong shape"])
def test_reference_alpha_dropout_refuses_a_keep_mask_that_is_not_bool_of_x_shape(keep):
    """An int or float keep (probabilities passed by mistake) scaled the gradient by its values; a
    broadcastable one silently changed the output's shape."""
    with pytest.raises(ValueError, match=r"keep must be a bool array of x's shape \(1, 3\)"):
        R.alpha_dropout_forward(np.ones((1, 3)), 0.5, keep=keep)


def test_functional_inplace_flags_write_into_the_input_as_torchs():
    """NF.selu(x, inplace=True) and NF.alpha_dropout(..., inplace=True) overwrite x and return it,
    as torch's functional forms do (outputs alone could not tell)."""
    x = torch.tensor([-1.0, 2.0, -0.5])
    want = F.selu(x.clone())
    y = NF.selu(x, True)
    assert y.data_ptr() == x.data_ptr() and torch.equal(x, want)
    x1, x2 = torch.randn(64), None
    x2 = x1.clone()
    torch.manual_seed(3)
    y1 = NF.alpha_dropout(x1, 0.4, True, True)
    torch.manual_seed(3)
    F.alpha_dropout(x2, 0.4, True, True)
    assert y1.data_ptr() == x1.data_ptr() and torch.equal(x1, x2)


@pytest.mark.parametrize("shape", [(5, 0), (0, 5), (4, 0, 3, 3), (0,)])
def test_lecun_normal_of_a_zero_element_weight_is_a_no_op_as_torchs_init(shape):
    """torch.nn.init's initializers leave a zero-element tensor alone with a warning; lecun_normal_
    raised ZeroDivisionError where fan_in is 0 (``nn.Linear(0, 5).weight``)."""
    w = torch.empty(shape)
    with pytest.warns(UserWarning, match="zero-element"):
        assert NN.lecun_normal_(w) is w
    with pytest.warns(UserWarning, match="zero-element"):  # torch's too, even where fan_in is undefined (1-D)
        assert torch.nn.init.kaiming_normal_(torch.empty(shape)).shape == shape


def test_selu_module_inplace_writes_into_its_input_as_torchs():
    for make in (torch.nn.SELU, NN.SELU):
        x = t(randn((3, 4), 0, 2.0))
        want = torch.nn.functional.selu(x)
        y = make(inplace=True)(x)
        assert y is x or y.data_ptr() == x.data_ptr(), make
        torch.testing.assert_close(x, want, rtol=0, atol=0)
