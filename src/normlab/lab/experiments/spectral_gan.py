"""Miyato et al. 2018: spectral normalization of the discriminator makes GAN training robust to the
optimizer's settings. Here on the classic toy: a mixture of 8 Gaussians on a ring.

A generator (MLP, ReLU) maps 2-D Gaussian noise to the plane; a discriminator (MLP, leaky ReLU
0.1 as in the paper) scores points. Both train with the non-saturating GAN loss and Adam in
each optimizer setting (Adam's lr, beta1, beta2 and the discriminator steps per generator
step, named after the paper's Table 1), with and without :func:`normlab.nn.spectral_norm` on
every discriminator layer. As in the paper's Algorithm 1, the power iteration advances once
per discriminator update (the spectral-norm layers are in eval mode during the generator's step).

Quality is measured on 2000 generator samples: a sample is *good* within 3 sigma of a
mode's centre; a mode is *covered* when at least ``min_mode_share`` of the samples are good
samples of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normlab.lab import plotting, training
from normlab.lab.verdict import combine, fmt, one_seed, over_seeds, paired
from normlab.nn import SpectralNorm, spectral_norm

CLAIM = ("Spectral normalization of the discriminator makes GAN training robust to the choice of optimizer "
         "settings: with it, sample quality and diversity stay high across learning rates and Adam betas, including "
         "aggressive ones where unnormalized training fails.")
SOURCE = "Miyato, Kataoka, Koyama & Yoshida 2018, Spectral Normalization for GANs, Table 1 settings, Fig. 1"
# The paper's Table 1: Adam lr, beta1, beta2 and n_dis (discriminator updates per generator update).
SETTINGS = {"A": (1e-4, 0.5, 0.9, 5), "B": (1e-4, 0.5, 0.999, 1), "C": (2e-4, 0.5, 0.999, 1),
            "D": (1e-3, 0.5, 0.9, 5), "E": (1e-3, 0.5, 0.999, 5), "F": (1e-3, 0.9, 0.999, 5)}
PUBLISHED = ("Fig. 1 (inception scores on CIFAR-10 and STL-10 over settings A-F of Table 1, from A: lr 1e-4, beta1 "
             "0.5, beta2 0.9, n_dis 5 to F: lr 1e-3, beta1 0.9, beta2 0.999, n_dis 5): SN-GAN's score stays high in "
             "every setting, while the other methods (weight clipping, WGAN-GP, batch, layer and weight norm, "
             "orthonormal regularization) lose much of theirs in some settings, above all the high-learning-rate "
             "ones (D-F). The paper has no 8-Gaussian numbers.")
SCALE_NOTE = ("A 2-D toy, not CNNs on CIFAR-10, trained for 600 generator steps rather than 100k, and with one "
              "discriminator step per generator step in every setting (the paper's A, D, E, F use 5, which costs about three "
              "times the time) - so 'F' here means F's Adam parameters with n_dis 1. Early in training the "
              "GANs are still spreading over the ring: the numbers say which trains more robustly in this budget, "
              "not where each would end. The full scale runs settings C, E and F with the paper's n_dis for "
              "3000 generator steps.")


@dataclass(frozen=True)
class Config:
    settings: tuple[str, ...] = ("E", "F")
    """Optimizer settings by their letter in the paper's Table 1 (A-F)."""
    n_dis: int = 1
    """Discriminator updates per generator update; 0 takes each setting's own n_dis from Table 1."""
    steps: int = 600
    """Generator updates."""
    batch_size: int = 128
    """Real and generated samples per update."""
    width: int = 64
    """Units in each of the two hidden layers of both networks."""
    modes: int = 8
    """Gaussians on the ring."""
    radius: float = 2.0
    """Radius of the ring of mode centres."""
    std: float = 0.05
    """Standard deviation of each Gaussian."""
    min_mode_share: float = 0.01
    """A mode is covered when at least this share of the samples lie within 3 std of it (20 of 2000)."""
    quality_margin: float = 0.05
    """A share of good samples better by more than this counts as better (the end point of a GAN
    wanders; 0.05 is several times the sampling noise of 2000 samples)."""
    samples: int = 2000
    """Generator samples per evaluation."""
    evals: int = 6
    """Evaluations along training (for the curves)."""


ZERO_ALLOWED = ("n_dis",)  # 0: each setting's own n_dis
SCALES = {"smoke": Config(steps=40, width=32, evals=2, samples=500),
          "quick": Config(),
          "full": Config(settings=("C", "E", "F"), n_dis=0, steps=3000, evals=15)}


def validate(config: Config) -> None:
    bad = [s for s in config.settings if s not in SETTINGS]
    if bad or not config.settings:
        raise ValueError(f"settings must be letters of the paper's Table 1 ({', '.join(SETTINGS)}), "
                         f"got {config.settings}")
    if config.n_dis < 0:
        raise ValueError(f"n_dis must be >= 0 (0: the paper's per setting), got {config.n_dis}")
    if not config.std > 0:  # a sample is good within 3 std of a mode: at std <= 0 none can be, whatever the GAN does
        raise ValueError(f"std is the modes' standard deviation and must be positive, got {config.std}")
    if not 0.0 < config.min_mode_share <= 1.0:  # <= 0: every mode counts as covered, even with no sample near it
        raise ValueError(f"min_mode_share is a share of the samples and must be in (0, 1], got {config.min_mode_share}")


def centers(config: Config) -> torch.Tensor:
    angle = 2 * math.pi * torch.arange(config.modes, dtype=torch.float32) / config.modes
    return config.radius * torch.stack([angle.cos(), angle.sin()], dim=1)


def real_batch(config: Config, mu: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return mu[torch.randint(len(mu), (n,), generator=gen)] + config.std * torch.randn(n, 2, generator=gen)


def generator(config: Config) -> nn.Module:
    w = config.width
    return nn.Sequential(nn.Linear(2, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 2))


def discriminator(config: Config, sn: bool) -> nn.Module:
    w = config.width
    layers = [nn.Linear(2, w), nn.LeakyReLU(0.1), nn.Linear(w, w), nn.LeakyReLU(0.1), nn.Linear(w, 1)]
    return nn.Sequential(*[spectral_norm(m) if sn and isinstance(m, nn.Linear) else m for m in layers])


@torch.no_grad()
def quality(config: Config, g: nn.Module, mu: torch.Tensor, z: torch.Tensor) -> dict:
    """Good-sample share, covered modes and the generated points (for the scatter plot)."""
    x = g(z)
    if not torch.isfinite(x).all():  # diverged
        return {"good": 0.0, "modes": 0, "x": x}
    dist, nearest = torch.cdist(x, mu).min(dim=1)
    good = dist < 3 * config.std
    per_mode = torch.bincount(nearest[good], minlength=len(mu)).float() / len(x)
    return {"good": float(good.float().mean()), "modes": int((per_mode >= config.min_mode_share).sum()), "x": x}


def train_gan(config: Config, setting: str, sn: bool, seed: int, progress) -> dict:
    lr, beta1, beta2, paper_n_dis = SETTINGS[setting]
    n_dis = config.n_dis or paper_n_dis
    torch.manual_seed(seed)
    g, d = generator(config), discriminator(config, sn)
    sn_layers = [m for m in d.modules() if isinstance(m, SpectralNorm)]
    opt_g = training.Adam(g.parameters(), lr, betas=(beta1, beta2))
    opt_d = training.Adam(d.parameters(), lr, betas=(beta1, beta2))
    gen = torch.Generator().manual_seed(seed)
    mu = centers(config)
    z_eval = torch.randn(config.samples, 2, generator=torch.Generator().manual_seed(10_000 + seed))
    eval_at = set(training.eval_points(config.steps, config.evals))
    n = config.batch_size
    hist = {"step": [], "good": [], "modes": []}
    for step in range(1, config.steps + 1):
        for _ in range(n_dis):
            fake = g(torch.randn(n, 2, generator=gen))
            out = d(torch.cat([real_batch(config, mu, n, gen), fake.detach()]))
            loss_d = F.softplus(-out[:n]).mean() + F.softplus(out[n:]).mean()
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
        for m in sn_layers:  # the generator's step reuses the current u, v: one power iteration per D update
            m.training = False  # (Algorithm 1); cheaper than d.eval(), which walks every module
        loss_g = F.softplus(-d(fake)).mean()  # non-saturating loss, on the last fake batch (as DCGAN's example)
        for m in sn_layers:
            m.training = True
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        if step in eval_at:
            q = quality(config, g, mu, z_eval)
            hist["step"].append(step)
            hist["good"].append(q["good"])
            hist["modes"].append(q["modes"])
            progress(step / config.steps)
    final = quality(config, g, mu, z_eval)
    hist.update(good_final=final["good"], modes_final=final["modes"], n_dis=n_dis,
                points=final["x"][:500].numpy().round(3).tolist())
    return hist


def run(config: Config, seed: int, progress) -> dict:
    jobs = [(s, sn) for s in config.settings for sn in (False, True)]
    out = {s: {} for s in config.settings}
    for i, (s, sn) in enumerate(jobs):
        out[s]["sn" if sn else "plain"] = train_gan(config, s, sn, seed, lambda f, i=i: progress((i + f) / len(jobs)))
    return out


def summarize(config: Config, runs: list) -> dict:
    s = {"settings": list(config.settings), "quality_margin": config.quality_margin}
    for st in config.settings:
        for k in ("plain", "sn"):
            s[f"good_{st}_{k}"] = [r[st][k]["good_final"] for r in runs]
            s[f"modes_{st}_{k}"] = [r[st][k]["modes_final"] for r in runs]
    for k in ("plain", "sn"):  # the worst setting, per seed: robustness is about the worst case
        s[f"worst_good_{k}"] = [min(r[st][k]["good_final"] for st in config.settings) for r in runs]
        s[f"worst_modes_{k}"] = [min(r[st][k]["modes_final"] for st in config.settings) for r in runs]
    per = "; ".join(f"{st}: SN {fmt(s[f'good_{st}_sn'], 2)} / {fmt(s[f'modes_{st}_sn'], 1)} modes vs plain "
                    f"{fmt(s[f'good_{st}_plain'], 2)} / {fmt(s[f'modes_{st}_plain'], 1)}" for st in config.settings)
    s["measured"] = f"good-sample share / modes covered (of {config.modes}) - {per}"
    return s


def verdict(s: dict):
    m = s["quality_margin"]
    per = ", ".join(f"{st}: {fmt(s[f'good_{st}_sn'], 2)} vs {fmt(s[f'good_{st}_plain'], 2)}" for st in s["settings"])
    return combine([
        (paired(s["worst_good_sn"], s["worst_good_plain"], margin=m),
         f"robust quality: share of good samples in the worst setting SN {fmt(s['worst_good_sn'])} > no SN "
         f"{fmt(s['worst_good_plain'])} + {m} (per setting, SN vs no SN: {per})"),
        (paired(s["worst_modes_sn"], s["worst_modes_plain"]),
         f"robust diversity: modes covered in the worst setting SN {fmt(s['worst_modes_sn'], 1)} > no SN "
         f"{fmt(s['worst_modes_plain'], 1)}"),
    ])


def plots(config: Config, runs: list, summary: dict, out_dir, seeds=None) -> list:
    mu = centers(config).numpy()
    ns = len(config.settings)
    fig, axes = plotting.subplots(2, ns, figsize=(3.6 * ns, 7.0), squeeze=False)
    lim = config.radius * 1.6
    for c, st in enumerate(config.settings):
        for r, k in enumerate(("plain", "sn")):
            ax = axes[r][c]
            p = np.array(runs[0][st][k]["points"], float)
            p = p[np.isfinite(p).all(axis=1)]
            ax.scatter(p[:, 0], p[:, 1], s=3, alpha=0.5, color=plotting.color("none" if k == "plain" else "batch"),
                       label="generated")
            ax.scatter(mu[:, 0], mu[:, 1], marker="x", color="black", s=30, label="mode centres")
            h = runs[0][st][k]
            lr, b1, b2, _ = SETTINGS[st]
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="x1", ylabel="x2",
                   title=f"{st} (lr {lr:g}, betas {b1}, {b2}, n_dis {h['n_dis']})\n"
                         f"{'SN' if k == 'sn' else 'no SN'}: {h['good_final']:.0%} good, {h['modes_final']} modes")
            ax.title.set_fontsize(9)
            if r == 0 and c == 0:
                ax.legend(fontsize=7, loc="upper right")
    plotting.save(fig, out_dir / "samples.png")

    fig, axes = plotting.figure(ncols=2, width=5.2)
    styles = {s: ls for s, ls in zip(config.settings, ("-", "--", ":", "-."))}
    for st in config.settings:
        for k, label in (("plain", "no SN"), ("sn", "SN")):
            col = plotting.color("none" if k == "plain" else "batch")
            step = runs[0][st][k]["step"]
            plotting.band(axes[0], step, [r[st][k]["good"] for r in runs], f"{st}, {label}", col, ls=styles[st])
            plotting.band(axes[1], step, [r[st][k]["modes"] for r in runs], f"{st}, {label}", col, ls=styles[st])
    axes[0].set(xlabel="generator step", ylabel="share of good samples (within 3 std)", title="sample quality")
    axes[1].set(xlabel="generator step", ylabel=f"modes covered (of {config.modes})", title="diversity",
                ylim=(-0.3, config.modes + 0.3))
    axes[0].legend(fontsize=8)
    plotting.save(fig, out_dir / "curves.png")
    return [("samples.png", f"{min(500, config.samples)} generated points at the end of training ({one_seed(seeds)}) "
                            "for each optimizer setting, without (top) and with (bottom) spectral norm on the "
                            f"discriminator; crosses: the {config.modes} mode centres."),
            ("curves.png", f"Share of good samples and modes covered along training ({over_seeds(len(runs))}); "
                           "line style = optimizer setting.")]
