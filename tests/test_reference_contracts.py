"""Contracts of the NumPy reference that the per-technique files leave open: dtypes kept
(running statistics, float16 gradients), refusals, shapes of gradients, the edges of SELU,
LRN, spectral norm and the switchable mix. Each was found by mutating the reference: the
test fails on the wrong version named in its docstring and passes on the right one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab import functional as NF
from normlab import reference as R
from helpers import assert_close, assert_lowp_close, big_mean_input, randn, t, torch_grads
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

EPS = 1e-3


# ----------------------------------------------------------------------------- _core.moments
def test_moments_with_a_mask_broadcast_along_a_reduced_axis_counts_every_copy():
    """moments' mask need only broadcast to x: reduced over C with an (N, 1, L) mask, each valid
    (n, l) counts once per channel. (Wrong version: the count was the mask's own sum, C times too
    small, so the mean came out C times too large.)"""
    x = randn((3, 4, 5), 0, 2.0, 1.0)
    mask = np.arange(5)[None, :] < np.array([5, 2, 3])[:, None]  # (N, L), lengths 5, 2, 3
    m3 = mask[:, None, :]
    mean, var, count = R.moments(x, (0, 1, 2), mask=m3)
    valid = x[np.broadcast_to(m3, x.shape)]
    assert float(np.squeeze(count)) == valid.size == 4 * mask.sum()
    assert_close(np.squeeze(mean), valid.mean())
    assert_close(np.squeeze(var), valid.var())


# ----------------------------------------------------------------------------- dtype contracts
@pytest.mark.parametrize("name", ["batch", "instance", "renorm", "masked", "switchable"])
def test_running_statistics_keep_their_dtype(name):
    """float32 running buffers stay float32 after an update, as torch's buffers do (wrong version:
    the update returned float64 arrays, which a caller storing them back would silently widen)."""
    x = randn((4, 3, 5), 0).astype(np.float32)
    run = R.RunningStats(np.zeros(3, np.float32), np.ones(3, np.float32))
    calls = {
        "batch": lambda: R.batch_norm_forward(x, running=run),
        "instance": lambda: R.instance_norm_forward(x, running=run),
        "renorm": lambda: R.batch_renorm_forward(x, None, None, run),
        "masked": lambda: R.masked_batch_norm_forward(x, np.ones((4, 5), bool), running=run),
        "switchable": lambda: R.switchable_norm_forward(x, None, None, np.zeros(3), np.zeros(3), run),
    }
    new = calls[name]()[2]
    assert new.mean.dtype == np.float32 and new.var.dtype == np.float32
    assert new.num_batches_tracked == (0 if name == "instance" else 1)  # torch's InstanceNorm counts no steps


def _f16_backward_calls(x, dy):
    c = x.shape[1]
    # parameters rounded to float16 first: both sides must see the same values; kept in float32 as
    # under mixed precision (their gradients, in their dtype, would overflow float16 here)
    g, b = (np.linspace(lo, hi, c).astype(np.float16).astype(np.float32) for lo, hi in ((0.8, 1.2), (-0.2, 0.2)))
    run = R.RunningStats(np.zeros(c), np.ones(c))
    mask = (np.arange(x.shape[2])[None, :] < np.arange(x.shape[2], 0, -1)[: x.shape[0], None]) if x.ndim == 3 else None
    w3 = np.array([0.3, -0.5, 0.8])
    return {
        "batch_norm": lambda: R.batch_norm_backward(dy, R.batch_norm_forward(x, g, b, run)[1]),
        "layer_norm": lambda: R.layer_norm_backward(dy, R.layer_norm_forward(x, x.shape[1:])[1]),
        "group_norm": lambda: R.group_norm_backward(dy, R.group_norm_forward(x, 2, g, b)[1]),
        "instance_norm": lambda: R.instance_norm_backward(dy, R.instance_norm_forward(x, g, b)[1]),
        "rms_norm": lambda: R.rms_norm_backward(dy, R.rms_norm_forward(x, x.shape[-1])[1]),
        "batch_renorm": lambda: R.batch_renorm_backward(dy, R.batch_renorm_forward(x, g, b, run)[1]),
        "switchable_norm": lambda: R.switchable_norm_backward(dy, R.switchable_norm_forward(x, g, b, w3, w3, run)[1]),
        "masked_batch_norm": lambda: R.masked_batch_norm_backward(dy, R.masked_batch_norm_forward(x, mask, g, b, run)[1]),
    }


@pytest.mark.parametrize("name", list(_f16_backward_calls(np.ones((2, 2, 2)), None)))
def test_float16_backward_matches_float64_and_keeps_the_dtype(name):
    """The backward of the float16 path accumulates in float32 and returns dx in float16: a dy with
    a large common part (1000 + randn, big_mean_input on the gradient side) must give the float64
    gradient of the same rounded inputs. (Wrong version: dy left in float16, so sum(dy) was
    rounded to, or overflowed, float16 before mean(dy) was subtracted; or dx came back float32.)
    x itself is unit-scale: with a large mean in both x and dy, float32 statistics alone cost
    ~0.14 here, in torch's float32 batch norm as in the reference: an accepted limit."""
    shape = (8, 4, 30) if name == "masked_batch_norm" else (8, 4, 5, 6)
    x16 = randn(shape, 0).astype(np.float16)
    dy16 = big_mean_input(shape, torch.float16, seed=1).numpy()
    got = _f16_backward_calls(x16, dy16)[name]()
    want = _f16_backward_calls(x16.astype(np.float64), dy16.astype(np.float64))[name]()
    assert got[0].dtype == np.float16, f"{name}: dx dtype {got[0].dtype}"
    assert_lowp_close(got[0], want[0], np.float16, f"{name} dx")


# ----------------------------------------------------------------------------- validation
def test_masked_batch_norm_refuses_a_single_valid_position():
    """One valid position per channel: variance 0 and an unbiased running variance of 0/0, as
    torch's one-value batch norm. The nn tier refuses it ("mbn-one-valid"); so must the
    reference, with or without running statistics, naming the input's shape. (Wrong
    versions: count < 1 for count <= 1; a count that ignores the mask; a message without the shape.)"""
    x = randn((1, 3, 4), 0)
    mask = np.array([[True, False, False, False]])
    for running in (None, R.RunningStats(np.zeros(3), np.ones(3))):
        with pytest.raises(ValueError, match=r"more than 1 valid position per channel, got 1 \(input shape \(1, 3, 4\)\)"):
            R.masked_batch_norm_forward(x, mask, running=running)


def test_batch_renorm_refuses_one_value_per_channel():
    """As batch norm (and the nn tier's "brn-one-value"): (1, C) in training has no batch
    variance (wrong version: the check was removed and the reference went on silently)."""
    run = R.RunningStats(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        R.batch_renorm_forward(randn((1, 3), 0), None, None, run)
    R.batch_renorm_forward(randn((1, 3), 0), None, None, run, training=False)  # eval: running stats, fine


def test_batch_renorm_without_running_stats_says_what_it_needs():
    """The message says what was expected as well as what came (matching only "got
    running=None" would let the explanation say anything)."""
    with pytest.raises(ValueError, match=r"batch_renorm needs running statistics .*got running=None"):
        R.batch_renorm_forward(np.ones((2, 3)), None, None, None)


def test_rms_norm_refuses_a_negative_eps():
    """rms_norm's own eps check (wrong version: removed; a negative eps went through, NaN-prone)."""
    with pytest.raises(ValueError, match=r"rms_norm: eps must be a number >= 0"):
        R.rms_norm_forward(randn((4, 3), 0), 3, eps=-1e-5)


def test_weight_norm_refuses_an_integer_g():
    """An integer g was accepted  and its gradient came back truncated to integers."""
    with pytest.raises(TypeError, match="floating"):
        R.weight_norm_forward(randn((3, 3), 0), np.ones((3, 1), np.int64))


@pytest.mark.parametrize("which", ["alpha_dropout", "local_response_norm"])
def test_backward_refuses_a_broadcastable_gradient(which):
    """A dy of a broadcastable but different shape gave gradients of the wrong shape (wrong
    version: the shape check removed)."""
    x = randn((2, 3, 4), 0)
    if which == "alpha_dropout":
        _, cache = R.alpha_dropout_forward(x, 0.5, rng=np.random.default_rng(0))
        call = lambda dy: R.alpha_dropout_backward(dy, cache)  # noqa: E731
    else:
        _, cache = R.local_response_norm_forward(x, 3)
        call = lambda dy: R.local_response_norm_backward(dy, cache)  # noqa: E731
    with pytest.raises(ValueError, match=r"dy must have the forward output's shape \(2, 3, 4\), got \(1, 3, 4\)"):
        call(np.ones((1, 3, 4)))


# ----------------------------------------------------------------------------- weight norm
@pytest.mark.parametrize("shape,dim", [((4, 3), 0), ((4, 3), 1), ((5, 2, 3), 1), ((4, 3), None), ((4, 3), -1),
                                       ((6,), 0)], ids=str)
def test_weight_norm_dg_has_g_shape(shape, dim):
    """dg comes back in g's own shape, so ``g -= lr * dg`` updates g and nothing else (wrong version:
    dg flattened to 1-D; the existing test reshaped torch's gradient to whatever shape dg had,
    and a (4, 1) g minus a (4,) dg broadcasts to (4, 4))."""
    v, dw = randn(shape, 0), randn(shape, 1)
    g = R.norm_except_dim(v, dim) * 1.5
    _, cache = R.weight_norm_forward(v, g, dim)
    dv, dg = R.weight_norm_backward(dw, cache)
    assert dv.shape == v.shape
    assert dg.shape == g.shape


# ----------------------------------------------------------------------------- switchable norm
@pytest.mark.parametrize("shape", [(3, 2, 4), (4, 3)], ids=str)
def test_switchable_eval_without_running_stats_uses_batch_statistics(shape):
    """As batch norm: evaluation with running=None normalizes the BN branch with the batch's own
    statistics, and the gradient flows through them (wrong version: use_batch = training, which
    read running.mean from None)."""
    x, dy = randn(shape, 0, 2.0, 1.0), randn(shape, 1)
    c = shape[1]
    g, b, mw, vw = randn(c, 2) * 0.3 + 1, randn(c, 3), np.array([0.3, -0.5, 0.8]), np.array([-0.2, 0.6, 0.1])
    y_tr, cache_tr, _ = R.switchable_norm_forward(x, g, b, mw, vw, None, training=True, eps=EPS)
    y_ev, cache_ev, run = R.switchable_norm_forward(x, g, b, mw, vw, None, training=False, eps=EPS)
    assert run is None
    assert_close(y_ev, y_tr)
    for name, a, e in zip(("dx", "dgamma", "dbeta", "dmean_weight", "dvar_weight"),
                          R.switchable_norm_backward(dy, cache_ev), R.switchable_norm_backward(dy, cache_tr), strict=True):
        assert_close(a, e, what=name)


# ----------------------------------------------------------------------------- LRN
def test_lrn_float16_squares_in_float32_and_returns_float16():
    """|a| above 256 squares past float16's 65504: the window sums must be taken in float32 (the
    module says so), the output and the gradient returned in float16. (Wrong version: float16
    arithmetic, a*a = inf so b = 0; or the gradient came back float32.)"""
    h = (np.random.default_rng(0).standard_normal((2, 6, 3)) * 400).astype(np.float16)
    dy = randn(h.shape, 1).astype(np.float16)
    assert np.abs(h).max() > 256
    y16, cache = R.local_response_norm_forward(h, 3)
    da16 = R.local_response_norm_backward(dy, cache)
    y64, (da64,) = torch_grads(lambda a_: F.local_response_norm(a_, 3), (h.astype(np.float64),), dy.astype(np.float64))
    assert y16.dtype == np.float16 and da16.dtype == np.float16
    assert_lowp_close(y16, y64, np.float16, "y")
    assert_lowp_close(da16, da64, np.float16, "da")


# ----------------------------------------------------------------------------- SELU family
def test_selu_keeps_its_digits_just_below_zero():
    """lambda alpha expm1(x), not exp(x) - 1, as torch: for x = -1e-13 exp(x) - 1 is off by ~3e-4
    relative . Compared with torch relative only (atol would hide it)."""
    x = np.array([-1e-5, -1e-8, -1e-10, -1e-13, -1e-300])
    y, _ = R.selu_forward(x)
    assert_close(y, F.selu(t(x)), rtol=1e-12, atol=0)


def test_lecun_normal_fan_in_of_a_conv_weight():
    """fan_in defaults to the product of shape[1:] (in_channels * kernel), not shape[1] ."""
    w = R.lecun_normal((64, 8, 3, 3), rng=np.random.default_rng(0))
    assert abs(w.var() * 72 - 1) < 0.05


# ----------------------------------------------------------------------------- spectral norm
def test_one_d_zero_weight_is_zero_as_f_normalize():
    """A 1-D weight is divided by max(||w||, eps), as F.normalize: a zero weight (a zero-initialized
    bias) gives 0 and the gradient dy / eps, not NaN (wrong version: max(., eps) removed)."""
    w, dy = np.zeros(4), randn(4, 1)
    y, cache, _ = R.spectral_norm_forward(w, None, None)
    ty, (tdw,) = torch_grads(lambda w_: F.normalize(w_, dim=0, eps=1e-12), (w,), dy)
    assert_close(y, ty)
    assert_close(R.spectral_norm_backward(dy, cache), tdw)


def test_power_iteration_on_a_null_vector_stays_finite_as_torchs():
    """W v = 0: torch's F.normalize(., eps) gives u = 0 (and then v = 0); dividing by the bare norm
     gave NaN vectors that then poison the persistent state."""
    wm = np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    u0, v0 = np.array([0.6, 0.0, 0.8]), np.array([0.0, 1.0])
    u, v = R.power_iteration(wm, u0, v0, 1)
    tw, tu, tv = t(wm), t(u0), t(v0)
    tu = F.normalize(tw @ tv, dim=0, eps=1e-12)
    tv = F.normalize(tw.T @ tu, dim=0, eps=1e-12)
    assert_close(u, tu, what="u")
    assert_close(v, tv, what="v")


def test_instance_norm_one_position_message_fits_the_running_statistics():
    """With running statistics the hint is "use eval mode"; without, evaluation uses batch
    statistics too and the message says so (wrong version: always the no-running-stats wording)."""
    x = np.ones((2, 3, 1))
    with pytest.raises(ValueError, match=r"instance_norm in training needs more than 1 value per instance.*use eval mode"):
        R.instance_norm_forward(x, running=R.RunningStats(np.zeros(3), np.ones(3)))
    with pytest.raises(ValueError, match=r"instance_norm without running statistics .*use a larger batch"):
        R.instance_norm_forward(x)


def test_batch_norm_eval_with_eps_zero_is_refused_only_for_batch_statistics():
    """eps=0 is refused where a *batch* variance is 0 (0/0 by construction); in evaluation the
    fixed statistics are the caller's, and the channel with running variance 0 divides by 0 as
    told: (x - rm) / 0 = +-inf there (torch's fused CPU formula gives NaN instead, so only the
    other channels are compared with it). Wrong version: the check also ran on the running
    statistics and raised."""
    x, rm, rv = randn((4, 3), 0), np.array([0.5, 0.3, -0.2]), np.array([2.0, 0.0, 1.5])
    with np.errstate(divide="ignore"):
        y, _, _ = R.batch_norm_forward(x, running=R.RunningStats(rm, rv), training=False, eps=0.0)
    assert np.array_equal(y[:, 1], np.sign(x[:, 1] - rm[1]) * np.inf)
    want = F.batch_norm(t(x), t(rm), t(rv), training=False, eps=0.0)
    assert_close(y[:, [0, 2]], want[:, [0, 2]])


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 4)], ids=str)
def test_switchable_logits_are_shift_invariant_even_when_large(shape):
    """softmax(z + 1000) = softmax(z): the mix (and every gradient) must not change, where a bare
    exp overflows to inf/inf = NaN (wrong version: the max no longer subtracted)."""
    x, dy = randn(shape, 0, 2.0, 1.0), randn(shape, 1)
    mw, vw = np.array([0.3, -0.5, 0.8]), np.array([-0.2, 0.6, 0.1])
    y, cache, _ = R.switchable_norm_forward(x, None, None, mw, vw, eps=EPS)
    y2, cache2, _ = R.switchable_norm_forward(x, None, None, mw + 1000.0, vw + 1000.0, eps=EPS)
    assert_close(y2, y)
    for a, e in zip(R.switchable_norm_backward(dy, cache2), R.switchable_norm_backward(dy, cache), strict=True):
        assert_close(a, e)


def test_switchable_2d_leaves_the_callers_logits_alone():
    """For (N, C) the IN logit is masked to -inf on a copy: the caller's float64 logit arrays must
    come back unchanged (wrong version: no copy, -inf written into mean_weight/var_weight)."""
    mw, vw = np.array([0.3, -0.5, 0.8]), np.array([-0.2, 0.6, 0.1])
    before = mw.copy(), vw.copy()
    R.switchable_norm_forward(randn((4, 3), 0), None, None, mw, vw)
    assert np.array_equal(mw, before[0]) and np.array_equal(vw, before[1])


def test_selu_gradient_has_the_inputs_dtype():
    """dx is the gradient of x, so it has x's dtype whatever dy's (as torch's autograd, and as
    every other backward here); a float64 dy used to widen a float32 x's gradient."""
    x = randn((3, 4), 0).astype(np.float32)
    _, cache = R.selu_forward(x)
    dx = R.selu_backward(randn((3, 4), 1), cache)
    assert dx.dtype == np.float32
    ty, (tdx,) = torch_grads(F.selu, (x.astype(np.float64),), randn((3, 4), 1))
    np.testing.assert_allclose(dx, tdx, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- found by an audit
def test_instance_norm_momentum_none_leaves_the_running_statistics_as_torch_does():
    """torch's InstanceNorm passes momentum=None on as 0.0 (no cumulative average): the running
    statistics stay. The reference replaced them with the batch's (a cumulative average's first
    step). Wrong version: reference/instance_norm.py without ``and momentum is not None``."""
    x = randn((2, 3, 4), 0)
    run = R.RunningStats(np.full(3, 0.5), np.full(3, 2.0))
    _, _, got = R.instance_norm_forward(x, running=run, momentum=None)
    m = torch.nn.InstanceNorm1d(3, momentum=None, track_running_stats=True).double()
    with torch.no_grad():
        m.running_mean.fill_(0.5)
        m.running_var.fill_(2.0)
    m(t(x))
    np.testing.assert_array_equal(got.mean, m.running_mean.numpy())
    np.testing.assert_array_equal(got.var, m.running_var.numpy())


@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 3, 4), (2, 3, 0, 2)], ids=str)
def test_switchable_norm_in_evaluation_on_an_empty_input_has_zero_gradients(shape):
    """No positions: the instance statistics are 0/0, and the gradients of gamma and of both
    mixes came back NaN (NaN times an empty sum); they are sums of nothing: 0.
    Wrong version: reference/switchable_norm.py backward without the ``x.size == 0`` return."""
    y, cache, _ = R.switchable_norm_forward(np.ones(shape), np.ones(3), np.zeros(3), np.zeros(3), np.zeros(3),
                                            R.RunningStats(np.zeros(3), np.ones(3)), training=False)
    dx, dg, db, dmw, dvw = R.switchable_norm_backward(np.ones(shape), cache)
    assert y.shape == dx.shape == shape
    for g, n in ((dg, 3), (db, 3), (dmw, 3), (dvw, 3)):
        np.testing.assert_array_equal(g, np.zeros(n))


def test_one_d_spectral_norm_below_eps_divides_by_the_constant_eps():
    """||w|| < eps: the forward divides by eps (torch's F.normalize clamps so), a constant, but
    the backward still subtracted the norm's own gradient: 3% off torch's.
    Wrong version: reference/spectral_norm.py backward without the ``clamped`` branch."""
    w, d = np.array([1e-13, 0.0, 2e-13]), np.array([1.0, 0.5, -2.0])
    _, cache, _ = R.spectral_norm_forward(w, None, None)
    tw = t(w).requires_grad_()
    F.normalize(tw, dim=0, eps=1e-12).backward(t(d))
    assert_close(R.spectral_norm_backward(d, cache), tw.grad.numpy())
    w = np.array([1.0, -2.0, 0.5])  # above eps: the full gradient, as before
    _, cache, _ = R.spectral_norm_forward(w, None, None)
    tw = t(w).requires_grad_()
    F.normalize(tw, dim=0, eps=1e-12).backward(t(d))
    assert_close(R.spectral_norm_backward(d, cache), tw.grad.numpy())


def test_parameters_and_dy_may_be_lists_everywhere():
    """layer_norm and rms_norm took gamma and beta only as arrays (AttributeError on a list,
    which batch_norm takes); a backward took dy only as an array."""
    x = randn((4, 3), 0)
    y, cache = R.layer_norm_forward(x, 3, [1.0, 2.0, 0.5], [0.0, 0.1, 0.2])
    want_y, want_cache = R.layer_norm_forward(x, 3, np.array([1.0, 2.0, 0.5]), np.array([0.0, 0.1, 0.2]))
    np.testing.assert_array_equal(y, want_y)
    for got, want in zip(R.layer_norm_backward(y.tolist(), cache), R.layer_norm_backward(y, want_cache)):
        np.testing.assert_array_equal(got, want)
    y, cache = R.rms_norm_forward(x, 3, [1.0, 2.0, 0.5])
    np.testing.assert_array_equal(y, R.rms_norm_forward(x, 3, np.array([1.0, 2.0, 0.5]))[0])
    y, cache, _ = R.batch_norm_forward(x)
    np.testing.assert_array_equal(R.batch_norm_backward(y.tolist(), cache)[0], R.batch_norm_backward(y, cache)[0])


# ----------------------------------------------------------------------------- ninth-session audit
def test_every_backward_takes_dy_as_a_list():
    """group_norm, local_response_norm, switchable_norm, weight_norm and alpha_dropout backwards
    took dy only as an array (AttributeError on a list), as the normalize family no longer does."""
    x = randn((2, 4, 3, 3), 0)
    w3 = np.array([0.3, -0.5, 0.8])
    caches = {
        "group_norm": (R.group_norm_backward, R.group_norm_forward(x, 2)),
        "local_response_norm": (R.local_response_norm_backward, R.local_response_norm_forward(x, 3)),
        "switchable_norm": (R.switchable_norm_backward, R.switchable_norm_forward(x, None, None, w3, w3)),
        "weight_norm": (R.weight_norm_backward, R.weight_norm_forward(x[0], np.ones((4, 1, 1)))),
        "alpha_dropout": (R.alpha_dropout_backward, R.alpha_dropout_forward(x, 0.3, rng=np.random.default_rng(0))),
        "alpha_dropout_eval": (R.alpha_dropout_backward, R.alpha_dropout_forward(x, 0.3, training=False)),
    }
    for name, (backward, (y, cache, *_)) in caches.items():
        want = backward(np.ones_like(y), cache)
        got = backward(np.ones_like(y).tolist(), cache)
        for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in (got, want))):
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_alpha_dropout_gradient_is_fresh_in_xs_dtype_and_checks_dy(training):
    """Wrong version: in evaluation (or p=0) the gradient was dy itself (aliasing the caller's
    array), in dy's dtype, and a dy of any shape came back unchecked; in training dx took dy's dtype."""
    x = randn((3, 4), 0).astype(np.float32)
    _, cache = R.alpha_dropout_forward(x, 0.5, training=training, rng=np.random.default_rng(1))
    dy = np.ones((3, 4))
    dx = R.alpha_dropout_backward(dy, cache)
    assert dx.dtype == np.float32 and not np.shares_memory(dx, dy)
    dy32 = np.ones((3, 4), np.float32)  # already x's dtype: a cast that copies only when needed would alias it
    assert not np.shares_memory(R.alpha_dropout_backward(dy32, cache), dy32)
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        R.alpha_dropout_backward(np.ones(7), cache)


@pytest.mark.parametrize("name", ["batch", "instance", "renorm", "masked", "switchable"])
def test_integer_running_statistics_are_updated_as_floats(name):
    """RunningStats([0, 0, 0], [1, 1, 1]) (lists of ints): the update rounded back to the integers
    every step, so the running statistics never moved. They become float64, as float lists do."""
    x = randn((6, 3, 5), 0, 2.0, 5.0)
    runs = {"int": R.RunningStats([0, 0, 0], [1, 1, 1]), "float": R.RunningStats([0.0] * 3, [1.0] * 3)}
    calls = {
        "batch": lambda run: R.batch_norm_forward(x, running=run),
        "instance": lambda run: R.instance_norm_forward(x, running=run),
        "renorm": lambda run: R.batch_renorm_forward(x, None, None, run),
        "masked": lambda run: R.masked_batch_norm_forward(x, np.ones((6, 5), bool), running=run),
        "switchable": lambda run: R.switchable_norm_forward(x, None, None, np.zeros(3), np.zeros(3), run),
    }
    got, want = (calls[name](runs[k])[2] for k in ("int", "float"))
    assert got.mean.dtype == got.var.dtype == np.float64
    np.testing.assert_array_equal(got.mean, want.mean)
    np.testing.assert_array_equal(got.var, want.var)
    assert np.all(got.mean > 0.3)  # moved a tenth of the way towards the batch mean, 5


def _param_grads(x, p, eps):
    """Parameter gradients of every reference technique with parameters, float16/32 params ``p``."""
    c = x.shape[1]
    g, b = np.linspace(0.8, 1.2, c).astype(p), np.linspace(-0.2, 0.2, c).astype(p)
    run = R.RunningStats(np.zeros(c, p), np.ones(c, p))
    mask = np.ones((x.shape[0], x.shape[2]), bool)
    w3 = np.array([0.3, -0.5, 0.8], p)
    dy = np.ones_like(x)
    ln = R.layer_norm_forward(x, x.shape[1:], np.ones(x.shape[1:], p), np.zeros(x.shape[1:], p), eps=eps)[1]
    return {
        "batch_norm": R.batch_norm_backward(dy, R.batch_norm_forward(x, g, b, run, eps=eps)[1])[1:],
        "layer_norm": R.layer_norm_backward(dy, ln)[1:],
        "group_norm": R.group_norm_backward(dy, R.group_norm_forward(x, 2, g, b, eps=eps)[1])[1:],
        "instance_norm": R.instance_norm_backward(dy, R.instance_norm_forward(x, g, b, eps=eps)[1])[1:],
        "rms_norm": R.rms_norm_backward(dy, R.rms_norm_forward(x, x.shape[-1], np.ones(x.shape[-1], p), eps=eps)[1])[1:],
        "batch_renorm": R.batch_renorm_backward(dy, R.batch_renorm_forward(x, g, b, run, eps=eps)[1])[1:],
        "masked_batch_norm": R.masked_batch_norm_backward(dy, R.masked_batch_norm_forward(x, mask, g, b, run,
                                                                                           eps=eps)[1])[1:],
        "switchable_norm": R.switchable_norm_backward(dy, R.switchable_norm_forward(x, g, b, w3, w3, run,
                                                                                     eps=eps)[1])[1:],
    }


@pytest.mark.parametrize("x_dtype,p_dtype,eps", [(np.float16, np.float16, 1e-5), (np.float32, np.float32, np.float64(1e-5)),
                                                 (np.float32, np.float64, 1e-5)], ids=["f16", "f32-eps64", "f32-p64"])
def test_parameter_gradients_have_the_parameters_dtype(x_dtype, p_dtype, eps):
    """As torch's autograd: dgamma, dbeta (and switchable's logits) in their parameter's dtype.
    Wrong version: float32 for float16 parameters, and float64 for float32 ones when eps came as
    np.float64 (NumPy's promotion widened rstd, and every gradient with it)."""
    x = randn((4, 4, 6), 0).astype(x_dtype)
    for name, grads in _param_grads(x, p_dtype, eps).items():
        assert all(g.dtype == p_dtype for g in grads), f"{name}: {[g.dtype for g in grads]}"


def test_moments_without_centring_ignores_a_nan_where_the_mask_is_0():
    """Wrong version: with center=False the mean is 0, so the check for a non-finite masked mean
    never ran, and NaN * 0 made the mean square NaN."""
    x = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 5.0]])
    m = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert float(np.squeeze(R.moments(x, (0, 1), mask=m, center=False)[1])) == pytest.approx(55 / 5)
    assert float(np.squeeze(R.moments(x, (0, 1), mask=m)[1])) == pytest.approx(np.var([1, 2, 3, 4, 5]))


def test_instance_norm_leaves_num_batches_tracked_as_torch_does():
    """torch's InstanceNorm (track_running_stats=True) never counts steps; the reference counted one
    per training forward."""
    x = randn((4, 3, 5), 0)
    ref = R.instance_norm_forward(x, running=R.RunningStats(np.zeros(3), np.ones(3), 7))[2]
    m = torch.nn.InstanceNorm1d(3, track_running_stats=True).double()
    m.num_batches_tracked.fill_(7)
    m(t(x))
    assert ref.num_batches_tracked == int(m.num_batches_tracked) == 7
    assert_close(ref.mean, m.running_mean.numpy())
    assert_close(ref.var, m.running_var.numpy())


# ----------------------------------------------------------------------------- eleventh-session audit
@pytest.mark.parametrize("name", ["batch", "batch_beta", "instance", "group", "layer", "layer_beta", "rms", "renorm",
                                  "masked", "switchable", "switchable_logits"])
def test_an_integer_parameter_is_refused_as_weight_norms_g(name):
    """gamma, beta (and switchable's logits) get their gradients in their own dtype: an integer one
    was accepted and its gradient came back truncated to integers (dgamma [-2.567, -3.738, 2.647]
    returned as [-2, -3, 2]). Refused, as weight_norm refuses an integer g and torch an integer
    tensor that requires grad."""
    x = randn((4, 3, 5), 0)
    i3, f3 = np.array([1, 2, 3]), np.ones(3)
    run = R.RunningStats(np.zeros(3), np.ones(3))
    calls = {
        "batch": lambda: R.batch_norm_forward(x, i3, f3),
        "batch_beta": lambda: R.batch_norm_forward(x, f3, [0, 1, 0]),
        "instance": lambda: R.instance_norm_forward(x, i3),
        "group": lambda: R.group_norm_forward(x, 3, i3),
        "layer": lambda: R.layer_norm_forward(x, 5, np.arange(5)),
        "layer_beta": lambda: R.layer_norm_forward(x, 5, None, np.arange(5)),
        "rms": lambda: R.rms_norm_forward(x, 5, np.arange(5)),
        "renorm": lambda: R.batch_renorm_forward(x, i3, None, run),
        "masked": lambda: R.masked_batch_norm_forward(x, None, i3),
        "switchable": lambda: R.switchable_norm_forward(x, i3, None, np.zeros(3), np.zeros(3)),
        "switchable_logits": lambda: R.switchable_norm_forward(x, None, None, np.zeros(3), np.zeros(3, int)),
    }
    with pytest.raises(TypeError, match=r"\((gamma|beta|var_weight)\) expects a floating-point input.*got dtype int"):
        calls[name]()


@pytest.mark.parametrize("name", ["batch", "batch_eval", "instance", "group", "renorm", "renorm_eval", "masked",
                                  "switchable", "switchable_empty"])
def test_per_channel_gradients_come_back_in_the_parameters_shapes(name):
    """The per-channel forwards take gamma and beta of any shape with one value per channel (a
    broadcastable (1, C, 1) as well as (C,)); dgamma and dbeta came back flat, so ``gamma -= lr *
    dgamma`` broadcast a (1, 3, 1) gamma to (1, 3, 3), which the next forward refused (as for
    weight_norm's dg). Now each gradient has its parameter's shape, and the same values."""
    x = randn((4, 3, 5), 0)
    dy = randn(x.shape, 1)
    run = R.RunningStats(np.zeros(3), np.ones(3))
    w3 = np.array([0.3, -0.5, 0.8])
    calls = {
        "batch": (lambda g, b: R.batch_norm_forward(x, g, b, run), R.batch_norm_backward),
        "batch_eval": (lambda g, b: R.batch_norm_forward(x, g, b, run, training=False), R.batch_norm_backward),
        "instance": (lambda g, b: R.instance_norm_forward(x, g, b), R.instance_norm_backward),
        "group": (lambda g, b: R.group_norm_forward(x, 3, g, b), R.group_norm_backward),
        "renorm": (lambda g, b: R.batch_renorm_forward(x, g, b, run, rmax=1.2, dmax=0.1), R.batch_renorm_backward),
        "renorm_eval": (lambda g, b: R.batch_renorm_forward(x, g, b, run, training=False), R.batch_renorm_backward),
        "masked": (lambda g, b: R.masked_batch_norm_forward(x, np.arange(5) < np.array([[5], [2], [3], [4]]), g, b),
                   R.masked_batch_norm_backward),
        "switchable": (lambda g, b: R.switchable_norm_forward(x, g, b, w3, w3, run), R.switchable_norm_backward),
    }
    if name == "switchable_empty":  # an input with no positions (evaluation): zero gradients, same shapes
        x, dy = np.zeros((2, 3, 0)), np.zeros((2, 3, 0))
        name = "switchable"
        calls[name] = (lambda g, b: R.switchable_norm_forward(x, g, b, w3, w3, run, training=False),
                       R.switchable_norm_backward)
    forward, backward = calls[name]
    g, b = np.array([1.5, 2.0, 0.5]), np.array([0.1, -0.2, 0.3])
    want = backward(dy, forward(g, b)[1])
    got = backward(dy, forward(g.reshape(1, 3, 1), b.reshape(3, 1))[1])
    assert got[1].shape == (1, 3, 1) and got[2].shape == (3, 1)
    np.testing.assert_array_equal(got[1].reshape(-1), want[1])
    np.testing.assert_array_equal(got[2].reshape(-1), want[2])
    assert want[1].shape == want[2].shape == (3,)
    only_gamma = backward(dy, forward(g.reshape(3, 1), None)[1])
    assert only_gamma[1].shape == (3, 1) and only_gamma[2] is None


@pytest.mark.parametrize("dim", [1, -2, 5])
def test_one_d_spectral_norm_refuses_an_out_of_range_dim_as_torch(dim):
    """A 1-D weight is divided by its norm whatever dim says, so its dim was never checked: dim=5
    went through, where torch's parametrizations.spectral_norm raises IndexError (as the
    reference already did for 2-D weights)."""
    with pytest.raises(IndexError, match=rf"spectral_norm: dim must be in \[-1, 0\] for a 1-D weight, got {dim}"):
        R.spectral_norm_forward(randn(3, 0), None, None, dim=dim)
    with pytest.raises(IndexError, match=rf"spectral_norm: dim must be in \[-1, 0\] for a 1-D weight, got {dim}"):
        NF.spectral_norm(torch.ones(3), None, None, dim=dim)  # the functional tier had the same gap
    lin = torch.nn.Linear(3, 1)
    lin.weight = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(IndexError):
        torch.nn.utils.parametrizations.spectral_norm(lin, dim=dim)
    for ok in (0, -1):
        R.spectral_norm_forward(randn(3, 0), None, None, dim=ok)


def test_rms_norm_eps_zero_message_names_the_group_of_zeros():
    """RMS norm divides by the root mean square: with eps=0 a row of zeros is what divides 0 by 0
    (a row of equal values such as [2, 2, 2] normalizes to ones). The message said "values are all
    equal (variance 0)", the batch norm cause, pointing at the wrong rows."""
    x = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"eps=0 divides 0 by 0 where a normalized group's values are all 0 "
                                         r"\(mean square 0\): 1 of 2 groups"):
        R.rms_norm_forward(x, 3, eps=0)
    np.testing.assert_allclose(R.rms_norm_forward(np.full((1, 3), 2.0), 3, eps=0)[0], np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"all equal \(variance 0\)"):
        R.layer_norm_forward(np.full((1, 3), 2.0), 3, eps=0)
