"""Klambauer et al. 2017, self-normalizing networks: deep SELU MLPs keep their activations near zero
mean and unit variance without any normalization layer.

Deep MLPs (``depth`` hidden layers of ``width`` units) on standardized inputs, in variants:

================  ==========================================================================
``selu``          SELU (:class:`normlab.nn.SELU`), weights from :func:`normlab.nn.lecun_normal_`
``selu_dropout``  the same with :class:`normlab.nn.AlphaDropout` after each SELU (optional)
``relu``          ReLU with He (Kaiming-normal) weights: the best plain ReLU initialization
``relu_bn``       ReLU with batch norm before each activation, He weights
================  ==========================================================================

Per layer, the mean and variance of the activations (over units and examples of a probe of
test inputs) are measured at initialization, for the standardized inputs and for inputs
scaled by other factors (a net that self-normalizes pulls them back towards (0, 1); a ReLU
net, being positively homogeneous, keeps the scale: its variance grows with the square of
the input's), and again after training. Batch-norm nets are probed in training mode (batch
statistics), the AlphaDropout net in training mode (dropout on), the others in eval mode.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from normlab.lab import data as lab_data
from normlab.lab import models, plotting, training
from normlab.lab.verdict import check, combine, fmt, over_seeds, paired
from normlab.nn import SELU, AlphaDropout, lecun_normal_

CLAIM = ("With SELU activations and LeCun-normal weights, activations converge towards zero mean and unit variance "
         "layer after layer (an attracting fixed point), so very deep feed-forward nets train without normalization "
         "layers, better than plain ReLU nets and than ReLU nets with batch normalization.")
SOURCE = "Klambauer, Unterthiner, Mayr & Hochreiter 2017, Self-Normalizing Neural Networks, Theorem 1, Fig. 1, Sec. 4"
PUBLISHED = ("Theorem 1: the SELU layer map has a stable, attracting fixed point at mean 0, variance 1 for (mean, var) "
             "in [-0.1, 0.1] x [0.8, 1.5] (weights per unit with sum near 0 and squared sum near 1); Fig. 1: 8-, 16- "
             "and 32-layer SNNs train on MNIST and CIFAR-10 with lower-variance, faster-falling training loss than "
             "batch-normalized nets; Sec. 4: SNNs have the best average rank among feed-forward nets (plain, BN, LN, "
             "WN, highway, residual ...) on 121 UCI tasks and the best result on Tox21. No number for this setup.")
SCALE_NOTE = ("Activation statistics at initialization are exact forward passes, so every scale shows them; the "
              "finite width (64) makes each layer's weights only approximately normalized, so the deepest layer's "
              "variance wanders by about ±0.1-0.2 around 1 from seed to seed. Accuracy comes from 400 SGD steps on "
              "MNIST-1D (about 13 epochs) with one learning rate for every net, not the paper's per-method "
              "hyper-parameter search on UCI data: it says which net trains faster at this budget, and the "
              "comparison with batch norm may come out either way. The AlphaDropout net's initial statistics are measured "
              "at every scale (dropout on); it is trained at full scale only.")


@dataclass(frozen=True)
class Config:
    data: str = "mnist1d"
    """Data set (normlab.lab.data), flattened and standardized per feature with training statistics."""
    depth: int = 16
    """Hidden layers (the paper's Fig. 1: 8, 16 and 32)."""
    width: int = 64
    """Units per hidden layer."""
    steps: int = 400
    """SGD steps, the same for every net."""
    batch_size: int = 128
    """Mini-batch size."""
    lr: float = 0.01
    """SGD learning rate, the same for every net."""
    momentum: float = 0.9
    """SGD momentum."""
    alpha_dropout: float = 0.05
    """AlphaDropout rate (the paper recommends 0.05 or 0.1) for the selu_dropout net."""
    train_dropout: bool = False
    """Also train the selu_dropout net (its initial statistics are always measured)."""
    input_scales: tuple[float, ...] = (0.3, 1.0, 3.0)
    """Factors on the standardized probe inputs at initialization (1.0 must be one of them)."""
    probe: int = 500
    """Test examples on which the activation statistics are taken."""
    mean_bound: float = 0.1
    """Near the fixed point means |mean| <= mean_bound (Theorem 1's domain: mean in [-0.1, 0.1])."""
    var_range: tuple[float, ...] = (0.8, 1.5)
    """... and variance in this (low, high) range (Theorem 1's domain: variance in [0.8, 1.5])."""
    evals: int = 4
    """Test-accuracy evaluations along training."""


SCALES = {"smoke": Config(data="digits", depth=8, width=32, steps=30, probe=100, evals=2),
          "quick": Config(),
          "full": Config(depth=32, width=128, steps=3000, train_dropout=True, evals=20)}


def validate(config: Config) -> None:
    if 1.0 not in config.input_scales or any(s <= 0 for s in config.input_scales):
        raise ValueError(f"input_scales must be positive and include 1.0, got {config.input_scales}")
    if len(config.var_range) != 2 or not 0 < config.var_range[0] < 1 < config.var_range[1]:
        raise ValueError(f"var_range must be (low, high) around 1, got {config.var_range}")
    if not config.mean_bound > 0:  # |mean| <= 0 holds for no measured mean: the fixed point could never be found
        raise ValueError(f"mean_bound must be positive, got {config.mean_bound}")
    if not 0.0 < config.alpha_dropout < 1.0:
        raise ValueError(f"alpha_dropout must be in (0, 1), got {config.alpha_dropout}")


def variants(config: Config) -> list:
    return ["selu", "selu_dropout", "relu", "relu_bn"] if config.train_dropout else ["selu", "relu", "relu_bn"]


def build(config: Config, kind: str, in_features: int, num_classes: int) -> nn.Module:
    model = models.MLP(in_features, num_classes, (config.width,) * config.depth,
                       norm="batch" if kind == "relu_bn" else "none", activation="relu")
    for block in model.blocks:
        linear = block[0]
        if kind.startswith("selu"):
            block[2] = SELU()
            lecun_normal_(linear.weight)
            if kind == "selu_dropout":
                block.append(AlphaDropout(config.alpha_dropout))
        else:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
    if kind.startswith("selu"):
        lecun_normal_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    return model


@torch.no_grad()
def layer_stats(model: nn.Module, x: torch.Tensor, train_mode: bool) -> dict:
    """Mean and variance of each hidden block's output (over examples and units), on a copy of
    ``model`` in training (batch statistics, dropout on) or eval mode."""
    m = copy.deepcopy(model).train(train_mode)
    means, variances = [], []
    for block in m.blocks:
        x = block(x)
        means.append(float(x.mean()))
        variances.append(float(x.var()))
    return {"mean": means, "var": variances}


def _probe_mode(kind: str) -> bool:
    return kind in ("relu_bn", "selu_dropout")


def standardized(ds):
    mu = ds.x_train.mean(0)
    sd = ds.x_train.std(0) + 1e-6
    return dataclasses.replace(ds, x_train=(ds.x_train - mu) / sd, x_test=(ds.x_test - mu) / sd)


def run(config: Config, seed: int, progress) -> dict:
    ds = standardized(lab_data.load(config.data).flat())
    tensors = training.Tensors.of(ds)
    probe = tensors.x_test[: config.probe]
    kinds = variants(config)
    out = {}
    if "selu_dropout" not in kinds:  # not trained at this scale: its initial statistics only
        torch.manual_seed(seed)
        model = build(config, "selu_dropout", ds.input_shape[0], ds.num_classes)
        out["selu_dropout"] = {"init": {str(s): layer_stats(model, probe * s, True) for s in config.input_scales}}
    for i, kind in enumerate(kinds):
        torch.manual_seed(seed)
        model = build(config, kind, ds.input_shape[0], ds.num_classes)
        init = {str(s): layer_stats(model, probe * s, _probe_mode(kind)) for s in config.input_scales}
        h = training.train(model, tensors, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                           momentum=config.momentum, seed=seed,
                           eval_at=training.eval_points(config.steps, config.evals),
                           progress=lambda f, i=i: progress((i + f) / len(kinds)))
        out[kind] = {"init": init, "trained": layer_stats(model, probe, _probe_mode(kind)), "step": h["step"],
                     "test_acc": h["test_acc"], "final_acc": h["final_acc"], "diverged": h["diverged"]}
    return out


def _inside(config: Config, mean: float, var: float) -> bool:
    return abs(mean) <= config.mean_bound and config.var_range[0] <= var <= config.var_range[1]


def summarize(config: Config, runs: list) -> dict:
    one = "1.0"
    others = [str(s) for s in config.input_scales if s != 1.0]
    s = {"depth": config.depth, "mean_bound": config.mean_bound, "var_range": list(config.var_range),
         "input_scales": list(config.input_scales)}
    for kind in ("selu", "selu_dropout", "relu", "relu_bn"):
        if kind not in runs[0]:
            continue
        s[f"last_mean_{kind}"] = [r[kind]["init"][one]["mean"][-1] for r in runs]
        s[f"last_var_{kind}"] = [r[kind]["init"][one]["var"][-1] for r in runs]
        for sc in others:
            s[f"last_var_{kind}_x{sc}"] = [r[kind]["init"][sc]["var"][-1] for r in runs]
        if "final_acc" in runs[0][kind]:
            s[f"acc_{kind}"] = [r[kind]["final_acc"] for r in runs]
            s[f"trained_last_var_{kind}"] = [r[kind]["trained"]["var"][-1] for r in runs]
    s["selu_inside"] = [float(_inside(config, m, v)) for m, v in zip(s["last_mean_selu"], s["last_var_selu"])]
    # attraction: for inputs off scale, how much closer to variance 1 (in |log var|) the last layer is than the first
    pull = lambda v: abs(math.log(v[0])) - abs(math.log(v[-1]))  # noqa: E731 - first minus last layer
    s["selu_pull"] = [min(pull(r["selu"]["init"][sc]["var"]) for sc in others) if others else float("nan")
                      for r in runs]
    s["measured"] = (f"layer {config.depth} at init: SELU mean {fmt(s['last_mean_selu'], 2, signed=True)}, var "
                     f"{fmt(s['last_var_selu'], 2)} (with AlphaDropout on {fmt(s['last_var_selu_dropout'], 2)}; ReLU "
                     f"{fmt(s['last_var_relu'], 2)}); test acc SELU "
                     f"{fmt(s['acc_selu'])} vs ReLU {fmt(s['acc_relu'])} vs ReLU+BN {fmt(s['acc_relu_bn'])}")
    return s


def verdict(s: dict):
    lo, hi = s["var_range"]
    scales = [x for x in s["input_scales"] if x != 1.0]
    parts = [
        (check(s["selu_inside"], 0.5),
         f"fixed point: SELU layer {s['depth']} at init has mean {fmt(s['last_mean_selu'], 3, signed=True)} within "
         f"±{s['mean_bound']} and variance {fmt(s['last_var_selu'], 2)} within [{lo}, {hi}] (in "
         f"{int(sum(s['selu_inside']))}/{len(s['selu_inside'])} seeds)"),
    ]
    if scales:
        parts.append((check(s["selu_pull"], 0.0),
                      f"attraction: inputs scaled by {', '.join(map(str, scales))} end closer to variance 1 than "
                      f"they start (|log var| first minus last layer, worst scale) "
                      f"{fmt(s['selu_pull'], 2, signed=True)} > 0"))
    parts += [
        (paired(s["acc_selu"], s["acc_relu"]),
         f"beats plain ReLU: test acc {fmt(s['acc_selu'])} > {fmt(s['acc_relu'])}"),
        (paired(s["acc_selu"], s["acc_relu_bn"]),
         f"beats ReLU + BN: test acc {fmt(s['acc_selu'])} > {fmt(s['acc_relu_bn'])}"),
    ]
    return combine(parts)


STYLE = {"selu": ("SELU", "#2ca02c"), "selu_dropout": ("SELU + AlphaDropout", "#98df8a"),
         "relu": ("ReLU (He init)", plotting.color("none")), "relu_bn": ("ReLU + BN", plotting.color("batch"))}


def plots(config: Config, runs: list, summary: dict, out_dir) -> list:
    layers = np.arange(1, config.depth + 1)
    kinds = [k for k in STYLE if k in runs[0]]
    fig, (ax1, ax2) = plotting.figure(ncols=2, width=5.2)
    for k in kinds:
        label, col = STYLE[k]
        plotting.band(ax1, layers, [r[k]["init"]["1.0"]["mean"] for r in runs], label, col, marker=".")
        plotting.band(ax2, layers, [r[k]["init"]["1.0"]["var"] for r in runs], label, col, marker=".")
    ax1.axhspan(-config.mean_bound, config.mean_bound, color="gray", alpha=0.15, label="Theorem 1 domain")
    ax2.axhspan(*config.var_range, color="gray", alpha=0.15, label="Theorem 1 domain")
    ax1.set(xlabel="hidden layer", ylabel="mean of activations", title="mean per layer at initialization")
    ax2.set(xlabel="hidden layer", ylabel="variance of activations (log)", yscale="log",
            title="variance per layer at initialization")
    ax1.legend(fontsize=8)
    plotting.save(fig, out_dir / "layer_stats.png")

    fig, axes = plotting.figure(ncols=2, width=5.2)
    for ax, k in zip(axes, ("selu", "relu")):
        for j, sc in enumerate(config.input_scales):
            plotting.band(ax, layers, [r[k]["init"][str(sc)]["var"] for r in runs], f"inputs x {sc}",
                          plt_color(j, len(config.input_scales)), marker=".")
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set(xlabel="hidden layer", ylabel="variance of activations (log)", yscale="log",
               title=f"{STYLE[k][0]}: inputs at other scales")
        ax.legend(fontsize=8)
    plotting.save(fig, out_dir / "attraction.png")

    fig, (ax1, ax2) = plotting.figure(ncols=2, width=5.2)
    trained = [k for k in kinds if "test_acc" in runs[0][k]]
    for k in trained:
        label, col = STYLE[k]
        plotting.band(ax1, runs[0][k]["step"], [r[k]["test_acc"] for r in runs], label, col)
        plotting.band(ax2, layers, [r[k]["trained"]["var"] for r in runs], label, col, marker=".")
    ax1.set(xlabel="training step", ylabel="test accuracy", title=f"{config.depth}-layer MLPs on {config.data}")
    ax2.axhspan(*config.var_range, color="gray", alpha=0.15)
    ax2.set(xlabel="hidden layer", ylabel="variance of activations (log)", yscale="log",
            title="variance per layer after training")
    ax1.legend(fontsize=8)
    plotting.save(fig, out_dir / "training.png")
    return [("layer_stats.png", f"Mean and variance of each hidden layer's activations at initialization on "
                                f"{config.probe} standardized test inputs ({over_seeds(len(runs))}); grey: "
                                "the domain of Theorem 1 around the fixed point (0, 1). BN and AlphaDropout nets are "
                                "probed in training mode."),
            ("attraction.png", "Variance per layer at initialization for inputs scaled by each factor: SELU pulls them "
                               "towards 1, ReLU (positively homogeneous) keeps the input's scale."),
            ("training.png", f"Test accuracy along training, and the variance per layer after training "
                             f"({over_seeds(len(runs))}).")]


def plt_color(j: int, n: int):
    return plotting.cmap("plasma")(0.1 + 0.7 * j / max(1, n - 1))
