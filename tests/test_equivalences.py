"""One computation, many names: the identities between the techniques, checked in float64
on outputs, gradients and running statistics (nn layers and the NumPy reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import normlab.nn as NN
from normlab import reference as R
from helpers import assert_close, randn, run_twins, t
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

F64 = torch.float64


def test_layer_norm_over_chw_is_group_norm_with_one_group():
    c, shape = 3, (2, 3, 4, 5)
    w, b = randn(c, 0) + 1, randn(c, 1)
    ln = NN.LayerNorm(shape[1:], dtype=F64)
    gn = NN.GroupNorm(1, c, dtype=F64)
    with torch.no_grad():
        ln.weight.copy_(t(w)[:, None, None].expand(shape[1:]))
        ln.bias.copy_(t(b)[:, None, None].expand(shape[1:]))
        gn.weight.copy_(t(w))
        gn.bias.copy_(t(b))
    x, dy = randn(shape, 2, 2.0, 1.0), randn(shape, 3)
    xl, xg = t(x, True), t(x, True)
    yl, yg = ln(xl), gn(xg)
    assert_close(yl, yg)
    yl.backward(t(dy))
    yg.backward(t(dy))
    assert_close(xl.grad, xg.grad)
    assert_close(ln.weight.grad.sum((1, 2)), gn.weight.grad)
    assert_close(ln.bias.grad.sum((1, 2)), gn.bias.grad)
    # and in the reference tier
    y1, c1 = R.layer_norm_forward(x, shape[1:], np.broadcast_to(w[:, None, None], shape[1:]).copy())
    y2, c2 = R.group_norm_forward(x, 1, w)
    assert_close(y1, y2)
    assert_close(R.layer_norm_backward(dy, c1)[0], R.group_norm_backward(dy, c2)[0])


@pytest.mark.parametrize("shape", [(2, 3, 7), (3, 4, 2, 3), (1, 2, 2, 1, 3)], ids=str)
def test_group_norm_with_c_groups_is_instance_norm(shape):
    c = shape[1]
    gn = NN.GroupNorm(c, c, dtype=F64)
    inorm = getattr(NN, f"InstanceNorm{len(shape) - 2}d")(c, affine=True, dtype=F64)
    run_twins(gn, inorm, lambda s: t(randn(shape, s, 2.0, s)), steps=2)
    x, dy = randn(shape, 9), randn(shape, 10)
    y1, c1 = R.group_norm_forward(x, c, randn(c, 1), randn(c, 2))
    y2, c2, _ = R.instance_norm_forward(x, randn(c, 1), randn(c, 2))
    assert_close(y1, y2)
    for g1, g2 in zip(R.group_norm_backward(dy, c1), R.instance_norm_backward(dy, c2), strict=True):
        assert_close(g1, g2)


ONE_HOT = {"IN": [0, -np.inf, -np.inf], "LN": [-np.inf, 0, -np.inf], "BN": [-np.inf, -np.inf, 0]}
SOFT_HOT = {k: [0.0 if z == 0 else -1e4 for z in v] for k, v in ONE_HOT.items()}  # exp(-1e4) == 0 in float64


def _target(branch, c, ndim):
    if branch == "IN":
        return getattr(torch.nn, f"InstanceNorm{ndim - 2}d")(c, affine=True, dtype=F64)
    if branch == "LN":
        return torch.nn.GroupNorm(1, c, dtype=F64)  # LN over (C, *spatial) with per-channel affine
    return getattr(torch.nn, f"BatchNorm{max(ndim - 2, 1)}d")(c, dtype=F64)


@pytest.mark.parametrize("logits", [ONE_HOT, SOFT_HOT], ids=["-inf", "-1e4"])
@pytest.mark.parametrize("branch,shape", [(b, s) for s in [(3, 2, 3, 2), (4, 3, 5), (5, 3)] for b in ("IN", "LN", "BN")
                                          if not (b == "IN" and len(s) == 2)], ids=str)  # (N, C): no IN branch
def test_switchable_norm_one_hot_is_in_ln_bn(logits, branch, shape):
    """Training and eval (the BN branch then uses its running statistics), outputs, input and
    affine gradients; the running statistics are always the BN branch's, equal to batch norm's."""
    c = shape[1]
    sn = (NN.SwitchableNorm2d if len(shape) == 4 else NN.SwitchableNorm1d)(c, dtype=F64)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor(logits[branch]))
        sn.var_weight.copy_(torch.tensor(logits[branch]))
    target = _target(branch, c, len(shape)) if len(shape) > 2 else (
        torch.nn.LayerNorm(c, dtype=F64) if branch == "LN" else torch.nn.BatchNorm1d(c, dtype=F64))
    shadow_bn = _target("BN", c, len(shape))
    make = lambda s: t(randn(shape, s, 1.0 + s, s))  # noqa: E731
    run_twins(sn, target, make, steps=3, lr=0.2, copy_state=False, common_only=True)
    for s in range(3):
        shadow_bn(make(s))
    assert_close(sn.running_mean, shadow_bn.running_mean)
    assert_close(sn.running_var, shadow_bn.running_var)
    assert int(sn.num_batches_tracked) == 3
    assert torch.isfinite(sn.mean_weight.grad[~torch.isinf(sn.mean_weight)]).all()


@pytest.mark.parametrize("cls,bn_cls,shape", [(NN.BatchRenorm1d, torch.nn.BatchNorm1d, (6, 3)),
                                              (NN.BatchRenorm2d, torch.nn.BatchNorm2d, (2, 3, 2, 3)),
                                              (NN.BatchRenorm3d, torch.nn.BatchNorm3d, (2, 2, 1, 2, 3))],
                         ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_renorm_with_rmax_1_dmax_0_is_batch_norm(cls, bn_cls, shape, momentum):
    brn = cls(shape[1], rmax=1.0, dmax=0.0, momentum=momentum, dtype=F64)
    bn = bn_cls(shape[1], momentum=momentum, dtype=F64)
    with torch.no_grad():  # running statistics far from the batch's: r, d would be far from (1, 0)
        brn.running_mean.fill_(5.0)
        brn.running_var.fill_(0.1)
    run_twins(brn, bn, lambda s: t(randn(shape, s, 1.0 + s, s)), steps=4, lr=0.2)


def test_masked_batch_norm_with_all_true_mask_is_batch_norm():
    mbn, bn = NN.MaskedBatchNorm1d(3, dtype=F64), torch.nn.BatchNorm1d(3, dtype=F64)
    ones = torch.ones(4, 5, dtype=torch.bool)
    run_twins(mbn, bn, lambda s: t(randn((4, 3, 5), s, 1.0 + s, s)), steps=3,
              call=lambda m, x: m(x, ones) if m is mbn else m(x))
    run_twins(mbn, bn, lambda s: t(randn((4, 3, 5), s, 1.0 + s, s)), steps=2,
              call=lambda m, x: m(x, None) if m is mbn else m(x))


@pytest.mark.parametrize("kw", [dict(), dict(affine=False, momentum=None)], ids=str)
def test_masked_batch_norm_is_batch_norm_over_the_gathered_valid_positions(kw):
    """The valid positions, gathered into (n_valid, C), through BatchNorm1d give the same outputs,
    gradients and running statistics; padded outputs and padded input gradients are exactly 0."""
    c, L = 3, 6
    mbn, bn = NN.MaskedBatchNorm1d(c, dtype=F64, **kw), torch.nn.BatchNorm1d(c, dtype=F64, **kw)
    opts = [torch.optim.SGD(m.parameters(), lr=0.3) for m in (mbn, bn)] if kw.get("affine", True) else []
    for step, lens in enumerate(([6, 2, 4, 1], [3, 3, 5, 6], [1, 6, 2, 2], [5, 1, 6, 3])):
        training = step < 3
        for m in (mbn, bn):
            m.train(training)
        mask = torch.arange(L)[None, :] < torch.tensor(lens)[:, None]
        x, dy = randn((4, c, L), step, 1.0 + step, step), t(randn((4, c, L), 50 + step))  # dy nonzero at padding too
        xm, xb = t(x, True), t(x, True)
        y = mbn(xm, mask)
        gather = xb.permute(0, 2, 1)[mask]  # (n_valid, C)
        yb = bn(gather)
        assert_close(y.permute(0, 2, 1)[mask], yb)
        assert torch.all(y.permute(0, 2, 1)[~mask] == 0)
        for o in opts:
            o.zero_grad()
        y.backward(dy)
        yb.backward(dy.permute(0, 2, 1)[mask])
        assert_close(xm.grad, xb.grad)
        assert torch.all(xm.grad.permute(0, 2, 1)[~mask] == 0)
        for (k, p), (_, q) in zip(mbn.named_parameters(), bn.named_parameters(), strict=True):
            assert_close(p.grad, q.grad, what=k)
        if training:
            for o in opts:
                o.step()
        assert_close(mbn.running_mean, bn.running_mean)
        assert_close(mbn.running_var, bn.running_var)
        assert int(mbn.num_batches_tracked) == int(bn.num_batches_tracked)
