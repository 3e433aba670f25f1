"""The report redraws an experiment's plots only when something they depend on may have changed.

Drawing is counted through ``plotting.save`` (every experiment saves through it), patched with a
counting wrapper: patching a module attribute leaves the source files in the key unchanged.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import normlab
from normlab.lab import experiments, plotting, report, runner

KEY = report.PLOT_KEY_FILE


def _run(out, name, seeds=2, sets=()):
    tasks = runner.plan([name], "quick", seeds, list(sets))
    runner.execute(tasks, out, jobs=1, show_progress=False)
    return tasks


def _page(out) -> str:
    """index.html without its generation time (the one line that differs between two builds)."""
    return re.sub(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d", "Generated", (out / "index.html").read_text())


def _results(out) -> dict:
    doc = json.loads((out / "results.json").read_text())
    doc.pop("generated")
    return doc


def _shown(out, name) -> dict:
    return json.loads((out / "results.json").read_text())["experiments"][name]


def test_a_second_build_reuses_the_plots_and_shows_the_same_page(fake_experiment, out_dir, saves):
    _run(out_dir, fake_experiment)
    report.build(out_dir)
    png = out_dir / "plots" / fake_experiment / "values.png"
    assert saves == [png]
    drawn_page, drawn_results, mtime = _page(out_dir), _results(out_dir), png.stat().st_mtime_ns
    key = json.loads((png.parent / KEY).read_text())
    assert [e[:2] for e in key["plots"]] == [["values.png", "value per seed"]]

    report.build(out_dir)
    assert saves == [png], "nothing changed: the plot must not be drawn again"
    assert png.stat().st_mtime_ns == mtime
    assert _page(out_dir) == drawn_page and _results(out_dir) == drawn_results
    assert not _shown(out_dir, fake_experiment)["errors"]


def test_metrics_rewritten_with_the_same_content_reuse_the_plots(fake_experiment, out_dir, saves):
    tasks = _run(out_dir, fake_experiment)
    report.build(out_dir)
    metrics = tasks[0].path(out_dir) / "metrics.json"
    metrics.write_text(json.dumps(json.loads(metrics.read_text()), indent=4))  # new mtime and layout, same numbers
    report.build(out_dir)
    assert len(saves) == 1


def _change_a_metric(out, tasks):
    metrics = tasks[1].path(out) / "metrics.json"
    doc = json.loads(metrics.read_text())
    doc["value"] += 1e-12  # the smallest change shows: the key is the exact content
    metrics.write_text(json.dumps(doc))


def _change_a_metric_the_summary_ignores(out, tasks):
    metrics = tasks[0].path(out) / "metrics.json"
    doc = json.loads(metrics.read_text())
    doc["steps"] += 1  # the plot function gets every metric, not only the summary
    metrics.write_text(json.dumps(doc))


def _delete_the_plot(out, tasks):
    (out / "plots" / tasks[0].experiment / "values.png").unlink()


def _overwrite_the_plot(out, tasks):
    png = out / "plots" / tasks[0].experiment / "values.png"
    png.write_bytes(png.read_bytes()[:-10])


def _key_file(text):
    def write(out, tasks):
        (out / "plots" / tasks[0].experiment / KEY).write_text(text)
    return write


def _delete_the_key_file(out, tasks):
    (out / "plots" / tasks[0].experiment / KEY).unlink()


def _list_a_missing_file(out, tasks):
    path = out / "plots" / tasks[0].experiment / KEY
    doc = json.loads(path.read_text())
    doc["plots"].append(["gone.png", "a plot that is not there", 1, "0" * 64])
    path.write_text(json.dumps(doc))


def _add_a_seed(out, tasks):
    _run(out, tasks[0].experiment, seeds=3)


def _renumber_a_seed(out, tasks):
    """Same metrics under another seed number: a caption naming seeds would be stale (report.py's
    plot_key without ``seeds`` reused the plots)."""
    d = tasks[1].path(out)
    d.rename(d.with_name(d.name.replace("-seed1", "-seed7")))


@pytest.mark.parametrize("change", [
    _change_a_metric, _change_a_metric_the_summary_ignores, _delete_the_plot, _overwrite_the_plot,
    _delete_the_key_file, _list_a_missing_file, _add_a_seed, _renumber_a_seed,
    _key_file("not json {"), _key_file(""), _key_file("[]"), _key_file('{"key": 1, "plots": 2}'),
    _key_file('{"key": "x", "plots": [["values.png"]]}'),
], ids=["metric", "metric-not-summarized", "deleted-plot", "changed-plot", "no-key-file", "missing-listed-file",
        "new-seed", "renumbered-seed", "corrupt-key", "empty-key", "key-list", "key-types", "key-entry"])
def test_anything_the_plots_depend_on_changing_redraws_them(fake_experiment, out_dir, saves, change):
    tasks = _run(out_dir, fake_experiment)
    report.build(out_dir)
    change(out_dir, tasks)
    report.build(out_dir)
    assert len(saves) == 2, "the plot must be drawn again"
    shown = _shown(out_dir, fake_experiment)
    assert not shown["errors"] and shown["plots"] == [f"plots/{fake_experiment}/values.png"]
    assert (out_dir / "plots" / fake_experiment / "values.png").is_file()
    report.build(out_dir)
    assert len(saves) == 2, "redrawn once, then reused"


def test_the_key_file_alone_corrupt_matches_no_key(fake_experiment, out_dir, saves):
    """A key file with the right key but an entry that does not unpack is a redraw, not an error."""
    _run(out_dir, fake_experiment)
    report.build(out_dir)
    path = out_dir / "plots" / fake_experiment / KEY
    doc = json.loads(path.read_text())
    doc["plots"] = [{"file": "values.png"}]
    path.write_text(json.dumps(doc))
    report.build(out_dir)
    assert len(saves) == 2 and not _shown(out_dir, fake_experiment)["errors"]


def test_a_changed_config_redraws_and_so_does_going_back(fake_experiment, out_dir, saves):
    (a, _) = _run(out_dir, fake_experiment)
    report.build(out_dir, prefer={fake_experiment: a.config_hash})
    (b, _) = _run(out_dir, fake_experiment, sets=["lr=0.2"])
    report.build(out_dir, prefer={fake_experiment: b.config_hash})
    assert len(saves) == 2 and _shown(out_dir, fake_experiment)["config_hash"] == b.config_hash
    report.build(out_dir, prefer={fake_experiment: a.config_hash})  # the plots on disk are b's now
    assert len(saves) == 3 and _shown(out_dir, fake_experiment)["config_hash"] == a.config_hash


def test_changed_drawing_code_or_versions_redraw(fake_experiment, out_dir, saves, monkeypatch, tmp_path):
    module = experiments.get(fake_experiment).module
    source = tmp_path / "fake_experiment.py"
    source.write_text("# version 1\n")
    monkeypatch.setattr(module, "__file__", str(source), raising=False)
    _run(out_dir, fake_experiment)
    report.build(out_dir)
    report.build(out_dir)
    assert len(saves) == 1
    source.write_text("# version 2\n")  # the experiment module's source
    report.build(out_dir)
    assert len(saves) == 2
    helpers = tmp_path / "plotting.py"  # plotting.py's source
    helpers.write_text(Path(plotting.__file__).read_text() + "\n# a changed style\n")
    monkeypatch.setattr(plotting, "__file__", str(helpers))
    report.build(out_dir)
    assert len(saves) == 3
    monkeypatch.setattr(normlab, "__version__", normlab.__version__ + ".post1")  # an upgrade
    report.build(out_dir)
    assert len(saves) == 4
    report.build(out_dir)
    assert len(saves) == 4


def test_unreadable_drawing_code_means_always_drawing(fake_experiment, out_dir, saves, monkeypatch, tmp_path):
    monkeypatch.setattr(experiments.get(fake_experiment).module, "__file__", str(tmp_path / "gone.py"), raising=False)
    _run(out_dir, fake_experiment)
    report.build(out_dir)
    report.build(out_dir)
    assert len(saves) == 2 and not _shown(out_dir, fake_experiment)["errors"]
    assert not (out_dir / "plots" / fake_experiment / KEY).exists()


def test_a_redraw_cut_short_leaves_no_key_vouching_for_its_files(fake_experiment, out_dir, saves, monkeypatch):
    tasks = _run(out_dir, fake_experiment)
    report.build(out_dir)
    metrics = tasks[1].path(out_dir) / "metrics.json"
    original = metrics.read_text()
    _change_a_metric(out_dir, tasks)
    save = plotting.save  # the counting one

    def broken(fig, path):  # a new PNG is written, then drawing fails
        save(fig, path)
        raise RuntimeError("drawing failed")
    monkeypatch.setattr(plotting, "save", broken)
    report.build(out_dir)
    assert "drawing failed" in _shown(out_dir, fake_experiment)["reason"]
    assert not (out_dir / "plots" / fake_experiment / KEY).exists()
    monkeypatch.setattr(plotting, "save", save)
    metrics.write_text(original)  # back to the inputs the old key was for: the PNG on disk is not theirs
    report.build(out_dir)
    assert len(saves) == 3 and not _shown(out_dir, fake_experiment)["errors"]  # first build, cut short, redrawn


def test_every_real_experiment_reuses_its_plots_and_shows_the_same_page(smoke_report, tmp_path, saves):
    src, _ = smoke_report
    out = tmp_path / "copy"
    shutil.copytree(src, out)  # keeps mtimes; the shared report stays as it is
    pngs = {p: p.stat().st_mtime_ns for p in (out / "plots").rglob("*.png")}
    assert pngs and all((out / "plots" / n / KEY).is_file() for n in experiments.names())
    report.build(out)
    assert saves == [], "every plot is up to date"
    assert {p: p.stat().st_mtime_ns for p in (out / "plots").rglob("*.png")} == pngs
    assert _page(out) == _page(src).replace(str(src), str(out))
    assert _results(out) == _results(src)
