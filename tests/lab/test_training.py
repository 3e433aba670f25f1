"""The lab's training loop: what its history holds when a run diverges."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from normlab.lab import data, models, training
from normlab.lab.experiments import bn_mnist


def test_a_run_that_diverges_keeps_every_on_eval_list_as_long_as_step():
    ds = data.load("digits").flat().subset(n_train=64, n_test=50)
    torch.manual_seed(0)
    model = models.MLP(ds.input_shape[0], ds.num_classes, (8,))
    hist = training.train(model, training.Tensors.of(ds), steps=20, batch_size=16, lr=1e6, seed=0,
                          eval_at=[0, 5, 10, 15], diverge_loss=2.0, on_eval=lambda step, m: {"at": step})
    assert hist["diverged"] and hist["diverged_step"] <= 5
    assert hist["step"] == [0, 5, 10, 15, 20] and hist["at"] == hist["step"]
    assert all(math.isinf(v) for v in hist["test_loss"][1:])


def test_bn_mnist_run_with_a_net_that_diverges_before_its_first_evaluation_still_returns_its_history():
    config = bn_mnist.Config(data="digits", hidden=(16, 16), steps=20, evals=2, probe=50, lr=1e5)
    out = bn_mnist.run(config, 0, lambda f: None)
    for key in bn_mnist.NORMS:
        h = out[key]
        assert len(h["pct_unit0"]) == len(h["step"]) and len(h["drift"]) == 16
    assert any(out[k]["diverged"] for k in bn_mnist.NORMS)
    for key in bn_mnist.NORMS:  # a diverged net's drift is undefined (NaN: its seed cannot support the claim)
        assert np.isnan(out[key]["drift"]).all() == out[key]["diverged"]
    assert np.asarray(out["plain"]["pct_unit0"]).shape == (len(out["plain"]["step"]), 3)


def test_batches_take_every_full_batch_of_an_epoch_including_a_batch_of_all_rows():
    gen, ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    it = training.batches(8, 4, gen)
    perm = torch.randperm(8, generator=ref)
    assert [next(it).tolist() for _ in range(2)] == [perm[:4].tolist(), perm[4:].tolist()]  # n % batch_size == 0
    whole = training.batches(5, 5, torch.Generator().manual_seed(1))
    assert sorted(next(whole).tolist()) == [0, 1, 2, 3, 4]


def test_evaluate_counts_a_last_batch_of_one_row():
    torch.manual_seed(0)
    model = models.MLP(4, 3, (5,))
    x, y = torch.randn(9, 4), torch.tensor([0, 1, 2] * 3)
    assert training.evaluate(model, x, y, batch_size=4) == pytest.approx(training.evaluate(model, x, y))


def test_sgd_momentum_keeps_its_own_buffer_and_frozen_parameters_are_not_decayed():
    """With gradients accumulated over backward passes (no zero_grad in between) the momentum buffer must
    not be the gradient tensor itself; a frozen parameter is not decayed. The reference is torch.optim.SGD's
    update written out (importing torch.optim costs seconds: see training.SGD)."""
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    m.bias.requires_grad_(False)
    frozen, w = m.bias.detach().clone(), m.weight.detach().clone()
    opt = training.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(6, 4)
    grad, buf = torch.zeros_like(w), None
    for _ in range(3):
        m(x).square().sum().backward()  # accumulates into .grad
        opt.step()
        w_ = w.clone().requires_grad_()
        (x @ w_.T + frozen).square().sum().backward()
        grad = grad + w_.grad
        buf = grad if buf is None else 0.9 * buf + grad
        w = w - 0.1 * buf
    assert torch.allclose(m.weight, w, rtol=1e-5, atol=1e-6)
    training.SGD(m.parameters(), lr=0.1, weight_decay=0.5).step()
    assert torch.equal(m.bias, frozen)


def test_adam_takes_no_momentum():
    with pytest.raises(ValueError, match="adam takes no momentum"):
        training.make_optimizer("adam", nn.Linear(2, 2).parameters(), 0.1, momentum=0.9)


def test_eval_points_round_to_the_nearest_step():
    assert training.eval_points(10, 3) == [3, 7, 10]


def test_a_nan_loss_is_a_divergence_and_a_nan_test_loss_reads_inf():
    torch.manual_seed(0)
    t = training.Tensors(torch.randn(32, 4), torch.arange(32) % 3, torch.randn(20, 4), torch.arange(20) % 3)
    model = models.MLP(4, 3, (8,))
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    hist = training.train(model, t, steps=3, batch_size=8, lr=0.1, seed=0, eval_at=[0])
    assert hist["diverged"] and hist["diverged_step"] == 1
    assert hist["test_loss"] == [float("inf")] * 2  # step 0 (NaN measured) and step 3 (after the divergence)
