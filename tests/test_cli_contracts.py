"""Contracts of the demo, the root command, help text, input checks, the factory, weight and
spectral norm, and the benchmarks' timing helpers that their own tests left open. Each was
found by mutating the code: the test fails on the wrong version named in its docstring.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrizations as P

import normlab.functional as NF
import normlab.nn as NN
from helpers import cli_runner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # _timing

cli = cli_runner()
WIDE = {"COLUMNS": "400"}


def _torch_sigmoid_stack(seed, layers, width, n=100, d=20):
    """The documented experiment, built on torch: X ~ U(0, 1) (n, d), W ~ N(0, 1) drawn after X from
    one default_rng(seed); batch norm (training, gamma=1, beta=0, eps=1e-5) before each sigmoid."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.uniform(0.0, 1.0, size=(n, d)))
    ws = [torch.from_numpy(rng.standard_normal((d if i == 0 else width, width))) for i in range(layers)]
    plain, bn, rows = x, x, []
    for w in ws:
        plain = torch.sigmoid(plain @ w)
        bn = torch.sigmoid(F.batch_norm(bn @ w, None, None, training=True, eps=1e-5))
        rows.append([(h.mean().item(), h.var(unbiased=False).item(), ((h < 0.05) | (h > 0.95)).double().mean().item())
                     for h in (plain, bn)])
    return rows


@pytest.mark.parametrize("seed,layers,width", [(0, 5, 64), (3, 2, 8)])
def test_demo_numbers_match_a_torch_twin_of_the_documented_experiment(seed, layers, width):
    """sigmoid_stack's rows: layer 1..L, mean / population variance / share outside [0.05, 0.95] of
    the sigmoid outputs, plain and with batch norm, against torch's batch norm and sigmoid.
    Wrong version: demo.py ``h_bn = sigmoid(z)`` -> ``sigmoid(h_bn @ w)`` (no batch norm); ``h > 0.95`` ->
    ``h > 0.9``; ``h_plain.var()`` -> ``.std()``; ``uniform(0.0, 1.0`` -> ``uniform(-1.0, 1.0``; ``layer=i + 1`` -> ``i``."""
    from normlab.demo import sigmoid_stack

    rows = sigmoid_stack(seed=seed, layers=layers, width=width)
    want = _torch_sigmoid_stack(seed, layers, width)
    assert [r["layer"] for r in rows] == list(range(1, layers + 1))
    for r, ((pm, pv, ps), (bm, bv, bs)) in zip(rows, want):
        got = (r["plain_mean"], r["plain_var"], r["plain_saturated"], r["bn_mean"], r["bn_var"], r["bn_saturated"])
        assert got == pytest.approx((pm, pv, ps, bm, bv, bs), rel=1e-9, abs=1e-12)
    if (seed, layers, width) == (0, 5, 64):  # the article's point: saturation without BN, not with it
        assert rows[-1]["plain_saturated"] > 0.5 > rows[-1]["bn_saturated"]


def test_demo_table_prints_sigmoid_stacks_numbers_for_the_options_given():
    """``normlab demo --seed S --layers L --width W`` prints one row per layer with sigmoid_stack's
    numbers for exactly those options, each column the right statistic.
    Wrong version: cli.py ``f"{r['plain_var']:.4f}"`` -> ``r['plain_mean']``; ``width=width`` -> ``width=64``."""
    from normlab.cli import app as root
    from normlab.demo import sigmoid_stack

    result = cli.invoke(root, ["demo", "--seed", "3", "--layers", "2", "--width", "8"], env=WIDE)
    assert result.exit_code == 0, result.stderr
    table = [[c.strip() for c in line.split("│")[1:-1]] for line in result.stdout.splitlines() if line.count("│") == 8]
    body = [row for row in table if row[0].isdigit()]
    want = [[str(r["layer"]), f"{r['plain_mean']:.3f}", f"{r['plain_var']:.4f}", f"{r['plain_saturated']:.0%}",
             f"{r['bn_mean']:.3f}", f"{r['bn_var']:.4f}", f"{r['bn_saturated']:.0%}"]
            for r in sigmoid_stack(seed=3, layers=2, width=8)]
    assert body == want


@pytest.mark.parametrize("args", [["--layers", "0"], ["--width", "1"], ["--seed", "-1"]])
def test_demo_refuses_counts_below_their_minimum(args):
    """--layers < 1, --width < 2 and a negative --seed are usage errors (exit 2), not an empty table.
    Wrong version: cli.py ``min=1`` -> ``min=0`` for --layers."""
    from normlab.cli import app as root

    result = cli.invoke(root, ["demo", *args])
    assert result.exit_code == 2 and "Invalid value" in result.stderr


def test_root_command_has_the_lab_group():
    """``normlab lab ...`` is reachable from the root command (the console script's app).
    Wrong version: cli.py ``add_typer(lab_app, name="lab")`` -> ``name="labs"``."""
    from normlab.cli import app as root

    result = cli.invoke(root, ["lab", "list"], env=WIDE)
    assert result.exit_code == 0 and "bn-mnist" in result.stdout


def test_reflowed_joins_prose_paragraphs_and_keeps_indented_examples():
    """Each prose paragraph of the docstring becomes one line; a paragraph with indented lines
    (examples) keeps its line breaks.
    Wrong version: _help.py ``else " ".join(p.split())`` -> ``else p``; ``p if any(`` -> ``p if not any(``."""
    from normlab._help import reflowed

    @reflowed
    def f():
        """Summary line.

        A paragraph wrapped
        over two lines.

          example one
          example two
        """
    assert f.__doc__ == "Summary line.\n\nA paragraph wrapped over two lines.\n\n  example one\n  example two"


@pytest.mark.parametrize("cls", [NN.LayerNorm, NN.RMSNorm])
def test_a_zero_size_normalized_shape_is_accepted_as_torch_does(cls):
    """normalized_shape sizes are ints >= 0, as torch's: (0,) builds the layer and runs on an empty input.
    Wrong version: _checks.py as_normalized_shape ``s < 0`` -> ``s <= 0``."""
    twin = getattr(torch.nn, cls.__name__)
    ours, theirs = cls((0,)), twin((0,))
    assert repr(ours) == repr(theirs)
    assert ours(torch.randn(2, 0)).shape == theirs(torch.randn(2, 0)).shape == (2, 0)


@pytest.mark.parametrize("ns", [True, (3, False)])
def test_a_bool_normalized_shape_is_refused(ns):
    """A bool is never a size (True == 1 to Python): refused with the normalized_shape message.
    Wrong version: _checks.py as_normalized_shape ``any(isinstance(s, bool) or not ...`` -> ``any(not ...``."""
    for cls in (NN.LayerNorm, NN.RMSNorm):
        with pytest.raises(ValueError, match="normalized_shape must be a size or a non-empty sequence"):
            cls(ns)


def test_a_bool_momentum_is_refused():
    """momentum=True is a mistake, not the factor 1.0.
    Wrong version: _checks.py check_momentum ``not isinstance(momentum, bool) and`` removed."""
    with pytest.raises(ValueError, match=r"momentum must be None or a number in \[0, 1\].*got momentum=True"):
        NN.BatchNorm1d(3, momentum=True)


def test_masked_batch_norm_refuses_a_bool_momentum_when_training_updates_running_stats():
    """The functional masked batch norm's momentum must be a number when it updates running stats.
    Wrong version: _checks.py check_running_args ``(momentum is None or isinstance(momentum, bool))`` -> ``momentum is None``."""
    x, rm, rv = torch.randn(4, 3, 5), torch.zeros(3), torch.ones(3)
    mask = torch.ones(4, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="momentum must be a number when training updates the running statistics, got True"):
        NF.masked_batch_norm(x, mask, rm, rv, training=True, momentum=True)
    assert torch.equal(rm, torch.zeros(3))


def test_groups_that_do_not_divide_the_channels_say_how_many_are_left_over():
    """Wrong version: _checks.py check_groups ``(it leaves {num_channels % num_groups ...} over)`` -> a fixed text."""
    with pytest.raises(ValueError, match=r"num_groups=3 must be positive and divide the number of channels 8 "
                                         r"\(it leaves 2 over\)"):
        NN.GroupNorm(3, 8)


def test_exactly_eight_all_padding_sequences_are_all_listed_without_and_more():
    """Up to 8 all-padding sequences are listed in full; "and N more" only past 8.
    Wrong version: _checks.py check_no_empty_rows ``len(empty) > 8`` -> ``>= 8``."""
    def padded(n_rows):  # the first n_rows - 1 sequences all padding, the last one valid
        mask = torch.zeros(n_rows, 4, dtype=torch.bool)
        mask[-1] = True
        return mask

    with pytest.raises(ValueError) as e:
        NN.MaskedBatchNorm1d(2)(torch.randn(9, 2, 4), padded(9))
    assert "sequence(s) [0, 1, 2, 3, 4, 5, 6, 7] of the batch" in str(e.value) and "more" not in str(e.value)
    with pytest.raises(ValueError, match=r"sequence\(s\) \[0, 1, 2, 3, 4, 5, 6, 7\] and 1 more of the batch"):
        NN.MaskedBatchNorm1d(2)(torch.randn(10, 2, 4), padded(10))


def test_lrn_without_a_size_names_the_spec_and_gives_an_example():
    """Wrong version: factory.py ``f"norm spec {spec!r} needs {what}, ..."`` -> ``f"norm spec needs {what}, ..."``."""
    with pytest.raises(ValueError, match=r"^norm spec 'lrn' needs a size \(channels summed over\), e.g. 'lrn:5'$"):
        NN.make_norm("lrn", 8, dim=2)


def test_a_numpy_channel_count_becomes_a_python_int():
    """make_norm takes any integral num_channels and hands the layer a Python int (its repr and
    attributes as if built with 8).
    Wrong version: factory.py ``num_channels = int(num_channels)`` removed."""
    for spec, attr in (("batch", "num_features"), ("group:2", "num_channels"), ("instance", "num_features")):
        m = NN.make_norm(spec, np.int64(8), dim=1)
        assert type(getattr(m, attr)) is int and repr(m) == repr(NN.make_norm(spec, 8, dim=1))


def test_weight_norm_parametrization_repr_shows_dim():
    """Wrong version: nn/weight_norm.py ``extra_repr`` -> ``""``."""
    assert repr(NN.weight_norm(torch.nn.Linear(3, 4)).parametrizations.weight[0]) == "WeightNorm(dim=0)"
    assert repr(NN.weight_norm(torch.nn.Linear(3, 4), dim=None).parametrizations.weight[0]) == "WeightNorm(dim=-1)"


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_a_legacy_checkpoint_missing_weight_v_fails_to_load_as_torchs_does():
    """A checkpoint with weight_g but no weight_v is not converted: the strict load names the
    missing keys (RuntimeError), as torch's parametrization does.
    Wrong version: nn/weight_norm.py ``if g in state_dict and v in state_dict`` -> ``or`` (KeyError)."""
    old = torch.nn.utils.weight_norm(torch.nn.Linear(5, 3)).state_dict()
    old.pop("weight_v")
    for make in (NN.weight_norm, P.weight_norm):
        with pytest.raises(RuntimeError, match="Missing key"):
            make(torch.nn.Linear(5, 3)).load_state_dict(dict(old))


def test_spectral_norm_repr_shows_the_normalized_dim():
    """Wrong version: nn/spectral_norm.py ``self.dim = dim if dim >= 0 else dim + ndim`` -> ``self.dim = dim``;
    ``extra_repr`` -> ``""``."""
    m = NN.spectral_norm(torch.nn.Linear(4, 3), dim=-1, n_power_iterations=2, eps=1e-6)
    assert repr(m.parametrizations.weight[0]) == "SpectralNorm(n_power_iterations=2, dim=1, eps=1e-06)"


def test_spectral_norm_two_training_forwards_then_one_backward():
    """A second training forward (its power iteration updates _u and _v in place) leaves the first
    forward's graph intact, as torch's (it clones u and v).
    Wrong version: nn/spectral_norm.py ``u = self._u.clone(...)`` -> ``u = self._u``."""
    for make in (NN.spectral_norm, P.spectral_norm):
        torch.manual_seed(0)
        m = make(torch.nn.Linear(4, 3))
        x = torch.randn(2, 4)
        (m(x).sum() + m(x).sum()).backward()
        assert torch.isfinite(m.parametrizations.weight.original.grad).all()


def test_spectral_norm_of_a_zero_1d_weight_is_zero_as_torchs():
    """A 1-D weight is divided by max(norm, eps): a zero weight stays zero, not NaN.
    Wrong version: nn/spectral_norm.py ``F.normalize(weight, dim=0, eps=self.eps)`` -> ``weight / weight.norm()``."""
    outs = []
    for make in (NN.spectral_norm, P.spectral_norm):
        p = torch.nn.PReLU(3)
        with torch.no_grad():
            p.weight.zero_()
        outs.append(make(p).weight.detach())
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], torch.zeros(3))


@pytest.mark.parametrize("cls", [torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d])
def test_spectral_norm_of_transposed_convs_uses_their_output_channels_as_torch(cls):
    """dim=None is 1 (output channels) for every transposed convolution, as torch.
    Wrong version: nn/spectral_norm.py ``transposed = (ConvTranspose1d, ConvTranspose2d, ConvTranspose3d)`` -> ``(ConvTranspose1d,)``."""
    torch.manual_seed(0)
    theirs = P.spectral_norm(cls(3, 5, 2).double())
    torch.manual_seed(0)
    ours = NN.spectral_norm(cls(3, 5, 2).double())
    assert ours.parametrizations.weight[0]._u.shape == theirs.parametrizations.weight[0]._u.shape == (5,)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-12, atol=1e-14)


def test_positive_int_refuses_zero_and_non_numbers():
    """Wrong version: _timing.py positive_int ``if value < 1`` -> ``if value < 0``."""
    import argparse

    from _timing import positive_int

    assert positive_int("3") == 3 and positive_int("1") == 1
    for text, msg in (("0", "must be at least 1, got 0"), ("-2", "must be at least 1"), ("x", "expected a whole number")):
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            positive_int(text)


def test_interleaved_reports_the_median_seconds_per_call(monkeypatch):
    """Each round times ``inner`` calls and records their mean; the result is the median over rounds.
    A fake clock advances 1 s per call of "a" and 3 s per call of "b", except in round 3 (free) and
    round 5 (10x): the median is exactly 1 and 3 (min would be 0, the mean 2.6 and 7.8).
    Wrong version: _timing.py ``statistics.median`` -> ``min``; ``/ inner`` removed."""
    import _timing

    clock = [0.0]
    calls = {"a": 0, "b": 0}
    warmup, inner, rounds = 2, 4, 5
    monkeypatch.setattr(_timing.time, "perf_counter", lambda: clock[0])

    def make(name, cost):
        def f():
            calls[name] += 1
            k = calls[name] - warmup - 1  # 0-based timed call
            if k >= 0:
                clock[0] += cost * {2: 0.0, 4: 10.0}.get(k // inner, 1.0)
        return f

    got = _timing.interleaved({"a": make("a", 1.0), "b": make("b", 3.0)}, rounds=rounds, inner=inner, warmup=warmup)
    assert got == {"a": pytest.approx(1.0), "b": pytest.approx(3.0)}
    assert calls == {"a": warmup + rounds * inner, "b": warmup + rounds * inner}


def test_python_dash_m_normlab_is_the_normlab_command():
    """``python -m normlab`` failed ("is a package and cannot be directly executed")."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "normlab", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lab" in out.stdout and "demo" in out.stdout
