"""Ba, Kiros & Hinton 2016, Table 1: what batch norm, weight norm and layer norm are invariant to.

One layer's summed inputs ``a_i = w_i^T x`` (weight matrix W of shape (H, D), a batch X of
shape (N, D), no bias) and their *normalized* versions before gain and bias:

* batch norm: ``(a_i - mean_batch(a_i)) / std_batch(a_i)``, per unit over the N cases;
* weight norm: ``a_i / ||w_i||`` (mean 0, sigma = ||w_i||, Ba et al. eq. 5 and Sec. 5.1);
* layer norm: ``(a_i - mean_units(a)) / std_units(a)``, per case over the H units.

Each transformation of the paper is applied and the largest change of the normalized inputs,
relative to their largest magnitude, is measured; a cell is "Inv" when that change is below
``tolerance`` in every seed and implementation. The transformations (Sec. 5.1):

==========================  ===============================================================
weight-matrix re-scaling    W -> delta W
weight-matrix re-centering  w_i -> w_i + gamma for every i (the same vector added to each row)
weight-vector re-scaling    w_j -> delta w_j for one unit j
dataset re-scaling          x_n -> delta x_n for every case
dataset re-centering        x_n -> x_n + gamma for every case
single-case re-scaling      x_m -> delta x_m for one case m
==========================  ===============================================================

The statistics are computed twice: by the NumPy reference (:mod:`normlab.reference`) and by
the torch layers (:mod:`normlab.nn`), both in float64 and with ``eps = 0`` as in the paper
(a positive eps makes the scale invariances hold only approximately, by O(eps / var)).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from normlab.lab import plotting
from normlab.lab.verdict import Verdict, check, mean_sd, over_seeds, pm, too_few_seeds

CLAIM = ("Under re-scaling and re-centering of the weights and the data, the normalized summed inputs of batch "
         "norm, weight norm and layer norm are invariant exactly as Table 1 says (BN Inv/No/Inv/Inv/Inv/No, "
         "WN Inv/No/Inv/No/No/No, LN Inv/Inv/No/Inv/No/Inv).")
SOURCE = "Ba, Kiros & Hinton 2016, Layer Normalization, Table 1 (invariance properties, Sec. 5.1)"
TRANSFORMS = ("weight-matrix re-scaling", "weight-matrix re-centering", "weight-vector re-scaling",
              "dataset re-scaling", "dataset re-centering", "single-case re-scaling")
SHORT = ("W re-scale", "W re-center", "w_j re-scale", "data re-scale", "data re-center", "x_m re-scale")
METHODS = {"batch": "Batch norm", "weight": "Weight norm", "layer": "Layer norm"}
PAPER = {"batch": ("Inv", "No", "Inv", "Inv", "Inv", "No"),
         "weight": ("Inv", "No", "Inv", "No", "No", "No"),
         "layer": ("Inv", "Inv", "No", "Inv", "No", "Inv")}
PUBLISHED = "Table 1 (columns: " + ", ".join(TRANSFORMS) + "): " + "; ".join(
    f"{m} {'/'.join(PAPER[k])}" for k, m in (("batch", "BN"), ("weight", "WN"), ("layer", "LN")))
SCALE_NOTE = ("Exact arithmetic on one layer at a random point, no training: every scale shows the whole table. "
              "Seeds draw new W, X, delta, gamma and the re-scaled unit and case; the scales only change the "
              "layer's size. 'Inv' means the largest change of the normalized summed inputs is below the "
              "tolerance in float64 (about 1e-15 is reached); a 'No' cell changes by a sizeable fraction.")
BACKENDS = ("reference", "torch")


@dataclass(frozen=True)
class Config:
    n: int = 32
    """Cases in the batch X (N)."""
    d: int = 20
    """Input features (D)."""
    h: int = 16
    """Units of the layer (H); W has shape (H, D)."""
    delta_range: tuple[float, ...] = (0.1, 10.0)
    """Re-scaling factors delta are drawn log-uniformly from this (low, high) range, one per transformation."""
    shift_std: float = 1.0
    """Re-centering vectors gamma have N(0, shift_std^2) entries."""
    input_mean: float = 0.5
    """X ~ N(input_mean, 1): a non-zero mean, as real activations have."""
    eps: float = 0.0
    """Added to the variance by BN and LN (the paper's definitions have none)."""
    tolerance: float = 1e-9
    """A cell is 'Inv' when the largest relative change is below this in every seed and backend."""


SCALES = {"smoke": Config(n=8, d=6, h=5), "quick": Config(), "full": Config(n=256, d=100, h=64)}


def validate(config: Config) -> None:
    if len(config.delta_range) != 2 or not 0 < config.delta_range[0] <= config.delta_range[1]:
        raise ValueError(f"delta_range must be (low, high) with 0 < low <= high, got {config.delta_range}")
    if tuple(config.delta_range) == (1.0, 1.0):  # every delta 1: the re-scalings move nothing
        raise ValueError("delta_range (1, 1) makes every re-scaling the identity; give factors other than 1")
    if config.n < 3 or config.h < 3:
        raise ValueError("need n >= 3 cases and h >= 3 units (batch and layer statistics of 2 values are degenerate)")
    if not config.shift_std > 0:  # negative: numpy's "scale < 0" in every run; 0: the re-centerings move nothing
        raise ValueError(f"shift_std is the re-centering vectors' standard deviation and must be positive, "
                         f"got {config.shift_std}")
    if not config.tolerance > 0:  # a cell is Inv when its change is below it: at 0 no cell can be
        raise ValueError(f"tolerance must be positive, got {config.tolerance}")


# -- the normalized summed inputs, twice ---------------------------------------------------------

def normalized_reference(kind: str, w: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
    """The normalized summed inputs (N, H) of ``kind`` by the NumPy reference."""
    from normlab.reference import batch_norm_forward, layer_norm_forward, weight_norm_forward

    if kind == "weight":
        w_unit, _ = weight_norm_forward(w, np.ones((w.shape[0], 1)), dim=0)  # g = 1: before the gain
        return x @ w_unit.T
    a = x @ w.T
    if kind == "batch":
        return batch_norm_forward(a, eps=eps)[0]
    return layer_norm_forward(a, a.shape[1], eps=eps)[0]


def normalized_torch(kind: str, w: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
    """The same through :mod:`normlab.nn` layers in float64 (training mode, no affine). Torch's batch
    norm refuses ``eps = 0``, so 0 becomes the smallest positive float64 (no effect on a variance near 1)."""
    import torch

    from normlab import nn as nnl

    wt, xt = torch.from_numpy(w), torch.from_numpy(x)
    with torch.no_grad():
        if kind == "weight":
            lin = nnl.weight_norm(torch.nn.Linear(w.shape[1], w.shape[0], bias=False).double())
            lin.parametrizations.weight.original0.fill_(1.0)  # g
            lin.parametrizations.weight.original1.copy_(wt)  # v
            return lin(xt).numpy()
        a = xt @ wt.T
        eps = eps or float(np.finfo(np.float64).tiny)
        if kind == "batch":
            layer = nnl.BatchNorm1d(w.shape[0], eps=eps, affine=False, track_running_stats=False).double()
        else:
            layer = nnl.LayerNorm(w.shape[0], eps=eps, elementwise_affine=False).double()
        return layer(a).numpy()


def transformed(index: int, w: np.ndarray, x: np.ndarray, rng: np.random.Generator, config: Config) -> tuple:
    """``(w', x')`` after transformation ``TRANSFORMS[index]`` with random delta, gamma, unit and case."""
    lo, hi = config.delta_range
    delta = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    w, x = w.copy(), x.copy()
    if index == 0:
        w *= delta
    elif index == 1:
        w += rng.normal(0.0, config.shift_std, size=w.shape[1])  # the same gamma added to every w_i
    elif index == 2:
        w[rng.integers(w.shape[0])] *= delta
    elif index == 3:
        x *= delta
    elif index == 4:
        x += rng.normal(0.0, config.shift_std, size=x.shape[1])  # the same gamma added to every case
    else:
        x[rng.integers(x.shape[0])] *= delta
    return w, x


def relative_change(before: np.ndarray, after: np.ndarray) -> float:
    return float(np.max(np.abs(after - before)) / np.max(np.abs(before)))


def run(config: Config, seed: int, progress) -> dict:
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.0 / np.sqrt(config.d), size=(config.h, config.d))
    x = rng.normal(config.input_mean, 1.0, size=(config.n, config.d))
    moved = [transformed(i, w, x, rng, config) for i in range(len(TRANSFORMS))]
    impl = {"reference": normalized_reference, "torch": normalized_torch}
    out = {}
    for b, backend in enumerate(BACKENDS):
        f = impl[backend]
        out[backend] = {kind: [relative_change(f(kind, w, x, config.eps), f(kind, w2, x2, config.eps))
                               for w2, x2 in moved] for kind in METHODS}
        progress((b + 1) / len(BACKENDS))
    return out


# -- summary, verdict, plot ---------------------------------------------------------------------

def measured_table(config: Config, runs: list) -> dict:
    """``{method: ("Inv"|"No", ...)}``: Inv where every seed and backend stays below the tolerance."""
    return {k: tuple("Inv" if max(r[b][k][i] for r in runs for b in BACKENDS) < config.tolerance else "No"
                     for i in range(len(TRANSFORMS))) for k in METHODS}


def summarize(config: Config, runs: list) -> dict:
    table = measured_table(config, runs)
    worst = {k: [max(r[b][k][i] for r in runs for b in BACKENDS) for i in range(len(TRANSFORMS))] for k in METHODS}
    # per seed: the largest change in a cell the paper calls Inv, the smallest in one it calls No
    inv_max = [max(r[b][k][i] for b in BACKENDS for k in METHODS for i in range(len(TRANSFORMS))
                   if PAPER[k][i] == "Inv") for r in runs]
    no_min = [min(r[b][k][i] for b in BACKENDS for k in METHODS for i in range(len(TRANSFORMS))
                  if PAPER[k][i] == "No") for r in runs]
    tol = config.tolerance
    mismatches = [sum((max(r[b][k][i] for b in BACKENDS) < tol) != (PAPER[k][i] == "Inv")
                      for k in METHODS for i in range(len(TRANSFORMS))) for r in runs]
    cells = len(METHODS) * len(TRANSFORMS)
    s = {"tolerance": tol, "cells": cells, "mismatches": mismatches, "inv_cell_max_change": inv_max,
         "no_cell_min_change": no_min, "max_change": worst}
    for k, name in (("batch", "BN"), ("weight", "WN"), ("layer", "LN")):
        s[f"table_{name}"] = f"measured {'/'.join(table[k])} | paper {'/'.join(PAPER[k])}"
    agree = sum(a == p for k in METHODS for a, p in zip(table[k], PAPER[k]))
    s["cells_agreeing"] = agree
    s["measured"] = (f"{agree}/{cells} cells as in Table 1 (BN {'/'.join(table['batch'])}; WN "
                     f"{'/'.join(table['weight'])}; LN {'/'.join(table['layer'])}); max change in Inv cells "
                     f"{_sci(inv_max)}, min in No cells {_sci(no_min)}")
    return s


def _sci(values) -> str:
    values = list(values)
    m, sd = mean_sd(values)
    return pm(f"{m:.1e}", f"{sd:.1e}", len(values))


def verdict(s: dict) -> Verdict:
    label = check(s["mismatches"], 0.5, above=False)  # every seed: no cell differs from the paper
    return Verdict(label, f"cells differing from Table 1 per seed: {s['mismatches']} of {s['cells']}; largest relative "
                          f"change where the paper says Inv {_sci(s['inv_cell_max_change'])} (tolerance "
                          f"{s['tolerance']:.0e}), smallest where it says No {_sci(s['no_cell_min_change'])}"
                          f"{too_few_seeds(len(s['mismatches']))}")


def plots(config: Config, runs: list, summary: dict, out_dir) -> list:
    table = measured_table(config, runs)
    worst = np.array([summary["max_change"][k] for k in METHODS])
    fig, ax = plotting.subplots(figsize=(11.5, 3.6))
    logc = np.log10(np.maximum(worst, 1e-17))
    ax.imshow(logc, cmap="viridis", vmin=-17, vmax=1, aspect="auto")
    for r, k in enumerate(METHODS):
        for c in range(len(TRANSFORMS)):
            ok = table[k][c] == PAPER[k][c]
            ax.text(c, r, f"{table[k][c]} (paper: {PAPER[k][c]})\n{worst[r, c]:.1e}", ha="center",
                    va="center", fontsize=8.5, color="white" if logc[r, c] < -6 else "black",
                    fontweight="bold" if ok else "normal",
                    bbox=None if ok else dict(facecolor="#d62728", alpha=0.8, edgecolor="none"))
    ax.set_xticks(range(len(TRANSFORMS)), SHORT)
    ax.set_yticks(range(len(METHODS)), list(METHODS.values()))
    ax.set_title(f"Largest relative change of the normalized summed inputs over "
                 f"{over_seeds(len(runs), 'the largest')} and both backends "
                 f"(Inv: < {config.tolerance:.0e}); red = differs from Ba et al. Table 1", fontsize=9)
    fig.colorbar(ax.images[0], ax=ax, label="log10 relative change")
    plotting.save(fig, out_dir / "invariance_table.png")
    return [("invariance_table.png", "Measured invariance table beside the paper's (Ba et al. 2016, Table 1): "
                                     "each cell gives the measured verdict, the paper's, and below them the largest "
                                     "relative change of the normalized summed inputs over seeds and backends (NumPy "
                                     "reference and normlab.nn).")]
