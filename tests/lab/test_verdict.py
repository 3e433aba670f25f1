"""Verdict rules on synthetic metrics: each experiment's rule must say "reproduced" when the numbers
support the claim and "not reproduced" when they contradict it."""
from __future__ import annotations

import math

import pytest

from normlab.lab import experiments
from normlab.lab.verdict import (INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Verdict, check, combine, fmt, mean_sd,
                                 over_seeds, paired, too_few_seeds)

NOISE = (0.0, 0.01, -0.01)  # per-seed jitter


def test_check_and_paired():
    assert check([0.2, 0.3, 0.1], 0.0) == REPRODUCED
    assert check([0.2, -0.1, 0.3], 0.0) == INCONCLUSIVE  # mean above, one seed below
    assert check([-0.2, 0.1, -0.3], 0.0) == NOT_REPRODUCED
    assert check([0.2], 0.0) == INCONCLUSIVE  # no spread from one seed
    assert check([0.1, 0.2], 0.3, above=False) == REPRODUCED
    assert check([float("inf")] * 3, 0.3, above=False) == NOT_REPRODUCED
    assert paired([0.9, 0.91], [0.8, 0.82]) == REPRODUCED
    assert paired([0.9, 0.91], [0.9, 0.91]) == NOT_REPRODUCED  # no effect at all is not the claim


def test_combine_and_fmt():
    assert combine([(REPRODUCED, "a"), (INCONCLUSIVE, "b")]).label == INCONCLUSIVE
    assert combine([(REPRODUCED, "a"), (NOT_REPRODUCED, "b"), (INCONCLUSIVE, "c")]).label == NOT_REPRODUCED
    v = combine([(REPRODUCED, "a"), (REPRODUCED, "b")])
    assert v.label == REPRODUCED and "a [reproduced]; b [reproduced]" == v.reason
    assert fmt([0.94, 0.95, 0.93]) == "0.940 ± 0.010"
    assert fmt([0.5, 0.6], percent=True) == "55.0 ± 7.1%"


def test_one_seed_shows_no_spread():
    """One seed has no standard deviation: "± 0.000" would claim a spread of zero."""
    from normlab.lab.experiments.invariance import _sci
    from normlab.lab.report import _over_seeds
    assert fmt([0.5]) == "0.500" and fmt((x for x in [0.5]), percent=True) == "50.0%"
    assert fmt([0.25], signed=True) == "+0.250"
    assert _over_seeds([8e-8]) == "8e-08" and _over_seeds([0.5]) == "0.5000"
    assert _sci([2e-15]) == "2.0e-15" and _sci([1e-15, 3e-15]) == "2.0e-15 ± 1.4e-15"
    assert over_seeds(1) == "1 seed" and over_seeds(3) == "mean ± sd over 3 seeds"
    assert over_seeds(2, "mean") == "mean over 2 seeds"


def _decide(name, runs, **overrides):
    e = experiments.get(name)
    cfg = e.config("quick", {k: str(v) for k, v in overrides.items()})
    return e.module.verdict(e.module.summarize(cfg, runs))


def _activations(sat_plain, sat_bn, decay_plain, decay_bn):
    def net(sat, first_over_last):
        return {"saturated": [0.1, 0.1, 0.1, 0.1, sat], "grad_norm": [first_over_last, 1, 1, 1, 1.0],
                "mean": [0.5] * 5, "var": [0.1] * 5, "hist": [[1] * 25] * 5}
    return [{"plain": net(sat_plain + n, decay_plain), "bn": net(sat_bn, decay_bn)} for n in NOISE]


def test_activations_rule():
    assert _decide("activations", _activations(0.6, 0.01, 0.2, 1.0)).label == REPRODUCED
    assert _decide("activations", _activations(0.05, 0.3, 1.0, 0.2)).label == NOT_REPRODUCED


def _bn_mnist(early, final, drift):
    steps = [0, 200, 1000, 2000]
    return [{key: {"step": steps, "test_acc": [0.1, early[key] + n, 0.5, final[key] + n], "drift": [drift[key]] * 4}
             for key in ("plain", "bn")} for n in NOISE]


def test_bn_mnist_rule():
    good = _bn_mnist({"plain": 0.5, "bn": 0.9}, {"plain": 0.9, "bn": 0.95}, {"plain": 0.3, "bn": 0.1})
    assert _decide("bn-mnist", good).label == REPRODUCED
    # faster and more stable but not higher at the end: the claim as a whole is not reproduced
    flat = _bn_mnist({"plain": 0.5, "bn": 0.9}, {"plain": 0.95, "bn": 0.93}, {"plain": 0.3, "bn": 0.1})
    v = _decide("bn-mnist", flat)
    assert v.label == NOT_REPRODUCED and "higher" in v.reason


def _convergence(bn_hits_at, epochs=40):
    plain = [0.3 + 0.01 * e for e in range(epochs)]
    target = plain[-1]
    bn = [target - 0.1 if e + 1 < bn_hits_at else target + 0.01 for e in range(epochs)]
    return [{"plain": {"test_acc": plain}, "bn": {"test_acc": bn}} for _ in NOISE]


def test_convergence_rule():
    assert _decide("convergence", _convergence(8)).label == REPRODUCED  # 8/40 = 0.2 of the epochs
    assert _decide("convergence", _convergence(30)).label == NOT_REPRODUCED  # 0.75
    never = [{"plain": {"test_acc": [0.5] * 40}, "bn": {"test_acc": [0.4] * 40}} for _ in NOISE]
    assert _decide("convergence", never).label == NOT_REPRODUCED


def _learning_rate(plain_ok_up_to, bn_ok_up_to, best_plain, best_bn):
    def net(ok_up_to, best):
        return [{"multiplier": m, "best_acc": best if m <= ok_up_to else 0.1, "final_acc": best if m <= ok_up_to
                 else 0.1, "diverged": m > ok_up_to} for m in (1.0, 3.0, 10.0, 30.0)]
    return [{"plain": net(plain_ok_up_to, best_plain + n), "bn": net(bn_ok_up_to, best_bn), "chance": 0.1}
            for n in NOISE]


def test_learning_rate_rule():
    assert _decide("learning-rate", _learning_rate(3, 30, 0.6, 0.7)).label == REPRODUCED
    assert _decide("learning-rate", _learning_rate(30, 3, 0.7, 0.6)).label == NOT_REPRODUCED


def _init_scale(plain, bn):
    return [{"plain": [{"scale": s, "final_acc": a + n} for s, a in zip((1e-4, 1e-3, 1e-2, 1e-1, 1), plain)],
             "bn": [{"scale": s, "final_acc": a} for s, a in zip((1e-4, 1e-3, 1e-2, 1e-1, 1), bn)]} for n in NOISE]


def test_init_scale_rule():
    assert _decide("init-scale", _init_scale([0.1, 0.1, 0.5, 0.9, 0.2], [0.8, 0.9, 0.9, 0.9, 0.9])).label == REPRODUCED
    assert _decide("init-scale", _init_scale([0.9] * 5, [0.1, 0.5, 0.9, 0.9, 0.9])).label == NOT_REPRODUCED
    # "much more robust": BN's worst scale 5 points above the plain net's is not much (margin 0.1)
    small = _init_scale([0.75, 0.8, 0.9, 0.9, 0.85], [0.8, 0.85, 0.9, 0.9, 0.9])
    assert _decide("init-scale", small).label == NOT_REPRODUCED
    assert _decide("init-scale", small, robust_margin=0.02).label == REPRODUCED


@pytest.mark.parametrize("scales,needle", [("-0.1,1", "must be positive"), ("0,1", "must be positive"),
                                           ("0.1", "at least 2 different scales"),
                                           ("0.1,0.1", "at least 2 different scales")])
def test_init_scale_refuses_scales_that_fail_every_run_or_measure_nothing(scales, needle):
    """A negative scale (a standard deviation) failed inside every run with torch's 'normal expects std >= 0.0';
    one scale (or one repeated) gave a range over the scales of 0 for both nets, so the verdict's second part
    was "not reproduced" whatever the nets did. Both are refused before any training."""
    e = experiments.get("init-scale")
    with pytest.raises(experiments.ConfigError, match=needle):
        e.validate(e.config("smoke", {"scales": scales}))
    e.validate(e.config("smoke", {"scales": "0.001,1"}))


def _batch_size(bn, gn):
    norms = ("batch", "group:4", "layer", "instance", "batch_renorm")
    return [{n: {str(b): {"final_acc": (bn if n == "batch" else gn)[i] + (d if n == "batch" else 0)}
                 for i, b in enumerate((2, 4, 8, 16, 32))} for n in norms} for d in NOISE]


@pytest.mark.parametrize("bn,gn,label", [
    ([0.65, 0.7, 0.75, 0.76, 0.76], [0.75] * 5, REPRODUCED),          # Wu & He's picture
    ([0.76] * 5, [0.7, 0.72, 0.74, 0.75, 0.75], NOT_REPRODUCED),      # BN flat, GN worse at batch 2
    ([0.73, 0.74, 0.75, 0.76, 0.76], [0.75] * 5, NOT_REPRODUCED),     # the same direction, 2-3 points: not "far"
])
def test_batch_size_rule(bn, gn, label):
    assert _decide("batch-size", _batch_size(bn, gn)).label == label


def test_batch_size_margin_is_a_config_field():
    small = _batch_size([0.73, 0.74, 0.75, 0.76, 0.76], [0.75] * 5)  # GN +2, BN's loss 3 points more than GN's
    assert _decide("batch-size", small, margin=0.01).label == REPRODUCED
    assert "by more than 0.01" in _decide("batch-size", small, margin=0.01).reason


def test_seeds_split_evenly_on_a_flag_are_inconclusive():
    from normlab.lab.verdict import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, check

    assert check([0, 1], 0.5) == INCONCLUSIVE  # half the seeds: neither side
    assert check([1, 1], 0.5) == REPRODUCED and check([0, 0], 0.5) == NOT_REPRODUCED
    assert check([1, 0, 0], 0.5) == NOT_REPRODUCED and check([1, 1, 0], 0.5) == INCONCLUSIVE


def test_per_seed_lists_are_told_from_config_lists_of_the_same_length():
    import types
    from dataclasses import dataclass

    from normlab.lab.report import _over_seeds, _per_seed_keys

    @dataclass(frozen=True)
    class Config:
        multipliers: tuple = (1.0, 30.0)

    def summarize(config, runs):
        return {"multipliers": list(config.multipliers), "acc": [r["acc"] for r in runs], "range": [0.8, 1.5],
                "same": [r["same"] for r in runs], "pull": [r["pull"] for r in runs]}

    exp = types.SimpleNamespace(module=types.SimpleNamespace(summarize=summarize))
    runs = [{"acc": 0.9, "same": 2.0, "pull": 0.5}, {"acc": 0.7, "same": 2.0, "pull": float("nan")}]
    keys = _per_seed_keys(exp, Config(), runs, summarize(Config(), runs))
    assert keys == {"acc", "same", "pull"}  # not the swept multipliers, not a [low, high] range; NaN is a value
    assert _over_seeds([0.0, float("inf")]).endswith("1 of 2 seeds not finite (never reached)")
    assert "nan" not in _over_seeds([1.0, float("inf"), 3.0])


def test_an_experiment_specific_set_beats_a_global_one_in_any_order():
    from normlab.lab import runner

    with pytest.raises(runner.ConfigError, match="n_dis counts something and must be at least 0, got -1"):
        runner.plan(["spectral-gan"], scale="smoke", seeds=1, sets=["n_dis=-1"])  # 0 is allowed there
    for sets in (["invariance.n=10", "n=20"], ["n=20", "invariance.n=10"]):
        tasks = runner.plan(["invariance", "activations"], scale="smoke", seeds=1, sets=sets)
        assert {t.experiment: t.config["n"] for t in tasks} == {"invariance": 10, "activations": 20}


def test_check_below_the_bound_is_strict():
    """Wrong version (verdict.py: ``a < bound`` -> ``a <= bound``): a seed exactly at the bound is
    not below it (the above=True side of this was tested, the below side not)."""
    assert check([0.3, 0.3], 0.3, above=False) == NOT_REPRODUCED
    assert check([0.2, 0.3], 0.3, above=False) == INCONCLUSIVE
    assert check([0.2, 0.29], 0.3, above=False) == REPRODUCED


def test_an_inclusive_bound_holds_at_the_bound():
    """A claim of "at most" (or "at least") holds at the bound itself; a mean on the bound with a
    seed beyond it is then on the claim's side (inconclusive, not the split-flags rule)."""
    assert check([0.3, 0.3], 0.3, above=False, inclusive=True) == REPRODUCED
    assert check([0.2, 0.35], 0.3, above=False, inclusive=True) == INCONCLUSIVE
    assert check([0.35, 0.4], 0.3, above=False, inclusive=True) == NOT_REPRODUCED
    assert check([0.5, 0.5], 0.5, above=True, inclusive=True) == REPRODUCED
    assert check([0.4, 0.45], 0.5, above=True, inclusive=True) == NOT_REPRODUCED


def test_convergence_at_exactly_the_claimed_share_of_epochs_reproduces():
    """The claim is that BN needs at most 30% of the baseline's epochs (20-30 of 100): 12 of 40
    epochs is that 30%, and was judged not reproduced by a strict "<", while the measured line
    said "claim <= 0.3". Wrong version: convergence.py verdict without ``inclusive=True``."""
    assert _decide("convergence", _convergence(12)).label == REPRODUCED  # 12/40 = 0.3 exactly
    assert _decide("convergence", _convergence(13)).label == NOT_REPRODUCED


def test_a_diverged_seed_makes_the_rest_decide_between_inconclusive_and_not():
    """Wrong version (verdict.py: ``np.nanmean`` -> ``np.mean``): one NaN seed (a diverged run)
    caps the label at inconclusive, and the other seeds' mean decides the rest."""
    nan = float("nan")
    assert check([0.2, 0.3, nan], 0.0) == INCONCLUSIVE
    assert check([-0.2, -0.3, nan], 0.0) == NOT_REPRODUCED
    assert check([0.1, 0.2, nan], 0.5, above=False) == INCONCLUSIVE
    assert check([nan, nan], 0.0) == NOT_REPRODUCED


def test_combine_is_order_independent():
    """Wrong version (verdict.py: INCONCLUSIVE looked for after the first part only): the test
    had the inconclusive part second; first must count too."""
    assert combine([(INCONCLUSIVE, "a"), (REPRODUCED, "b")]).label == INCONCLUSIVE
    assert combine([(INCONCLUSIVE, "a"), (REPRODUCED, "b"), (NOT_REPRODUCED, "c")]).label == NOT_REPRODUCED
    assert combine([(REPRODUCED, "a")]).label == REPRODUCED


def test_combine_of_one_part_keeps_its_text():
    """Wrong version (verdict.py: ``len(parts) > 1`` -> ``> 0``): one part's reason is its own
    text, without a ``[label]`` suffix."""
    v = combine([(INCONCLUSIVE, "values 0.1 ± 0.2 > 0")])
    assert v.reason == "values 0.1 ± 0.2 > 0" and v.label == INCONCLUSIVE


def test_mean_sd_of_one_seed():
    """A single seed's sd is 0, not NaN (``len(v) > 0`` for ``> 1`` would make it NaN); ``fmt``
    then shows the value alone, a spread of one seed being no spread at all."""
    assert mean_sd([0.5]) == (0.5, 0.0)
    assert fmt([0.5]) == "0.500"
    m, s = mean_sd([0.94, 0.95, 0.93])
    assert math.isclose(m, 0.94) and math.isclose(s, 0.01)


def test_fmt_signed():
    """Wrong version (verdict.py: the ``+`` sign flag dropped): signed=True shows the sign of a
    positive mean (used for gaps and gains in the reasons), never on the sd."""
    assert fmt([0.01, 0.03], signed=True) == "+0.020 ± 0.014"
    assert fmt([-0.01, -0.03], signed=True) == "-0.020 ± 0.014"
    assert fmt([0.01, 0.03]) == "0.020 ± 0.014"
    assert fmt([0.1, 0.2], percent=True, signed=True) == "+15.0 ± 7.1%"


def test_too_few_seeds_text():
    """Wrong version (verdict.py: ``n < MIN_SEEDS`` -> ``<=``) and (``n != 1`` -> ``n > 1``)."""
    assert too_few_seeds(2) == "" and too_few_seeds(5) == ""
    assert too_few_seeds(1) == " (only 1 seed: a verdict needs at least 2)"
    assert too_few_seeds(0) == " (only 0 seeds: a verdict needs at least 2)"


def test_verdict_rejects_an_unknown_label():
    """Wrong version (verdict.py: the label check removed): a typo in a rule is an error, not a
    fourth label in the report."""
    with pytest.raises(ValueError, match="verdict label must be one of"):
        Verdict("reproducd", "x")
    assert Verdict(REPRODUCED, "x").label == REPRODUCED


@pytest.mark.parametrize("values,want", [([7.9e-08, 9.7e-08], "8.8e-08 ± 1.3e-08"), ([0.5, 0.7], "0.6000 ± 0.1414"),
                                         ([0.0, 0.0], "0.0000 ± 0.0000"), ([1e-08, -1e-08], "0 ± 1.4e-08")])
def test_numbers_table_keeps_the_digits_of_tiny_numbers(values, want):
    """A masked error of 8e-08 read "0.0000 ± 0.0000" while the verdict beside it quoted 8.8e-08."""
    from normlab.lab.report import _over_seeds

    assert _over_seeds(values) == want


def test_mean_sd_counts_a_nan_seed_as_nan():
    """The documented rule: a NaN seed (a diverged run) makes the mean and spread NaN, never silently dropped."""
    m, s = mean_sd([0.5, float("nan"), 0.7])
    assert math.isnan(m) and math.isnan(s)


def test_one_seed_names_the_first_of_the_seeds_given():
    from normlab.lab.verdict import one_seed
    assert one_seed([3, 5, 7]) == "seed 3"
    assert one_seed() == one_seed([]) == "the first seed"


def test_small_means_keep_significant_digits_and_only_infinities_read_as_never_reached():
    """Wrong versions: report.py _mean_sd's ``1e-3 <= size`` -> ``1e-4`` (1.3e-4 read 0.0001 ± 0.0000);
    _over_seeds' ``all(math.isinf ...)`` -> ``any`` (a diverged NaN seed counted as never reached)."""
    from normlab.lab.report import _over_seeds

    assert _over_seeds([1.234e-4, 1.3e-4]) == "0.0001267 ± 4.7e-06"
    assert _over_seeds([1.0, float("inf"), float("nan")]) == "1.0000 over the other 1; 2 of 3 seeds not finite"


def test_a_config_list_that_reads_the_same_both_ways_is_not_per_seed():
    """A swept list of the config as long as the seeds and a palindrome ([0.5, 0.5]) comes back
    the same from the reversed runs too; it is the config's, not one number per seed.
    Wrong versions: report.py _per_seed_keys without the ``same(v, v[::-1])`` test or without the
    config-list test (both counted it per seed: a "mean ± sd" row for the swept values)."""
    import types
    from dataclasses import dataclass

    from normlab.lab.report import _per_seed_keys

    @dataclass(frozen=True)
    class Config:
        rates: tuple = (0.5, 0.5)

    def summarize(config, runs):
        return {"rates": list(config.rates), "acc": [r["acc"] for r in runs]}

    exp = types.SimpleNamespace(module=types.SimpleNamespace(summarize=summarize))
    runs = [{"acc": 0.9}, {"acc": 0.7}]
    assert _per_seed_keys(exp, Config(), runs, summarize(Config(), runs)) == {"acc"}


def test_pooled_seeds_that_agree_on_an_environment_value_show_it_once():
    """Wrong version: report.py _per_run without its ``len(seen) == 1`` case ("2.1 (seeds 0, 1)")."""
    import types

    from normlab.lab.report import _per_run

    runs = [types.SimpleNamespace(env={"torch": "2.1"}, seed=s) for s in (0, 1)]
    assert _per_run(runs, lambda env: env["torch"]) == "2.1"


def test_per_seed_lists_are_found_even_when_summarize_refuses_the_reversed_runs():
    """The reversed-order probe is only for the table layout: a summarize that raises on it (here
    one that wants seeds in order) must not fail the section. Wrong version: report.py
    _per_seed_keys catching only some exceptions."""
    import types
    from dataclasses import dataclass

    from normlab.lab.report import _per_seed_keys

    @dataclass(frozen=True)
    class Config:
        n: int = 1

    def summarize(config, runs):
        if [r["seed"] for r in runs] != sorted(r["seed"] for r in runs):
            raise KeyError("seeds out of order")
        return {"acc": [r["acc"] for r in runs]}

    exp = types.SimpleNamespace(module=types.SimpleNamespace(summarize=summarize))
    runs = [{"seed": 0, "acc": 0.9}, {"seed": 1, "acc": 0.7}]
    assert _per_seed_keys(exp, Config(), runs, summarize(Config(), runs)) == {"acc"}
