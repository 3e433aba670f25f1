"""Seed table "transformer with/without layer norm" and Xiong et al. 2020: pre-LN vs post-LN.

A tiny transformer encoder (:class:`normlab.lab.models.TransformerClassifier`) classifies
MNIST-1D, each signal cut into tokens of ``patch`` consecutive samples. Every norm of the
model is ``none``, ``layer`` (LN), ``rms`` (RMSNorm) or ``batch`` (BN over batch and tokens),
placed pre-LN (``h + f(N(h))``, with a final norm); the norms in ``post_norms`` (LN at quick
scale, all at full) are also trained post-LN (``N(h + f(h))``). With no norm the two
placements are the same model, trained once. All train from the same seed, data
order and learning rate (Adam, constant, **no warm-up**: the regime Xiong et al. discuss).

Two measurements:

- *training*: test accuracy along training; "final" is the mean over the last two
  evaluations (at a constant learning rate one point alone is noisy); divergence is a
  non-finite loss or one above 1000;
- *gradients at initialization* (Xiong et al., Theorem 1 and Fig. 3): the Frobenius norm of the
  gradient of each block's second feed-forward weight, on one batch of ``probe_batch``
  training signals, for pre-LN and post-LN LN models of several depths. The theorem says the
  last block's gradient scales as sqrt(ln d / L) for pre-LN but does not shrink with depth
  L for post-LN, so post-LN's gradient near the output, relative to pre-LN's, grows like
  sqrt(L) (its large gradients near the output are why post-LN needs warm-up).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from normlab.lab import data as lab_data
from normlab.lab import models, parallel, plotting, training
from normlab.lab.verdict import check, combine, fmt, over_seeds, paired

CLAIM = ("Without layer normalization the transformer trains poorly or is unstable; with it, pre-LN (norm inside "
         "the residual branch) is more stable than post-LN: post-LN's gradients near the output are large at "
         "initialization, so without learning-rate warm-up it trains worse than pre-LN.")
SOURCE = ("Seed article: transformer with/without layer norm table; Xiong et al. 2020, On Layer "
          "Normalization in the Transformer Architecture, Theorem 1, Fig. 3 and Sec. 4 (IWSLT14, WMT14, BERT)")
PUBLISHED = ("Xiong et al.: at initialization the gradient of the last FFN weight is O(d sqrt(ln d)) for post-LN and "
             "O(d sqrt(ln d / L)) for pre-LN (Theorem 1), so at depth 12 vs 2 post-LN's is sqrt(6) = 2.4x larger "
             "relative to pre-LN's; Fig. 3 shows post-LN's gradient norm growing with the layer index and pre-LN's "
             "flat; pre-LN without warm-up reaches results comparable to post-LN with warm-up in less training "
             "time, while post-LN without warm-up trains worse. The seed gives no numbers.")
SCALE_NOTE = ("A 3-block, 32-wide encoder on 10-token MNIST-1D signals for 150 Adam steps (quick), not 6-12 blocks "
              "of width 512 on translation for 100k steps: instability from depth and width has little room here, "
              "and shallow transformers are known to train without any norm, so the training comparison can well "
              "come out null or reversed at this scale. The constant learning rate 0.01, a large one for Adam, stands "
              "in for Xiong's 'large learning rate without warm-up'; a one-seed pilot at 0.001 did not favour LN "
              "or pre-LN either (final acc: no norm 0.40, pre-LN 0.39, post-LN 0.37). The gradient probe "
              "tests Theorem 1's depth scaling directly and needs no training; d = 32 is far from the theorem's "
              "large-width limit, so only the direction (post-LN / pre-LN growing with depth) is checked, not the "
              "sqrt(L) factor.")


@dataclass(frozen=True)
class Config:
    data: str = "mnist1d"
    """Data set (normlab.lab.data) of 1-channel signals, cut into tokens."""
    patch: int = 4
    """Samples per token (MNIST-1D's 40 samples -> 10 tokens of 4 features)."""
    norms: tuple[str, ...] = ("none", "layer", "rms", "batch")
    """Norms to train (make_norm specs: 'layer', 'rms', 'batch', 'none' ...); the verdict needs none and layer."""
    post_norms: tuple[str, ...] = ("layer",)
    """Norms trained in the post-LN placement N(h + f(h)) as well as pre-LN h + f(N(h)); the verdict needs 'layer'."""
    d_model: int = 32
    """Width of the token features."""
    nhead: int = 4
    """Attention heads."""
    num_layers: int = 3
    """Encoder blocks of the trained models."""
    steps: int = 150
    """Training steps per model."""
    batch_size: int = 32
    """Mini-batch size."""
    lr: float = 0.01
    """Constant Adam learning rate, no warm-up, the same for every model (a large one for Adam)."""
    evals: int = 6
    """Evaluation points along training (plus step 0); 'final' is the mean of the last two."""
    probe_depths: tuple[int, ...] = (2, 4, 8, 12)
    """Depths at which the gradients at initialization are probed (LN models, pre and post)."""
    probe_batch: int = 128
    """Training signals in the gradient probe's batch."""


SCALES = {"smoke": Config(data="digits", patch=8, norms=("none", "layer"), d_model=16, num_layers=1, steps=10,
                          evals=2, probe_depths=(1, 3), probe_batch=32),
          "quick": Config(),
          "full": Config(d_model=64, num_layers=6, steps=3000, evals=20, post_norms=("layer", "rms", "batch"),
                         probe_depths=(2, 4, 6, 8, 12, 18, 24))}


PLACEMENTS = ("pre", "post")
STYLE = {"pre": "-", "post": "--"}
PROBE_COLORS = {"pre": plotting.color("layer"), "post": "#8c564b"}
MARKERS = {"pre": "o", "post": "s"}


def validate(config: Config) -> None:
    if not {"none", "layer"} <= set(config.norms):
        raise ValueError("norms must include 'none' and 'layer' (the verdict compares them)")
    if "layer" not in config.post_norms or not set(config.post_norms) <= set(config.norms) - {"none"}:
        raise ValueError("post_norms must include 'layer' and name only norms of 'norms' other than 'none'")
    if config.d_model % config.nhead:
        raise ValueError(f"d_model={config.d_model} must be divisible by nhead={config.nhead}")
    for n in config.norms:
        models.SequenceNorm(n, 4)  # raises ValueError for a bad spec
    if len(set(config.probe_depths)) < 2 or min(config.probe_depths) < 1:
        # the verdict compares the smallest depth with the largest: one depth twice compares a number with itself
        raise ValueError(f"probe_depths needs at least two different depths >= 1, got {config.probe_depths}")
    if config.evals < 2:
        raise ValueError("evals must be at least 2 ('final' is the mean of the last two)")
    if config.data != "mnist":  # (full MNIST is read from --data-dir when the runs start: 784 = 28 * 28)
        _tokens(lab_data.load(config.data).subset(1, 1), config.patch)  # raises: patch must divide the length


def data_parallel(config: Config):
    """--nproc N: every norm in ``norms`` must be one that can be synchronized across processes."""
    return parallel.check_norms(config.norms)


def _tokens(ds: lab_data.Dataset, patch: int) -> lab_data.Dataset:
    """(N, 1, L) signals or (N, 1, H, W) images as (N, L / patch, patch) token sequences."""
    def cut(x):
        flat = x.reshape(len(x), -1)
        if flat.shape[1] % patch:
            raise ValueError(f"patch={patch} must divide the input length {flat.shape[1]}")
        return flat.reshape(len(x), flat.shape[1] // patch, patch)
    return replace(ds, x_train=cut(ds.x_train), x_test=cut(ds.x_test))


def _variants(config: Config) -> list:
    """(norm, placement) pairs to train; 'none' once (both placements are the same model)."""
    out = [("none", "pre")] if "none" in config.norms else []
    return out + [(n, p) for n in config.norms if n != "none" for p in ("pre", "post")
                  if p == "pre" or n in config.post_norms]


def _model(config: Config, ds, norm: str, placement: str, num_layers: int):
    return models.TransformerClassifier(ds.input_shape[-1], ds.num_classes, d_model=config.d_model,
                                        nhead=config.nhead, num_layers=num_layers,
                                        dim_feedforward=2 * config.d_model, norm=norm,
                                        norm_first=placement == "pre", max_len=ds.input_shape[0])


def gradient_norms(model, x: torch.Tensor, y: torch.Tensor) -> list:
    """Frobenius norm of the loss gradient w.r.t. each block's second feed-forward weight (W^2 in Xiong et al.)."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [layer.ff[2].weight.grad.norm().item() for layer in model.layers]


def run(config: Config, seed: int, progress) -> dict:
    ds = _tokens(lab_data.load(config.data), config.patch)
    tensors = training.Tensors.of(ds)
    eval_at = [0] + training.eval_points(config.steps, config.evals)
    variants = _variants(config)
    out = {"train": {}, "probe": {}}
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(tensors.x_train), generator=gen)[: config.probe_batch]
    for placement in PLACEMENTS:  # no training: cheap
        for depth in config.probe_depths:
            torch.manual_seed(seed)
            model = _model(config, ds, "layer", placement, depth)
            out["probe"][f"{placement}-{depth}"] = gradient_norms(model, tensors.x_train[idx], tensors.y_train[idx])
    for i, (norm, placement) in enumerate(variants):
        torch.manual_seed(seed)
        model = _model(config, ds, norm, placement, config.num_layers)
        out["train"][f"{norm}-{placement}"] = training.train(
            model, tensors, steps=config.steps, batch_size=config.batch_size, lr=config.lr, optimizer="adam",
            seed=seed, eval_at=eval_at, progress=lambda f, i=i: progress((i + f) / len(variants)))
    return out


def _final(h: dict) -> float:
    return float(np.mean(h["test_acc"][-2:]))


def summarize(config: Config, runs: list) -> dict:
    lo, hi = min(config.probe_depths), max(config.probe_depths)
    s = {"variants": [f"{n}-{p}" for n, p in _variants(config)], "lr": config.lr, "num_layers": config.num_layers,
         "depth_lo": lo, "depth_hi": hi, "probe_depths": list(config.probe_depths)}
    for key in s["variants"]:
        s[f"final_acc_{key}"] = [_final(r["train"][key]) for r in runs]
        s[f"diverged_{key}"] = sum(bool(r["train"][key]["diverged"]) for r in runs)
    for p in PLACEMENTS:
        s[f"last_grad_{p}"] = [[r["probe"][f"{p}-{d}"][-1] for d in config.probe_depths] for r in runs]
    ratio = lambda r, d: r["probe"][f"post-{d}"][-1] / r["probe"][f"pre-{d}"][-1]  # noqa: E731
    s["post_over_pre_lo"] = [ratio(r, lo) for r in runs]
    s["post_over_pre_hi"] = [ratio(r, hi) for r in runs]
    s["ratio_growth"] = [b / a for a, b in zip(s["post_over_pre_lo"], s["post_over_pre_hi"])]
    s["expected_growth"] = math.sqrt(hi / lo)
    table = ", ".join(f"{k} {fmt(s[f'final_acc_{k}'])}" + (f" ({s[f'diverged_{k}']} diverged)"
                                                             if s[f"diverged_{k}"] else "") for k in s["variants"])
    s["measured"] = (f"final test acc at lr {config.lr}, no warm-up: {table}; last block's FFN gradient at init, "
                     f"post-LN / pre-LN: {fmt(s['post_over_pre_lo'], 2)} at depth {lo}, "
                     f"{fmt(s['post_over_pre_hi'], 2)} at depth {hi} (growth {fmt(s['ratio_growth'], 2)}; theory "
                     f"sqrt({hi}/{lo}) = {s['expected_growth']:.2f})")
    return s


def verdict(s: dict):
    a = lambda k: s[f"final_acc_{k}"]  # noqa: E731
    return combine([
        (paired(a("layer-pre"), a("none-pre")),
         f"without LN it trains worse: final test acc pre-LN {fmt(a('layer-pre'))} > no norm {fmt(a('none-pre'))} "
         f"(post-LN {fmt(a('layer-post'))})"),
        (paired(a("layer-pre"), a("layer-post")),
         f"pre-LN trains better than post-LN at lr {s['lr']} without warm-up: {fmt(a('layer-pre'))} > "
         f"{fmt(a('layer-post'))}"),
        (check(s["ratio_growth"], 1.0, above=True),
         f"post-LN's gradient near the output grows relative to pre-LN's with depth (Theorem 1): post/pre "
         f"{fmt(s['post_over_pre_lo'], 2)} at depth {s['depth_lo']} -> {fmt(s['post_over_pre_hi'], 2)} at depth "
         f"{s['depth_hi']}, growth {fmt(s['ratio_growth'], 2)} > 1 (theory {s['expected_growth']:.2f})"),
    ])


def plots(config: Config, runs: list, summary: dict, out_dir) -> list:
    fig, ax = plotting.figure(width=6.5)
    for key in summary["variants"]:
        norm, placement = key.split("-")
        label = "no norm" if norm == "none" else f"{norm} ({placement}-LN placement)"
        plotting.band(ax, runs[0]["train"][key]["step"], [r["train"][key]["test_acc"] for r in runs], label,
                      plotting.color(norm), ls=STYLE[placement])
    ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1),
           title=f"{config.data}: {config.num_layers}-block transformer, lr {config.lr}, no warm-up")
    ax.legend(fontsize=7, loc="upper left")
    plotting.save(fig, out_dir / "training.png")

    fig, axes = plotting.figure(ncols=2, width=4.8)
    for p in PLACEMENTS:
        plotting.band(axes[0], config.probe_depths, summary[f"last_grad_{p}"], f"{p}-LN", PROBE_COLORS[p],
                      ls=STYLE[p], marker=MARKERS[p])
    d = np.array(config.probe_depths, float)
    pre0 = float(np.mean([g[0] for g in summary["last_grad_pre"]]))
    axes[0].plot(d, pre0 * np.sqrt(d[0] / d), color="gray", lw=0.8, ls=":", label="pre-LN theory: ~ 1/sqrt(L)")
    axes[0].set(xlabel="depth L (blocks)", ylabel="|grad W2| of the last block",
                title="Gradient near the output at init")
    axes[0].set_xticks(config.probe_depths, [str(x) for x in config.probe_depths])
    axes[0].legend(fontsize=8)
    hi = max(config.probe_depths)
    for p in PLACEMENTS:
        plotting.band(axes[1], range(1, hi + 1), [r["probe"][f"{p}-{hi}"] for r in runs], f"{p}-LN",
                      PROBE_COLORS[p], ls=STYLE[p], marker=MARKERS[p])
    axes[1].set(xlabel="block index", ylabel="|grad W2| at init", title=f"Per block, depth {hi} (as Xiong Fig. 3)")
    axes[1].legend(fontsize=8)
    plotting.save(fig, out_dir / "gradients.png")
    return [("training.png", f"Test accuracy along training per norm and placement ({over_seeds(len(runs))}); "
                             "solid: pre-LN placement, dashed: post-LN."),
            ("gradients.png", "Gradient norm of the second feed-forward weight at initialization (LN models, "
                              f"{over_seeds(len(runs))}): left, of the last block vs depth, with Theorem 1's 1/sqrt(L) for "
                              "pre-LN; right, per block of the deepest model.")]
