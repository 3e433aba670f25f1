"""Every registered experiment honours the contract and runs end to end at smoke scale (seconds each)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from normlab.lab import experiments, runner
from normlab.lab.verdict import LABELS, Verdict


@pytest.mark.parametrize("name", experiments.names())
def test_contract(name):
    e = experiments.get(name)
    assert e.claim and e.source and "-" not in e.module.__name__.rsplit(".", 1)[-1]
    for scale in experiments.SCALES:
        cfg = e.config(scale)
        assert isinstance(cfg, e.module.Config)
        json.dumps(dataclasses.asdict(cfg))  # JSON-able, so it can be hashed and stored
        e.validate(cfg)
    docs = e.field_docs()
    assert set(docs) == {f.name for f in dataclasses.fields(e.module.Config)}, "every field needs a docstring"
    assert e.config_hash(e.config("quick")) != e.config_hash(e.config("full"))


def test_every_experiment_runs_at_smoke_scale(smoke_report):
    """Also the worker-process path of the runner: the fixture runs with one worker per core."""
    out, outcome = smoke_report
    assert not outcome.failed, outcome.failed[0][1] if outcome.failed else ""
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["experiments"]) == experiments.names()
    for name, e in doc["experiments"].items():
        assert e["seeds"] == [0, 1] and not e["errors"], (name, e["errors"])
        assert e["verdict"] in LABELS and "±" in e["reason"], name
        assert isinstance(e["measured"], str) and e["measured"], name
        assert e["plots"], name
        for rel in e["plots"]:
            assert (out / rel).stat().st_size > 1000, rel


@pytest.mark.parametrize("name", ["activations", "convergence"])
def test_run_reports_progress_and_json_metrics(name, tmp_path):
    e = experiments.get(name)
    fractions = []
    metrics = runner.jsonable(e.module.run(e.config("smoke"), 0, fractions.append))
    json.dumps(metrics, allow_nan=False)
    assert fractions and fractions[-1] == pytest.approx(1.0) and max(fractions) <= 1.0 + 1e-9
    v = e.module.verdict(e.module.summarize(e.config("smoke"), [metrics, metrics]))
    assert isinstance(v, Verdict)


def test_set_parses_types():
    e = experiments.get("batch-size")
    cfg = e.config("quick", {"batch_sizes": "2,8", "base_lr": "0.1", "norms": "batch,group:2"})
    assert cfg.batch_sizes == (2, 8) and cfg.base_lr == 0.1 and cfg.norms == ("batch", "group:2")
    with pytest.raises(experiments.ConfigError, match="must be an int"):
        e.config("quick", {"epochs": "2.5"})
    with pytest.raises(experiments.ConfigError, match="bool"):
        experiments.parse_value("x.flag", "maybe", bool)
    assert experiments.parse_value("x.flag", "yes", bool) is True


def test_bad_norm_spec_is_caught_before_running():
    e = experiments.get("batch-size")
    with pytest.raises(experiments.ConfigError, match="unknown norm spec"):
        e.validate(e.config("quick", {"norms": "batch,group:4,fancy"}))
