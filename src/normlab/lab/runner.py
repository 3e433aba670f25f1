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

Data-parallel runs (``nproc`` > 1, :mod:`normlab.lab.parallel`): each such run is trained
by ``nproc`` local processes started for it (forked from the process that would have run
it; rank 0 writes the run folder, atomically as above), and counts ``nproc`` cores against
``jobs``. Its cache key includes ``nproc`` (a 2-process run never reuses or replaces a
1-process one), and ``config.json`` and ``env.json`` record ``nproc``. Experiments that do not
declare themselves data-parallel for a config run as ordinary 1-process runs (same key as
without ``--nproc``). Under torchrun (``RANK``/``WORLD_SIZE`` set, :func:`execute_torchrun`)
the processes are torchrun's: all of them train each data-parallel run, rank 0 alone runs
the rest and writes everything.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import difflib
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

from normlab.lab import experiments, parallel
from normlab.lab._files import as_created
from normlab.lab.experiments import ConfigError


@dataclass(frozen=True)
class Task:
    """One run to do: an experiment, its config (as a dict), the config's hash, a seed, and the
    number of processes that train it (data-parallel when more than 1)."""

    experiment: str
    config: dict
    config_hash: str
    seed: int
    nproc: int = 1

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


def _known_fields(field: str, targets: list) -> str:
    """What ``--set`` could have said instead of the unknown ``field``: one experiment's fields, or
    for several (their union runs to dozens) the close spellings among them."""
    if len(targets) == 1:
        return f"; fields: {', '.join(f.name for f in dataclasses.fields(targets[0].module.Config))}"
    known = sorted({f.name for e in targets for f in dataclasses.fields(e.module.Config)})
    close = difflib.get_close_matches(field, known)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def plan(names: Sequence[str] = (), scale: str = "quick", seeds: int = 3, sets: Sequence[str] = (),
         data_dir: Optional[str] = None, nproc: int = 1) -> list:
    """The runs for ``names`` (all experiments if empty) at ``scale`` with seeds ``0..seeds-1``,
    each trained by ``nproc`` processes where its experiment can run that config data-parallel
    (:meth:`~normlab.lab.experiments.Experiment.data_parallel`), by one elsewhere.

    Raises :class:`ConfigError` (one line) for an unknown experiment, scale, field, data set,
    a ``--set`` value of the wrong type, a data set whose files are missing, or ``nproc`` < 1.
    """
    from normlab.lab import data

    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    names = list(dict.fromkeys(names)) or experiments.names()
    exps = [experiments.get(n) for n in names]
    overrides = parse_sets(sets)
    for exp_name, field, _ in overrides:
        if exp_name is not None and exp_name not in names:
            raise ConfigError(f"--set {exp_name}.{field}: {exp_name!r} is not among the experiments to run "
                              f"({', '.join(names)})")
        targets = [e for e in exps if exp_name in (None, e.name)]
        if not any(field in {f.name for f in dataclasses.fields(e.module.Config)} for e in targets):
            raise ConfigError(f"--set {field}=...: no field {field!r} in {', '.join(e.name for e in targets)}"
                              + _known_fields(field, targets))
    tasks = []
    for e in exps:
        fields = {f.name for f in dataclasses.fields(e.module.Config)}
        # EXP.field beats a bare field for EXP, whatever their order on the command line
        mine = {f: v for x, f, v in overrides if x is None and f in fields}
        mine.update({f: v for x, f, v in overrides if x == e.name})
        config = e.config(scale, mine)
        source = None
        if getattr(config, "data", None):
            try:
                data.check_available(config.data, data_dir)
                source = data.source_key(config.data, data_dir)
            except data.DataError as err:
                raise ConfigError(f"{e.name}: {err}") from None
        e.validate(config, data_dir)
        n = nproc if nproc > 1 and e.data_parallel(config) is None else 1
        h = e.config_hash(config, n, source)
        tasks += [Task(e.name, dataclasses.asdict(config), h, s, n) for s in range(seeds)]
    return tasks


def serial_notes(tasks: Sequence[Task], nproc: int) -> list:
    """One line per experiment that runs in one process although ``nproc`` > 1 was asked for, saying why."""
    if nproc <= 1:
        return []
    notes = {}
    for t in tasks:
        if t.nproc == 1 and t.experiment not in notes:
            e = experiments.get(t.experiment)
            notes[t.experiment] = f"{t.experiment} runs in 1 process: {e.data_parallel(e.from_dict(t.config))}"
    return list(notes.values())


def prepare_output(out) -> Path:
    """Create ``out`` if needed and make sure files can be written there (ConfigError otherwise)."""
    out = Path(out)
    # a file where the folder (or a folder above it) should be: mkdir's "File exists" reads as fine
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"cannot write to output folder {out}: {blocker} is a file, not a folder")
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
        as_created(tmp, directory=True)  # mkdtemp makes it 0700
        for name, obj in files.items():
            write_json(tmp / name, obj)
        if final.exists():  # --force: move the old run aside, then swap the new one in
            old = final.parent / f".{final.name}.old-{os.getpid()}-{random.randrange(1 << 30)}"
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if old is None and is_done(final):
                # a second `lab run` into this folder finished the same run (same config, seed and
                # code: the same numbers) between the check above and here: its copy stands
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise
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
    """Run one task and store it atomically; returns its seconds. Exceptions propagate.

    A data-parallel task (``task.nproc`` > 1) starts its ``nproc`` processes here, with this
    process's torch threads shared among them (:func:`normlab.lab.parallel.launch`); a rank
    that fails raises :class:`~normlab.lab.parallel.RankError` here.
    """
    import torch

    if task.nproc > 1 and parallel.world()[1] == 1:
        threads = max(1, torch.get_num_threads() // task.nproc)
        _prepare_data([task], None)  # once here: the ranks inherit it (fork) or read its cache (spawn)
        return parallel.launch(task.nproc, _run_rank, (task, str(out), threads), threads=threads, progress=progress)
    return _run(task, out, progress)


def _run_rank(task: Task, out: str, threads: int, progress: Callable[[float], None]) -> float:
    _setup_process(threads, None)
    return _run(task, out, progress)


def _run(task: Task, out, progress: Optional[Callable[[float], None]]) -> float:
    """The run itself, in this process (one rank of it in a data-parallel run: rank 0 stores it)."""
    import torch

    rank, size = parallel.world()
    if size != task.nproc:
        raise RuntimeError(f"{task.experiment} {task.name} is planned for {task.nproc} process(es) but runs in {size}")
    exp = experiments.get(task.experiment)
    config = exp.from_dict(task.config)
    random.seed(task.seed)
    np.random.seed(task.seed)
    torch.manual_seed(task.seed)
    start, cpu_start = time.time(), time.process_time()
    metrics = exp.module.run(config, task.seed, progress or (lambda f: None))
    seconds = time.time() - start
    cpu_seconds, = parallel.sum_over_ranks(time.process_time() - cpu_start)  # every rank's CPU time
    if rank != 0:
        return seconds
    env = environment()
    env.update(seconds=round(seconds, 3), cpu_seconds=round(cpu_seconds, 3), nproc=size,
               threads=torch.get_num_threads(),
               finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seed=task.seed)
    write_run(task.path(Path(out)), {"config.json": {"experiment": task.experiment, "config_hash": task.config_hash,
                                                     "version": exp.version, "seed": task.seed, "nproc": size,
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

    ``jobs``: runs at a time (default: one per core, or per ``nproc`` cores for data-parallel
    tasks; at most one per task); 1 runs them from this process (a data-parallel run in its own
    processes). Ctrl-C stops the workers and returns with ``interrupted=True``; finished runs stay.
    """
    out = Path(out)
    remove_stale_temps(out)
    todo = [t for t in tasks if force or not is_done(t.path(out))]
    cached = [t for t in tasks if t not in todo]
    outcome = Outcome([], cached, [], {})
    cores = os.cpu_count() or 1
    width = max([t.nproc for t in todo] or [1])  # processes per run
    jobs = max(1, min(jobs or max(1, cores // width), len(todo) or 1))
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
    others = set(multiprocessing.active_children())
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
        _end_pool(pool, others)  # end the runs in progress now; their temporary folders are cleaned next time
        raise


def _end_pool(pool, others) -> None:
    """Shut ``pool`` down at once and end its worker processes, including any that its manager
    thread starts while shutting down (CPython's pool replaces a worker that exits, even then, and
    after ``shutdown`` it no longer lists them): every child process started since ``others``
    (the children that existed before the pool) is terminated until none is left and the
    manager thread has ended."""
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)

    def workers():
        return [p for p in multiprocessing.active_children() if p not in others]

    for _ in range(5):
        for p in workers():
            p.terminate()
        for p in workers():
            p.join(timeout=5)
        if manager is not None:
            manager.join(timeout=5)
        if not workers() and (manager is None or not manager.is_alive()):
            return


def _drain(q, display) -> None:
    while True:
        try:
            name, experiment, fraction = q.get_nowait()
        except queue_mod.Empty:
            return
        display.update(name, experiment, fraction)


def execute_torchrun(tasks: Sequence[Task], out, *, force: bool = False, data_dir: Optional[str] = None, console=None,
                     show_progress: bool = True) -> Outcome:
    """:func:`execute` in each process torchrun started (``RANK``, ``WORLD_SIZE`` ... set).

    Every process calls it with the same tasks (planned with ``nproc`` = ``WORLD_SIZE``). Rank 0
    decides what is left to do (its disk holds the runs) and tells the others; all ranks train
    each data-parallel task together (first), then rank 0 alone runs the 1-process ones. Rank 0
    writes every run and shows the progress. A data-parallel run that fails raises on its rank,
    which ends the launch (torchrun stops the others; finished runs stay, a rerun resumes).
    """
    import torch.distributed as dist

    parallel.init_from_env()
    rank, size = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    _setup_process(max(1, (os.cpu_count() or 1) // local), data_dir)
    out = Path(out)
    todo_index = None
    if rank == 0:
        remove_stale_temps(out)
        todo_index = [i for i, t in enumerate(tasks) if force or not is_done(t.path(out))]
    box = [todo_index]
    dist.broadcast_object_list(box, 0)
    todo = sorted((tasks[i] for i in box[0]), key=lambda t: t.nproc == 1)  # data-parallel runs first
    cached = [t for t in tasks if t not in todo]
    outcome = Outcome([], cached, [], {})
    try:
        with Display(tasks, cached, console, show_progress and rank == 0) as display:
            try:
                for t in todo:
                    if t.nproc == 1 and rank != 0:
                        continue
                    display.update(t.name, t.experiment, 0.0)
                    progress = lambda f, t=t: display.update(t.name, t.experiment, f)  # noqa: E731
                    try:
                        if t.nproc > 1:
                            with parallel.active():
                                outcome.seconds[t.name] = _run(t, out, progress)
                        else:
                            outcome.seconds[t.name] = _run(t, out, progress)
                        outcome.ran.append(t)
                    except Exception as e:
                        if t.nproc > 1:  # the other ranks are inside the same run: end the launch
                            raise
                        outcome.failed.append((t, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
                    display.finish(t)
            except KeyboardInterrupt:
                outcome.interrupted = True
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return outcome
