"""The seed article's experiment, small enough for a terminal: activations of a deep sigmoid
network with and without batch normalization, computed with :mod:`normlab.reference`."""
from __future__ import annotations

import numpy as np

from normlab.reference import batch_norm_forward


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def sigmoid_stack(seed: int = 0, layers: int = 5, width: int = 64, n: int = 100, d: int = 20) -> list:
    """Per layer: mean, variance and saturated share of the sigmoid outputs, plain and with
    batch norm (training mode, gamma=1, beta=0) before each sigmoid. The same weights serve both."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(n, d))
    weights = [rng.standard_normal((d if i == 0 else width, width)) for i in range(layers)]
    rows = []
    h_plain, h_bn = x, x
    for i, w in enumerate(weights):
        h_plain = sigmoid(h_plain @ w)
        z, _, _ = batch_norm_forward(h_bn @ w)
        h_bn = sigmoid(z)
        sat = lambda h: float(np.mean((h < 0.05) | (h > 0.95)))  # noqa: E731
        rows.append(dict(layer=i + 1, plain_mean=float(h_plain.mean()), plain_var=float(h_plain.var()),
                         plain_saturated=sat(h_plain), bn_mean=float(h_bn.mean()), bn_var=float(h_bn.var()),
                         bn_saturated=sat(h_bn)))
    return rows
