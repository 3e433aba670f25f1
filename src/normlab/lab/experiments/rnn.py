"""Ba, Kiros & Hinton 2016: layer normalization speeds up the training of recurrent networks,
where batch normalization is awkward (it needs statistics per time step).

A one-layer GRU and LSTM (:class:`normlab.lab.models.RNNClassifier`) with the norm inside the
cell (Ba et al., eq. 20-22: the input and recurrent projections normalized apart, and the
LSTM's cell state): ``none`` (the plain cell), ``layer`` (LN) and ``batch`` (BN over the
batch at each time step, one BatchNorm module shared by all steps, so its running averages
pool every step's statistics). All three train from the same initialization, data order and
learning rate (Adam) on generated sequences (sine waves whose period gives the class,
:func:`normlab.lab.data.make_padded_seq` with every sequence of full length, so no padding).

Measured per seed and cell:

- *steps to target*: the first evaluation step at which a net's test accuracy reaches the
  plain cell's final test accuracy (the plain cell itself needs at most all the steps);
- *final accuracy* of each net;
- *BN's statistics gap*: BN's test accuracy in inference mode (its shared running averages)
  against its accuracy with batch statistics at every time step (train mode, batches of the
  training size, on a copy of the model). LN computes the same thing in both modes (gap 0).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.patches import Patch

from normlab.lab import data as lab_data
from normlab.lab import models, parallel, plotting, training
from normlab.lab.verdict import combine, fmt, over_seeds, paired

CLAIM = ("Layer normalization speeds up the training of recurrent networks (LN-LSTM/GRU reach a given accuracy in "
         "fewer steps than the plain cell), whereas batch normalization is awkward in them: it needs statistics per "
         "time step, which running averages shared over time do not give.")
SOURCE = ("Ba, Kiros & Hinton 2016, Layer Normalization, Sec. 3.1 and Sec. 6 (order embeddings, attentive reader, "
          "skip-thoughts: training curves); per-time-step BN statistics: Cooijmans et al. 2016, Recurrent BN")
PUBLISHED = ("Ba et al. give training curves, not a steps-to-target table: in their recurrent experiments the LN "
             "models converge faster than the unnormalized baselines (and, for the attentive reader, than BN-LSTM). "
             "Cooijmans et al. 2016 make BN work in an LSTM by keeping separate population statistics for each time "
             "step, which is the awkwardness this experiment measures when they are shared.")
SCALE_NOTE = ("A 32-unit cell on length-16 synthetic sequences for 150 Adam steps (quick) instead of large LSTMs on "
              "text for days: the plain cells are still learning when training stops, which is where a speed-up "
              "shows, but a small cell with an adaptive optimizer has little hidden-state instability for LN to fix, "
              "so a smaller effect than the paper's is expected. LN's benefit depends on the learning rate: in pilot "
              "runs at lr 0.01 (instead of the default 0.003, chosen before looking) the plain LSTM was faster than "
              "LN-LSTM. LN of a projection of very few input features discards their scale (a 1-2 feature input, "
              "e.g. raw MNIST-1D, trains badly with LN), so these sequences have 8 features. BN's gap is measured "
              "with one shared BatchNorm per projection, as a naive implementation has; test-time lengths and small "
              "batches, the other BN troubles Ba et al. name, are not measured here.")


@dataclass(frozen=True)
class Config:
    cells: tuple[str, ...] = ("gru", "lstm")
    """Recurrent cells to test ('gru', 'lstm')."""
    norms: tuple[str, ...] = ("none", "layer", "batch")
    """Norms inside the cell (normlab.nn.make_norm, token-wise or batch); the verdict needs none, layer and batch."""
    length: int = 16
    """Length of every sequence (no padding: each time step sees a full batch)."""
    num_features: int = 8
    """Features per time step."""
    num_classes: int = 6
    """Classes (sine periods spread between 3 and 12 steps)."""
    noise: float = 1.0
    """Std of the Gaussian noise added to the sine features (the task's difficulty)."""
    n_train: int = 2000
    """Training sequences."""
    n_test: int = 500
    """Test sequences."""
    hidden_size: int = 32
    """Hidden units of the cell."""
    steps: int = 150
    """Training steps per net."""
    batch_size: int = 32
    """Mini-batch size."""
    lr: float = 0.003
    """Adam learning rate, the same for every net."""
    evals: int = 10
    """Evaluation points along training (plus step 0): the resolution of steps-to-target."""
    gap_margin: float = 0.02
    """BN's statistics gap counts when its accuracy with running averages is this much below (0.02 = 2 points)."""


SCALES = {"smoke": Config(length=8, n_train=256, n_test=128, hidden_size=16, steps=12, evals=3),
          "quick": Config(),
          "full": Config(length=40, n_train=4000, n_test=1000, hidden_size=64, steps=2000, evals=20)}


def validate(config: Config) -> None:
    missing = [n for n in ("none", "layer", "batch") if n not in config.norms]
    if missing:
        raise ValueError(f"norms must include none, layer and batch (the verdict compares them); missing {missing}")
    for c in config.cells:
        for n in config.norms:
            models.RNNClassifier(2, 2, 2, cell=c, norm=n)  # raises ValueError for a bad cell or norm
    if config.length < 2 or config.steps < 1 or config.evals < 1:
        raise ValueError("length must be at least 2, steps and evals at least 1")


def data_parallel(config: Config):
    """--nproc N: every norm in ``norms`` must be one that can be synchronized across processes."""
    return parallel.check_norms(config.norms)


def _data(config: Config) -> lab_data.Dataset:
    return lab_data.make_padded_seq(n_train=config.n_train, n_test=config.n_test, min_len=config.length,
                                    max_len=config.length, num_features=config.num_features,
                                    num_classes=config.num_classes, noise=config.noise, seed=0)


@torch.no_grad()
def batch_stats_accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Test accuracy with batch statistics at every time step (train mode, batches of ``batch_size``),
    on a copy, so the model's running averages stay as they are."""
    m = copy.deepcopy(model).train()
    correct = seen = 0
    for i in range(0, len(x), batch_size):
        xb = x[i: i + batch_size]
        if len(xb) < 2:  # a batch of one has no batch statistics
            break
        correct += (m(xb).argmax(1) == y[i: i + batch_size]).sum().item()
        seen += len(xb)
    return correct / max(seen, 1)


def run(config: Config, seed: int, progress) -> dict:
    ds = _data(config)
    tensors = training.Tensors.of(ds)
    tensors.mask_train = tensors.mask_test = None  # every sequence is full length
    eval_at = [0] + training.eval_points(config.steps, config.evals)
    jobs = [(c, n) for c in config.cells for n in config.norms]
    out = {c: {} for c in config.cells}
    for i, (cell, norm) in enumerate(jobs):
        torch.manual_seed(seed)
        model = models.RNNClassifier(config.num_features, config.hidden_size, ds.num_classes, cell=cell, norm=norm)
        h = training.train(model, tensors, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                           optimizer="adam", seed=seed, eval_at=eval_at,
                           progress=lambda f, i=i: progress((i + f) / len(jobs)))
        h["acc_batch_stats"] = batch_stats_accuracy(model, tensors.x_test, tensors.y_test, config.batch_size)
        out[cell][norm] = h
    return out


def steps_to(steps: list, acc: list, target: float) -> float:
    """First evaluation step whose accuracy reaches ``target``; inf if none does."""
    hits = [s for s, a in zip(steps, acc) if a is not None and a >= target - 1e-12]
    return float(hits[0]) if hits else math.inf


def censored(values: list, steps: int, interval: float) -> list:
    """Step counts with "never" (inf) replaced by one evaluation interval past the end: a lower
    bound, so one seed that never gets there weighs like a late seed, not like infinity, in a mean."""
    return [v if math.isfinite(v) else steps + interval for v in values]


def fmt_steps(values: list) -> str:
    """Mean ± sd of step counts, or the per-seed list when some never reached the target."""
    if all(math.isfinite(v) for v in values):
        return fmt(values, 0)
    return "[" + ", ".join("never" if not math.isfinite(v) else f"{v:.0f}" for v in values) + "]"


def summarize(config: Config, runs: list) -> dict:
    s = {"cells": list(config.cells), "norms": list(config.norms), "steps": config.steps,
         "eval_interval": config.steps / config.evals, "gap_margin": config.gap_margin}
    parts = []
    for c in config.cells:
        target = [r[c]["none"]["test_acc"][-1] for r in runs]
        s[f"target_{c}"] = target
        for n in config.norms:
            s[f"steps_to_target_{c}_{n}"] = [steps_to(r[c][n]["step"], r[c][n]["test_acc"], t)
                                             for r, t in zip(runs, target)]
            s[f"final_acc_{c}_{n}"] = [r[c][n]["test_acc"][-1] for r in runs]
            s[f"batch_stats_acc_{c}_{n}"] = [r[c][n]["acc_batch_stats"] for r in runs]
            s[f"gap_{c}_{n}"] = [b - a for a, b in zip(s[f"final_acc_{c}_{n}"], s[f"batch_stats_acc_{c}_{n}"])]
        parts.append(f"{c.upper()}: steps to the plain cell's final acc {fmt(target)}: LN "
                     f"{fmt_steps(s[f'steps_to_target_{c}_layer'])} vs plain "
                     f"{fmt_steps(s[f'steps_to_target_{c}_none'])} of {config.steps}; final acc LN "
                     f"{fmt(s[f'final_acc_{c}_layer'])}, plain {fmt(s[f'final_acc_{c}_none'])}, BN "
                     f"{fmt(s[f'final_acc_{c}_batch'])} (with batch statistics {fmt(s[f'batch_stats_acc_{c}_batch'])})")
    s["measured"] = "; ".join(parts)
    return s


def verdict(s: dict):
    parts = []
    for c in s["cells"]:
        ln, plain = s[f"steps_to_target_{c}_layer"], s[f"steps_to_target_{c}_none"]
        late = lambda v: censored(v, s["steps"], s["eval_interval"])  # noqa: E731
        parts.append((paired(late(plain), late(ln)),
                      f"{c.upper()}: LN reaches the plain cell's final test acc {fmt(s[f'target_{c}'])} sooner: "
                      f"{fmt_steps(ln)} < {fmt_steps(plain)} steps (never = one evaluation interval past the end)"))
    for c in s["cells"]:
        parts.append((paired(s[f"gap_{c}_batch"], [0.0] * len(s[f"gap_{c}_batch"]), s["gap_margin"]),
                      f"{c.upper()}: BN with running averages shared over time steps loses more than "
                      f"{100 * s['gap_margin']:.0f} points against per-step batch statistics: "
                      f"{fmt(s[f'final_acc_{c}_batch'])} vs {fmt(s[f'batch_stats_acc_{c}_batch'])} "
                      f"(gap {fmt(s[f'gap_{c}_batch'], signed=True)}; LN's gap "
                      f"{fmt(s[f'gap_{c}_layer'], signed=True)})"))
    return combine(parts)


LABELS = {"none": "plain", "layer": "LN", "batch": "BN over time"}


def plots(config: Config, runs: list, summary: dict, out_dir) -> list:
    fig, axes = plotting.figure(ncols=len(config.cells), width=4.8)
    axes = np.atleast_1d(axes)
    for ax, c in zip(axes, config.cells):
        for n in config.norms:
            plotting.band(ax, runs[0][c][n]["step"], [r[c][n]["test_acc"] for r in runs], LABELS.get(n, n),
                          plotting.color(n))
        ax.axhline(float(np.mean(summary[f"target_{c}"])), color="gray", ls="--", lw=1,
                   label="plain cell's final acc")
        ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1), title=f"{c.upper()}")
        ax.legend(loc="lower right", fontsize=8)
    plotting.save(fig, out_dir / "curves.png")

    fig, ax = plotting.figure(width=6.5)
    groups = [(c, n) for c in config.cells for n in config.norms]
    x = np.arange(len(groups))
    kinds = (("final_acc", "inference mode (running averages)", None, 1.0),
             ("batch_stats_acc", "batch statistics at each time step", "//", 0.5))
    for k, (key, _, hatch, alpha) in enumerate(kinds):
        vals = [summary[f"{key}_{c}_{n}"] for c, n in groups]
        ax.bar(x + (k - 0.5) * 0.38, [np.mean(v) for v in vals], 0.38,
               yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals], capsize=3,
               color=[plotting.color(n) for _, n in groups], alpha=alpha, hatch=hatch, edgecolor="black",
               linewidth=0.5)
    ax.set_xticks(x, [f"{c.upper()}\n{LABELS.get(n, n)}" for c, n in groups], fontsize=8)
    ax.set(ylabel="test accuracy", ylim=(0, 1.15), title="Final test accuracy with each kind of statistics")
    ax.legend(handles=[Patch(facecolor="lightgray", edgecolor="black", hatch=hatch, alpha=alpha, label=label)
                       for _, label, hatch, alpha in kinds], fontsize=8, loc="upper right", ncols=2)
    plotting.save(fig, out_dir / "statistics.png")
    return [("curves.png", f"Test accuracy along training for each cell and norm ({over_seeds(len(runs))}); "
                           "the dashed line is the target for steps-to-target."),
            ("statistics.png", "Final test accuracy in inference mode vs with batch statistics at every time step "
                               f"({over_seeds(len(runs))}). Only BN differs: its running averages pool all time "
                               "steps.")]
