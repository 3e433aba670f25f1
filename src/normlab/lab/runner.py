"""Plan, cache, run and store experiment runs.

A run is one experiment, one config and one seed, stored as

    <out>/runs/<experiment>/<config-hash>-seed<k>/{config.json, metrics.json, env.json}

written into a hidden temporary folder beside it and renamed into place when complete, so a
run folder either holds a finished run or does not exist: Ctrl-C, a crash or a full disk
leave at most a hidden ``.…tmp-<pid>-…`` folder, which readers ignore and the next ``run``
removes once its process is gone. A finished run is never redone unless ``force``.

Runs execute in worker processes (one per core by default, each with one thread: on a
small CPU two single-threaded runs beat one run on two threads) or in this process with
``jobs=1``.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import queue as queue_mod
import random
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from normlab.lab import experiments
from normlab.lab.experiments import ConfigError


@dataclass(frozen=True)
class Task:
    """One run to do: an experiment, its config (as a dict), the config's hash and a seed."""

    experiment: str
    config: dict
    config_hash: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.config_hash}-seed{self.seed}"

    def path(self, out: Path) -> Path:
        return Path(out) / "runs" / self.experiment / self.name


@dataclass
class Outcome:
    ran: list
    cached: list
    failed: list  # (task, one-line error)
    seconds: dict  # task name -> seconds of the runs done now
    interrupted: bool = False


# -- planning: every check on user input happens here, before anything is written ------------

def parse_sets(sets: Sequence[str]) -> list:
    """``["lr=0.1", "bn-mnist.steps=500"]`` -> ``[(None, "lr", "0.1"), ("bn-mnist", "steps", "500")]``."""
    out = []
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE or EXPERIMENT.KEY=VALUE")
        exp, dot, field = key.strip().rpartition(".")
        out.append((exp if dot else None, field, value))
    return out


def plan(names: Sequence[str] = (), scale: str = "quick", seeds: int = 3, sets: Sequence[str] = (),
         data_dir: Optional[str] = None) -> list:
    """The runs for ``names`` (all experiments if empty) at ``scale`` with seeds ``0..seeds-1``.

    Raises :class:`ConfigError` (one line) for an unknown experiment, scale, field, data set,
    a ``--set`` value of the wrong type, or a data set whose files are missing.
    """
    from normlab.lab import data

    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    names = list(dict.fromkeys(names)) or experiments.names()
    exps = [experiments.get(n) for n in names]
    overrides = parse_sets(sets)
    for exp_name, field, _ in overrides:
        if exp_name is not None and exp_name not in names:
            raise ConfigError(f"--set {exp_name}.{field}: {exp_name!r} is not among the experiments to run "
                              f"({', '.join(names)})")
        targets = [e for e in exps if exp_name in (None, e.name)]
        if not any(field in {f.name for f in dataclasses.fields(e.module.Config)} for e in targets):
            raise ConfigError(f"--set {field}=...: no field {field!r} in {', '.join(e.name for e in targets)}")
    tasks = []
    for e in exps:
        fields = {f.name for f in dataclasses.fields(e.module.Config)}
        mine = {f: v for x, f, v in overrides if (x == e.name) or (x is None and f in fields)}
        config = e.config(scale, mine)
        e.validate(config)
        if getattr(config, "data", None):
            try:
                data.check_available(config.data, data_dir)
            except data.DataError as err:
                raise ConfigError(f"{e.name}: {err}") from None
        h = e.config_hash(config)
        tasks += [Task(e.name, dataclasses.asdict(config), h, s) for s in range(seeds)]
    return tasks


def prepare_output(out) -> Path:
    """Create ``out`` if needed and make sure files can be written there (ConfigError otherwise)."""
    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if created and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)  # leave nothing behind on bad input
        raise ConfigError(f"cannot write to output folder {out}: {e.strerror or e}") from None
    return out


# -- storage ---------------------------------------------------------------------------------

def jsonable(obj):
    """Plain JSON: numpy scalars and arrays become numbers and lists, NaN and ±inf become null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(jsonable(obj), f, indent=1, allow_nan=False)
        f.write("\n")


def write_run(final: Path, files: dict) -> None:
    """Write ``{filename: object}`` as JSON files into the folder ``final``, atomically."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{os.getpid()}-"))
    old = None
    try:
        for name, obj in files.items():
            write_json(tmp / name, obj)
        if final.exists():  # --force: move the old run aside, then swap the new one in
            old = final.parent / f".{final.name}.old-{os.getpid()}-{random.randrange(1 << 30)}"
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.rename(old, final)
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def is_done(path: Path) -> bool:
    return (Path(path) / "metrics.json").is_file()


def remove_stale_temps(out: Path) -> None:
    """Remove hidden temporary run folders left by processes that no longer exist."""
    for d in (Path(out) / "runs").glob("*/.*"):
        try:
            pid = int(d.name.split("-")[-2]) if (".tmp-" in d.name or ".old-" in d.name) else None
        except ValueError:
            continue
        if pid is not None and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Run:
    """A finished run read back from disk."""

    experiment: str
    config_hash: str
    seed: int
    config: dict
    metrics: dict
    env: dict
    path: Path


def load_runs(out) -> tuple:
    """``({experiment: {config_hash: [Run, ...] sorted by seed}}, [problems])`` from what is on disk."""
    found, problems = {}, []
    for d in sorted((Path(out) / "runs").glob("*/*")):
        if d.name.startswith(".") or not d.is_dir():
            continue
        h, sep, seed = d.name.rpartition("-seed")
        try:
            files = {n: json.loads((d / f"{n}.json").read_text()) for n in ("config", "metrics", "env")}
            run = Run(d.parent.name, h, int(seed), files["config"], files["metrics"], files["env"], d)
        except (OSError, ValueError) as e:
            problems.append(f"{d}: unreadable ({e.__class__.__name__})")
            continue
        found.setdefault(run.experiment, {}).setdefault(h, []).append(run)
    for groups in found.values():
        for runs in groups.values():
            runs.sort(key=lambda r: r.seed)
    return found, problems


# -- environment -------------------------------------------------------------------------------

_ENV_CACHE: dict = {}


def environment() -> dict:
    """Versions, machine and git SHA (of the normlab checkout, if it is one)."""
    if not _ENV_CACHE:
        import torch

        import normlab

        sha = None
        try:
            src = Path(normlab.__file__).resolve().parent
            sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
        _ENV_CACHE.update(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                          normlab=getattr(normlab, "__version__", None), git_sha=sha, platform=platform.platform(),
                          machine=platform.machine(), cpu_count=os.cpu_count())
    return dict(_ENV_CACHE)


# -- executing ---------------------------------------------------------------------------------

def _setup_process(threads: int, data_dir: Optional[str]) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # sigmoid nets on a plateau otherwise crawl through denormals
    if data_dir:
        os.environ["NORMLAB_DATA_DIR"] = str(data_dir)


_QUEUE = None


def _worker_init(threads: int, data_dir: Optional[str], q) -> None:
    global _QUEUE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the workers
    _setup_process(threads, data_dir)
    _QUEUE = q


def run_task(task: Task, out: str, progress: Optional[Callable[[float], None]] = None) -> float:
    """Run one task and store it atomically; returns its seconds. Exceptions propagate."""
    import torch

    exp = experiments.get(task.experiment)
    config = exp.from_dict(task.config)
    random.seed(task.seed)
    np.random.seed(task.seed)
    torch.manual_seed(task.seed)
    start, cpu_start = time.time(), time.process_time()
    metrics = exp.module.run(config, task.seed, progress or (lambda f: None))
    seconds = time.time() - start
    env = environment()
    env.update(seconds=round(seconds, 3), cpu_seconds=round(time.process_time() - cpu_start, 3),
               threads=torch.get_num_threads(),
               finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seed=task.seed)
    write_run(task.path(Path(out)), {"config.json": {"experiment": task.experiment, "config_hash": task.config_hash,
                                                     "version": exp.version, "seed": task.seed,
                                                     "config": task.config},
                                     "metrics.json": metrics, "env.json": env})
    return seconds


def _pool_task(task: Task, out: str) -> tuple:
    last = [0.0]

    def progress(f: float) -> None:
        if f - last[0] >= 0.02 or f >= 1.0:
            last[0] = f
            _QUEUE.put((task.name, task.experiment, f))

    _QUEUE.put((task.name, task.experiment, 0.0))
    try:
        return "ok", run_task(task, out, progress)
    except Exception as e:  # reported by the parent; the other runs go on
        return "failed", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"


class Display:
    """Progress bars (rich): one per experiment (runs done of runs planned) and one per live run."""

    def __init__(self, tasks: Sequence[Task], cached: Sequence[Task], console=None, enabled: bool = True) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, disable=not enabled, transient=False)
        self.exp_bars, self.run_bars, self.finished = {}, {}, set()
        for t in tasks:
            if t.experiment not in self.exp_bars:
                n = sum(1 for u in tasks if u.experiment == t.experiment)
                done = sum(1 for u in cached if u.experiment == t.experiment)
                self.exp_bars[t.experiment] = self.progress.add_task(t.experiment, total=n, completed=done)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, task_name: str, experiment: str, fraction: float) -> None:
        if task_name in self.finished:  # a late message from a worker
            return
        if task_name not in self.run_bars:
            self.run_bars[task_name] = self.progress.add_task(f"  {experiment} {task_name.split('-')[-1]}",
                                                              total=100)
        self.progress.update(self.run_bars[task_name], completed=int(100 * fraction))

    def finish(self, task: Task) -> None:
        self.finished.add(task.name)
        bar = self.run_bars.pop(task.name, None)
        if bar is not None:
            self.progress.remove_task(bar)
        self.progress.advance(self.exp_bars[task.experiment])


def execute(tasks: Sequence[Task], out, *, force: bool = False, jobs: Optional[int] = None,
            data_dir: Optional[str] = None, console=None, show_progress: bool = True) -> Outcome:
    """Run the tasks that are not finished yet (all of them with ``force``) and store them.

    ``jobs``: worker processes (default: one per core, at most one per task); 1 runs in this
    process. Ctrl-C stops the workers and returns with ``interrupted=True``; finished runs stay.
    """
    out = Path(out)
    remove_stale_temps(out)
    todo = [t for t in tasks if force or not is_done(t.path(out))]
    cached = [t for t in tasks if t not in todo]
    outcome = Outcome([], cached, [], {})
    cores = os.cpu_count() or 1
    jobs = max(1, min(jobs or cores, len(todo) or 1))
    with Display(tasks, cached, console, show_progress) as display:
        try:
            if jobs == 1 or len(todo) <= 1:
                _execute_here(todo, out, data_dir, cores, display, outcome)
            else:
                _execute_pool(todo, out, data_dir, jobs, max(1, cores // jobs), display, outcome)
        except KeyboardInterrupt:
            outcome.interrupted = True
    return outcome


def _execute_here(todo, out, data_dir, threads, display, outcome) -> None:
    import torch

    before = torch.get_num_threads()
    _setup_process(threads, data_dir)
    try:
        for t in todo:
            display.update(t.name, t.experiment, 0.0)
            try:
                outcome.seconds[t.name] = run_task(t, str(out), lambda f, t=t: display.update(t.name, t.experiment, f))
                outcome.ran.append(t)
            except Exception as e:
                outcome.failed.append((t, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            display.finish(t)
    finally:
        torch.set_num_threads(before)
        torch.set_flush_denormal(False)  # torch's default; the setting is process-wide and has no getter


def _prepare_data(todo, data_dir) -> None:
    """Load (and so cache on disk) each data set once here, so workers do not all generate it."""
    from normlab.lab import data

    for name in dict.fromkeys(t.config.get("data") for t in todo):
        if name:
            data.load(name, data_dir)


def _execute_pool(todo, out, data_dir, jobs, threads, display, outcome) -> None:
    _prepare_data(todo, data_dir)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    q = ctx.Queue()
    pool = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads, data_dir, q))
    futures = {pool.submit(_pool_task, t, str(out)): t for t in todo}
    try:
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.1, return_when=cf.FIRST_COMPLETED)
            _drain(q, display)
            for f in done:
                t = futures[f]
                try:
                    status, value = f.result()
                except Exception as e:  # the worker process itself died
                    status, value = "failed", f"{type(e).__name__}: {e}"
                if status == "ok":
                    outcome.ran.append(t)
                    outcome.seconds[t.name] = value
                else:
                    outcome.failed.append((t, value))
                display.finish(t)
        pool.shutdown(wait=True)
    except BaseException:
        workers = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
        pool.shutdown(wait=False, cancel_futures=True)
        for p in workers:  # end the runs in progress now; their temporary folders are cleaned next time
            p.terminate()
        for p in workers:
            p.join(timeout=5)
        raise


def _drain(q, display) -> None:
    while True:
        try:
            name, experiment, fraction = q.get_nowait()
        except queue_mod.Empty:
            return
        display.update(name, experiment, fraction)
