"""Timing helpers shared by the benchmarks: interleaved rounds and medians, because the
machines here are noisy (other processes share the cores), so only ratios measured in the
same run mean anything."""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path


def help_if_asked(doc: str, argv: list) -> None:
    """For the scripts without argparse: ``-h``/``--help`` prints the module docstring and exits,
    instead of being taken as a path (or running the script)."""
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(doc.strip())
        raise SystemExit(0)


def positive_int(text: str) -> int:
    """argparse type: a count of at least 1 (0 rounds would end in a median of nothing)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def interleaved(fns: dict, rounds: int = 15, inner: int = 3, warmup: int = 2, sync=None) -> dict:
    """Median seconds per call of each function, timed in interleaved rounds (A B C, C A B, ..., shuffled)
    so that slow phases of a noisy machine hit every candidate alike."""
    sync = sync or (lambda: None)
    for f in fns.values():
        for _ in range(warmup):
            f()
    sync()
    times = {k: [] for k in fns}
    keys = list(fns)
    order = random.Random(0)
    for _ in range(rounds):
        # a fresh order every round: whichever candidate runs right after another one's big
        # allocations (a cold cache, page faults) is a different one each time
        order.shuffle(keys)
        for k in keys:
            f = fns[k]
            t = time.perf_counter()
            for _ in range(inner):
                f()
            sync()
            times[k].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def environment() -> dict:
    import numpy
    import torch

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = ""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "git": sha,
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
