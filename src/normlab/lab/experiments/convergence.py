"""Seed article 001: a fully connected net reaches its accuracy in far fewer epochs with batch norm.

The plain net trains for ``epochs`` epochs; its final test accuracy is the target. The same
net with batch norm after each linear layer trains alike; we count the epochs it needs to
reach that target (evaluated after every epoch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from normlab.lab import data as lab_data
from normlab.lab import models, plotting, training
from normlab.lab.verdict import Verdict, check, fmt, over_seeds

CLAIM = ("With batch normalization a fully connected network reaches the accuracy the plain network has after 100 "
         "epochs in 20-30 epochs.")
SOURCE = "Seed article 001: FC vs FC+BN, 20-30 epochs vs 100"
PUBLISHED = "BN needs 20-30% of the baseline's epochs (20-30 vs 100)."
SCALE_NOTE = ("Quick scale: 40 epochs of MNIST-1D (4000 training sequences, harder than MNIST: an MLP reaches ~68% "
              "in its paper) with SGD + momentum; the claim is read as a ratio (BN's epochs / the baseline's), so a "
              "shorter baseline still tests it, though the baseline has not converged after 40 epochs; full scale "
              "runs the 100 epochs.")


@dataclass(frozen=True)
class Config:
    data: str = "mnist1d"
    """Data set (normlab.lab.data)."""
    hidden: tuple[int, ...] = (100, 100, 100)
    """Hidden layer widths."""
    activation: str = "relu"
    """Hidden activation."""
    epochs: int = 40
    """Epochs of the baseline (the article: 100); BN gets the same."""
    batch_size: int = 128
    """Mini-batch size."""
    lr: float = 0.01
    """SGD learning rate (both nets)."""
    momentum: float = 0.9
    """SGD momentum."""
    claimed_ratio: float = 0.3
    """The claim: BN needs at most this share of the baseline's epochs (30 of 100)."""


SCALES = {"smoke": Config(data="digits", hidden=(32,), epochs=3), "quick": Config(), "full": Config(epochs=100)}


DATA_PARALLEL = True  # --nproc N: run() trains only through training.train, the same calls on every process
def run(config: Config, seed: int, progress) -> dict:
    ds = lab_data.load(config.data).flat()
    tensors = training.Tensors.of(ds)
    per_epoch = len(ds.x_train) // config.batch_size
    steps = per_epoch * config.epochs
    out = {"steps_per_epoch": per_epoch}
    for i, (key, norm) in enumerate((("plain", "none"), ("bn", "batch"))):
        torch.manual_seed(seed)
        model = models.MLP(ds.input_shape[0], ds.num_classes, config.hidden, norm=norm, activation=config.activation)
        out[key] = training.train(model, tensors, steps=steps, batch_size=config.batch_size, lr=config.lr,
                                  momentum=config.momentum, seed=seed,
                                  eval_at=[per_epoch * (e + 1) for e in range(config.epochs)],
                                  progress=lambda f, i=i: progress((i + f) / 2))
    return out


def epochs_to(acc: list, target: float) -> float:
    """First epoch (1-based) whose test accuracy reaches ``target``; inf if none does."""
    hits = np.flatnonzero(np.asarray(acc, float) >= target)
    return float(hits[0] + 1) if len(hits) else math.inf


def summarize(config: Config, runs: list) -> dict:
    target = [r["plain"]["test_acc"][-1] for r in runs]
    bn_epochs = [epochs_to(r["bn"]["test_acc"], t) for r, t in zip(runs, target)]
    ratio = [e / config.epochs for e in bn_epochs]
    s = {"target_acc": target, "bn_epochs_to_target": bn_epochs, "ratio": ratio,
         "final_acc_plain": target, "final_acc_bn": [r["bn"]["test_acc"][-1] for r in runs],
         "epochs": config.epochs, "claimed_ratio": config.claimed_ratio}
    shown = fmt(bn_epochs, 1) if all(map(math.isfinite, bn_epochs)) else f"{bn_epochs} (inf = never)"
    s["measured"] = (f"BN reaches the baseline's final acc {fmt(target)} after {shown} of {config.epochs} epochs "
                     f"(ratio {fmt(ratio, 2)}; claim <= {config.claimed_ratio}); final acc BN {fmt(s['final_acc_bn'])}")
    return s


def verdict(s: dict):
    label = check(s["ratio"], s["claimed_ratio"], above=False, inclusive=True)  # "at most": 30 of 100 holds
    return Verdict(label, f"BN's epochs to the baseline's final accuracy / baseline's epochs: {fmt(s['ratio'], 2)} "
                          f"<= {s['claimed_ratio']} (seed: 20-30 of 100); final test acc BN {fmt(s['final_acc_bn'])} vs plain "
                          f"{fmt(s['final_acc_plain'])}")


def plots(config: Config, runs: list, summary: dict, out_dir) -> list:
    fig, ax = plotting.figure()
    epochs = np.arange(1, config.epochs + 1)
    for key, label, norm in (("plain", "FC", "none"), ("bn", "FC + BN", "batch")):
        plotting.band(ax, epochs, [r[key]["test_acc"] for r in runs], label, plotting.color(norm))
    ax.axhline(float(np.mean(summary["target_acc"])), color="gray", ls="--", lw=1, label="baseline's final accuracy")
    finite = [e for e in summary["bn_epochs_to_target"] if math.isfinite(e)]
    if finite:
        ax.axvline(float(np.mean(finite)), color=plotting.color("batch"), ls=":", lw=1, label="BN reaches it (mean)")
    ax.set(xlabel="epoch", ylabel="test accuracy", title=f"{config.data}: FC vs FC + BN")
    ax.legend(loc="lower right")
    plotting.save(fig, out_dir / "convergence.png")
    return [("convergence.png", f"Test accuracy per epoch ({over_seeds(len(runs))}); the dashed line is the "
                                "baseline's final accuracy, the dotted line where BN first reaches it.")]
