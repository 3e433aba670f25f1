"""``normlab lab`` through typer's CliRunner: bad input is one line on stderr, exit code 2, nothing written."""
from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from normlab.lab.cli import app

try:
    runner = CliRunner(mix_stderr=False)
except TypeError:  # click >= 8.2 always separates stderr
    runner = CliRunner()


def _bad(args, needle, out_dir):
    result = runner.invoke(app, ["run", *args, "--out", str(out_dir)])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not out_dir.exists(), "nothing may be written on bad input"
    return lines[0]


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


@pytest.mark.parametrize("setting,needle", [("activations.layers=0", "layers counts something and must be at least 1"),
                                            ("learning-rate.multipliers=", "multipliers must not be empty"),
                                            ("bn-mnist.evals=0", "evals counts something")])
def test_counts_and_lists_that_would_fail_inside_a_run_are_refused_up_front(out_dir, setting, needle):
    _bad([setting.split(".")[0], "--set", setting], needle, out_dir)


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
