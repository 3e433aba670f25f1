"""Local response norm: NumPy reference vs torch in float64, nn twin."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import assert_close, randn, run_twins, t, torch_grads
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)


@pytest.mark.parametrize("shape", [(2, 7, 3), (1, 5, 2, 3), (2, 1, 4), (1, 13, 1, 2, 2)], ids=str)
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 20])
def test_reference_matches_torch(shape, size):
    # large alpha and values so the normalization is far from the identity
    x, dy = randn(shape, 0, 3.0), randn(shape, 1)
    kw = dict(alpha=0.5, beta=0.75, k=2.0)
    y, cache = R.local_response_norm_forward(x, size, **kw)
    dx = R.local_response_norm_backward(dy, cache)
    ty, (tdx,) = torch_grads(lambda x_: F.local_response_norm(x_, size, **kw), (x,), dy)
    assert_close(y, ty, what="y")
    assert_close(dx, tdx, what="dx")


def test_reference_formula_on_one_channel_window():
    """b_c = a_c (k + alpha/n sum_{window} a^2)^-beta, the window cut at the channel ends, always / n."""
    x = randn((1, 4, 1), 2)
    y, _ = R.local_response_norm_forward(x, 3, alpha=0.3, beta=0.5, k=1.5)
    a = x[0, :, 0]
    for c in range(4):
        win = a[max(0, c - 1): c + 2]
        assert np.isclose(y[0, c, 0], a[c] * (1.5 + 0.3 / 3 * np.sum(win ** 2)) ** -0.5, rtol=1e-12)


@pytest.mark.parametrize("kw", [dict(size=3), dict(size=4, alpha=0.2, beta=0.5, k=2.0)], ids=str)
def test_module_matches_torch_twin(kw):
    ours, theirs = NN.LocalResponseNorm(**kw), torch.nn.LocalResponseNorm(**kw)
    assert repr(ours) == repr(theirs)
    run_twins(ours, theirs, lambda s: t(randn((2, 6, 3, 2), s, 4.0)), steps=2)


def test_functional_matches_torch():
    x = randn((2, 5, 3), 0, 5.0)
    assert_close(NF.local_response_norm(t(x), 3, 0.1, 0.6, 1.2), F.local_response_norm(t(x), 3, 0.1, 0.6, 1.2))


def test_reference_window_sums_stay_accurate_after_large_channels():
    # a running-total difference loses small channels after large ones (float32), and its totals
    # overflow float16; the window sums must only depend on each window's own channels
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 64, 3))
    a[:, :32] *= 1000.0
    dy = rng.standard_normal(a.shape)
    kw = dict(alpha=1.0, beta=0.75, k=1.0)
    ty, (tdx,) = torch_grads(lambda x_: F.local_response_norm(x_, 5, **kw), (a,), dy)
    want_y, want_dx = ty.numpy(), tdx.numpy()
    y, cache = R.local_response_norm_forward(a.astype(np.float32), 5, **kw)
    dx = R.local_response_norm_backward(dy.astype(np.float32), cache)
    assert y.dtype == dx.dtype == np.float32
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6 * np.abs(want_y).max())
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5 * np.abs(want_dx).max())
    h = (rng.standard_normal((2, 256, 3)) * 20).astype(np.float16)  # total of a*a over channels >> 65504
    y16, cache16 = R.local_response_norm_forward(h, 5)
    dx16 = R.local_response_norm_backward(np.ones_like(h), cache16)
    y64 = F.local_response_norm(torch.from_numpy(h.astype(np.float64)), 5).numpy()
    assert y16.dtype == np.float16 and np.isfinite(y16).all() and np.isfinite(dx16).all()
    np.testing.assert_allclose(y16.astype(np.float64), y64, rtol=2e-3, atol=2e-3 * np.abs(y64).max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_on_cpu(dtype):
    """torch has no CPU half LRN; ours computes in float32 and rounds once: it equals the float32
    result on the same rounded input, rounded, and its gradient flows in the input's dtype."""
    x = (torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(0)) * 3).to(dtype).requires_grad_()
    kw = dict(alpha=0.5, beta=0.75, k=2.0)
    y = NN.LocalResponseNorm(3, **kw)(x)
    assert y.dtype == dtype
    expect = F.local_response_norm(x.detach().float(), 3, **kw).to(dtype)
    assert torch.equal(y.detach(), expect)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    if dtype == torch.float16:  # the NumPy reference on the same float16 input
        ry, _ = R.local_response_norm_forward(x.detach().numpy(), 3, **kw)
        assert_close(y.detach().float(), torch.from_numpy(ry).float(), rtol=2e-3, atol=2e-3, what="y vs reference")


@pytest.mark.parametrize("shape", [(2, 6, 5), (2, 6, 5, 5), (2, 6, 3, 4, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_under_cpu_autocast_it_is_torchs_result_in_torchs_dtype(dtype, shape):
    """Under CPU autocast torch's LRN runs its 3-D average pool in float32, so a 4-D or 5-D half
    input comes back float32 (3-D: in the input's dtype). Ours rounded its float32 result back to
    the input's dtype there; now it gives torch's tensor, dtype and bits.
    Wrong version: local_response_norm.py without the ``not autocast_enabled("cpu")`` condition."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = NN.LocalResponseNorm(3)(x), torch.nn.LocalResponseNorm(3)(x)
    assert y.dtype == want.dtype
    assert torch.equal(y, want)


def test_size_may_be_any_integer_torch_accepts():
    x = torch.randn(2, 5, 3)
    for size in (np.int64(3), torch.tensor(3)):
        assert torch.equal(NN.LocalResponseNorm(size)(x), F.local_response_norm(x, 3))
