"""Contracts of the lab that decide its numbers: evaluation in eval mode, the training history
(loss window, data order, divergence, best accuracy), the data sets' scaling, splits and
subsets, the run cache and seeds, the report's choice of runs and cells, and what each
experiment trains with and how it summarizes. Each was found by mutating the lab: the test
fails on the wrong version named in its docstring. Several replace ``training.train`` with a
recorder, to see what a run trains with in well under a second.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab.lab import data, models, parallel, training

def _digits(n_train=40, n_test=50):
    return data.load("digits").flat().subset(n_train=n_train, n_test=n_test)


# -- training.py: evaluation --------------------------------------------------------------------

def test_evaluate_uses_running_statistics_and_leaves_them_and_the_mode_alone():
    """Wrong version (training.py evaluate: ``model.eval()`` -> ``model.train()``): test accuracy
    and loss were measured with batch statistics, and each evaluation moved the running averages."""
    ds = _digits()
    torch.manual_seed(0)
    model = models.MLP(64, 10, (16,), norm="batch")
    bn = model.blocks[0][1]
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 2.0)
        bn.running_var.uniform_(0.5, 3.0)
    before = (bn.running_mean.clone(), bn.running_var.clone())
    t = training.Tensors.of(ds)
    acc, loss = training.evaluate(model.train(), t.x_test, t.y_test, batch_size=8)  # partial last batch too
    assert model.training, "evaluate restores the mode it found"
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    with torch.no_grad():
        out = model.eval()(t.x_test)
    assert acc == (out.argmax(1) == t.y_test).sum().item() / len(t.y_test)
    assert loss == pytest.approx(F.cross_entropy(out, t.y_test).item(), rel=1e-5)


def test_eval_points_are_spread_evenly_and_end_at_the_last_step():
    """Wrong version (training.py eval_points: ``steps * (i + 1) / count`` -> ``steps * i / count``):
    the schedule started at step 1 and stopped one interval short of the end (bn-mnist's 'early'
    accuracy and every curve read off the wrong steps)."""
    assert training.eval_points(100, 4) == [25, 50, 75, 100]
    assert training.eval_points(2000, 20)[:2] == [100, 200] and training.eval_points(2000, 20)[-1] == 2000
    assert training.eval_points(3, 10) == [1, 2, 3]


# -- training.py: mini-batches, data order, recorded training loss ------------------------------

def test_batches_reshuffle_every_epoch_and_drop_the_last_partial_batch():
    """Wrong versions (training.py batches): ``range(0, n - batch_size + 1, ...)`` -> ``range(0, n, ...)``
    (a batch of 2 at each epoch's end: BN on a tiny batch), and the permutation drawn once outside
    the epoch loop (every epoch in the same order)."""
    it = training.batches(10, 4, torch.Generator().manual_seed(5))
    got = [next(it) for _ in range(6)]
    ref = torch.Generator().manual_seed(5)
    want = []
    for _ in range(3):
        perm = torch.randperm(10, generator=ref)
        want += [perm[0:4], perm[4:8]]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(torch.cat(want[0:2]), torch.cat(want[2:4]))  # (the check means something)


def _replayed_losses(model, t, steps, batch_size, seed, train_mode=True):
    """Per-step training losses of ``train(..., lr=0)``, computed independently of training.batches."""
    g = torch.Generator().manual_seed(seed)
    n = len(t.x_train)
    losses, per_epoch = [], n // batch_size
    while len(losses) < steps:
        perm = torch.randperm(n, generator=g)
        for k in range(per_epoch):
            if len(losses) == steps:
                break
            idx = perm[k * batch_size: (k + 1) * batch_size]
            model.train(train_mode)
            with torch.no_grad():
                losses.append(F.cross_entropy(model(t.x_train[idx]), t.y_train[idx]).item())
    return losses


def test_train_loss_is_the_mean_over_the_steps_since_the_previous_point_in_the_seeds_data_order():
    """Wrong versions (training.py _train): the window's sum recorded instead of its mean; the
    window not reset at each point (a running mean since step 1); the data-order generator seeded
    with 0 instead of ``seed`` (every seed saw the same batches); ``model.train()`` before the loop
    dropped (a model handed over in eval mode trained on running statistics)."""
    ds = _digits(n_train=40)
    t = training.Tensors.of(ds)
    torch.manual_seed(0)
    model = models.MLP(64, 10, (16,), norm="batch")
    expected = _replayed_losses(model, t, steps=6, batch_size=16, seed=3)  # 2 batches per epoch: 3 epochs
    model.eval()
    hist = training.train(model, t, steps=6, batch_size=16, lr=0.0, seed=3, eval_at=[0, 2, 3, 6])
    assert hist["step"] == [0, 2, 3, 6] and math.isnan(hist["train_loss"][0])
    want = [np.mean(expected[0:2]), np.mean(expected[2:3]), np.mean(expected[3:6])]
    np.testing.assert_allclose(hist["train_loss"][1:], want, rtol=1e-5)
    other = _replayed_losses(model, t, steps=6, batch_size=16, seed=0)
    assert not np.allclose(other, expected)  # (seed 0's order differs: the check means something)


# -- training.py: divergence ------------------------------------------------------------------

def test_a_run_that_diverges_at_an_evaluation_point_keeps_that_point_with_the_diverged_models_accuracy():
    """Wrong versions (training.py _train, after a divergence): ``s >= diverged_step`` -> ``s >``
    (the point at the step that diverged vanished from the history), and the remaining points given
    the last accuracy measured before the divergence instead of the diverged model's."""
    ds = _digits(n_train=64)
    t = training.Tensors.of(ds)
    torch.manual_seed(0)
    model = models.MLP(64, 10, (16,))
    hist = training.train(model, t, steps=3, batch_size=32, lr=50.0, seed=0, eval_at=[0, 1, 2], diverge_loss=0.0)
    assert hist["diverged"] and hist["diverged_step"] == 1
    assert hist["step"] == [0, 1, 2, 3]
    after, _ = training.evaluate(model, t.x_test, t.y_test)
    assert after != hist["test_acc"][0]  # (one huge step changed the model: the check means something)
    assert hist["test_acc"][1:] == [after] * 3 and hist["final_acc"] == after
    assert all(math.isinf(v) for v in hist["test_loss"][1:]) and all(math.isnan(v) for v in hist["train_loss"][1:])


def test_best_acc_is_the_best_point_and_final_acc_the_last(monkeypatch):
    """Wrong version (training.py: ``best_acc = max(test_acc)`` -> ``test_acc[-1]``): learning-rate's
    'largest trainable multiplier' compares final accuracy with the best."""
    scripted = iter([(0.1, 2.3), (0.9, 0.4), (0.5, 1.0)])
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: next(scripted))
    ds = _digits()
    torch.manual_seed(0)
    hist = training.train(models.MLP(64, 10, (8,)), training.Tensors.of(ds), steps=4, batch_size=8, lr=0.1, seed=0,
                          eval_at=[0, 2])
    assert hist["test_acc"] == [0.1, 0.9, 0.5] and hist["best_acc"] == 0.9 and hist["final_acc"] == 0.5


# -- parallel.py ----------------------------------------------------------------------------------

def test_rank_rng_gives_each_rank_its_own_stream_and_restores_the_callers(monkeypatch):
    """Wrong version (parallel.py rank_rng: the rank left out of the seed): every slice of a global
    batch drew the same dropout mask."""
    draws = {}
    for rank in (0, 1):
        monkeypatch.setattr(parallel, "world", lambda rank=rank: (rank, 2))
        torch.manual_seed(123)
        with parallel.rank_rng(7):
            draws[rank] = torch.rand(5)
        assert torch.equal(torch.rand(1), torch.rand(1, generator=torch.Generator().manual_seed(123)))
    assert not torch.equal(draws[0], draws[1])


# -- data.py --------------------------------------------------------------------------------------

def test_digits_pixels_are_sixteenths_scaled_to_exactly_zero_to_one():
    """Wrong version (data.py _make_digits: ``/ 16.0`` -> ``/ 32.0``): the pixels stayed inside
    [0, 1] (the old check) but used half of it."""
    ds = data.load("digits")
    for x in (ds.x_train, ds.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
        np.testing.assert_array_equal(x * 16, np.round(x * 16))


def test_digits_test_split_gives_each_class_its_largest_remainder_share():
    """Wrong version (data.py _stratified_split: the remainders sorted ascending, ``[::-1]`` dropped):
    the extra test images went to the classes with the smallest remainders, still within one of
    the share, so the old balance check passed."""
    ds = data.load("digits")
    total = np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_test, minlength=10)
    share = total * 360 / total.sum()
    want = np.floor(share).astype(int)
    want[np.argsort(share - want)[::-1][: 360 - want.sum()]] += 1
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), want)


@pytest.mark.parametrize("name", ["digits", "padded-seq"])
def test_subset_keeps_inputs_labels_and_masks_together(name):
    """Wrong versions (data.py Dataset.subset: ``y_train[:n]`` -> ``y_train[-n:]``, and the same for
    ``y_test``): the shapes were right and every label was shuffled off its input; no test looked."""
    ds = data.load(name)
    sub = ds.subset(n_train=7, n_test=5)
    for part, n in (("train", 7), ("test", 5)):
        for field in ("x", "y", "mask"):
            full = getattr(ds, f"{field}_{part}")
            if full is not None:
                np.testing.assert_array_equal(getattr(sub, f"{field}_{part}"), full[:n])


def test_padded_sequence_lengths_cover_min_len_to_max_len():
    """Wrong version (data.py make_padded_seq: ``t < lengths`` -> ``t <= lengths``): every sequence
    one step longer than drawn, so ``min_len`` never occurred; the old bounds check still passed."""
    ds = data.make_padded_seq(n_train=400, n_test=10, min_len=5, max_len=12, num_features=3, num_classes=3)
    assert set(data.lengths(ds.mask_train).tolist()) == set(range(5, 13))


# -- experiments/__init__.py and runner.py: the cache key, seeds, stored configs ------------------

def test_bumping_an_experiments_version_is_a_new_cache_entry(fake_experiment, monkeypatch):
    """Wrong version (Experiment.config_hash: ``version`` left out of the key): after a module bumped
    VERSION because ``run`` changed meaning, the old runs were still reused."""
    from normlab.lab import experiments, runner

    (a,) = runner.plan([fake_experiment], "quick", 1)
    monkeypatch.setattr(experiments.get(fake_experiment).module, "VERSION", 2, raising=False)
    (b,) = runner.plan([fake_experiment], "quick", 1)
    assert a.config_hash != b.config_hash
    assert runner.plan([fake_experiment], "quick", 1)[0].config_hash == b.config_hash


@pytest.mark.parametrize("name", ["bn-mnist", "batch-size", "padding", "transformer"])
def test_a_config_read_back_from_config_json_equals_the_one_planned(name):
    """Wrong version (Experiment.from_dict: lists not turned back into tuples): the run and the
    report saw a config unequal to the planned one (lists for tuple fields)."""
    import dataclasses
    import json

    from normlab.lab import experiments

    e = experiments.get(name)
    cfg = e.config("quick")
    assert e.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_each_seed_starts_from_its_own_global_rng_state(fake_experiment, out_dir, monkeypatch):
    """Wrong version (runner._run: ``torch.manual_seed(task.seed)`` -> ``manual_seed(0)``): every
    seed of an experiment drawing from the global torch RNG got the same numbers."""
    import json

    from normlab.lab import experiments, runner

    module = experiments.get(fake_experiment).module
    monkeypatch.setattr(module, "run", lambda config, seed, progress: {"value": torch.rand(1).item()})
    tasks = runner.plan([fake_experiment], "quick", 2)
    runner.execute(tasks, out_dir, jobs=1, show_progress=False)
    got = [json.loads((t.path(out_dir) / "metrics.json").read_text())["value"] for t in tasks]
    assert got == [torch.rand(1, generator=torch.Generator().manual_seed(s)).item() for s in (0, 1)]


def test_runs_read_back_are_in_seed_order_past_ten_seeds(fake_experiment, out_dir):
    """Wrong version (runner.load_runs: the sort by seed dropped): folder names sort seed10 before
    seed2, so the report's per-seed lists and 'seeds' came out of order."""
    from normlab.lab import runner

    tasks = runner.plan([fake_experiment], "quick", 11)
    runner.execute(tasks, out_dir, jobs=1, show_progress=False)
    found, _ = runner.load_runs(out_dir)
    (runs,) = found[fake_experiment].values()
    assert [r.seed for r in runs] == list(range(11))


# -- report.py --------------------------------------------------------------------------------------

def _fake_runs(out_dir, name, seeds, sets=()):
    from normlab.lab import runner

    tasks = runner.plan([name], "quick", seeds, list(sets))
    runner.execute(tasks, out_dir, jobs=1, show_progress=False)
    return tasks


def test_the_verdict_and_summary_use_every_stored_seed(fake_experiment, out_dir):
    """Wrong version (report._section: summarize given ``runs[:MIN_SEEDS]``): with 3 seeds stored the
    report listed 3 seeds but built its numbers and verdict from 2."""
    import json

    from normlab.lab import report

    _fake_runs(out_dir, fake_experiment, 3)
    report.build(out_dir)
    shown = json.loads((out_dir / "results.json").read_text())["experiments"][fake_experiment]
    assert shown["seeds"] == [0, 1, 2]
    assert shown["summary"]["values"] == pytest.approx([0.1, 1.1, 2.1])


def test_without_a_remembered_run_the_report_shows_the_config_that_finished_last(fake_experiment, out_dir):
    """Wrong version (report._latest_group: ``max`` -> ``min``): the oldest config was shown."""
    import json
    import os

    from normlab.lab import report

    (old,) = _fake_runs(out_dir, fake_experiment, 1)
    os.utime(old.path(out_dir), (1_000_000_000, 1_000_000_000))  # finished long ago
    (new,) = _fake_runs(out_dir, fake_experiment, 1, ["lr=0.2"])
    assert not (out_dir / "last-run.json").exists()
    report.build(out_dir)
    shown = json.loads((out_dir / "results.json").read_text())["experiments"][fake_experiment]
    assert shown["config_hash"] == new.config_hash and shown["summary"]["values"] == [pytest.approx(0.2)]


def test_the_numbers_table_shows_mean_sd_then_the_per_seed_values(fake_experiment, out_dir):
    """Wrong version (report._section_html: the 'mean ± sd over seeds' cell showing the raw list):
    the per-seed list landed in the mean ± sd column."""
    from normlab.lab import report

    _fake_runs(out_dir, fake_experiment, 2)
    page = report.build(out_dir).read_text()
    assert "<tr><td>values</td><td>0.6000 ± 0.7071</td><td>[0.1, 1.1]</td></tr>" in page


# -- experiments: what run() trains, and the numbers summarize() derives --------------------------

def _stub_train(calls):
    def train(model, data, **kw):
        calls.append({"model": model, **kw})
        return {"step": [kw["steps"]], "test_acc": [0.5], "test_loss": [1.0], "train_loss": [1.0], "final_acc": 0.5,
                "best_acc": 0.5, "diverged": False, "diverged_step": None}
    return train


def test_learning_rate_trains_each_net_at_base_lr_times_each_multiplier(monkeypatch):
    """Wrong version (learning_rate.run: ``lr=config.base_lr * mult`` -> ``config.base_lr``): every
    'multiplier' trained at the same rate, and the verdict compared runs that differed in nothing."""
    from normlab.lab.experiments import learning_rate as m

    calls = []
    monkeypatch.setattr(training, "train", _stub_train(calls))
    cfg = m.SCALES["smoke"]
    m.run(cfg, 0, lambda f: None)
    assert [c["lr"] for c in calls] == pytest.approx([cfg.base_lr * x for x in cfg.multipliers] * 2)


def test_batch_size_scales_the_rate_linearly_and_keeps_the_epochs(monkeypatch):
    """Wrong version (batch_size.run: ``lr=base_lr * b / 32`` -> ``base_lr``): the linear scaling rule
    the experiment states was not applied."""
    from normlab.lab.experiments import batch_size as m

    calls = []
    monkeypatch.setattr(training, "train", _stub_train(calls))
    cfg = m.SCALES["smoke"]
    m.run(cfg, 0, lambda f: None)
    got = [(c["batch_size"], c["lr"], c["steps"]) for c in calls]
    want = [(b, pytest.approx(cfg.base_lr * b / 32), cfg.epochs * cfg.n_train // b)
            for _ in cfg.norms for b in cfg.batch_sizes]
    assert got == want


def test_init_scale_initializes_each_net_at_each_scale(monkeypatch):
    """Wrong version (init_scale.run: the scale not passed to init_gaussian_): every 'scale' was the
    same initialization."""
    from normlab.lab.experiments import init_scale as m

    stds = []
    monkeypatch.setattr(training, "train", lambda model, data, **kw: stds.append(
        model.blocks[0][0].weight.std().item()) or {"final_acc": 0.5, "diverged": False})
    cfg = m.Config(hidden=(32,), scales=(0.01, 1.0), steps=1, n_train=64)
    m.run(cfg, 0, lambda f: None)
    assert stds == [pytest.approx(s, rel=0.1) for s in cfg.scales] * 2


def test_activations_saturated_share_counts_both_tails():
    """Wrong version (activations.run: ``(h < s) | (h > 1 - s)`` -> ``&``): the share was always 0.
    With 20 bins the first and last bins are exactly the saturated ranges."""
    from normlab.lab.experiments import activations as m

    cfg = m.Config(layers=3, width=16, bins=20)
    out = m.run(cfg, 0, lambda f: None)
    seen = 0.0
    for key in ("plain", "bn"):
        for sat, hist in zip(out[key]["saturated"], out[key]["hist"]):
            assert sat == pytest.approx((hist[0] + hist[-1]) / (cfg.n * cfg.width))
            seen += sat
    assert seen > 0  # (some unit saturates: the check means something)


def test_bn_mnist_drift_is_the_mean_distance_to_the_final_percentiles_over_their_final_spread():
    """Wrong versions (bn_mnist.run): drift not divided by the final p85 - p15 spread; the step-0
    point (initial running statistics) included; the distance taken to the first point, not the last."""
    from normlab.lab.experiments import bn_mnist as m

    cfg = m.Config(data="digits", hidden=(8, 8), steps=20, evals=4, probe=50)
    out = m.run(cfg, 0, lambda f: None)
    for key in m.NORMS:
        p = np.asarray(out[key]["pct_unit0"])[1:]  # (points after step 0, 3 percentiles) of unit 0
        want = np.abs(p - p[-1]).mean() / max(p[-1, 2] - p[-1, 0], 1e-8)
        assert out[key]["drift"][0] == pytest.approx(want, rel=1e-4)


def test_convergence_counts_epochs_from_one_to_the_plain_nets_final_accuracy():
    """Wrong versions (convergence): ``epochs_to`` 0-based (``hits[0]`` for ``hits[0] + 1``), and the
    target taken as the plain net's best accuracy instead of its final one (the claim's)."""
    from normlab.lab.experiments import convergence as m

    assert m.epochs_to([0.1, 0.5, 0.9], 0.5) == 2.0 and m.epochs_to([0.1], 0.5) == math.inf
    runs = [{"plain": {"test_acc": [0.6, 0.8, 0.7]}, "bn": {"test_acc": [0.65, 0.7, 0.75]}}]
    s = m.summarize(m.Config(epochs=3), runs)
    assert s["target_acc"] == [0.7] and s["bn_epochs_to_target"] == [2.0] and s["ratio"] == [pytest.approx(2 / 3)]


def test_largest_trainable_multiplier_excludes_diverged_runs_and_measures_against_the_best_accuracy():
    """Wrong versions (learning_rate.largest_trainable): a diverged run counted when its frozen
    accuracy was high; the half-gain bar measured from the best *final* accuracy, not the best."""
    from normlab.lab.experiments import learning_rate as m

    runs = [{"multiplier": 1.0, "best_acc": 0.6, "final_acc": 0.6, "diverged": False},
            {"multiplier": 3.0, "best_acc": 0.9, "final_acc": 0.45, "diverged": False},  # kept < half its gain
            {"multiplier": 10.0, "best_acc": 0.7, "final_acc": 0.7, "diverged": True}]
    assert m.largest_trainable(runs, 0.1) == 1.0


def test_rnn_batch_stats_accuracy_uses_batch_statistics_and_leaves_the_model_alone():
    """Wrong version (rnn.batch_stats_accuracy: the copy in eval mode): the 'batch statistics'
    accuracy was the inference accuracy, so BN's gap was 0 by construction."""
    import copy

    from normlab.lab.experiments import rnn

    torch.manual_seed(0)
    model = models.RNNClassifier(3, 8, 4, cell="gru", norm="batch").eval()
    x, y = torch.randn(20, 6, 3) * 3 + 2, torch.randint(0, 4, (20,))
    state = copy.deepcopy(model.state_dict())
    got = rnn.batch_stats_accuracy(model, x, y, batch_size=8)
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        want = sum((ref(x[i: i + 8]).argmax(1) == y[i: i + 8]).sum().item() for i in (0, 8, 16)) / 20
        inference = (model(x).argmax(1) == y).float().mean().item()
    assert got == want and not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert want != inference  # (batch statistics do change the answer here: the check means something)


def test_transformer_final_accuracy_is_the_mean_of_the_last_two_points():
    """Wrong version (transformer._final: ``[-2:]`` -> ``[-1:]``): its docstring and validate() say
    'final' is the mean of the last two evaluations."""
    from normlab.lab.experiments import transformer as m

    assert m._final({"test_acc": [0.1, 0.5, 0.7]}) == pytest.approx(0.6)


def test_regularization_gap_is_final_train_accuracy_minus_final_test_accuracy():
    """Wrong versions (regularization.run): the gap's sign flipped (test - train), and the 'train'
    accuracy measured on the test set (a gap of 0 by construction)."""
    from normlab.lab.experiments import regularization as m

    out = m.run(m.SCALES["smoke"], 0, lambda f: None)
    for key, r in out.items():
        assert r["gap"] == pytest.approx(r["final_train_acc"] - r["test_acc"][-1]), key
        if not r["diverged"]:
            assert r["final_train_acc"] == r["train_acc"][-1], key  # the last point is the final model
    assert any(r["gap"] != 0 for r in out.values())


def test_convergence_trains_with_momentum_for_whole_epochs_evaluated_after_each(monkeypatch):
    """Wrong version (convergence.run: ``momentum=config.momentum`` dropped): plain SGD, not the
    SGD + momentum its scale note states."""
    from normlab.lab.experiments import convergence as m

    calls = []
    monkeypatch.setattr(training, "train", _stub_train(calls))
    cfg = m.SCALES["smoke"]
    m.run(cfg, 0, lambda f: None)
    per_epoch = 1437 // cfg.batch_size  # digits' training split
    for c in calls:
        assert (c["lr"], c["momentum"], c["batch_size"]) == (cfg.lr, cfg.momentum, cfg.batch_size)
        assert c["steps"] == per_epoch * cfg.epochs and list(c["eval_at"]) == [per_epoch * (e + 1) for e in range(cfg.epochs)]


def test_bn_mnist_nets_share_their_initialization(monkeypatch):
    """Wrong version (bn_mnist.run: the seed set once before the loop, not per net): the BN net started
    from other weights than the plain one, which the module docstring says they share."""
    from normlab.lab.experiments import bn_mnist as m

    firsts = []
    def train(model, data, **kw):
        firsts.append(model.blocks[0][0].weight.detach().clone())
        return {"step": [0, 2], "test_acc": [0.1, 0.5], "pct": [np.zeros((3, 8)), np.ones((3, 8))], "diverged": False}
    monkeypatch.setattr(training, "train", train)
    m.run(m.Config(data="digits", hidden=(8,), steps=2, evals=1, probe=10), 0, lambda f: None)
    assert len(firsts) == 2 and torch.equal(firsts[0], firsts[1])


# -- experiments: metrics and verdict inputs left unguarded (found by a mutation audit of experiments/) --

@pytest.mark.parametrize("bn", [False, True])
def test_activations_gradient_norms_are_autograds_through_sigmoid_and_batch_norm(bn):
    """activations' hand-written backward pass against torch autograd of the documented loss
    ``mean(h_L @ r)`` through ``sigmoid(BN(h @ W))`` layers (reference BN: eps 1e-5, biased variance).
    Wrong versions (activations._forward_backward): the sigmoid's slope ``h (1 - h)`` -> ``h``; the
    batch-norm backward step skipped; a layer's weight gradient taken with its own output as input
    (``hs[i]`` for ``hs[i - 1]``). Each changed the gradient ratio the verdict decides on."""
    from normlab.lab.experiments import activations as m

    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, size=(30, 6))
    weights = [rng.normal(size=(6, 8)), rng.normal(size=(8, 8)), rng.normal(size=(8, 8))]
    r = rng.standard_normal(8)
    hs, grads = m._forward_backward(x, weights, r, bn)
    ws = [torch.tensor(w, requires_grad=True) for w in weights]
    h, outs = torch.from_numpy(x), []
    for w in ws:
        z = h @ w
        h = torch.sigmoid(F.batch_norm(z, None, None, training=True, eps=1e-5) if bn else z)
        outs.append(h)
    (h @ torch.from_numpy(r)).mean().backward()
    assert grads == pytest.approx([w.grad.norm().item() for w in ws], rel=1e-9)
    for got, want in zip(hs, outs):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-12)


def _recording_train(models_seen, diverged=False):
    """A stand-in for training.train that calls on_eval at every eval point, as train does."""
    def train(model, data, **kw):
        models_seen.append(model)
        hist = {"step": list(kw["eval_at"]), "test_acc": [0.5] * len(kw["eval_at"])}
        for s in kw["eval_at"]:
            for k, v in (kw["on_eval"](s, model) or {}).items():
                hist.setdefault(k, []).append(v)
        hist.update(diverged=diverged, diverged_step=2 if diverged else None)
        return hist
    return train


def test_bn_mnist_percentiles_are_of_the_last_hidden_sigmoids_input_in_eval_mode(monkeypatch):
    """bn_mnist records, at each point, the 15th/50th/85th percentiles of every last-hidden-layer
    sigmoid's input on the probe, the net in eval mode (BN on its running statistics), and the
    weights start N(0, gain^2 / fan_in). Wrong versions (bn_mnist.run): the hook on the first
    block's norm; percentiles 10/50/90; the probe run in train mode (batch statistics);
    ``fan_in=True`` -> ``False`` (N(0, gain^2), a saturated sigmoid net)."""
    from normlab.lab.experiments import bn_mnist as m

    seen = []
    monkeypatch.setattr(training, "train", _recording_train(seen))
    cfg = m.Config(data="digits", hidden=(8, 6), steps=4, evals=2, probe=40, init_gain=1.0)
    out = m.run(cfg, 0, lambda f: None)
    probe = torch.from_numpy(data.load("digits").flat().x_test[:40])
    for key, model in zip(m.NORMS, seen):
        w = model.blocks[0][0].weight
        assert w.std().item() == pytest.approx(1 / math.sqrt(64), rel=0.1)
        model.eval()
        with torch.no_grad():
            h = probe
            for block in model.blocks[:-1]:
                h = block(h)
            z = model.blocks[-1][1](model.blocks[-1][0](h))
        want = np.percentile(z.numpy(), [15, 50, 85], axis=0)[:, 0]
        for got in out[key]["pct_unit0"]:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bn_mnist_drift_of_a_diverged_net_is_nan_and_the_summary_takes_the_median_over_units(monkeypatch):
    """A diverged net's frozen percentiles repeat (drift 0): the run must store NaN, which the
    verdict counts against the claim, not 0 (perfect stability); and the summary's drift is the
    median over units, as the verdict's text says. Wrong versions (bn_mnist): the NaN for a
    diverged run dropped; ``np.median`` -> ``np.mean``."""
    from normlab.lab.experiments import bn_mnist as m

    monkeypatch.setattr(training, "train", _recording_train([], diverged=True))
    out = m.run(m.Config(data="digits", hidden=(8,), steps=4, evals=2, probe=20), 0, lambda f: None)
    assert all(np.isnan(out[k]["drift"]).all() for k in m.NORMS)
    runs = [{k: {"step": [0, 2, 4], "test_acc": [0.1, 0.5, 0.6], "drift": [0.0, 0.1, 0.2, 0.3, 5.0]}
             for k in m.NORMS}]
    s = m.summarize(m.Config(steps=4), runs)
    assert s["drift_plain"] == [pytest.approx(0.2)]


def test_learning_rate_half_gain_bar_is_inclusive_and_chance_is_one_over_the_classes(monkeypatch):
    """A multiplier 'trains' when it keeps *at least* half of the best gain over chance, where chance
    is 1 / classes (digits: 0.1); the best accuracy per net is over every point of every rate.
    Wrong versions (learning_rate): ``>=`` -> ``>`` in largest_trainable; ``chance`` stored as 0;
    best accuracy from the final points only."""
    from normlab.lab.experiments import learning_rate as m

    runs = [{"multiplier": 1.0, "best_acc": 0.75, "final_acc": 0.75, "diverged": False},
            {"multiplier": 3.0, "best_acc": 0.5, "final_acc": 0.5, "diverged": False}]  # exactly half the gain
    assert m.largest_trainable(runs, 0.25) == 3.0
    calls = []
    monkeypatch.setattr(training, "train", _stub_train(calls))
    assert m.run(m.SCALES["smoke"], 0, lambda f: None)["chance"] == pytest.approx(0.1)
    net = [{"multiplier": 1.0, "best_acc": 0.9, "final_acc": 0.6, "diverged": False}]
    s = m.summarize(m.Config(multipliers=(1.0,)), [{"plain": net, "bn": net, "chance": 0.1}])
    assert s["best_acc_plain"] == [0.9]


def test_init_scale_worst_accuracy_is_the_minimum_over_every_scale():
    """Wrong version (init_scale.summarize: ``min(a)`` -> ``a[0]``, the smallest scale): the rule's
    test data had each net's worst accuracy at the first scale, so it could not tell."""
    from normlab.lab.experiments import init_scale as m

    runs = [{"plain": [{"final_acc": a} for a in (0.9, 0.2, 0.8)], "bn": [{"final_acc": a} for a in (0.7, 0.9, 0.6)]}]
    s = m.summarize(m.Config(scales=(0.01, 0.1, 1.0)), runs)
    assert s["worst_acc_plain"] == [0.2] and s["worst_acc_bn"] == [0.6]
    assert s["range_plain"] == [pytest.approx(0.7)] and s["range_bn"] == [pytest.approx(0.3)]


def test_batch_size_group_norms_own_loss_enters_the_rule_and_every_stage_is_checked():
    """BN's loss from the largest batch to the smallest must exceed GN's own (not zero), and a
    'group:G' that does not divide a later stage's channels is refused before any run.
    Wrong versions (batch_size): ``drop_gn`` taken as 0; validate building only the first stage."""
    from normlab.lab.experiments import batch_size as m

    runs = [{n: {"2": {"final_acc": lo + d}, "32": {"final_acc": 0.8}} for n, lo in (("batch", 0.6), ("group:4", 0.7))}
            for d in (0.0, 0.01, -0.01)]
    cfg = m.Config(norms=("batch", "group:4"), batch_sizes=(2, 32))
    s = m.summarize(cfg, runs)
    assert s["drop_gn"] == pytest.approx([0.1, 0.09, 0.11])
    v = m.verdict(s)  # GN beats BN at batch 2 by 0.1, but loses 0.1 itself: BN's extra loss is 0.1 > 0.05
    assert v.label == "reproduced"
    runs_gn_drops = [{n: {"2": {"final_acc": lo + d}, "32": {"final_acc": 0.9 if n != "batch" else 0.8}}
                      for n, lo in (("batch", 0.6), ("group:4", 0.7))} for d in (0.0, 0.01, -0.01)]
    assert m.verdict(m.summarize(cfg, runs_gn_drops)).label == "not reproduced"  # GN lost 0.2, BN 0.2
    with pytest.raises(ValueError, match="group"):
        m.validate(m.Config(channels=(16, 6)))
