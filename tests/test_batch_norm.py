"""Batch norm: NumPy reference vs torch in float64, normlab.nn vs torch.nn twins, state dicts."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import assert_close, assert_state_dict_roundtrip, randn, run_twins, t, torch_grads
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

# sizes 1, primes and non-powers of two; N=1 is fine when there is more than one position
SHAPES = [(7, 3), (1, 5, 7), (4, 1, 13), (3, 2, 5, 1), (2, 3, 1, 2, 7), (6, 13)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_reference_matches_torch_over_steps_then_eval(shape, affine, momentum):
    c = shape[1]
    gamma = randn(c, 1) + 1 if affine in ("both", "weight") else None
    beta = randn(c, 2) if affine in ("both", "bias") else None
    running = R.RunningStats(np.zeros(c), np.ones(c))
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    for step in range(4):
        training = step < 3
        x, dy = randn(shape, 10 + step, 2.0, 0.5), randn(shape, 20 + step)
        y, cache, running = R.batch_norm_forward(x, gamma, beta, running, training=training, momentum=momentum,
                                                 eps=1e-3)
        dx, dg, db = R.batch_norm_backward(dy, cache)
        # torch's cumulative average passes 1 / num_batches_tracked as the factor
        f = momentum if momentum is not None else 1.0 / (step + 1)
        ty, (tdx, tdg, tdb) = torch_grads(
            lambda x_, g_, b_, tr=training, f=f: F.batch_norm(x_, rm, rv, g_, b_, tr, f, 1e-3), (x, gamma, beta), dy)
        what = f"step {step} ({'train' if training else 'eval'})"
        assert_close(y, ty, what=f"{what} y")
        assert_close(dx, tdx, what=f"{what} dx")
        assert_close(dg, tdg, what=f"{what} dgamma")
        assert_close(db, tdb, what=f"{what} dbeta")
        assert_close(running.mean, rm, what=f"{what} running_mean")
        assert_close(running.var, rv, what=f"{what} running_var")
    assert running.num_batches_tracked == 3


def test_reference_eval_without_running_stats_uses_batch_stats():
    x, dy = randn((5, 3, 4), 0), randn((5, 3, 4), 1)
    y, cache, running = R.batch_norm_forward(x, None, None, None, training=False)
    assert running is None
    # torch's modules do the same: without running stats, eval passes training=True
    ty, (tdx,) = torch_grads(lambda x_: F.batch_norm(x_, None, None, training=True), (x,), dy)
    assert_close(y, ty)
    assert_close(R.batch_norm_backward(dy, cache)[0], tdx)


def _bn_pair(cls_name, **kw):
    ours = getattr(NN, cls_name)(kw.pop("c"), dtype=torch.float64, **kw)
    theirs = getattr(torch.nn, cls_name)(ours.num_features, dtype=torch.float64, **kw)
    return ours, theirs


CASES = [("BatchNorm1d", (6, 3)), ("BatchNorm1d", (2, 3, 7)), ("BatchNorm2d", (2, 5, 3, 1)),
         ("BatchNorm3d", (1, 2, 3, 1, 5))]


@pytest.mark.parametrize("cls_name,shape", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("kw", [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                dict(bias=False, eps=1e-3, momentum=0.3)], ids=str)
def test_module_matches_torch_twin(cls_name, shape, kw):
    ours, theirs = _bn_pair(cls_name, c=shape[1], **kw)
    run_twins(ours, theirs, lambda s: t(randn(shape, s, 1.5, 0.3)), steps=3)
    if ours.track_running_stats:
        assert int(ours.num_batches_tracked) == 3
        assert not torch.equal(ours.running_mean, torch.zeros(shape[1], dtype=torch.float64))


@pytest.mark.parametrize("cls_name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
@pytest.mark.parametrize("kw", [dict(), dict(eps=1e-3, momentum=None, affine=False, track_running_stats=False),
                                dict(bias=False)], ids=str)
def test_repr_and_state_dict_match_torch(cls_name, kw):
    ours, theirs = _bn_pair(cls_name, c=4, **kw)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # the same dtypes (num_batches_tracked a long) and the same version in the metadata, which
    # decides how an older checkpoint without num_batches_tracked loads
    assert [v.dtype for v in ours.state_dict().values()] == [v.dtype for v in theirs.state_dict().values()]
    assert ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"]
    assert_state_dict_roundtrip(ours, theirs)


def test_momentum_none_is_cumulative_average():
    bn = NN.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    xs = [randn((5, 3), s, 1 + s, s) for s in range(4)]
    for x in xs:
        bn(t(x))
    assert_close(bn.running_mean, np.mean([x.mean(0) for x in xs], axis=0))
    assert_close(bn.running_var, np.mean([x.var(0, ddof=1) for x in xs], axis=0))
    assert int(bn.num_batches_tracked) == 4


def test_eval_does_not_move_running_stats_or_count():
    bn = NN.BatchNorm2d(3, dtype=torch.float64)
    bn(t(randn((2, 3, 2, 2), 0)))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bn.eval()
    y = bn(t(randn((2, 3, 2, 2), 1, 3.0, 4.0)))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = randn((2, 3, 2, 2), 1, 3.0, 4.0)
    rm, rv = n_(before["running_mean"]), n_(before["running_var"])
    expect = (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5)
    assert_close(y, expect)


def n_(v):
    return v.detach().numpy()


def test_old_checkpoint_without_num_batches_tracked_loads_like_torch():
    """A version-1 state dict (before num_batches_tracked existed) loads in both, and the counter
    ends up the same as in torch."""
    ours, theirs = _bn_pair("BatchNorm1d", c=3)
    for m in (ours, theirs):
        m(t(randn((4, 3), 0)))
        m(t(randn((4, 3), 1)))
    sd = OrderedDict((k, v.clone()) for k, v in theirs.state_dict().items() if k != "num_batches_tracked")
    sd._metadata = OrderedDict({"": {"version": 1}})
    for m in (ours, theirs):
        m.load_state_dict(sd)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def test_functional_matches_torch_functional_with_bias_only():
    x = randn((4, 3, 5), 0)
    b = randn(3, 1)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    y = NF.batch_norm(t(x), rm, rv, None, t(b), True, 0.2, 1e-4)
    ty = F.batch_norm(t(x), rm2, rv2, None, t(b), True, 0.2, 1e-4)
    assert_close(y, ty)
    assert_close(rm, rm2)
    assert_close(rv, rv2)


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_num_batches_tracked_set_to_none_updates_as_torch(momentum):
    """With the counter removed (torch allows it) the step is not counted; torch then weighs a
    cumulative average (momentum=None) by 0, leaving the running statistics as they were, and a
    fixed momentum by itself."""
    ours, theirs = _bn_pair("BatchNorm1d", c=3, momentum=momentum)
    for m in (ours, theirs):
        m.num_batches_tracked = None
        for s in range(2):
            m(t(randn((6, 3), s, 2.0, 1.0)))
    assert ours.num_batches_tracked is None
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_eval_with_only_one_running_buffer_refuses_as_torch(missing):
    """Batch statistics stand in for the running ones in evaluation only when *both* are None
    (torch's rule); one of them alone is an error, not a silent switch to batch statistics."""
    x = t(randn((6, 3), 0))
    for m in _bn_pair("BatchNorm1d", c=3):
        m.eval()
        setattr(m, missing, None)
        with pytest.raises(RuntimeError, match="must be defined in evaluation mode"):
            m(x)
