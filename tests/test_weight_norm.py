"""Weight norm: NumPy reference vs torch, normlab.nn.weight_norm vs torch.nn.utils.parametrizations.weight_norm."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrizations as P

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import assert_close, assert_state_dict_roundtrip, randn, run_twins, t, torch_grads
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)


# -1: the whole tensor, as in torch; a 1-D weight has no dim 1 or -2
@pytest.mark.parametrize("shape,dim", [(s, d) for s in [(4, 3), (5, 2, 3), (1, 7), (3, 1, 1, 2), (6,)]
                                       for d in [0, 1, None, -2, -1] if len(s) > 1 or d not in (1, -2)], ids=str)
def test_reference_matches_torch(shape, dim):
    v, dw = randn(shape, 0), randn(shape, 1)
    g = R.norm_except_dim(v, dim) * 1.7 + randn(R.norm_except_dim(v, dim).shape, 2) * 0.1
    w, cache = R.weight_norm_forward(v, g, dim)
    dv, dg = R.weight_norm_backward(dw, cache)
    tdim = -1 if dim is None else dim
    g_shape = torch.norm_except_dim(t(v), 2, tdim).shape  # torch's weight_g: 0-d for the whole-tensor norm
    tw, (tdv, tdg) = torch_grads(lambda v_, g_: torch._weight_norm(v_, g_.reshape(g_shape), tdim), (v, g), dw)
    assert_close(w, tw, what="w")
    assert_close(dv, tdv, what="dv")
    assert_close(dg, tdg.reshape(dg.shape), what="dg")
    assert_close(R.norm_except_dim(v, dim).reshape(-1), torch.norm_except_dim(t(v), 2, tdim).reshape(-1))


@pytest.mark.parametrize("shape,dim", [((5, 3, 2), 0), ((5, 3, 2), 1), ((5, 3, 2), None), ((5, 3, 2), -1),
                                       ((6,), 0), ((6,), None)], ids=str)
def test_functional_matches_torch(shape, dim):
    """A 1-D weight with dim=0 (a bias, PReLU's weight) gets one norm per element, as in torch."""
    v = t(randn(shape, 0))
    tdim = -1 if dim is None else dim
    g = torch.norm_except_dim(v, 2, tdim) * 2
    assert_close(NF.norm_except_dim(v, dim), g / 2)
    assert NF.norm_except_dim(v, dim).shape == g.shape
    assert_close(NF.weight_norm(v, g, dim), torch._weight_norm(v, g, tdim))


_MODULES = {"linear": (lambda: torch.nn.Linear(5, 7), (4, 5)), "conv1d": (lambda: torch.nn.Conv1d(3, 4, 3), (2, 3, 6)),
            "prelu": (lambda: torch.nn.PReLU(3), (4, 3))}  # PReLU's weight is 1-D: no dim 1


@pytest.mark.parametrize("make,shape,dim", [(*_MODULES[k], d) for k in _MODULES for d in (0, 1, None)
                                            if not (k == "prelu" and d == 1)],
                         ids=[f"{d}-{k}" for k in _MODULES for d in (0, 1, None) if not (k == "prelu" and d == 1)])
def test_module_matches_torch_parametrization(make, shape, dim):
    torch.manual_seed(0)
    ours = NN.weight_norm(make().double(), dim=dim)
    torch.manual_seed(1)
    theirs = P.weight_norm(make().double(), dim=dim)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # registration keeps the weight: g = ||v|| makes g * v / ||v|| the original weight
    torch.manual_seed(0)
    plain = make().double()
    assert_close(ours.weight, plain.weight, rtol=1e-14, atol=1e-15)
    assert_state_dict_roundtrip(ours, theirs)
    run_twins(ours, theirs, lambda s: t(randn(shape, s)), steps=3, lr=0.2)


def test_rejects_missing_attribute():
    with pytest.raises(ValueError, match=r"no tensor attribute 'kernel'"):
        NN.weight_norm(torch.nn.Linear(2, 3), name="kernel")


@pytest.mark.parametrize("dim", [2, 5, -3])
def test_out_of_range_dim_is_refused_in_every_tier_as_torch_does(dim):
    """torch raises IndexError; a modulo would silently norm over another axis."""
    with pytest.raises(IndexError):
        P.weight_norm(torch.nn.Linear(3, 4), dim=dim)
    match = rf"weight_norm: dim must be in \[-2, 1\] for a 2-D weight, got {dim}"
    m = torch.nn.Linear(3, 4)
    with pytest.raises(IndexError, match=match):
        NN.weight_norm(m, dim=dim)
    assert not hasattr(m, "parametrizations")  # nothing half-registered
    with pytest.raises(IndexError, match=match):
        NF.norm_except_dim(torch.ones(4, 3), dim)
    with pytest.raises(IndexError, match=match):
        R.weight_norm_forward(randn((4, 3), 0), randn((4, 1), 1), dim)


def test_a_0d_weight_has_no_dim_to_keep_as_torch_says():
    """A 0-D weight with dim=0: torch raises IndexError ("no dimensions"); it was taken as a 1-D
    weight and gave g * sign(v). dim=None (the whole tensor) still has a meaning there."""
    class Scalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor(3.0))

    with pytest.raises(IndexError):
        P.weight_norm(Scalar(), dim=0)
    with pytest.raises(IndexError, match=r"weight_norm: dim=0 needs a weight with at least 1 dimension, got a 0-D"):
        NN.weight_norm(Scalar(), dim=0)
    with pytest.raises(IndexError, match="0-D"):
        R.weight_norm_forward(np.array(3.0), np.array(3.0), 0)
    assert NN.weight_norm(Scalar(), dim=None).weight.item() == pytest.approx(3.0)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")  # what made the checkpoint
def test_loads_a_checkpoint_of_the_older_weight_norm_as_torch_does():
    """torch.nn.utils.weight_norm saved weight_g / weight_v; the parametrized layers load it."""
    torch.manual_seed(0)
    old = torch.nn.utils.weight_norm(torch.nn.Linear(5, 3)).state_dict()
    old["weight_g"] = old["weight_g"] * torch.tensor([[1.0], [-2.0], [0.5]])  # a trained g may be negative
    ours, theirs = NN.weight_norm(torch.nn.Linear(5, 3)), P.weight_norm(torch.nn.Linear(5, 3))
    ours.load_state_dict(dict(old))
    theirs.load_state_dict(dict(old))
    x = torch.randn(2, 5)
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours.parametrizations.weight.original0, old["weight_g"])
    assert_state_dict_roundtrip(ours, theirs)


def test_reference_norm_of_float16_is_taken_in_float32():
    """v * v overflows float16 from |v| = 256: the row [300, 400] came out [0, 0] and its gradient 0."""
    v = np.array([[300.0, 400.0], [3.0, 4.0]], np.float16)
    w, cache = R.weight_norm_forward(v, np.ones((2, 1), np.float16))
    want = torch._weight_norm(torch.tensor(v), torch.ones(2, 1, dtype=torch.float16), 0)
    assert w.dtype == np.float16
    np.testing.assert_allclose(w.astype(np.float32), want.float().numpy(), rtol=1e-3)
    dv, dg = R.weight_norm_backward(np.ones_like(v), cache)
    assert dv.dtype == dg.dtype == np.float16 and np.isfinite(dv).all() and (dg != 0).all()
    np.testing.assert_allclose(R.norm_except_dim(v).ravel().astype(np.float32), [500.0, 5.0])


def test_reference_refuses_a_g_of_the_wrong_shape_and_integer_input():
    """g of shape (3,) for a 3x3 v broadcast along the columns: w's row norms were not g, and the
    backward disagreed with the forward."""
    v = randn((3, 3), 0)
    with pytest.raises(ValueError, match=r"g must have shape \(3, 1\).*got \(3\)"):
        R.weight_norm_forward(v, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="floating"):
        R.weight_norm_forward(np.ones((3, 3), np.int64), np.ones((3, 1)))
    R.weight_norm_forward(v, np.float64(2.0), dim=None)  # the whole-tensor norm takes one number


@pytest.mark.parametrize("call", [
    lambda: NF.weight_norm(torch.randn(3, 4), torch.ones(1, 4), dim=1.5),
    lambda: NF.spectral_norm(torch.randn(3, 4), torch.randn(3), torch.randn(4), dim=0.5),
    lambda: R.weight_norm_forward(np.ones((3, 4)), np.ones((1, 4)), dim=1.5),
    lambda: NN.weight_norm(torch.nn.Linear(4, 3), dim=1.5),
], ids=["F-weight_norm", "F-spectral_norm", "ref-weight_norm", "nn-weight_norm"])
def test_a_float_dim_is_refused_not_truncated(call):
    """dim=1.5 was truncated to axis 1 (and 0.5 to 0) where torch raises TypeError."""
    with pytest.raises(TypeError, match=r"dim must be an int, got (1\.5|0\.5)"):
        call()


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_an_older_checkpoint_with_weight_g_alone_is_reported_as_torchs_not_a_key_error():
    """Only a complete (weight_g, weight_v) pair is renamed; weight_g alone is an unexpected key
    and the parametrization's keys are missing, as torch's reports them."""
    old = torch.nn.utils.weight_norm(torch.nn.Linear(5, 3)).state_dict()
    del old["weight_v"]
    messages = []
    for make in (P.weight_norm, NN.weight_norm):
        with pytest.raises(RuntimeError, match="Unexpected key.*weight_g") as err:
            make(torch.nn.Linear(5, 3)).load_state_dict(dict(old))
        messages.append(str(err.value))
    assert messages[0] == messages[1]
