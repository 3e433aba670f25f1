"""``normlab lab``: list, run and report the experiments.

Bad input (an unknown experiment or data set, missing MNIST files, an unwritable output
folder, a ``--set`` value of the wrong type, ``--nproc`` below 1) ends with one line on
stderr and exit code 2, before anything is written. A package of the ``[lab]`` extra that is
not installed (normlab installed without it) is one line naming it, exit code 1.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from normlab._help import reflowed

app = typer.Typer(help="Run the claims about normalization as experiments and report them.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# the [lab] extra of pyproject.toml, import name -> package name (tests/lab/test_cli.py checks them)
LAB_EXTRA = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "mnist1d": "mnist1d", "mlxtend": "mlxtend",
             "scipy": "scipy"}


def _needs_lab_extra(fn):
    """Decorator (below ``@reflowed``): a package of the ``[lab]`` extra missing where the command
    imports it ends the command with one line naming it and how to install it, not an
    ImportError's traceback. ``normlab demo`` and the layers need none of them."""
    @functools.wraps(fn)
    def command(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ModuleNotFoundError as e:
            package = LAB_EXTRA.get((e.name or "").partition(".")[0])
            if package is None:
                raise
            _fail(f"the lab needs {package}, which is not installed: install the lab's extra, "
                  f"pip install 'normlab[lab]' (in a checkout: pip install -e '.[lab]')", 1)
    return command


@app.command("list")
@reflowed
@_needs_lab_extra
def list_() -> None:
    """List the experiments: name, claim, source, data set and quick-scale size.

    Example: normlab lab list
    """
    from rich.console import Console
    from rich.table import Table

    from normlab.lab import experiments

    table = Table(title="normlab lab experiments (normlab lab run NAME ...)", show_lines=True)
    # names and data sets unbroken; the claim gets twice the source's share of what is left
    # ("fold" only splits a word longer than its column, such as a URL)
    table.add_column("experiment", no_wrap=True)
    table.add_column("claim", overflow="fold", ratio=2)
    table.add_column("source", overflow="fold", ratio=1)
    table.add_column("data", no_wrap=True)
    table.add_column("quick scale\n(per model)", no_wrap=True)
    for name in experiments.names():
        e = experiments.get(name)
        config = e.config("quick")
        table.add_row(name, e.claim, e.source, str(getattr(config, "data", "generated")), _size(config))
    Console().print(table)


def _size(config) -> str:
    """How long a config trains: ``"2000 steps"``, ``"40 epochs"``, or ``"no training"`` (a measurement
    at initialization, such as the activations and invariance experiments)."""
    for field in ("steps", "epochs"):
        if isinstance(getattr(config, field, None), int):
            return f"{getattr(config, field)} {field}"
    return "no training"


@app.command()
@reflowed
@_needs_lab_extra
def run(
    names: Optional[List[str]] = typer.Argument(None, metavar="[NAMES]...",
                                                help="Experiments to run (default: all; see `normlab lab list`)."),
    scale: str = typer.Option("quick", "--scale", help="quick (the default suite, minutes), full (closer to the "
                                                       "sources, longer) or smoke (seconds, for tests)."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds to run per experiment (0..N-1). The report pools every "
                                                 "seed stored for the config it shows, earlier runs' too. A verdict "
                                                 "needs at least 2 seeds: with 1 it is inconclusive."),
    out: Path = typer.Option(Path("normlab-report"), "--out", help="Output folder: runs/, plots/, index.html, "
                                                                   "results.json."),
    force: bool = typer.Option(False, "--force", help="Redo finished runs instead of reusing them."),
    sets: Optional[List[str]] = typer.Option(None, "--set", metavar="[EXP.]KEY=VALUE",
                                             help="Override a config field (type-checked); repeatable. "
                                                  "KEY applies to every selected experiment that has it."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with the full MNIST files (only for "
                                                                     "data=mnist)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="Worker processes (default: one per core)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Processes per run (default 1): N trains each run "
                                                              "data-parallel over N local processes with synchronized "
                                                              "batch norm. An experiment that cannot run data-parallel "
                                                              "runs in 1 process, with a note saying why. Under "
                                                              "torchrun it is torchrun's WORLD_SIZE."),
    no_report: bool = typer.Option(False, "--no-report", help="Only run; build the report later with `report`."),
) -> None:
    """Run experiments (cached by config hash) and build the report.

    Examples:

      normlab lab run                                  # every experiment, quick scale, 3 seeds

      normlab lab run bn-mnist batch-size --seeds 5

      normlab lab run bn-mnist --scale full --set steps=20000

      normlab lab run bn-mnist --set data=mnist --data-dir ~/data/mnist

      normlab lab run bn-mnist --nproc 2               # each run data-parallel over 2 processes

      torchrun --nproc-per-node 2 -m normlab lab run bn-mnist       # the same, processes from torchrun

    A second run reuses finished runs (--force redoes them). The report shows, per experiment,
    the config this command asked for, over every seed stored for that config. Ctrl-C keeps
    every finished run; `normlab lab report DIR` then builds the report from what exists.
    """
    from rich.console import Console

    from normlab.lab import parallel, report, runner
    from normlab.lab.experiments import ConfigError

    world, rank = parallel.env_world(), parallel.env_rank()  # torchrun's, or 1 and 0
    console = Console(stderr=True, quiet=rank != 0)
    if world > 1 and nproc is not None and nproc >= 1 and nproc != world:
        _fail(f"--nproc {nproc}: under torchrun the processes are torchrun's ({world}); leave --nproc out")
    nproc = nproc if nproc is not None else world
    data = str(data_dir) if data_dir else None
    try:
        tasks = runner.plan(names or [], scale, seeds, sets or [], data, nproc=nproc)
        if data is not None and not any(t.config.get("data") == "mnist" for t in tasks):
            raise ConfigError(f"--data-dir {data}: only data=mnist reads it, and none of these runs uses it; add "
                              f"--set data=mnist (for the experiments with a data field) or leave --data-dir out")
        if rank == 0:
            runner.prepare_output(out)
    except ConfigError as e:
        _fail(str(e))
    n_exp = len({t.experiment for t in tasks})
    console.print(f"normlab lab: {n_exp} experiment(s) x {seeds} seed(s) at {scale} scale"
                  + (f", {nproc} processes per run" if nproc > 1 else "") + f" -> {out}")
    for note in runner.serial_notes(tasks, nproc):
        console.print(f"note: {note}")
    cpus = os.cpu_count() or 1
    if world == 1 and nproc > cpus:
        console.print(f"note: --nproc {nproc} is more than this machine's {cpus} CPU(s): the processes share them, "
                      f"so each run is slower than with fewer")
    if world > 1:
        outcome = runner.execute_torchrun(tasks, out, force=force, data_dir=data, console=console)
        if rank != 0:
            return
    else:
        outcome = runner.execute(tasks, out, force=force, jobs=jobs, data_dir=data, console=console)
    prefer = {t.experiment: t.config_hash for t in tasks}
    report.remember(out, prefer)  # `normlab lab report` shows these configs too, even after Ctrl-C or --no-report
    console.print(f"{len(outcome.ran)} run(s) done, {len(outcome.cached)} reused from the cache"
                  + (f", {len(outcome.failed)} failed" if outcome.failed else ""))
    for task, err in outcome.failed:
        console.print(f"[red]failed[/red] {task.experiment} seed {task.seed}: {err.splitlines()[0]} "
                      f"(traceback in {Path(out) / 'errors.log'})")
        with (Path(out) / "errors.log").open("a") as log:
            log.write(f"== {task.experiment} {task.name}\n{err}\n")
    if outcome.interrupted:
        console.print(interrupted_message(out))
        raise typer.Exit(130)
    if no_report:
        if outcome.failed:
            raise typer.Exit(1)
        return
    failed = [f"{task.experiment} seed {task.seed} failed: {err.splitlines()[0]} (errors.log)"
              for task, err in outcome.failed]
    try:
        path = report.build(out, prefer=prefer, failed=tuple(failed))
    except FileNotFoundError:
        _fail(f"every run failed; no report (tracebacks in {Path(out) / 'errors.log'})", 1)
    _print_summary(out, console)
    typer.echo(str(path.resolve()))
    if outcome.failed:
        raise typer.Exit(1)


def interrupted_message(out: Path) -> str:
    """What to tell after Ctrl-C: where the finished runs are and how to report them, or, when no
    finished run is on disk (so `report` would fail), that there is nothing to report yet."""
    from normlab.lab import runner

    found, _ = runner.load_runs(out)
    if not found:
        return (f"interrupted before any run finished: no finished run in {Path(out) / 'runs'}, so no report; "
                "run the same command again to start over")
    return (f"interrupted: finished runs are kept in {Path(out) / 'runs'}; `normlab lab report {out}` builds the "
            "report from them, and the same command (without --force) runs only what is missing")


def _print_summary(out: Path, console) -> None:
    import json

    from rich.table import Table

    doc = json.loads((Path(out) / "results.json").read_text())
    table = Table(title="verdicts")
    for col in ("experiment", "seeds", "verdict", "measured"):
        table.add_column(col, overflow="fold")
    for name, e in doc["experiments"].items():  # seeds: every seed stored for the config shown
        table.add_row(name, ", ".join(str(s) for s in e.get("seeds", [])), e["verdict"], e.get("measured") or "")
    console.print(table)


@app.command("report")
@reflowed
@_needs_lab_extra
def report_(out: Path = typer.Argument(Path("normlab-report"), help="The folder `run` wrote to.")) -> None:
    """Build index.html and results.json from the finished runs in a folder.

    Example: normlab lab report normlab-report
    """
    from normlab.lab import report, runner
    from normlab.lab.experiments import ConfigError

    if out.exists() and not out.is_dir():
        _fail(f"{out} is a file, not a folder; give the folder `normlab lab run --out` wrote to")
    if not (out / "runs").is_dir():
        _fail(f"no runs folder in {out}; run `normlab lab run --out {out}` first")
    try:
        runner.prepare_output(out)
        path = report.build(out)
    except ConfigError as e:
        _fail(str(e))
    except FileNotFoundError as e:
        _fail(str(e))
    typer.echo(str(path.resolve()))


def main() -> None:  # pragma: no cover - `python -m normlab.lab.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
