"""Activations and gradients through a deep sigmoid net, with and without batch norm (NumPy).

The seed article's demonstration, with :mod:`normlab.reference` doing the batch norm forward
and backward passes: X ~ U(0, 1) of shape 100x20 through five 64-unit sigmoid layers with
W ~ N(0, 1). The same weights serve both nets. A random linear read-out of the last layer,
``loss = mean(h_L @ r)`` with r ~ N(0, 1), gives the gradients; their per-layer norms show
whether the signal reaches the first layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from normlab.lab import plotting
from normlab.lab.verdict import combine, fmt, over_seeds, paired
from normlab.reference import batch_norm_backward, batch_norm_forward

CLAIM = ("In a deep sigmoid net with N(0, 1) weights the activations saturate layer by layer (piling up at 0 and 1) "
         "and the gradients vanish towards the input; batch norm before each sigmoid keeps the activations spread "
         "and the gradients alive.")
SOURCE = "Seed article: NumPy histogram of activations through five sigmoid layers"
PUBLISHED = "The article shows the histograms only (no numbers): plain layers pile up at 0 and 1, BN layers stay bell-shaped."
SCALE_NOTE = ("Exact arithmetic on a 100-sample batch at initialization: no training is involved, so every scale shows "
              "the effect fully; seeds change X, W and the read-out.")


@dataclass(frozen=True)
class Config:
    n: int = 100
    """Samples in the batch X."""
    d: int = 20
    """Input features; X ~ U(0, 1)."""
    layers: int = 5
    """Sigmoid layers."""
    width: int = 64
    """Units per layer."""
    weight_std: float = 1.0
    """Standard deviation of the Gaussian weights (the article uses 1)."""
    saturation: float = 0.05
    """An activation counts as saturated below this or above 1 minus it (at 0.05 the sigmoid's slope y(1 - y) there is
    under 0.0475, about a fifth of its 0.25 peak)."""
    bins: int = 25
    """Histogram bins over [0, 1]."""


SCALES = {"smoke": Config(layers=3, width=16), "quick": Config(), "full": Config(n=1000)}


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _forward_backward(x, weights, r, bn: bool) -> tuple:
    hs, caches, h = [], [], x
    for w in weights:
        z = h @ w
        cache = None
        if bn:
            z, cache, _ = batch_norm_forward(z)
        h = _sigmoid(z)
        hs.append(h)
        caches.append(cache)
    grad_norms = [0.0] * len(weights)
    dh = np.broadcast_to(r / len(x), hs[-1].shape)  # d mean(h_L @ r) / d h_L
    for i in reversed(range(len(weights))):
        dz = dh * hs[i] * (1 - hs[i])
        if bn:
            dz, _, _ = batch_norm_backward(dz, caches[i])
        h_in = x if i == 0 else hs[i - 1]
        grad_norms[i] = float(np.linalg.norm(h_in.T @ dz))
        dh = dz @ weights[i].T
    return hs, grad_norms


def validate(config: Config) -> None:
    if config.n < 2:
        raise ValueError(f"n is the batch whose statistics batch norm uses and must be at least 2, got {config.n}")
    if not config.weight_std > 0:  # negative: numpy's "scale < 0" in every run; 0: no signal, a log10 of 0 / 0
        raise ValueError(f"weight_std is the weights' standard deviation and must be positive, got {config.weight_std}")
    if not 0.0 < config.saturation < 0.5:  # 0: nothing counts as saturated; 0.5: everything does, in both nets
        raise ValueError(f"saturation is a distance from 0 and 1 and must be in (0, 0.5), got {config.saturation}")


def run(config: Config, seed: int, progress) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(config.n, config.d))
    weights = [rng.normal(0.0, config.weight_std, size=(config.d if i == 0 else config.width, config.width))
               for i in range(config.layers)]
    r = rng.standard_normal(config.width)
    out = {}
    for key, bn in (("plain", False), ("bn", True)):
        hs, grads = _forward_backward(x, weights, r, bn)
        s = config.saturation
        out[key] = {"mean": [float(h.mean()) for h in hs], "var": [float(h.var()) for h in hs],
                    "saturated": [float(np.mean((h < s) | (h > 1 - s))) for h in hs],
                    "grad_norm": grads,
                    "hist": [np.histogram(h, bins=config.bins, range=(0.0, 1.0))[0].tolist() for h in hs]}
        progress(0.5 if key == "plain" else 1.0)
    return out


def summarize(config: Config, runs: list) -> dict:
    last = config.layers - 1
    sat = {k: [r[k]["saturated"][last] for r in runs] for k in ("plain", "bn")}
    # log10 of first-layer over last-layer gradient norm: very negative = vanishing towards the input
    decay = {k: [float(np.log10(r[k]["grad_norm"][0] / r[k]["grad_norm"][last])) for r in runs] for k in ("plain", "bn")}
    summary = {
        "saturated_last_plain": sat["plain"], "saturated_last_bn": sat["bn"],
        "grad_decay_plain": decay["plain"], "grad_decay_bn": decay["bn"],
        "var_per_layer_plain": np.mean([r["plain"]["var"] for r in runs], axis=0).tolist(),
        "var_per_layer_bn": np.mean([r["bn"]["var"] for r in runs], axis=0).tolist(),
        "mean_per_layer_plain": np.mean([r["plain"]["mean"] for r in runs], axis=0).tolist(),
        "mean_per_layer_bn": np.mean([r["bn"]["mean"] for r in runs], axis=0).tolist(),
    }
    summary["measured"] = (f"layer {config.layers} saturated: plain {fmt(sat['plain'], percent=True)} vs BN "
                           f"{fmt(sat['bn'], percent=True)}; log10 |grad W1|/|grad W{config.layers}|: plain "
                           f"{fmt(decay['plain'], 2)} vs BN {fmt(decay['bn'], 2)}")
    return summary


def verdict(summary: dict):
    sp, sb = summary["saturated_last_plain"], summary["saturated_last_bn"]
    dp, db = summary["grad_decay_plain"], summary["grad_decay_bn"]
    return combine([
        (paired(sp, sb), f"last layer saturated: plain {fmt(sp, percent=True)} > BN {fmt(sb, percent=True)}"),
        (paired(db, dp), f"gradient kept towards the input (log10 first/last layer norm): BN {fmt(db, 2)} > "
                         f"plain {fmt(dp, 2)}"),
    ])


def plots(config: Config, runs: list, summary: dict, out_dir) -> list:
    edges = np.linspace(0, 1, config.bins + 1)
    fig, axes = plotting.subplots(2, config.layers, figsize=(2.1 * config.layers + 1, 4.4), sharex=True, squeeze=False)
    for row, (key, label) in enumerate((("plain", "plain"), ("bn", "with BN"))):
        for i in range(config.layers):
            counts = np.mean([r[key]["hist"][i] for r in runs], axis=0)
            ax = axes[row][i]
            ax.bar(edges[:-1], counts / counts.sum(), width=edges[1] - edges[0], align="edge",
                   color=plotting.color("none" if key == "plain" else "batch"))
            ax.set_title(f"layer {i + 1}, {label}", fontsize=9)
            if i == 0:
                ax.set_ylabel("share of activations")
            if row == 1:
                ax.set_xlabel("sigmoid output")
    plotting.save(fig, out_dir / "histograms.png")

    fig, (ax1, ax2) = plotting.figure(ncols=2, width=5.0)
    layers = np.arange(1, config.layers + 1)
    for key, label, col in (("plain", "plain", "none"), ("bn", "with BN", "batch")):
        plotting.band(ax1, layers, [r[key]["var"] for r in runs], label, plotting.color(col), marker="o")
        plotting.band(ax2, layers, [r[key]["grad_norm"] for r in runs], label, plotting.color(col), marker="o")
    ax1.set(xlabel="layer", ylabel="variance of activations", title="spread of the sigmoid outputs")
    ax2.set(xlabel="layer", ylabel="|dL/dW| (log scale)", yscale="log", title="gradient norm per layer")
    for ax in (ax1, ax2):
        ax.set_xticks(layers)
        ax.legend()
    plotting.save(fig, out_dir / "variance_gradients.png")
    return [("histograms.png", f"Sigmoid outputs per layer (share of the {config.n}x{config.width} activations, "
                               f"{over_seeds(len(runs), 'mean')}): plain (top) and with batch norm (bottom)."),
            ("variance_gradients.png", "Variance of the activations and gradient norm of each layer's weights "
                                       f"({over_seeds(len(runs))}). Vanishing is the fall from the last layer to the "
                                       "first; the levels differ because batch norm divides by the pre-activations' "
                                       "spread, which N(0, 1) weights make large.")]
