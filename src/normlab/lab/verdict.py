"""Verdicts: a claim is *reproduced*, *not reproduced* or *inconclusive*, by a rule written as code.

The building block is :func:`check`: a per-seed quantity (a difference, a ratio) against a
bound the claim implies.

* reproduced — every seed is on the claim's side of the bound;
* not reproduced — the mean over seeds is not (the effect is absent or reversed on average);
* inconclusive — the mean is, but some seed is not (the spread straddles the bound), or
  there are fewer than :data:`MIN_SEEDS` seeds, so no spread.

A claim with several parts combines them with :func:`combine`: any part not reproduced
makes the claim not reproduced, else any inconclusive part makes it inconclusive. Every
reason quotes mean ± standard deviation over seeds (sample std, ddof=1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
LABELS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
MIN_SEEDS = 2


@dataclass(frozen=True)
class Verdict:
    """A label from :data:`LABELS` and the measurement that decided it."""

    label: str
    reason: str

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"verdict label must be one of {LABELS}, got {self.label!r}")


def mean_sd(values: Iterable[float]) -> tuple:
    """Mean and sample standard deviation (0 for a single value); NaNs count as NaN."""
    v = np.asarray(list(values), dtype=float)
    with np.errstate(invalid="ignore"):  # inf (e.g. "never reached") gives a NaN spread
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def pm(mean: str, sd: str, n: int) -> str:
    """``"mean ± sd"`` for ``n`` seeds; one seed has no spread, so its value stands alone."""
    return f"{mean} ± {sd}" if n > 1 else mean


def over_seeds(n: int, what: str = "mean ± sd") -> str:
    """A caption's words for a statistic of ``n`` seeds: ``"mean ± sd over 3 seeds"``, ``"1 seed"``."""
    return f"{what} over {n} seeds" if n > 1 else f"{n} seed"


def one_seed(seeds=None) -> str:
    """A caption's words for a plot of ``runs[0]`` alone: ``"seed 3"`` when the report passed
    the seed numbers (``plots(..., seeds=...)``), else ``"the first seed"``."""
    return f"seed {seeds[0]}" if seeds else "the first seed"


def fmt(values: Iterable[float], digits: int = 3, percent: bool = False, signed: bool = False) -> str:
    """Mean ± sd over seeds: ``"0.941 ± 0.012"``, or with ``percent=True`` ``"94.1 ± 1.2%"``;
    one seed: ``"0.941"``."""
    values = list(values)
    m, s = mean_sd(values)
    scale, unit, digits = (100.0, "%", max(digits - 2, 0)) if percent else (1.0, "", digits)
    return pm(f"{scale * m:{'+' if signed else ''}.{digits}f}", f"{scale * s:.{digits}f}", len(values)) + unit


def check(values: Sequence[float], bound: float, above: bool = True, inclusive: bool = False) -> str:
    """The label for per-seed ``values`` that the claim says lie above (or below) ``bound``
    (``inclusive``: at or above, at or below: a claim of "at most 30%" holds at 30%).

    A NaN seed (a run that diverged where the quantity needs a trained net) never supports the
    claim, so the label is at best inconclusive; the mean that decides between not reproduced
    and inconclusive is over the other seeds (all NaN: not reproduced)."""
    v = np.asarray(list(values), dtype=float)
    if len(v) < MIN_SEEDS:
        return INCONCLUSIVE
    if inclusive:
        side = (lambda a: a >= bound) if above else (lambda a: a <= bound)
    else:
        side = (lambda a: a > bound) if above else (lambda a: a < bound)
    if np.all(side(v)):
        return REPRODUCED
    mean = np.nanmean(v) if not np.all(np.isnan(v)) else np.nan
    if mean == bound and np.any(side(v)) and not inclusive:  # seeds split evenly (0/1 flags): neither side
        return INCONCLUSIVE
    if np.isnan(mean) or not side(mean):
        return NOT_REPRODUCED
    return INCONCLUSIVE


def paired(a: Sequence[float], b: Sequence[float], margin: float = 0.0) -> str:
    """The label for the claim "``a`` exceeds ``b`` by more than ``margin``", seed by seed."""
    return check(np.asarray(a, float) - np.asarray(b, float), margin, above=True)


def combine(parts: Sequence[tuple]) -> Verdict:
    """One verdict from ``(label, text)`` parts; the reason lists every part with its label."""
    labels = [label for label, _ in parts]
    if NOT_REPRODUCED in labels:
        label = NOT_REPRODUCED
    elif INCONCLUSIVE in labels:
        label = INCONCLUSIVE
    else:
        label = REPRODUCED
    reason = "; ".join(f"{text} [{lab}]" for lab, text in parts) if len(parts) > 1 else parts[0][1]
    return Verdict(label, reason)


def too_few_seeds(n: int) -> str:
    return f" (only {n} seed{'s' if n != 1 else ''}: a verdict needs at least {MIN_SEEDS})" if n < MIN_SEEDS else ""
