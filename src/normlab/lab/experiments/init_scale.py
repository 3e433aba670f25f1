"""cs231n (assignment 2, "batch normalization and initialization"): a deep net with batch norm is far
less sensitive to the scale of its initial weights.

An 8-layer ReLU MLP (seven hidden layers of 50) with every weight ~ N(0, scale^2), for
scales on a log grid from 1e-4 to 1, trained with Adam with and without batch norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from normlab.lab import data as lab_data
from normlab.lab import models, plotting, training
from normlab.lab.verdict import combine, fmt, over_seeds, paired

CLAIM = ("Batch normalization makes a deep network much more robust to the scale of its weight initialization: "
         "without it only a narrow band of scales trains.")
SOURCE = "Stanford cs231n, assignment 2, BatchNormalization.ipynb ('Batch normalization and initialization')"
PUBLISHED = ("cs231n's plot (8-layer net, 1000 CIFAR-10 images, 20 scales 1e-4..1): the baseline trains only near "
             "scale 1e-1, the BN net over most of the range. No numbers are published.")
SCALE_NOTE = ("5 scales instead of 20 and 8x8 digits instead of CIFAR-10; the effect at the extremes (1e-4: signals "
              "vanish, 1: they explode) is large, so this scale suffices to see it.")


@dataclass(frozen=True)
class Config:
    data: str = "digits"
    """Data set (normlab.lab.data)."""
    n_train: int = 1000
    """Training images used (cs231n: 1000)."""
    hidden: tuple[int, ...] = (50, 50, 50, 50, 50, 50, 50)
    """Hidden layer widths (cs231n: seven of 50)."""
    scales: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    """Weight scales: every weight ~ N(0, scale^2) (cs231n: 20 on logspace(-4, 0))."""
    steps: int = 200
    """Training steps (10 epochs of 1000 images at batch 50, as cs231n)."""
    batch_size: int = 50
    """Mini-batch size."""
    lr: float = 1e-3
    """Adam learning rate (cs231n: 1e-3)."""
    robust_margin: float = 0.1
    """"Much more robust": BN's worst accuracy over the scales must beat the plain net's by more than this
    (0.1 = 10 points; a plain net at a scale that does not train sits at chance, 10% on digits)."""


SCALES = {"smoke": Config(hidden=(16, 16), scales=(1e-3, 1.0), steps=20, n_train=200), "quick": Config(),
          "full": Config(scales=tuple(float(x) for x in np.logspace(-4, 0, 20)), steps=1000)}
DATA_PARALLEL = True  # --nproc N: run() trains only through training.train, the same calls on every process
NORMS = {"plain": "none", "bn": "batch"}


def validate(config: Config) -> None:
    if any(not s > 0 for s in config.scales):  # standard deviations, on a log axis (a negative one failed every run)
        raise ValueError(f"scales are standard deviations of the weights and must be positive, got {config.scales}")
    if len(set(config.scales)) < 2:  # one scale: the range over scales is 0 for both nets, a verdict about nothing
        raise ValueError(f"scales needs at least 2 different scales (robustness is across scales), got {config.scales}")


def run(config: Config, seed: int, progress) -> dict:
    ds = lab_data.load(config.data).flat().subset(n_train=config.n_train)
    tensors = training.Tensors.of(ds)
    out = {key: [] for key in NORMS}
    jobs = [(k, sc) for k in NORMS for sc in config.scales]
    for i, (key, scale) in enumerate(jobs):
        torch.manual_seed(seed)
        model = models.init_gaussian_(models.MLP(ds.input_shape[0], ds.num_classes, config.hidden, norm=NORMS[key]),
                                      scale)
        h = training.train(model, tensors, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                           optimizer="adam", seed=seed, progress=lambda f, i=i: progress((i + f) / len(jobs)))
        out[key].append({"scale": scale, "final_acc": h["final_acc"], "diverged": h["diverged"]})
    return out


def summarize(config: Config, runs: list) -> dict:
    s = {"scales": list(config.scales), "robust_margin": config.robust_margin}
    for key in NORMS:
        acc = [[x["final_acc"] for x in r[key]] for r in runs]
        s[f"acc_by_scale_{key}"] = acc
        s[f"worst_acc_{key}"] = [min(a) for a in acc]
        s[f"range_{key}"] = [max(a) - min(a) for a in acc]
    s["measured"] = (f"worst final acc over scales {config.scales[0]:g}..{config.scales[-1]:g}: BN "
                     f"{fmt(s['worst_acc_bn'])} vs plain {fmt(s['worst_acc_plain'])}; best-minus-worst: BN "
                     f"{fmt(s['range_bn'])} vs plain {fmt(s['range_plain'])}")
    return s


def verdict(s: dict):
    return combine([
        (paired(s["worst_acc_bn"], s["worst_acc_plain"], s["robust_margin"]),
         f"worst accuracy over the scales BN {fmt(s['worst_acc_bn'])} > plain {fmt(s['worst_acc_plain'])} by more "
         f"than {s['robust_margin']:g}"),
        (paired(s["range_plain"], s["range_bn"]),
         f"accuracy range over the scales BN {fmt(s['range_bn'])} < plain {fmt(s['range_plain'])}"),
    ])


def plots(config: Config, runs: list, summary: dict, out_dir) -> list:
    fig, ax = plotting.figure()
    for key, label in (("plain", "without BN"), ("bn", "with BN")):
        plotting.band(ax, config.scales, summary[f"acc_by_scale_{key}"], label, plotting.color(NORMS[key]), marker="o")
    ax.set(xlabel="weight initialization scale (std of every weight)", ylabel="final test accuracy",
           ylim=(0, 1), title=f"{len(config.hidden) + 1}-layer net after {config.steps} Adam steps")
    plotting.log_x(ax, config.scales if len(config.scales) <= 8 else config.scales[::4])
    ax.legend()
    plotting.save(fig, out_dir / "init_scale.png")
    return [("init_scale.png", f"Final test accuracy vs initialization scale ({over_seeds(len(runs))}).")]
