"""Ioffe & Szegedy 2015, BN-x5 / BN-x30: batch norm lets a network train at much higher learning rates.

One MLP with and without batch norm, trained at the base learning rate times each
multiplier. A run diverges when its training loss becomes non-finite or exceeds 1000. A
multiplier "trains" when the run does not diverge and keeps at least half of the best
accuracy gain over chance that the same net reached at any multiplier.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from normlab.lab import data as lab_data
from normlab.lab import models, plotting, training
from normlab.lab.verdict import combine, fmt, over_seeds, paired

CLAIM = ("Batch normalization enables higher learning rates: the BN network trains at 5x and 30x the baseline's "
         "rate (BN-x5, BN-x30) and reaches a higher accuracy, where without BN such rates diverge.")
SOURCE = "Ioffe & Szegedy 2015, Batch Normalization, Sec. 4.2.2 and Fig. 3 (BN-x5, BN-x30)"
PUBLISHED = ("Inception on ImageNet, max accuracy: baseline 72.2%, BN-Baseline 72.7%, BN-x5 73.0%, BN-x30 74.8%; steps "
             "to 72.2%: 31.0M, 13.3M, 2.1M, 2.7M. The plain Inception at higher rates is not reported as trainable.")
SCALE_NOTE = ("An MLP on MNIST-1D for a few hundred steps, not Inception on ImageNet: it tests whether BN keeps "
              "training at rates where the plain net fails, and which reaches the better accuracy at its best rate. "
              "The grid 0.05 x (1..100) spans 0.05 to 5 so that it contains each net's best rate and its limit; the "
              "comparison (largest rate that trains, best accuracy over rates) does not depend on which rate is "
              "called 1x. The paper's BN-x30 also changed other things (no dropout, less L2, faster decay) that are "
              "not reproduced.")


@dataclass(frozen=True)
class Config:
    data: str = "mnist1d"
    """Data set (normlab.lab.data)."""
    hidden: tuple[int, ...] = (100, 100, 100)
    """Hidden layer widths (ReLU)."""
    base_lr: float = 0.05
    """The learning rate at multiplier 1, plain SGD (the grid must span both nets' limits; see the scale note)."""
    multipliers: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0)
    """Learning-rate multipliers (the paper: 1, 5, 30)."""
    steps: int = 600
    """Training steps per run."""
    batch_size: int = 64
    """Mini-batch size."""
    evals: int = 6
    """Evaluation points per run."""


SCALES = {"smoke": Config(data="digits", hidden=(32,), multipliers=(1.0, 30.0), steps=40, evals=2),
          "quick": Config(), "full": Config(multipliers=(1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0), steps=5000,
                                             evals=20)}
DATA_PARALLEL = True  # --nproc N: run() trains only through training.train, the same calls on every process
NORMS = {"plain": "none", "bn": "batch"}


def run(config: Config, seed: int, progress) -> dict:
    ds = lab_data.load(config.data).flat()
    tensors = training.Tensors.of(ds)
    out = {key: [] for key in NORMS}
    jobs = [(k, m) for k in NORMS for m in config.multipliers]
    for i, (key, mult) in enumerate(jobs):
        torch.manual_seed(seed)
        model = models.MLP(ds.input_shape[0], ds.num_classes, config.hidden, norm=NORMS[key])
        h = training.train(model, tensors, steps=config.steps, batch_size=config.batch_size,
                           lr=config.base_lr * mult, seed=seed, eval_at=training.eval_points(config.steps, config.evals),
                           progress=lambda f, i=i: progress((i + f) / len(jobs)))
        out[key].append({"multiplier": mult, "step": h["step"], "test_acc": h["test_acc"], "final_acc": h["final_acc"],
                         "best_acc": h["best_acc"], "diverged": h["diverged"], "diverged_step": h["diverged_step"]})
    out["chance"] = 1.0 / ds.num_classes
    return out


def largest_trainable(results: list, chance: float) -> float:
    """The largest multiplier whose run did not diverge and kept at least half of the net's best gain over chance."""
    best = max(r["best_acc"] for r in results)
    ok = [r["multiplier"] for r in results if not r["diverged"] and r["final_acc"] - chance >= 0.5 * (best - chance)]
    return max(ok) if ok else 0.0


def summarize(config: Config, runs: list) -> dict:
    s = {"multipliers": list(config.multipliers)}
    for key in NORMS:
        s[f"largest_trainable_{key}"] = [largest_trainable(r[key], r["chance"]) for r in runs]
        s[f"best_acc_{key}"] = [max(x["best_acc"] for x in r[key]) for r in runs]
        s[f"final_acc_by_mult_{key}"] = [[x["final_acc"] for x in r[key]] for r in runs]
        s[f"diverged_{key}"] = [sum(x["diverged"] for x in r[key]) for r in runs]
    top = config.multipliers[-1]
    s["measured"] = (f"largest trainable multiplier: BN {fmt(s['largest_trainable_bn'], 1)} vs plain "
                     f"{fmt(s['largest_trainable_plain'], 1)} (of {top:g}); best acc BN {fmt(s['best_acc_bn'])} vs "
                     f"plain {fmt(s['best_acc_plain'])}")
    return s


def verdict(s: dict):
    log = lambda v: [float(np.log2(max(x, 1e-3))) for x in v]  # noqa: E731 - compare multipliers on a log scale
    return combine([
        (paired(log(s["largest_trainable_bn"]), log(s["largest_trainable_plain"])),
         f"higher rates: largest multiplier that trains BN {fmt(s['largest_trainable_bn'], 1)} > plain "
         f"{fmt(s['largest_trainable_plain'], 1)}"),
        (paired(s["best_acc_bn"], s["best_acc_plain"]),
         f"higher accuracy at the best rate: BN {fmt(s['best_acc_bn'])} > plain {fmt(s['best_acc_plain'])}"),
    ])


def plots(config: Config, runs: list, summary: dict, out_dir) -> list:
    fig, ax = plotting.figure()
    for key, label in (("plain", "without BN"), ("bn", "with BN")):
        plotting.band(ax, config.multipliers, summary[f"final_acc_by_mult_{key}"], label, plotting.color(NORMS[key]),
                      marker="o")
        for r in runs:  # mark diverged runs
            for x in r[key]:
                if x["diverged"]:
                    ax.scatter([x["multiplier"]], [x["final_acc"]], marker="x", color=plotting.color(NORMS[key]),
                               zorder=3)
    ax.set(xlabel=f"learning-rate multiplier (base {config.base_lr:g})", ylabel="final test accuracy",
           ylim=(0, 1), title="accuracy vs learning rate (x = diverged run)")
    plotting.log_x(ax, config.multipliers)
    ax.legend()
    plotting.save(fig, out_dir / "learning_rate.png")
    return [("learning_rate.png", f"Final test accuracy after {config.steps} steps at each learning-rate multiplier "
                                  f"({over_seeds(len(runs))}); crosses mark runs that diverged.")]
