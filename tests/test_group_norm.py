"""Group norm: NumPy reference vs torch in float64, normlab.nn.GroupNorm vs torch.nn.GroupNorm."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import assert_close, assert_state_dict_roundtrip, randn, run_twins, t, torch_grads
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

# (shape, groups): G = 1, G = C, primes, a 2-D (N, C) input, a single sample
CASES = [((2, 6, 7), 1), ((2, 6, 7), 2), ((2, 6, 7), 3), ((2, 6, 7), 6), ((1, 4), 2), ((3, 9, 2, 5), 3),
         ((1, 13, 1, 1, 3), 13), ((2, 10, 3, 1), 5)]


@pytest.mark.parametrize("shape,groups", CASES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_reference_matches_torch(shape, groups, affine):
    c = shape[1]
    gamma, beta = (randn(c, 1) + 1, randn(c, 2)) if affine else (None, None)
    x, dy = randn(shape, 3, 2.0, 1.0), randn(shape, 4)
    y, cache = R.group_norm_forward(x, groups, gamma, beta, eps=1e-3)
    dx, dg, db = R.group_norm_backward(dy, cache)
    ty, (tdx, tdg, tdb) = torch_grads(lambda x_, g_, b_: F.group_norm(x_, groups, g_, b_, 1e-3), (x, gamma, beta), dy)
    assert_close(y, ty, what="y")
    assert_close(dx, tdx, what="dx")
    assert_close(dg, tdg, what="dgamma")
    assert_close(db, tdb, what="dbeta")


@pytest.mark.parametrize("shape,groups", [((2, 6, 7), 3), ((3, 4), 2), ((2, 6, 3, 1), 6), ((1, 3, 2, 2, 2), 1)],
                         ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(affine=False), dict(eps=1e-2), dict(bias=False)], ids=str)
def test_module_matches_torch_twin(shape, groups, kw):
    ours = NN.GroupNorm(groups, shape[1], dtype=torch.float64, **kw)
    theirs = torch.nn.GroupNorm(groups, shape[1], dtype=torch.float64, **kw)
    assert repr(ours) == repr(theirs)
    run_twins(ours, theirs, lambda s: t(randn(shape, s, 1.5, 0.3)), steps=3)
    assert_state_dict_roundtrip(ours, theirs)


def test_functional_matches_torch():
    x, w, b = randn((3, 4, 5), 0), randn(4, 1), randn(4, 2)
    assert_close(NF.group_norm(t(x), 2, t(w), t(b), 1e-4), F.group_norm(t(x), 2, t(w), t(b), 1e-4))


def test_functional_sends_tensor_subclasses_through_torchs_wrapper():
    # the fast path calls torch.group_norm itself; a __torch_function__ subclass must still see F.group_norm
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(2, 4, 3).as_subclass(Logged)
    y = NF.group_norm(x, 2)
    assert F.group_norm in seen
    assert_close(y.as_subclass(torch.Tensor), F.group_norm(x.as_subclass(torch.Tensor), 2))


def test_functional_bias_without_weight_backward():
    """torch's own CPU backward fails on weight=None with a bias; ours matches a weight of ones
    (and the reference with gamma=None)."""
    x, dy, b = randn((2, 6, 5), 0), randn((2, 6, 5), 1), randn(6, 2)
    xs, bs = t(x).requires_grad_(), t(b).requires_grad_()
    y = NF.group_norm(xs, 3, None, bs, 1e-4)
    y.backward(t(dy))
    ry, cache = R.group_norm_forward(x, 3, None, b, 1e-4)
    rdx, rdg, rdb = R.group_norm_backward(dy, cache)
    assert rdg is None
    assert_close(y.detach(), ry, what="y")
    assert_close(xs.grad, rdx, what="dx")
    assert_close(bs.grad, rdb, what="dbias")


def test_channels_last_input_without_grad_and_a_trainable_weight_does_not_crash():
    """Wrong version (group_norm's torch path called torch's CPU op on the channels-last input as
    it is): a GroupNorm fed a channels-last batch that needs no gradient, with a weight or bias
    that does, killed the process in backward (torch 2.13's CPU kernel segfaults). Run in a
    subprocess, so that the crash fails this test instead of the whole run. The output keeps the
    channels-last layout and matches torch's on a contiguous copy."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import torch, normlab.nn as NN
for shape, fmt in (((3, 4, 2, 2), torch.channels_last), ((3, 4, 2, 2, 2), torch.channels_last_3d)):
    for wg, bg in ((True, True), (True, False), (False, True)):
        x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt)
        m, r = NN.GroupNorm(2, 4).double(), torch.nn.GroupNorm(2, 4).double()
        m.weight.requires_grad_(wg); m.bias.requires_grad_(bg)
        r.weight.requires_grad_(wg); r.bias.requires_grad_(bg)
        y, yr = m(x), r(x.contiguous())
        assert y.is_contiguous(memory_format=fmt)
        y.square().sum().backward(); yr.square().sum().backward()
        torch.testing.assert_close(y, yr)
        for p, q in zip(m.parameters(), r.parameters()):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad)
print("ok")
"""
    src = str(Path(NN.__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_an_empty_half_input_on_the_cpu_gives_an_empty_output(dtype):
    """The CPU half path subtracts a per-group pivot, of which an empty input has none."""
    for shape in ((0, 4, 3), (2, 4, 0)):
        y = NF.group_norm(torch.empty(shape, dtype=dtype), 2, torch.ones(4), torch.zeros(4))
        assert y.shape == shape and y.dtype == dtype


def test_an_empty_batch_with_one_value_per_group_passes_as_in_torch():
    """One value per group is refused for a non-empty input only: an empty batch has nothing to
    normalize and gives an empty output, as torch's group_norm does."""
    for shape in ((0, 4), (0, 4, 1)):
        assert NF.group_norm(torch.empty(shape), 4).shape == F.group_norm(torch.empty(shape), 4).shape == shape
