"""Shared fixtures for the lab tests: a tiny registered fake experiment, a temp output folder,
and a fresh data cache for the session."""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass

import pytest

from normlab.lab import experiments, plotting
from normlab.lab.verdict import Verdict, check, fmt


@pytest.fixture(autouse=True, scope="session")
def fresh_data_cache(tmp_path_factory):
    """The generated data sets are cached under a versioned key (``digits-v1.npz``); a cache left
    by an earlier version of the generator would hide a change to it from every test. The
    session generates its own (seconds), and the CLI's subprocesses inherit the variable."""
    before = os.environ.get("NORMLAB_CACHE_DIR")
    os.environ["NORMLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("normlab-cache"))
    yield
    if before is None:
        os.environ.pop("NORMLAB_CACHE_DIR", None)
    else:
        os.environ["NORMLAB_CACHE_DIR"] = before


@dataclass(frozen=True)
class FakeConfig:
    steps: int = 3
    """Pretend steps."""
    lr: float = 0.1
    """Pretend learning rate."""
    fail_seed: int = -1
    """Seed whose run raises RuntimeError (-1: none)."""
    interrupt_seed: int = -1
    """Seed whose run raises KeyboardInterrupt, as Ctrl-C would (-1: none)."""


def _run(config, seed, progress):
    if seed == config.fail_seed:
        raise RuntimeError(f"boom on seed {seed}")
    if seed == config.interrupt_seed:
        raise KeyboardInterrupt
    progress(1.0)
    return {"value": seed + config.lr, "steps": config.steps}


def _summarize(config, runs):
    values = [r["value"] for r in runs]
    return {"values": values, "measured": f"value {fmt(values)}"}


def _verdict(s):
    return Verdict(check(s["values"], 0.0), f"values {fmt(s['values'])} > 0")


def _plots(config, runs, summary, out_dir):
    fig, ax = plotting.figure()
    ax.plot([r["value"] for r in runs], marker="o")
    ax.set(xlabel="seed", ylabel="value")
    plotting.save(fig, out_dir / "values.png")
    return [("values.png", "value per seed")]


def make_fake_module() -> types.ModuleType:
    m = types.ModuleType("normlab_test_fake_experiment")
    m.CLAIM, m.SOURCE = "The value is positive.", "conftest.py"
    m.Config = FakeConfig
    m.SCALES = {"smoke": FakeConfig(steps=1), "quick": FakeConfig(), "full": FakeConfig(steps=10)}
    m.run, m.summarize, m.verdict, m.plots = _run, _summarize, _verdict, _plots
    return m


@pytest.fixture
def fake_experiment(monkeypatch):
    """Registers the experiment ``fake`` (in-process runs only: worker processes cannot import it)."""
    module = make_fake_module()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(experiments.REGISTRY, "fake", module.__name__)
    experiments.get.cache_clear()
    yield "fake"
    experiments.get.cache_clear()


@pytest.fixture
def saves(monkeypatch):
    """The paths ``plotting.save`` wrote, in order."""
    calls, save = [], plotting.save

    def counting(fig, path):
        calls.append(path)
        save(fig, path)
    monkeypatch.setattr(plotting, "save", counting)
    return calls


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path / "report"


@pytest.fixture(scope="session")
def smoke_report(tmp_path_factory):
    """Every registered experiment at smoke scale, 2 seeds, run by the real runner (worker processes),
    and the report built from it: ``(out_dir, outcome)``."""
    from normlab.lab import report, runner

    out = tmp_path_factory.mktemp("smoke") / "report"
    tasks = runner.plan([], "smoke", 2)
    outcome = runner.execute(tasks, out, jobs=2, show_progress=False)  # always the worker-process path
    report.build(out)
    return out, outcome
