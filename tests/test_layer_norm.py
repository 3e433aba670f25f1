"""Layer norm: NumPy reference vs torch in float64, normlab.nn.LayerNorm vs torch.nn.LayerNorm."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import assert_close, assert_state_dict_roundtrip, randn, run_twins, t, torch_grads
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

# (input shape, normalized_shape): sizes 1, primes, multi-dim normalized shapes, an int
CASES = [((7, 13), 13), ((2, 3, 5), (3, 5)), ((1, 6), (6,)), ((3, 1), 1), ((2, 1, 7, 2), (1, 7, 2)), ((11,), 11)]


@pytest.mark.parametrize("shape,ns", CASES, ids=str)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_reference_matches_torch(shape, ns, affine):
    pshape = (ns,) if isinstance(ns, int) else ns
    gamma = randn(pshape, 1) + 1 if affine in ("both", "weight") else None
    beta = randn(pshape, 2) if affine in ("both", "bias") else None
    x, dy = randn(shape, 3, 2.0, 1.0), randn(shape, 4)
    y, cache = R.layer_norm_forward(x, ns, gamma, beta, eps=1e-3)
    dx, dg, db = R.layer_norm_backward(dy, cache)
    ty, (tdx, tdg, tdb) = torch_grads(lambda x_, g_, b_: F.layer_norm(x_, pshape, g_, b_, 1e-3), (x, gamma, beta), dy)
    assert_close(y, ty, what="y")
    assert_close(dx, tdx, what="dx")
    assert_close(dg, tdg, what="dgamma")
    assert_close(db, tdb, what="dbeta")


@pytest.mark.parametrize("shape,ns", [((4, 7), 7), ((2, 3, 5), (3, 5)), ((2, 1, 3, 2), (1, 3, 2))], ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(bias=False), dict(elementwise_affine=False), dict(eps=1e-2)], ids=str)
def test_module_matches_torch_twin(shape, ns, kw):
    ours = NN.LayerNorm(ns, dtype=torch.float64, **kw)
    theirs = torch.nn.LayerNorm(ns, dtype=torch.float64, **kw)
    assert repr(ours) == repr(theirs)
    run_twins(ours, theirs, lambda s: t(randn(shape, s, 1.5, 0.3)), steps=3)
    assert_state_dict_roundtrip(ours, theirs)


def test_functional_matches_torch():
    x, w, b = randn((3, 4, 5), 0), randn((4, 5), 1), randn((4, 5), 2)
    assert_close(NF.layer_norm(t(x), (4, 5), t(w), t(b), 1e-4), F.layer_norm(t(x), (4, 5), t(w), t(b), 1e-4))
    assert_close(NF.layer_norm(t(x), 5), F.layer_norm(t(x), (5,)))
