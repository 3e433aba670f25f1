"""Seed article 001 and Ioffe & Szegedy 2015, Sec. 3.4: batch norm's mini-batch noise regularizes,
so batch-normalized nets need less dropout. Ghost batch norm (Hoffer et al. 2017) turns the noise up.

One MLP architecture on a small training set (so that it overfits) is trained in six variants
with the same initialization, data order, optimizer and step count:

==================  ===============================================================
``plain``           no normalization
``plain_dropout``   no normalization, dropout after each hidden activation
``bn``              batch norm, statistics over the whole mini-batch
``ghost<G>``        ghost batch norm: statistics over sub-batches of G examples of
                    each mini-batch (smaller G = noisier statistics), one per G
``bn_dropout``      batch norm and dropout
==================  ===============================================================

Evaluation uses running statistics (eval mode, dropout off) on the whole training set and
the test set; the generalization gap is train accuracy minus test accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from normlab import functional as NF
from normlab.lab import data as lab_data
from normlab.lab import models, plotting, training
from normlab.lab.verdict import combine, fmt, over_seeds, paired
from normlab.nn import BatchNorm1d

CLAIM = ("The noise of mini-batch statistics regularizes: with batch norm the train/test gap is smaller, noisier "
         "statistics (smaller ghost batches) shrink it further, and batch norm reduces the need for dropout "
         "(dropout gains less on top of it).")
SOURCE = ("Seed article 001; Ioffe & Szegedy 2015, Sec. 3.4 and 4.2.1 ('reduces the need for Dropout'); "
          "Hoffer, Hubara & Soudry 2017, 'Train longer, generalize better', ghost batch norm")
PUBLISHED = ("No number for a net this size. Ioffe & Szegedy: removing dropout from BN-Inception 'speeds up "
             "training, without increasing overfitting' (Sec. 4.2.1); Hoffer et al.: ghost batch norm (statistics "
             "over 128 examples inside large batches), with longer training, narrows the generalization gap of "
             "large-batch training on MNIST, CIFAR and ImageNet.")
SCALE_NOTE = ("A 2 x 128 MLP on 1000 MNIST-1D training sequences (an MLP reaches about 68% test accuracy on the full "
              "4000 in the data set's paper) for 500 SGD steps of 128, so every variant without dropout fits the "
              "training set almost perfectly and the gap is about 1 - test accuracy. Effects of a few points are "
              "within the seed-to-seed spread of 3 seeds, so parts of the claim may come out inconclusive at this "
              "scale; the full scale trains 4x longer with 5 ghost sizes. A gap that shrinks only because a net fits "
              "the training set less (the smallest ghost batches, dropout) shows in its train accuracy, quoted "
              "beside it.")


@dataclass(frozen=True)
class Config:
    data: str = "mnist1d"
    """Data set (normlab.lab.data), flattened for the MLP."""
    n_train: int = 1000
    """Training examples used (small, so the nets overfit and the gap is large)."""
    hidden: tuple[int, ...] = (128, 128)
    """Hidden layer widths."""
    steps: int = 500
    """SGD steps, the same for every variant."""
    batch_size: int = 128
    """Mini-batch size; plain batch norm takes its statistics over all of it."""
    ghost_sizes: tuple[int, ...] = (32, 8)
    """Ghost batch sizes below batch_size (each must divide it); batch_size itself is the 'bn' variant."""
    dropout: float = 0.5
    """Dropout probability after each hidden activation in the *_dropout variants."""
    lr: float = 0.05
    """SGD learning rate (all variants)."""
    momentum: float = 0.9
    """SGD momentum."""
    evals: int = 5
    """Points along training where train and test accuracy are measured (for the plot)."""


SCALES = {"smoke": Config(data="digits", n_train=200, hidden=(32,), steps=40, batch_size=32, ghost_sizes=(8,),
                          evals=2),
          "quick": Config(),
          "full": Config(steps=2000, ghost_sizes=(64, 32, 16, 8, 4), evals=20)}


def validate(config: Config) -> None:
    for g in config.ghost_sizes:
        if not 2 <= g < config.batch_size or config.batch_size % g:
            raise ValueError(f"ghost size {g} must be at least 2, below batch_size={config.batch_size} and divide it")
    if not 0.0 < config.dropout < 1.0:
        raise ValueError(f"dropout must be in (0, 1), got {config.dropout}")


class GhostBatchNorm1d(BatchNorm1d):
    """Batch norm whose training statistics come from sub-batches of ``ghost_batch_size`` examples
    (Hoffer et al. 2017): each ghost batch is normalized with its own mean and variance; the
    running statistics move by the average over the ghost batches, once per mini-batch.
    Evaluation (and a batch no larger than a ghost batch) is plain batch norm.

    Implemented as instance norm over the (ghosts, C, G) view of the (N, C) input, whose
    "instances" are the ghost batches: one fused call instead of a loop.
    """

    def __init__(self, num_features: int, ghost_batch_size: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.ghost_batch_size = ghost_batch_size

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        n, g = input.shape[0], self.ghost_batch_size
        if not self.training or n <= g:
            return super().forward(input)
        if input.dim() != 2 or n % g:
            raise ValueError(f"GhostBatchNorm1d expects (N, C) with N divisible by {g}, got {tuple(input.shape)}")
        c = input.shape[1]
        y = NF.instance_norm(input.view(n // g, g, c).transpose(1, 2), self.running_mean, self.running_var,
                             self.weight, self.bias, True, self.momentum, self.eps)
        self.num_batches_tracked.add_(1)
        return y.transpose(1, 2).reshape(n, c)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


def variants(config: Config) -> dict:
    """``{key: (ghost batch size or None for no norm, dropout probability)}`` in training order."""
    out = {"plain": (None, 0.0), "plain_dropout": (None, config.dropout), "bn": (config.batch_size, 0.0)}
    out.update({f"ghost{g}": (g, 0.0) for g in sorted(config.ghost_sizes, reverse=True)})
    out["bn_dropout"] = (config.batch_size, config.dropout)
    return out


def build(config: Config, in_features: int, num_classes: int, ghost, dropout: float) -> nn.Module:
    model = models.MLP(in_features, num_classes, config.hidden, norm="none", activation="relu")
    for block in model.blocks:
        if ghost is not None:
            block[1] = GhostBatchNorm1d(block[0].out_features, ghost)
        if dropout:
            block.append(nn.Dropout(dropout))
    return model


def run(config: Config, seed: int, progress) -> dict:
    ds = lab_data.load(config.data).flat().subset(n_train=config.n_train)
    tensors = training.Tensors.of(ds)
    eval_at = training.eval_points(config.steps, config.evals)
    todo = variants(config)

    def train_acc(step, model):
        return {"train_acc": training.evaluate(model, tensors.x_train, tensors.y_train)[0]}

    out = {}
    for i, (key, (ghost, p)) in enumerate(todo.items()):
        torch.manual_seed(seed)
        model = build(config, ds.input_shape[0], ds.num_classes, ghost, p)
        h = training.train(model, tensors, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                           momentum=config.momentum, seed=seed, eval_at=eval_at, on_eval=train_acc,
                           progress=lambda f, i=i: progress((i + f) / len(todo)))
        final_train = training.evaluate(model, tensors.x_train, tensors.y_train)[0]  # also after a divergence
        out[key] = {"step": h["step"], "test_acc": h["test_acc"], "train_acc": h["train_acc"],
                    "diverged": h["diverged"], "final_train_acc": final_train, "gap": final_train - h["final_acc"]}
    return out


def summarize(config: Config, runs: list) -> dict:
    keys = list(variants(config))
    smallest = f"ghost{min(config.ghost_sizes)}"
    s = {"smallest_ghost": min(config.ghost_sizes), "batch_size": config.batch_size,
         "ghost_axis": [config.batch_size] + sorted(config.ghost_sizes, reverse=True)}
    for k in keys:
        s[f"train_acc_{k}"] = [r[k]["final_train_acc"] for r in runs]
        s[f"test_acc_{k}"] = [r[k]["test_acc"][-1] for r in runs]
        s[f"gap_{k}"] = [r[k]["gap"] for r in runs]
    s["gap_by_ghost"] = [[r["bn"]["gap"]] + [r[f"ghost{g}"]["gap"] for g in s["ghost_axis"][1:]] for r in runs]
    s["bn_narrows_gap"] = [a - b for a, b in zip(s["gap_plain"], s["gap_bn"])]
    s["ghost_narrows_gap"] = [a - b for a, b in zip(s["gap_bn"], s[f"gap_{smallest}"])]
    s["dropout_gain_plain"] = [a - b for a, b in zip(s["test_acc_plain_dropout"], s["test_acc_plain"])]
    s["dropout_gain_bn"] = [a - b for a, b in zip(s["test_acc_bn_dropout"], s["test_acc_bn"])]
    s["measured"] = (f"gap (train - test acc): plain {fmt(s['gap_plain'])}, BN {fmt(s['gap_bn'])}, ghost "
                     f"{s['smallest_ghost']} {fmt(s[f'gap_{smallest}'])}; dropout's test-acc gain: without BN "
                     f"{fmt(s['dropout_gain_plain'], signed=True)}, with BN {fmt(s['dropout_gain_bn'], signed=True)}")
    return s


def verdict(s: dict):
    g = s["smallest_ghost"]
    return combine([
        (paired(s["gap_plain"], s["gap_bn"]),
         f"BN narrows the gap: plain {fmt(s['gap_plain'])} > BN {fmt(s['gap_bn'])} (train acc "
         f"{fmt(s['train_acc_plain'])} vs {fmt(s['train_acc_bn'])})"),
        (paired(s["gap_bn"], s[f"gap_ghost{g}"]),
         f"smaller ghost batches narrow it further: BN over {s['batch_size']} {fmt(s['gap_bn'])} > ghost {g} "
         f"{fmt(s[f'gap_ghost{g}'])} (train acc {fmt(s[f'train_acc_ghost{g}'])})"),
        (paired(s["dropout_gain_plain"], s["dropout_gain_bn"]),
         f"BN reduces the need for dropout: dropout's test-acc gain without BN "
         f"{fmt(s['dropout_gain_plain'], signed=True)} > with BN {fmt(s['dropout_gain_bn'], signed=True)}"),
    ])


LABELS = {"plain": "no norm", "plain_dropout": "no norm + dropout", "bn": "BN", "bn_dropout": "BN + dropout"}


def plots(config: Config, runs: list, summary: dict, out_dir) -> list:
    keys = list(variants(config))
    cmap = plotting.cmap("viridis")
    colors = {"plain": plotting.color("none"), "plain_dropout": "#ff9896", "bn": plotting.color("batch"),
              "bn_dropout": "#aec7e8"}
    ghosts = sorted(config.ghost_sizes, reverse=True)
    for j, g in enumerate(ghosts):
        colors[f"ghost{g}"] = cmap(0.5 + 0.4 * j / max(1, len(ghosts) - 1))

    fig, (ax1, ax2) = plotting.figure(ncols=2, width=5.2)
    x = np.arange(len(keys))
    for ax, what, title in ((ax1, "gap", "train - test accuracy (gap)"), (ax2, "test_acc", "test accuracy")):
        vals = np.array([[r[k][what] if what == "gap" else r[k][what][-1] for k in keys] for r in runs])
        m = vals.mean(0)
        sd = vals.std(0, ddof=1) if len(runs) > 1 else np.zeros_like(m)
        ax.bar(x, m, yerr=sd, color=[colors[k] for k in keys], capsize=3)
        ax.set_xticks(x, [LABELS.get(k, f"ghost BN {k[5:]}") for k in keys], rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=title, title=f"{title} after {config.steps} steps")
        lo = float((m - sd).min())
        ax.set_ylim(max(0.0, lo - 0.1), min(1.0, float((m + sd).max()) + 0.05))
    plotting.save(fig, out_dir / "gap.png")

    fig, axes = plotting.figure(ncols=2, width=5.2)
    for k in keys:
        label = LABELS.get(k, f"ghost BN {k[5:]}")
        for ax, what in zip(axes, ("train_acc", "test_acc")):
            plotting.band(ax, runs[0][k]["step"], [r[k][what] for r in runs], label, colors[k])
    axes[0].set(xlabel="training step", ylabel="train accuracy (eval mode)", title="training set")
    axes[1].set(xlabel="training step", ylabel="test accuracy", title="test set")
    axes[1].legend(fontsize=7)
    plotting.save(fig, out_dir / "curves.png")
    return [("gap.png", f"Generalization gap and test accuracy per variant ({over_seeds(len(runs))}); "
                        f"ghost BN normalizes over sub-batches of the {config.batch_size}-example mini-batch."),
            ("curves.png", "Train and test accuracy along training (eval mode: running statistics, no dropout), "
                           f"{over_seeds(len(runs))}.")]
