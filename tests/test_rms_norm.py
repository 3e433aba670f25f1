"""RMS norm: NumPy reference vs torch in float64, normlab.nn.RMSNorm vs torch.nn.RMSNorm, eps=None."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import assert_close, assert_state_dict_roundtrip, randn, run_twins, t, torch_grads
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

CASES = [((7, 13), 13), ((2, 3, 5), (3, 5)), ((1, 6), (6,)), ((3, 1), 1), ((2, 1, 7, 2), (1, 7, 2))]


@pytest.mark.parametrize("shape,ns", CASES, ids=str)
@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("affine", [True, False])
def test_reference_matches_torch(shape, ns, eps, affine):
    pshape = (ns,) if isinstance(ns, int) else ns
    gamma = randn(pshape, 1) + 1 if affine else None
    # small values, so that eps=None (float64 machine epsilon) vs a wrong eps would show
    x, dy = randn(shape, 3, 1e-6), randn(shape, 4)
    y, cache = R.rms_norm_forward(x, ns, gamma, eps=eps)
    dx, dg = R.rms_norm_backward(dy, cache)
    ty, (tdx, tdg) = torch_grads(lambda x_, g_: F.rms_norm(x_, pshape, g_, eps), (x, gamma), dy)
    assert_close(y, ty, what="y")
    assert_close(dx, tdx, rtol=1e-8, what="dx")
    assert_close(dg, tdg, what="dgamma")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_reference_eps_none_is_torchs_default_for_narrow_dtypes(dtype):
    """torch's eps=None is the machine epsilon of the computation dtype: float32's for float16,
    bfloat16 and float32 input. Tiny inputs (mean square ~1e-6, below float16's epsilon ~1e-3)
    make a wrong default visible."""
    x = (randn((4, 8), 0) * 1e-3).astype(dtype)
    y, _ = R.rms_norm_forward(x, 8)
    ty = F.rms_norm(torch.from_numpy(x), (8,))
    tol = 2e-3 if dtype == np.float16 else 1e-6
    assert_close(y, ty, rtol=tol, atol=tol)


@pytest.mark.parametrize("kw", [dict(), dict(eps=1e-2), dict(elementwise_affine=False), dict(eps=None)], ids=str)
@pytest.mark.parametrize("shape,ns", [((4, 7), 7), ((2, 3, 5), (3, 5))], ids=str)
def test_module_matches_torch_twin(shape, ns, kw):
    ours = NN.RMSNorm(ns, dtype=torch.float64, **kw)
    theirs = torch.nn.RMSNorm(ns, dtype=torch.float64, **kw)
    assert repr(ours) == repr(theirs)
    run_twins(ours, theirs, lambda s: t(randn(shape, s, 1e-4 if s == 0 else 1.0)), steps=3)
    assert_state_dict_roundtrip(ours, theirs)


def test_functional_matches_torch():
    x, w = randn((3, 4, 5), 0, 1e-5), randn((4, 5), 1)
    for eps in (None, 1e-6):
        assert_close(NF.rms_norm(t(x), (4, 5), t(w), eps), F.rms_norm(t(x), (4, 5), t(w), eps))
