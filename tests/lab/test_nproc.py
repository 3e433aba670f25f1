"""``--nproc N``: a run trained data-parallel by N forked local processes (gloo, synchronized batch
norm, count-weighted gradients) matches the 1-process run up to float rounding, is its own cache
entry, and the report says how many processes ran; bad values and experiments that cannot run
data-parallel are handled before anything runs.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import cli_runner
from normlab.lab import experiments, report, runner
from normlab.lab.cli import app

CliRunner = cli_runner

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()
                                     and "fork" in multiprocessing.get_all_start_methods()),
                                reason="needs torch.distributed with gloo and fork")


def _metrics(out, task) -> dict:
    return json.loads((task.path(out) / "metrics.json").read_text())


def _close(a, b, rtol=1e-4, atol=1e-5) -> None:
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def bn_mnist(tmp_path_factory):
    """bn-mnist at smoke scale, 1 seed, with a batch of 45 (slices of 22 and 23), run with 1 and then 2
    processes into one folder, and the report built: ``(out, 1-process task, 2-process task)``."""
    out = tmp_path_factory.mktemp("nproc") / "report"
    one = runner.plan(["bn-mnist"], "smoke", 1, ["batch_size=45"])
    two = runner.plan(["bn-mnist"], "smoke", 1, ["batch_size=45"], nproc=2)
    for tasks in (one, two):
        outcome = runner.execute(tasks, out, jobs=1, show_progress=False)
        assert not outcome.failed, outcome.failed[0][1] if outcome.failed else ""
    report.build(out)
    return out, one[0], two[0]


def test_two_processes_match_one_process(bn_mnist):
    out, one, two = bn_mnist
    a, b = _metrics(out, one), _metrics(out, two)
    for net in ("plain", "bn"):
        assert a[net]["step"] == b[net]["step"]
        _close(a[net]["test_acc"], b[net]["test_acc"], rtol=0, atol=0.006)  # at most a test image or two flip
        _close(a[net]["test_loss"], b[net]["test_loss"])
        _close(a[net]["train_loss"][1:], b[net]["train_loss"][1:])  # [0] is NaN: no training before step 0
        _close(a[net]["drift"], b[net]["drift"], atol=1e-4)
        _close(a[net]["pct_unit0"], b[net]["pct_unit0"], atol=1e-4)  # hooks on the (synchronized) BN still fire
    assert a["bn"]["test_acc"][-1] > 0.5  # it did train


def test_a_data_parallel_run_is_its_own_cache_entry_and_records_nproc(bn_mnist):
    out, one, two = bn_mnist
    assert (one.nproc, two.nproc) == (1, 2) and one.config_hash != two.config_hash
    assert one.config == two.config
    e = experiments.get("bn-mnist")
    assert one.config_hash == e.config_hash(e.from_dict(one.config))  # 1-process keys are as before --nproc
    for task, n in ((one, 1), (two, 2)):
        assert json.loads((task.path(out) / "env.json").read_text())["nproc"] == n
        assert json.loads((task.path(out) / "config.json").read_text())["nproc"] == n
    again = runner.execute([two], out, jobs=1, show_progress=False)
    assert again.cached == [two] and not again.ran


def test_report_says_how_many_processes_ran(bn_mnist):
    out, _, two = bn_mnist
    doc = json.loads((out / "results.json").read_text())
    assert doc["experiments"]["bn-mnist"]["nproc"] == 2  # the newest config, the 2-process one, is shown
    assert doc["experiments"]["bn-mnist"]["config_hash"] == two.config_hash
    page = (out / "index.html").read_text()
    assert "<th title=" in page and ">processes</th>" in page
    assert "2 processes per run (data-parallel" in page


# -- the training loop's edge cases, through a small experiment of this file (forked ranks see it) ---------

@dataclass(frozen=True)
class TinyConfig:
    norm: str = "batch"
    """Norm spec of the MLP."""
    batch_size: int = 3
    """Global batch size."""
    momentum: float = 0.9
    """SGD momentum."""
    fail_rank: int = -1
    """Rank whose run raises RuntimeError (-1: none)."""


def _tiny_run(config, seed, progress):
    from normlab.lab import data, models, parallel, training

    if parallel.world()[0] == config.fail_rank:
        raise RuntimeError(f"boom on rank {config.fail_rank}")
    ds = data.load("digits").flat().subset(n_train=64, n_test=101)
    model = models.MLP(ds.input_shape[0], ds.num_classes, (8,), norm=config.norm)
    h = training.train(model, training.Tensors.of(ds), steps=12, batch_size=config.batch_size, lr=0.1,
                       momentum=config.momentum, seed=seed, eval_at=[0, 6], progress=progress)
    h["weights"] = [p.detach().double().sum().item() for p in model.parameters()]
    return h


@pytest.fixture
def tiny(monkeypatch):
    """Registers the experiment ``tiny`` in this process (forked ranks inherit it; spawned ones could not)."""
    import types

    from normlab.lab.verdict import INCONCLUSIVE, Verdict

    m = types.ModuleType("normlab_test_tiny_dp_experiment")
    m.CLAIM, m.SOURCE, m.DATA_PARALLEL = "Data parallelism changes nothing.", "test_nproc.py", True
    m.Config, m.run, m.SCALES = TinyConfig, _tiny_run, {s: TinyConfig() for s in experiments.SCALES}
    m.summarize = lambda config, runs: {"measured": ""}
    m.verdict = lambda s: Verdict(INCONCLUSIVE, "")
    m.plots = lambda config, runs, summary, out_dir: []
    monkeypatch.setitem(sys.modules, m.__name__, m)
    monkeypatch.setitem(experiments.REGISTRY, "tiny", m.__name__)
    experiments.get.cache_clear()
    yield "tiny"
    experiments.get.cache_clear()


@pytest.mark.parametrize("sets", [["norm=none", "batch_size=1"],  # rank 0's slice is empty
                                  ["norm=batch", "batch_size=3"],  # slices of 1 and 2 with BN over both
                                  ["norm=group:4", "batch_size=8", "momentum=0"]])
def test_uneven_and_empty_slices_match_one_process(tiny, out_dir, sets):
    res = {}
    for n in (1, 2):
        (task,) = runner.plan([tiny], "smoke", 1, sets, nproc=n)
        outcome = runner.execute([task], out_dir, jobs=1, show_progress=False)
        assert not outcome.failed, outcome.failed[0][1] if outcome.failed else ""
        res[n] = _metrics(out_dir, task)
    for key in ("test_acc", "test_loss", "train_loss", "weights"):
        _close(res[1][key][1:] if key == "train_loss" else res[1][key],
               res[2][key][1:] if key == "train_loss" else res[2][key], rtol=1e-4, atol=1e-5)


def test_a_failing_rank_fails_the_run_with_one_line_and_leaves_nothing(tiny, out_dir):
    (task,) = runner.plan([tiny], "smoke", 1, ["fail_rank=1"], nproc=2)
    outcome = runner.execute([task], out_dir, jobs=1, show_progress=False)
    (failed, err), = outcome.failed
    assert err.splitlines()[0] == "RankError: rank 1 of 2: RuntimeError: boom on rank 1"
    assert "Traceback in rank 1" in err and "_tiny_run" in err
    assert not task.path(out_dir).exists() and not multiprocessing.active_children()


def test_store_folders_are_removed_also_those_of_launchers_that_were_killed(tiny, out_dir):
    import glob
    import tempfile

    stale = Path(tempfile.gettempdir()) / "normlab-ranks-999999999-x"  # above any pid_max: never alive
    stale.mkdir(exist_ok=True)
    (task,) = runner.plan([tiny], "smoke", 1, ["norm=none"], nproc=2)
    assert runner.execute([task], out_dir, jobs=1, show_progress=False).ran == [task]
    assert not stale.exists()
    assert not glob.glob(str(Path(tempfile.gettempdir()) / f"normlab-ranks-{os.getpid()}-*"))


def test_batch_statistics_without_a_synchronized_version_are_refused(tiny, out_dir):
    (task,) = runner.plan([tiny], "smoke", 1, ["norm=batch_renorm"], nproc=2)
    (_, err), = runner.execute([task], out_dir, jobs=1, show_progress=False).failed
    assert "has no synchronized version" in err.splitlines()[0] and "--nproc 1" in err.splitlines()[0]


# -- planning and the command line -------------------------------------------------------------------------

def test_experiments_that_cannot_run_data_parallel_run_as_1_process_runs():
    tasks = runner.plan(["activations", "batch-size", "padding", "convergence"], "quick", 1, nproc=2)
    by = {t.experiment: t for t in tasks}
    assert {k: t.nproc for k, t in by.items()} == {"activations": 1, "batch-size": 1, "padding": 1, "convergence": 2}
    plain = {t.experiment: t.config_hash for t in runner.plan(["activations", "batch-size"], "quick", 1)}
    assert by["activations"].config_hash == plain["activations"]  # the same cache entry as without --nproc
    notes = runner.serial_notes(tasks, 2)
    assert len(notes) == 3 and any("batch-size runs in 1 process: batch_renorm" in n for n in notes)
    (t,) = runner.plan(["batch-size"], "quick", 1, ["norms=batch,group:4"], nproc=2)
    assert t.nproc == 2


@pytest.mark.parametrize("value", ["0", "-1"])
def test_nproc_below_one_is_one_line_and_exit_2(out_dir, value):
    result = CliRunner().invoke(app, ["run", "bn-mnist", "--nproc", value, "--out", str(out_dir)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: --nproc must be at least 1, got {value}"]
    assert not out_dir.exists(), "nothing may be written on bad input"


def test_cli_runs_data_parallel_and_says_so(out_dir):
    args = ["run", "bn-mnist", "activations", "--nproc", "2", "--scale", "smoke", "--seeds", "1", "--out", str(out_dir),
            "--set", "steps=10", "--set", "bn-mnist.evals=2", "--no-report"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "2 processes per run" in result.stderr and "note: activations runs in 1 process" in result.stderr
    found, _ = runner.load_runs(out_dir)
    assert {name: [r.env["nproc"] for g in groups.values() for r in g] for name, groups in found.items()} == \
        {"bn-mnist": [2], "activations": [1]}


@pytest.mark.slow
def test_torchrun_runs_the_same_code_path(tmp_path):
    """Two fresh interpreters from torchrun (tens of seconds): the report shows a 2-process run that
    matches the 1-process one."""
    out = tmp_path / "report"
    src = str(Path(runner.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    args = ["lab", "run", "bn-mnist", "activations", "--scale", "smoke", "--seeds", "1", "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "normlab.cli",
           *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["experiments"]["bn-mnist"]["nproc"] == 2 and doc["experiments"]["activations"]["nproc"] == 1
    (one,) = runner.plan(["bn-mnist"], "smoke", 1)
    assert runner.execute([one], out, jobs=1, show_progress=False).ran == [one]
    (two,) = runner.plan(["bn-mnist"], "smoke", 1, nproc=2)
    a, b = _metrics(out, one), _metrics(out, two)
    _close(a["bn"]["test_loss"], b["bn"]["test_loss"])
