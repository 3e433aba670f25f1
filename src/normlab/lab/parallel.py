"""Data parallelism for the lab: ``normlab lab run NAME --nproc N``.

One run (an experiment, a config, a seed) is trained by N processes that form a
``torch.distributed`` group (gloo, CPU). Every process runs the experiment's ``run`` from the
same seed; :func:`normlab.lab.training.train` then

- takes the same global batch of ``batch_size`` indices on every process (the same shuffle as
  the 1-process run) and gives process r its slice ``[r*B//N, (r+1)*B//N)`` (uneven slices,
  and empty ones when B < N, are fine);
- normalizes batch norm over the whole global batch: the lab's models build
  :class:`normlab.nn.SyncBatchNorm` for ``"batch"`` while a data-parallel run is active
  (:func:`sync_spec`), and :func:`prepare` converts any other batch norm with
  :func:`normlab.tools.convert`;
- sums ``loss_sum / B`` gradients over the processes with one all-reduce per step, so every
  process applies the 1-process full-batch gradient (count-weighted, whatever the slice
  sizes), and all parameters stay identical;
- evaluates the test set split across the processes and sums (correct, loss), so metrics are
  the same on every process and equal to the 1-process ones up to float rounding.

So a 2-process run matches the 1-process run closely (not bitwise: reductions add in a
different order). Not reproduced exactly: randomness inside the forward pass (dropout draws
its own masks per process, from a stream per rank) and layers whose batch statistics have no
synchronized version (batch renorm, switchable norm, masked batch norm): :func:`prepare`
refuses those with one line, and experiments declare beforehand whether a config can run
data-parallel (``DATA_PARALLEL`` / ``data_parallel(config)``, see
:mod:`normlab.lab.experiments`).

Processes: :func:`launch` starts N local ranks per run with ``fork`` when each gets one
thread (cheap: they inherit the imported torch; GNU OpenMP hangs in a forked child that uses
more than one thread after the parent used several) and ``spawn`` otherwise (a fresh
interpreter, a few seconds). They meet through a ``FileStore`` in a temporary folder (no
port to pick, so none to race for). Under ``torchrun`` the processes already exist and
:func:`init_from_env` joins the group torchrun describes (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``)::

    torchrun --nproc-per-node 2 -m normlab.cli lab run bn-mnist              # one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29500 -m normlab.cli lab run bn-mnist            # on each of two

Rank 0 writes the runs and the report on its own disk; every machine must be able to load
the data sets (``--data-dir`` for full MNIST).

Cost: every step adds one all-reduce, and each synchronized batch norm an all-gather forward
and an all-reduce backward. On the lab's small models on a small CPU these collectives cost
more than the compute they split: on the 2-core VM this was written on a gloo all-reduce of
4 floats took about 1 ms, so bn-mnist at quick scale (2000 steps of a 3-BN-layer MLP, 7
collectives a step) trained in about 50 s with ``--nproc 2`` against about 8 s in one
process; starting the 2 forked ranks adds well under a second. The split pays off when a
step's compute outweighs its collectives (bigger models and batches, more machines).
"""
from __future__ import annotations

import contextlib
import glob
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

_ACTIVE = False  # True while a data-parallel run is in progress in this process


class RankError(RuntimeError):
    """A rank of a data-parallel run failed; the message's first line says which and why, the
    rest is that rank's traceback."""


# -- the data-parallel run in progress ---------------------------------------------------------

def world() -> tuple:
    """``(rank, world size)`` of the data-parallel run in progress; ``(0, 1)`` when there is none
    (also in a process group that is not running a data-parallel lab run, as under torchrun when
    rank 0 runs an experiment alone)."""
    if _ACTIVE and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def active():
    """Mark the initialized default process group as the data-parallel group while inside."""
    global _ACTIVE
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("a data-parallel run needs an initialized torch.distributed process group")
    before, _ACTIVE = _ACTIVE, True
    try:
        yield
    finally:
        _ACTIVE = before


def sync_spec(spec: str) -> str:
    """``"sync_batch"`` for ``"batch"`` during a data-parallel run, else ``spec`` unchanged: the lab's
    models build their norms through this, so batch norm is synchronized from construction (the
    layer objects, and hooks an experiment puts on them, stay the same through training)."""
    if world()[1] > 1 and isinstance(spec, str) and spec.strip().lower() == "batch":
        return "sync_batch"
    return spec


def _unsyncable_kinds() -> tuple:
    from normlab.tools.convert import BATCH_STATS

    return tuple(k for k in BATCH_STATS if k not in ("batch", "sync_batch"))


def check_norms(specs: Sequence[str]) -> Optional[str]:
    """``None`` if every norm spec can be trained data-parallel, else the one-line reason why not
    (for an experiment's ``data_parallel(config)``)."""
    bad = [s for s in specs if isinstance(s, str) and s.strip().lower().partition(":")[0] in _unsyncable_kinds()]
    if not bad:
        return None
    return (f"{', '.join(bad)} compute{'s' if len(bad) == 1 else ''} batch statistics per process with no "
            f"synchronized version (leave {'it' if len(bad) == 1 else 'them'} out of norms to run data-parallel)")


def prepare(model: nn.Module) -> nn.Module:
    """Make ``model`` ready for data-parallel training; returns it (the same object unless the root
    itself is a norm layer).

    Batch norm layers that are not synchronized yet become :class:`normlab.nn.SyncBatchNorm`
    (new layer objects: hold the model, not its norm layers); a layer whose batch statistics
    have no synchronized version raises ``ValueError``; then every parameter and buffer is
    broadcast from rank 0, so all ranks start from the same weights whatever their RNG did.
    """
    from normlab.tools.convert import convert, norm_kind

    rank, size = world()
    bad = [f"'{name or '<root>'}' ({type(m).__name__})" for name, m in model.named_modules()
           if norm_kind(m) in _unsyncable_kinds()]
    if bad:
        raise ValueError(f"--nproc {size}: {bad[0]} computes batch statistics per process and has no synchronized "
                         f"version, so a data-parallel run would not match the 1-process run; run it with --nproc 1")
    if any(norm_kind(m) == "batch" for m in model.modules()):
        model, _ = convert(model, "sync_batch", only="batch")
    _broadcast_(list(model.parameters()) + list(model.buffers()))
    return model


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global batch of indices: ``idx[r*B//N : (r+1)*B//N]``."""
    rank, size = world()
    n = len(idx)
    return idx[rank * n // size: (rank + 1) * n // size]


def _groups(tensors: Sequence[torch.Tensor]) -> dict:
    out: dict = {}
    for t in tensors:
        out.setdefault(t.dtype, []).append(t)
    return out


@torch.no_grad()
def _broadcast_(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` with rank 0's, one collective per dtype."""
    for ts in _groups(tensors).values():
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        dist.broadcast(flat, 0)
        for t, part in zip(ts, torch.split(flat, [t.numel() for t in ts])):
            t.copy_(part.view_as(t))


@torch.no_grad()
def all_reduce_grads(params: Sequence[torch.Tensor], loss_sum: torch.Tensor) -> float:
    """Sum every parameter's gradient and ``loss_sum`` over the ranks, in place, with one all-reduce
    per dtype; returns the summed loss. A missing gradient counts as zeros (and becomes them)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups = list(_groups([p.grad for p in params]).values()) or [[]]
    loss = 0.0
    for i, ts in enumerate(groups):
        parts = [t.reshape(-1) for t in ts]
        if i == 0:  # the loss travels with the first group
            parts.append(loss_sum.detach().reshape(1).to(ts[0].dtype if ts else torch.float64))
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        if i == 0:
            loss, flat = float(flat[-1]), flat[:-1]
        if ts:
            for t, part in zip(ts, torch.split(flat, [t.numel() for t in ts])):
                t.copy_(part.view_as(t))
    return loss


def sum_over_ranks(*values: float) -> list:
    """Each value summed over the ranks of the data-parallel run (the values themselves without one)."""
    if world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


@contextlib.contextmanager
def rank_rng(seed: int):
    """A torch RNG stream of this rank's own inside (so dropout masks differ between the slices of
    a global batch), the caller's stream restored after; nothing happens without a data-parallel run."""
    rank, size = world()
    if size == 1:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + rank + 1) % (1 << 63))
        yield


# -- starting local ranks ------------------------------------------------------------------------

def launch(nproc: int, target: Callable, args: tuple = (), *, threads: int = 1,
           progress: Optional[Callable[[float], None]] = None, timeout_s: float = 1800.0):
    """Run ``target(*args, progress)`` in ``nproc`` new local processes that form a gloo group and a
    data-parallel run (:func:`active`); returns rank 0's return value.

    Rank 0's ``progress(fraction)`` calls reach ``progress`` here; the others' are dropped.
    When a rank fails (an exception, or it dies) the others are ended and :class:`RankError`
    carries the first failure. Ranks ignore Ctrl-C (this process ends them: an interrupt here
    ends every rank) and die with this process. ``threads``: torch threads per rank; with one,
    the ranks are forked (cheap), otherwise spawned (see the module docstring).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    method = "fork" if threads == 1 and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    _remove_stale_stores()
    folder = tempfile.mkdtemp(prefix=f"{_STORE_PREFIX}{os.getpid()}-")
    procs, conns = [], []
    try:
        for rank in range(nproc):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_rank_main, name=f"normlab-rank{rank}",
                            args=(rank, nproc, os.path.join(folder, "store"), threads, os.getpid(), timeout_s, send,
                                  target, args))
            p.start()
            send.close()  # so that a dead rank reads as end-of-file here
            procs.append(p)
            conns.append(recv)
        return _collect(procs, conns, progress)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        for c in conns:
            c.close()
        shutil.rmtree(folder, ignore_errors=True)


_STORE_PREFIX = "normlab-ranks-"


def _remove_stale_stores() -> None:
    """Remove the store folders of launching processes that ended without cleaning up (a pool
    worker terminated on Ctrl-C): ``<tmp>/normlab-ranks-<pid>-*`` whose pid is gone."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{_STORE_PREFIX}*-*")):
        try:
            pid = int(os.path.basename(path)[len(_STORE_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # another user's, alive
            continue


def _collect(procs, conns, progress):
    results, live = {}, dict(enumerate(conns))
    while live:
        for conn in multiprocessing.connection.wait(list(live.values())):
            rank = next(r for r, c in live.items() if c is conn)
            try:
                msg = conn.recv()
            except EOFError:  # the rank ended
                del live[rank]
                if rank not in results:
                    procs[rank].join(5)
                    raise RankError(f"rank {rank} of {len(procs)} ended (exit code {procs[rank].exitcode}) "
                                    f"without a result") from None
                continue
            if msg[0] == "progress":
                if progress is not None:
                    progress(msg[1])
            elif msg[0] == "ok":
                results[rank] = msg[1]
            else:
                _, line, tb = msg
                raise RankError(f"rank {rank} of {len(procs)}: {line}\n\nTraceback in rank {rank}:\n{tb}")
    return results.get(0)


def _die_with_parent(parent: int) -> None:
    """End this process when ``parent`` ends (a pool worker terminated by Ctrl-C must not leave ranks)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def _rank_main(rank, nproc, store_path, threads, parent, timeout_s, conn, target, args) -> None:
    import datetime

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    torch.set_num_threads(threads)  # first: a forked child must not start OpenMP with several threads
    code = 0
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, nproc), rank=rank, world_size=nproc,
                                timeout=datetime.timedelta(seconds=timeout_s))
        send = (lambda f: conn.send(("progress", float(f)))) if rank == 0 else (lambda f: None)
        with active():
            result = target(*args, send)
        conn.send(("ok", result if rank == 0 else None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which ends the others
        code = 1
        try:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            conn.send(("failed", f"{type(e).__name__}: {first}" if first else type(e).__name__,
                       traceback.format_exc()))
        except OSError:
            pass
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        conn.close()
    sys.exit(code)


# -- torchrun --------------------------------------------------------------------------------------

def env_world() -> int:
    """``WORLD_SIZE`` when this process was started by torchrun (or alike: ``RANK`` and
    ``WORLD_SIZE`` set), else 1."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            return max(1, int(os.environ["WORLD_SIZE"]))
        except ValueError:
            return 1
    return 1


def env_rank() -> int:
    """``RANK`` under torchrun, else 0."""
    try:
        return int(os.environ.get("RANK", "0")) if env_world() > 1 else 0
    except ValueError:
        return 0


def init_from_env() -> None:
    """Join the process group torchrun describes (gloo, ``env://``), unless one is initialized."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://")
