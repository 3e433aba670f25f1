"""``normlab lab run`` / ``report`` and ``--set`` parsing, the parts the CLI tests left open:
torchrun's process count, the run header, partial failures (report built, failure listed,
exit 1, every traceback kept), absolute report paths, a report folder without finished runs,
bool and optional values. Each was found by mutating the code: the test fails on the wrong
version named in its docstring.
"""
from __future__ import annotations

import pytest

from helpers import cli_runner
from normlab.lab import experiments

cli = cli_runner()
WIDE = {"COLUMNS": "400"}


def test_under_torchrun_nproc_is_the_world_size_and_a_different_nproc_is_refused(out_dir, monkeypatch):
    """Under torchrun (WORLD_SIZE=2) ``run`` plans each run for 2 processes and hands the tasks to
    execute_torchrun; ``--nproc 2`` is accepted, ``--nproc 3`` is one line and exit 2.
    Wrong version: lab/cli.py ``nproc != world`` -> ``nproc == world``; ``else world`` -> ``else 1``;
    ``if world > 1:`` -> ``if world > 2:``."""
    from normlab.lab import parallel, runner

    seen = []

    def fake_torchrun(tasks, out, **kw):
        seen.append(list(tasks))
        return runner.Outcome([], [], [], {})

    monkeypatch.setattr(parallel, "env_world", lambda: 2)
    monkeypatch.setattr(parallel, "env_rank", lambda: 0)
    monkeypatch.setattr(runner, "execute_torchrun", fake_torchrun)
    args = ["run", "bn-mnist", "--seeds", "1", "--scale", "smoke", "--no-report", "--out", str(out_dir)]
    for extra in ([], ["--nproc", "2"]):
        result = cli.invoke(experiments_app(), args + extra, env=WIDE)
        assert result.exit_code == 0, result.stderr
        assert [t.nproc for t in seen.pop()] == [2] and "2 processes per run" in result.stderr
    bad = cli.invoke(experiments_app(), args + ["--nproc", "3"])
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines() == [
        "error: --nproc 3: under torchrun the processes are torchrun's (2); leave --nproc out"]
    assert not seen


def experiments_app():
    from normlab.lab.cli import app

    return app


def test_run_header_counts_experiments_and_names_the_scale(fake_experiment, out_dir):
    """The first line counts experiments (not runs) and names the scale asked for.
    Wrong version: lab/cli.py ``n_exp = len({t.experiment ...})`` -> ``len(tasks)``; ``at {scale} scale`` -> ``at quick scale``."""
    result = cli.invoke(experiments_app(), ["run", fake_experiment, "--seeds", "2", "--scale", "smoke", "--jobs", "1",
                                            "--no-report", "--out", str(out_dir)], env=WIDE)
    assert result.exit_code == 0, result.stderr
    assert "normlab lab: 1 experiment(s) x 2 seed(s) at smoke scale" in result.stderr


def test_some_failed_runs_still_build_the_report_list_the_failure_and_exit_1(fake_experiment, out_dir):
    """One seed of two fails: the report is built from the other, names the failed run, and the
    command exits 1.
    Wrong version: lab/cli.py the final ``if outcome.failed: raise typer.Exit(1)`` removed;
    ``report.build(..., failed=tuple(failed))`` -> ``failed=()``."""
    result = cli.invoke(experiments_app(), ["run", fake_experiment, "--seeds", "2", "--set", "fail_seed=1", "--jobs",
                                            "1", "--out", str(out_dir)], env=WIDE)
    assert result.exit_code == 1, result.stderr
    assert result.stdout.strip().endswith("index.html")
    assert "fake seed 1 failed: RuntimeError: boom on seed 1 (errors.log)" in (out_dir / "results.json").read_text()


def test_errors_log_keeps_every_failed_run(out_dir, monkeypatch):
    """Two failed runs in one command: errors.log holds both tracebacks.
    Wrong version: lab/cli.py ``(Path(out) / "errors.log").open("a")`` -> ``open("w")``."""
    import normlab.lab.experiments.invariance as inv

    def broken(config, seed, progress):
        raise RuntimeError(f"boom {seed}")

    monkeypatch.setattr(inv, "run", broken)
    result = cli.invoke(experiments_app(), ["run", "invariance", "--scale", "smoke", "--seeds", "2", "--jobs", "1",
                                            "--no-report", "--out", str(out_dir)])
    assert result.exit_code == 1
    log = (out_dir / "errors.log").read_text()
    assert log.count("== invariance ") == 2 and "boom 0" in log and "boom 1" in log


def test_run_and_report_print_an_absolute_path_for_a_relative_out(fake_experiment, tmp_path, monkeypatch):
    """The last stdout line is the report's absolute path, whatever --out was.
    Wrong version: lab/cli.py ``typer.echo(str(path.resolve()))`` -> ``typer.echo(str(path))`` (in run)."""
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(experiments_app(), ["run", fake_experiment, "--seeds", "1", "--jobs", "1", "--out", "rel"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str((tmp_path / "rel" / "index.html").resolve())


def test_report_of_an_existing_folder_without_runs_or_with_no_finished_run(tmp_path):
    """``report DIR``: a folder without runs/ says so; a runs/ folder holding no finished run is one
    line and exit 2 too, never a traceback.
    Wrong version: lab/cli.py ``if not (out / "runs").is_dir()`` -> ``if not out.is_dir()``; the
    ``except FileNotFoundError`` of ``report_`` removed."""
    result = cli.invoke(experiments_app(), ["report", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        f"error: no runs folder in {tmp_path}; run `normlab lab run --out {tmp_path}` first"]
    (tmp_path / "runs").mkdir()
    result = cli.invoke(experiments_app(), ["report", str(tmp_path)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "no finished runs in" in lines[0], result.stderr


@pytest.mark.parametrize("text,want", [("on", True), ("1", True), ("TRUE", True), ("off", False), ("0", False),
                                       (" no ", False)])
def test_set_bool_spellings(text, want):
    """A bool field takes 1/true/yes/on and 0/false/no/off, any case, surrounding spaces ignored.
    Wrong version: experiments/__init__.py ``("1", "true", "yes", "on")`` without "on"; ``("0", "false", ...)`` without "0"."""
    assert experiments.parse_value("x.flag", text, bool) is want


def test_set_optional_field_takes_none_null_or_empty():
    """An ``Optional[T]`` field is None for "none", "null" or "" and a T otherwise.
    Wrong version: experiments/__init__.py ``("none", "null", "")`` -> ``("none", "null")``."""
    from typing import Optional

    for text in ("none", "NULL", ""):
        assert experiments.parse_value("x.n", text, Optional[int]) is None
    assert experiments.parse_value("x.n", "7", Optional[int]) == 7


def test_set_type_error_names_the_bare_field():
    """``--set bn-mnist.steps=x``: the message names the field (``steps``), after the echo of what was typed.
    Wrong version: experiments/__init__.py ``{what.split('.')[-1]} must be`` -> ``{what} must be``."""
    with pytest.raises(experiments.ConfigError) as e:
        experiments.parse_value("bn-mnist.steps", "x", int)
    assert str(e.value) == "--set bn-mnist.steps=x: steps must be an int, got 'x'"
