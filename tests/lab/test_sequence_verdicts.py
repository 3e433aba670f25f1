"""The sequence experiments (rnn, padding, transformer): verdict rules on synthetic metrics, each with a
case that must come out "reproduced" and one that must come out "not reproduced", and the padding
experiment's statistic error measured on tensors whose answer is known."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from normlab.lab import experiments
from normlab.lab.experiments import padding, rnn
from normlab.lab.verdict import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED

NOISE = (0.0, 0.01, -0.01)  # per-seed jitter


def _decide(name, runs):
    e = experiments.get(name)
    cfg = e.config("quick")
    return e.module.verdict(e.module.summarize(cfg, runs))


# -- rnn ----------------------------------------------------------------------------------------

def _rnn(ln_rise_at, bn_gap, plain_final=0.6):
    """Curves on the quick grid: the plain cell rises linearly to ``plain_final``; LN jumps to 0.7 at step
    ``ln_rise_at`` (never if None); BN's accuracy with batch statistics is ``bn_gap`` above its inference one."""
    steps = [0, 15, 30, 45, 60, 75, 90, 105, 120, 135, 150]
    plain = [0.2 + (plain_final - 0.2) * s / 150 for s in steps]
    ln = [0.7 if ln_rise_at is not None and s >= ln_rise_at else 0.3 for s in steps]
    out = []
    for n in NOISE:
        run = {}
        for cell in ("gru", "lstm"):
            run[cell] = {"none": {"step": steps, "test_acc": plain, "acc_batch_stats": plain[-1]},
                         "layer": {"step": steps, "test_acc": ln, "acc_batch_stats": ln[-1]},
                         "batch": {"step": steps, "test_acc": [0.5] * 11, "acc_batch_stats": 0.5 + bn_gap + n}}
        out.append(run)
    return out


def test_rnn_rule():
    assert _decide("rnn", _rnn(ln_rise_at=60, bn_gap=0.1)).label == REPRODUCED
    v = _decide("rnn", _rnn(ln_rise_at=None, bn_gap=0.1))  # LN never reaches the plain cell's accuracy
    assert v.label == NOT_REPRODUCED and "never" in v.reason
    assert _decide("rnn", _rnn(ln_rise_at=60, bn_gap=0.0)).label == NOT_REPRODUCED  # BN loses nothing


def test_steps_to_target_and_censoring():
    assert rnn.steps_to([0, 10, 20], [0.1, 0.5, 0.9], 0.5) == 10
    assert rnn.steps_to([0, 10, 20], [0.1, 0.5, 0.9], 0.95) == math.inf
    assert rnn.censored([10.0, math.inf], 20, 5.0) == [10.0, 25.0]
    assert rnn.fmt_steps([10.0, math.inf]) == "[10, never]"


# -- padding ------------------------------------------------------------------------------------

def test_stat_error_is_zero_for_masked_bn_and_positive_for_plain_bn():
    torch.manual_seed(0)
    x = torch.randn(16, 6, 20) + 1.0  # channels with mean 1, sd 1
    lengths = torch.randint(4, 21, (16,))
    mask = torch.arange(20)[None, :] < lengths[:, None]
    x = x * mask[:, None, :]  # zero padding, as make_padded_seq writes it
    e = padding.stat_errors(x, mask)
    assert e["masked_batch"]["mean"] < 1e-5 and e["masked_batch"]["var"] < 1e-5
    frac = 1 - mask.float().mean().item()
    assert e["batch"]["mean"] > 0.5 * frac and e["batch"]["var"] > 0.05  # mean_BN ~ (1 - p) mean_valid
    full = torch.ones(16, 20, dtype=torch.bool)  # no padding: both are exact
    e0 = padding.stat_errors(torch.randn(16, 6, 20), full)
    assert e0["batch"]["mean"] < 1e-5 and e0["batch"]["var"] < 1e-4 and e0["masked_batch"]["mean"] < 1e-5


def _padding(bn_error, masked_error=1e-7):
    fractions = [0.0, 0.25, 0.5, 0.75, 0.92]
    return [{"train_pad_fraction": 0.4,
             "probe": {"fraction": fractions, "batch_mean": [bn_error * f + n for f in fractions],
                       "batch_var": [bn_error * f for f in fractions], "masked_mean": [masked_error] * 5,
                       "masked_var": [masked_error] * 5, "sampling": [0.05] * 5},
             **{norm: {"test_acc": [0.25, 0.7 + n]} for norm in ("batch", "masked_batch", "layer")}}
            for n in NOISE]


def test_padding_rule():
    assert _decide("padding", _padding(bn_error=1.0)).label == REPRODUCED
    assert _decide("padding", _padding(bn_error=0.0)).label == NOT_REPRODUCED  # no pollution beyond noise
    assert _decide("padding", _padding(bn_error=1.0, masked_error=0.3)).label == NOT_REPRODUCED  # mask broken


def test_padding_with_one_fraction_above_zero_compares_it_with_no_padding():
    """With pad_fractions (0.0, 0.5) the least padding above 0 was 0.5 itself: "the more padding,
    the larger" compared 0.5 with 0.5 and could never hold. It now compares with 0."""
    runs = _padding(bn_error=1.0)
    for r in runs:
        pr = r["probe"]
        for key in ("fraction", "batch_mean", "batch_var", "masked_mean", "masked_var", "sampling"):
            pr[key] = [pr[key][0], pr[key][2]]  # fractions 0.0 and 0.5
    cfg = padding.Config(pad_fractions=(0.0, 0.5))
    s = padding.summarize(cfg, runs)
    assert s["min_fraction"] == 0.0 and s["max_fraction"] == 0.5
    assert padding.verdict(s).label == REPRODUCED


@pytest.mark.parametrize("fractions,max_len", [((0.0, 0.02), 24), ((0.5, 0.51), 24)])
def test_padding_fractions_that_round_to_one_length_are_refused(fractions, max_len):
    """Fractions are measured on whole tokens of max_len: 0.0 and 0.02 of 24 tokens are both 24
    valid tokens, one measurement; the check counted the fractions as given."""
    with pytest.raises(ValueError, match="at least 2 different fractions once rounded to whole tokens"):
        padding.validate(padding.Config(pad_fractions=fractions, max_len=max_len))


# -- transformer --------------------------------------------------------------------------------

def _transformer(acc, post_over_pre_growth):
    depths = (2, 4, 8, 12)
    runs = []
    for n in NOISE:
        train = {k: {"test_acc": [0.1, a + n, a + n], "diverged": False} for k, a in acc.items()}
        probe = {}
        for d in depths:
            pre = 0.3 / math.sqrt(d)
            post = 0.2 * post_over_pre_growth ** (math.log(d / 2) / math.log(6)) / math.sqrt(d)
            probe[f"pre-{d}"], probe[f"post-{d}"] = [pre] * d, [post] * d
        runs.append({"train": train, "probe": probe})
    return runs


BASE = {"none-pre": 0.3, "layer-pre": 0.6, "layer-post": 0.5, "rms-pre": 0.6, "batch-pre": 0.5}


def test_transformer_rule():
    assert _decide("transformer", _transformer(BASE, 2.0)).label == REPRODUCED
    assert _decide("transformer", _transformer({**BASE, "none-pre": 0.7}, 2.0)).label == NOT_REPRODUCED
    v = _decide("transformer", _transformer(BASE, 0.8))  # post-LN's gradient shrinks relative to pre-LN's
    assert v.label == NOT_REPRODUCED and "Theorem 1" in v.reason


@pytest.mark.parametrize("name", ["rnn", "padding", "transformer"])
def test_inconclusive_with_one_seed(name):
    runs = {"rnn": _rnn(60, 0.1), "padding": _padding(1.0), "transformer": _transformer(BASE, 2.0)}[name]
    assert _decide(name, runs[:1]).label == INCONCLUSIVE


def test_padding_rule_needs_growth_with_padding():
    runs = _padding(bn_error=1.0)
    for r in runs:  # polluted, but no more at 92% padding than at 25%
        r["probe"]["batch_mean"] = [0.0, 0.8, 0.8, 0.8, 0.8]
    v = _decide("padding", runs)
    assert v.label == NOT_REPRODUCED and "the more padding" in v.reason


@pytest.mark.parametrize("depths", [(4, 4), (3, 3, 3)])
def test_transformer_refuses_probe_depths_that_are_one_depth_repeated(depths):
    """The gradient part of the verdict divides the post/pre ratio at the largest depth by the one at the
    smallest: with a single distinct depth that is a number over itself, growth 1.00 and "not reproduced"
    whatever the model does, so such a config is refused up front, as a single depth is."""
    from normlab.lab.experiments import transformer

    with pytest.raises(ValueError, match="at least two different depths"):
        transformer.validate(transformer.Config(probe_depths=depths))
    transformer.validate(transformer.Config(probe_depths=(2, 4)))  # two different depths still pass


# -- metrics and verdict inputs left unguarded (found by a mutation audit of experiments/) ---------

def test_rnn_target_is_the_plain_cells_final_accuracy_and_a_never_seed_is_censored_not_infinite():
    """The target is the plain cell's *final* test accuracy (not its best), and a seed whose LN net
    never reaches it counts one evaluation interval past the end, so one such seed among early
    ones makes the speed-up inconclusive, not "not reproduced" by an infinite mean.
    Wrong versions (rnn): target ``[-1]`` -> ``max(...)``; the verdict comparing uncensored steps."""
    runs = _rnn(ln_rise_at=60, bn_gap=0.1)
    for r in runs:
        for cell in ("gru", "lstm"):
            r[cell]["none"]["test_acc"] = r[cell]["none"]["test_acc"][:-1] + [0.55]  # final below the peak 0.57
    s = rnn.summarize(rnn.SCALES["quick"], runs)
    assert s["target_gru"] == [0.55] * 3
    runs = _rnn(ln_rise_at=60, bn_gap=0.1)
    for cell in ("gru", "lstm"):
        runs[1][cell]["layer"]["test_acc"] = [0.3] * 11  # this seed's LN net never gets there
    assert _decide("rnn", runs).label == INCONCLUSIVE


def test_rnn_batch_statistics_skip_a_last_batch_of_one_and_validate_needs_batch_norm(monkeypatch):
    """A last test batch of one example has no batch statistics (BN in train mode refuses it): it is
    left out, not a crash at the end of every run. The verdict reads BN's gap, so 'batch' is required,
    and steps-to-target can be 0: the evaluation grid starts at step 0.
    Wrong versions (rnn): the ``len(xb) < 2`` guard removed; validate requiring only none and layer;
    ``eval_at = [0] + ...`` -> without 0."""
    from normlab.lab import models, training

    torch.manual_seed(0)
    model = models.RNNClassifier(3, 8, 4, cell="gru", norm="batch").eval()
    x, y = torch.randn(17, 5, 3), torch.randint(0, 4, (17,))
    got = rnn.batch_stats_accuracy(model, x, y, batch_size=8)
    assert got == rnn.batch_stats_accuracy(model, x[:16], y[:16], batch_size=8)
    with pytest.raises(ValueError, match="batch"):
        rnn.validate(rnn.Config(norms=("none", "layer")))
    calls = []

    def train(model, data, **kw):
        calls.append(kw["eval_at"])
        return {"step": list(kw["eval_at"]), "test_acc": [0.5] * len(kw["eval_at"]), "diverged": False}
    monkeypatch.setattr(training, "train", train)
    rnn.run(rnn.Config(cells=("gru",), length=4, n_train=64, n_test=16, hidden_size=4, steps=4, evals=2), 0,
            lambda f: None)
    assert all(list(e) == [0, 2, 4] for e in calls)


def test_stat_errors_are_in_units_of_the_valid_tokens_sd():
    """The mean error is |mean_layer - mean_valid| / sd_valid per channel, and the variance error
    |var_layer / var_valid - 1| (unbiased variances), checked on channels whose sd is far from 1.
    Wrong version (padding.stat_errors: the division by ``sd_v`` dropped): the existing test uses sd 1."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 10) * torch.tensor([0.2, 5.0, 30.0])[None, :, None] + 2.0
    mask = torch.arange(10)[None, :] < torch.tensor([10, 3, 7, 5, 10, 2, 8, 4])[:, None]
    x = x * mask[:, None, :]
    valid = x.transpose(1, 2)[mask]
    mean_v, var_v = valid.mean(0), valid.var(0)
    flat = x.transpose(1, 2).reshape(-1, 3)
    e = padding.stat_errors(x, mask)
    assert e["batch"]["mean"] == pytest.approx(((flat.mean(0) - mean_v).abs() / var_v.sqrt()).mean().item(), rel=1e-5)
    assert e["batch"]["var"] == pytest.approx((flat.var(0) / var_v - 1).abs().mean().item(), rel=1e-5)


def test_padding_probe_measures_the_first_norms_input_on_zero_padded_batches():
    """_probe: for each padding fraction, probe sequences cut to a common valid length with zeros
    after it, the statistic errors of the first norm's input (token embedding plus position) per
    batch, and the sampling error of a batch's valid mean against the pooled one, in valid sd.
    Wrong versions (padding._probe): the padding left as data (``x = probe_x``); the hook on
    ``norm2``; the sampling error not divided by the batch's valid sd."""
    from normlab.lab import models

    torch.manual_seed(0)
    cfg = padding.Config(max_len=12, min_len=4, d_model=16, num_layers=1, batch_size=4, pad_fractions=(0.0, 0.5),
                         probe_batches=2)
    model = models.TransformerClassifier(3, 4, d_model=16, nhead=4, num_layers=1, dim_feedforward=32, norm="batch",
                                         norm_first=True, max_len=12)
    probe_x = torch.randn(8, 12, 3) + 1.0
    out = padding._probe(cfg, model, probe_x)
    assert model.training  # left as it was found
    for k, p in enumerate(cfg.pad_fractions):
        n_valid = padding.valid_len(p, 12)
        mask = (torch.arange(12)[None, :] < n_valid).expand(8, 12)
        with torch.no_grad():
            h = (model.embed(probe_x * mask[..., None]) + model.pos[:12]).transpose(1, 2)
        errs = [padding.stat_errors(h[i: i + 4], mask[i: i + 4]) for i in (0, 4)]
        pooled = h.transpose(1, 2)[mask].mean(0)
        assert out["fraction"][k] == pytest.approx(1 - n_valid / 12)
        assert out["batch_mean"][k] == pytest.approx(np.mean([e["batch"]["mean"] for e in errs]), rel=1e-5)
        assert out["batch_var"][k] == pytest.approx(np.mean([e["batch"]["var"] for e in errs]), rel=1e-5)
        want = np.mean([((e["valid_mean"] - pooled).abs() / e["valid_sd"]).mean().item() for e in errs])
        assert out["sampling"][k] == pytest.approx(want, rel=1e-5)


def test_padding_masked_variance_error_counts_and_probe_batches_need_two_sequences():
    """Masked BN's largest error covers its variance as well as its mean, and batch_size 1 (no batch
    statistics) is refused. Wrong versions (padding): ``masked_error_max`` over the mean errors only;
    validate's ``batch_size < 2`` -> ``< 1``."""
    runs = _padding(bn_error=1.0)
    for r in runs:
        r["probe"]["masked_var"] = [0.3] * 5  # the mask fixes the mean but not the variance
    v = _decide("padding", runs)
    assert v.label == NOT_REPRODUCED and "masked BN" in v.reason
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        padding.validate(padding.Config(batch_size=1))


def test_transformer_gradient_probe_reads_each_blocks_second_ffn_weight_of_ln_models_in_place():
    """gradient_norms is |dL/dW2| of each block's second feed-forward weight; the probe builds LN
    models of each placement (pre: norm_first) at each depth, the training variants put each norm
    where their name says (post-LN also for every norm in post_norms), and the summary compares the
    *last* block's gradients. Wrong versions (transformer): ``ff[2]`` -> ``ff[0]``; the probe built
    with ``config.norms[0]`` ("none": pre and post the same model); ``norm_first`` always False;
    post-LN trained for 'layer' only; the ratio read at the first block; validate accepting evals=1."""
    from normlab.lab import training
    from normlab.lab.experiments import transformer as m

    torch.manual_seed(0)
    model = m._model(m.SCALES["smoke"], _TokDS(), "layer", "post", 2)
    x, y = torch.randn(6, 4, 8), torch.randint(0, 10, (6,))
    got = m.gradient_norms(model, x, y)
    ws = [layer.ff[2].weight for layer in model.layers]
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), ws)
    assert got == pytest.approx([g.norm().item() for g in grads], rel=1e-6)

    built, trained = [], []
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(m, "gradient_norms", lambda model, x, y: built.append(model) or [1.0] * len(model.layers))
        mp.setattr(training, "train", lambda model, data, **kw: trained.append(model) or
                   {"step": [0], "test_acc": [0.5], "diverged": False})
        cfg = m.Config(data="digits", patch=8, norms=("none", "layer", "rms"), post_norms=("layer", "rms"),
                       d_model=8, nhead=2, num_layers=1, steps=2, evals=2, probe_depths=(1, 2), probe_batch=8)
        out = m.run(cfg, 0, lambda f: None)
    finally:
        mp.undo()
    assert [(mod.layers[0].norm_first, len(mod.layers)) for mod in built] == [(True, 1), (True, 2), (False, 1), (False, 2)]
    assert all(type(mod.layers[0].norm1.norm).__name__ == "LayerNorm" for mod in built)
    assert list(out["train"]) == ["none-pre", "layer-pre", "layer-post", "rms-pre", "rms-post"]
    assert [mod.layers[0].norm_first for mod in trained] == [True, True, False, True, False]
    runs = [{"train": {k: {"test_acc": [0.5, 0.5], "diverged": False} for k in out["train"]},
             "probe": {"pre-1": [2.0], "post-1": [2.0], "pre-2": [9.0, 1.0], "post-2": [1.0, 3.0]}}]
    s = m.summarize(cfg, runs)
    assert s["post_over_pre_hi"] == [3.0] and s["ratio_growth"] == [3.0]
    with pytest.raises(ValueError, match="evals must be at least 2"):
        m.validate(m.Config(evals=1))


class _TokDS:
    """The two fields of a token data set that transformer._model reads: 4 tokens of 8 features, 10 classes."""
    input_shape = (4, 8)
    num_classes = 10
