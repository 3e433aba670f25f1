"""Spectral norm: NumPy reference vs torch, normlab.nn.spectral_norm vs
torch.nn.utils.parametrizations.spectral_norm (u, v copied through the state dict)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrizations as P

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import assert_close, assert_state_dict_roundtrip, assert_state_equal, randn, run_twins, t, torch_grads
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)


def _unit(a):
    return a / np.linalg.norm(a)


@pytest.mark.parametrize("shape,dim", [((4, 3), 0), ((3, 5, 2), 0), ((3, 5, 2), 1), ((2, 3, 2, 2), 2), ((1, 6), 0),
                                       ((3, 5, 2), -1)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_reference_matches_torch(shape, dim, training):
    w, dwsn = randn(shape, 0), randn(shape, 1)
    wm = R.spectral_norm.as_matrix(w, dim)
    u0, v0 = _unit(randn(wm.shape[0], 2)), _unit(randn(wm.shape[1], 3))
    wsn, cache, (u, v) = R.spectral_norm_forward(w, u0, v0, n_power_iterations=2, training=training, dim=dim)
    dw = R.spectral_norm_backward(dwsn, cache)
    tu, tv = t(u0), t(v0)
    if training:
        NF.power_iteration_(NF.weight_as_matrix(t(w), dim), tu, tv, 2)
    assert_close(u, tu, what="u")
    assert_close(v, tv, what="v")
    twsn, (tdw,) = torch_grads(lambda w_: NF.spectral_norm(w_, tu, tv, dim), (w,), dwsn)
    # an independent torch expression: sigma = u^T W v with W the dim-first matrix
    d = dim % len(shape)
    perm = (d,) + tuple(i for i in range(len(shape)) if i != d)
    sigma = torch.dot(tu, t(w).permute(perm).reshape(shape[d], -1) @ tv)
    assert_close(twsn, t(w) / sigma)
    assert_close(wsn, twsn, what="w_sn")
    assert_close(dw, tdw, what="dw")


def test_reference_power_iteration_converges_to_the_top_singular_value():
    w = randn((6, 4), 0)
    u, v = R.power_iteration(w, _unit(randn(6, 1)), _unit(randn(4, 2)), 200)
    assert np.isclose(u @ w @ v, np.linalg.svd(w, compute_uv=False)[0], rtol=1e-10)


def test_reference_one_d_weight():
    w, dy = randn(5, 0), randn(5, 1)
    y, cache, _ = R.spectral_norm_forward(w, None, None)
    ty, (tdw,) = torch_grads(lambda w_: F.normalize(w_, dim=0), (w,), dy)
    assert_close(y, ty)
    assert_close(R.spectral_norm_backward(dy, cache), tdw)


MAKERS = [(lambda: torch.nn.Linear(5, 7), (4, 5)), (lambda: torch.nn.Conv2d(3, 4, 2), (2, 3, 4, 3)),
          (lambda: torch.nn.ConvTranspose1d(3, 5, 2), (2, 3, 4))]


@pytest.mark.parametrize("make,shape", MAKERS, ids=["linear", "conv2d", "convtranspose1d"])
@pytest.mark.parametrize("n_iter", [1, 3])
def test_module_matches_torch_parametrization(make, shape, n_iter):
    torch.manual_seed(0)
    theirs = P.spectral_norm(make().double(), n_power_iterations=n_iter)
    torch.manual_seed(1)  # different u, v at registration ...
    ours = NN.spectral_norm(make().double(), n_power_iterations=n_iter)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # ... then torch's u, v (and weights) copied over
    run_twins(ours, theirs, lambda s: t(randn(shape, s)), steps=3, lr=0.2, copy_state=False)
    # eval: no power iteration, u and v stay put
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours(t(randn(shape, 9)))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert_state_dict_roundtrip(ours, theirs)


@pytest.mark.parametrize("transform", ["grad", "jvp", "vmap"])
def test_training_works_under_torch_func_transforms_as_torchs_does(transform):
    """Under torch.func the power iteration's in-place update of the captured u, v must go
    through ``out=`` (as torch's does): ``copy_`` is refused there ("mutate a captured Tensor").
    Gradients, tangents and batched outputs equal torch's, and u, v move as torch's do."""
    torch.manual_seed(0)
    base = torch.nn.Conv2d(4, 6, 3).double()
    theirs = P.spectral_norm(base)
    ours = NN.spectral_norm(torch.nn.Conv2d(4, 6, 3).double())
    ours.load_state_dict(theirs.state_dict())
    x, v = t(randn((3, 4, 7, 7), 0)), t(randn((3, 4, 7, 7), 1))
    outs = []
    for m in (ours, theirs):
        if transform == "grad":
            outs.append(torch.func.grad(lambda z: m(z).square().sum())(x))
        elif transform == "jvp":
            outs.append(torch.func.jvp(m, (x,), (v,))[1])
        else:
            outs.append(torch.func.vmap(m)(x.unsqueeze(1)))
    assert_close(outs[0], outs[1])
    assert_state_equal(ours, theirs, rtol=1e-12, atol=1e-14)


def test_same_seed_same_registration():
    """Registration draws u, v and runs 15 power iterations exactly as torch does."""
    for seed in (0, 1):
        torch.manual_seed(seed)
        a = NN.spectral_norm(torch.nn.Linear(6, 4).double())
        torch.manual_seed(seed)
        b = P.spectral_norm(torch.nn.Linear(6, 4).double())
        assert_state_equal(a, b, rtol=1e-12, atol=1e-14)


def test_training_drives_sigma_to_one():
    torch.manual_seed(0)
    m = NN.spectral_norm(torch.nn.Linear(8, 6).double(), n_power_iterations=1)
    for _ in range(30):
        m(torch.zeros(1, 8, dtype=torch.float64))
    assert abs(torch.linalg.matrix_norm(m.weight.detach(), 2).item() - 1) < 1e-8


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"n_power_iterations must be positive, got 0"):
        NN.spectral_norm(torch.nn.Linear(2, 3), n_power_iterations=0)
    with pytest.raises(IndexError, match=r"dim must be in \[-2, 1\].*got 2"):
        NN.spectral_norm(torch.nn.Linear(2, 3), dim=2)
    with pytest.raises(ValueError, match=r"no tensor attribute 'kernel'"):
        NN.spectral_norm(torch.nn.Linear(2, 3), name="kernel")


@pytest.mark.parametrize("dim", [2, -3])
def test_out_of_range_dim_is_refused_by_functional_and_reference(dim):
    """A modulo would silently use another axis; torch and the module raise IndexError."""
    match = rf"spectral_norm: dim must be in \[-2, 1\] for a 2-D weight, got {dim}"
    with pytest.raises(IndexError, match=match):
        NF.spectral_norm(torch.randn(4, 3), torch.randn(4), torch.randn(3), dim=dim)
    with pytest.raises(IndexError, match=match):
        R.spectral_norm_forward(randn((4, 3), 0), randn(4, 1), randn(3, 2), dim=dim)


@pytest.mark.parametrize("dim", [1, -2])
def test_out_of_range_dim_of_a_one_d_weight_is_refused_by_the_functional(dim):
    """The 1-D path (divide by the norm) ignores dim, so it checks it itself: unguarded before."""
    with pytest.raises(IndexError, match=rf"spectral_norm: dim must be in \[-1, 0\] for a 1-D weight, got {dim}"):
        NF.spectral_norm(torch.randn(4), None, None, dim=dim)


def test_reference_float16_weight_is_normed_without_overflow():
    """float16 squares overflow from |w| = 256: [300, 400] came out [0, 0], and a matrix whose
    largest singular value is above ~256 came out NaN (its power iteration ran in float16)."""
    w = np.array([300.0, 400.0], np.float16)
    y, cache, _ = R.spectral_norm_forward(w, None, None)
    np.testing.assert_allclose(y.astype(np.float32), [0.6, 0.8], rtol=1e-3)
    dw = R.spectral_norm_backward(np.ones_like(w), cache)
    assert y.dtype == dw.dtype == np.float16 and np.isfinite(dw).all()
    w2 = (randn((4, 6), 0) * 300).astype(np.float16)
    u, v = _unit(randn(4, 1)), _unit(randn(6, 2))
    got, cache, _ = R.spectral_norm_forward(w2, u.astype(np.float16), v.astype(np.float16), n_power_iterations=5)
    want, _, _ = R.spectral_norm_forward(w2.astype(np.float64), u, v, n_power_iterations=5)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-3, atol=1e-3)
    assert np.isfinite(R.spectral_norm_backward(np.ones_like(w2), cache)).all()


def test_reference_refuses_what_torch_refuses_and_keeps_the_weight_dtype():
    w = randn((4, 3), 0).astype(np.float32)
    u, v = _unit(randn(4, 1)), _unit(randn(3, 2))
    with pytest.raises(ValueError, match="n_power_iterations"):  # 0 iterations: u, v never normalized
        R.spectral_norm_forward(w, u, v, n_power_iterations=0)
    with pytest.raises(ValueError, match=r"u must be a vector of 4 .*got \(3\)"):
        R.spectral_norm_forward(w, v, v)
    with pytest.raises(ValueError, match="v must be a vector of 3 .*got None"):
        R.spectral_norm_forward(w, u, None)
    with pytest.raises(TypeError, match="floating"):
        R.spectral_norm_forward(np.ones((4, 3), np.int64), u, v)
    _, cache, _ = R.spectral_norm_forward(w, u, v)
    assert R.spectral_norm_backward(np.ones_like(w), cache).dtype == np.float32  # was float64 (u, v promoted it)


@pytest.mark.parametrize("eps", [-1.0, float("nan")])
def test_a_negative_or_nan_eps_is_refused_as_every_layer_refuses_it(eps):
    """torch accepts eps=NaN and returns NaN weights; the README says every layer refuses a
    negative or NaN eps at construction, and spectral norm did not."""
    with pytest.raises(ValueError, match=r"spectral_norm: eps must be a number >= 0 \(the smallest norm it divides by\)"):
        NN.spectral_norm(torch.nn.Linear(3, 3), eps=eps)
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        NN.SpectralNorm(torch.randn(3, 3), eps=eps)
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        R.spectral_norm_forward(np.ones((3, 3)), np.ones(3) / 3 ** 0.5, np.ones(3) / 3 ** 0.5, eps=eps)


def _twins(scale=1.0):
    torch.manual_seed(0)
    theirs = P.spectral_norm(torch.nn.Linear(4, 3).double())
    ours = NN.spectral_norm(torch.nn.Linear(4, 3).double())
    with torch.no_grad():
        theirs.parametrizations.weight.original.mul_(scale)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def test_two_training_forwards_then_one_backward_as_torchs():
    """A GAN discriminator on real then fake data: two forwards (each a power-iteration step) and one
    backward. The weight must be computed from copies of u and v (torch clones them), or the second
    step's in-place update breaks the first graph ("modified by an inplace operation")."""
    x = torch.randn(5, 4, dtype=torch.float64)
    grads = []
    for m in _twins():
        (m(x).sum() + m(x).sum()).backward()
        grads.append(m.parametrizations.weight.original.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_power_iteration_of_a_tiny_weight_matches_torchs():
    """Weights at 1e-8: u and v are normalized with eps=1e-12 as torch's (a larger clamp left the
    output 61 off torch's, whose largest entry is 0.5)."""
    x = torch.randn(5, 4, dtype=torch.float64)
    ours, theirs = _twins(1e-8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=0)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-9, atol=0)


def test_functional_one_d_spectral_norm_takes_eps():
    """A 1-D weight is divided by max(norm, eps), as F.normalize (0.01 each here, not 1/sqrt(3))."""
    w = torch.full((3,), 1e-4, dtype=torch.float64)
    torch.testing.assert_close(NF.spectral_norm(w, None, None, eps=1e-2), F.normalize(w, dim=0, eps=1e-2))
    assert float(NF.spectral_norm(w, None, None, eps=1e-2)[0]) == pytest.approx(0.01)


def test_a_negative_dim_is_stored_as_torchs_nonnegative_dim():
    """``dim=-1`` is kept as ``ndim - 1``, as torch's parametrization keeps it (its ``dim``
    attribute and this one's repr)."""
    torch.manual_seed(0)
    theirs = P.spectral_norm(torch.nn.Conv1d(3, 4, 2).double(), dim=-1)
    ours = NN.spectral_norm(torch.nn.Conv1d(3, 4, 2).double(), dim=-1)
    assert ours.parametrizations.weight[0].dim == theirs.parametrizations.weight[0].dim == 2
    assert "dim=2" in repr(ours.parametrizations.weight[0])


def test_module_one_d_weight_is_divided_by_max_norm_eps_as_torchs():
    """A 1-D weight (a batch norm's) goes through F.normalize with the layer's eps, as torch's
    parametrization: a tiny weight stays tiny (not scaled up to norm 1)."""
    twins = []
    for make in (P.spectral_norm, NN.spectral_norm):
        m = make(torch.nn.BatchNorm1d(3).double(), eps=1e-2)
        with torch.no_grad():
            m.parametrizations.weight.original.fill_(1e-4)
        twins.append(m.weight.detach())
    torch.testing.assert_close(twins[1], twins[0], rtol=1e-12, atol=0)
    assert float(twins[1][0]) == pytest.approx(0.01)
