"""The lab's training loop: what its history holds when a run diverges."""
from __future__ import annotations

import math

import numpy as np
import torch

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
