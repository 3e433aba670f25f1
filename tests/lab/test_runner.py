"""Caching, --force, atomic run folders, Ctrl-C and crash safety, and the report built from partial results."""
from __future__ import annotations

import json

import pytest

from normlab.lab import experiments, report, runner


def _run(out, name, seeds=2, force=False, sets=(), jobs=1):
    tasks = runner.plan([name], "quick", seeds, list(sets))
    return tasks, runner.execute(tasks, out, force=force, jobs=jobs, show_progress=False)


def test_runs_are_stored_with_config_metrics_env(fake_experiment, out_dir):
    tasks, outcome = _run(out_dir, fake_experiment)
    assert len(outcome.ran) == 2 and not outcome.failed
    for t in tasks:
        d = t.path(out_dir)
        assert d.name == f"{t.config_hash}-seed{t.seed}"
        assert json.loads((d / "metrics.json").read_text())["value"] == pytest.approx(t.seed + 0.1)
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["config"] == {"steps": 3, "lr": 0.1, "fail_seed": -1, "interrupt_seed": -1}
        env = json.loads((d / "env.json").read_text())
        assert {"torch", "numpy", "python", "git_sha", "seconds"} <= set(env)


def test_second_run_reuses_finished_runs_and_force_redoes_them(fake_experiment, out_dir):
    tasks, _ = _run(out_dir, fake_experiment)
    stamp = {t.name: (t.path(out_dir) / "metrics.json").stat().st_mtime_ns for t in tasks}
    _, again = _run(out_dir, fake_experiment)
    assert not again.ran and len(again.cached) == 2
    assert {t.name: (t.path(out_dir) / "metrics.json").stat().st_mtime_ns for t in tasks} == stamp
    _, forced = _run(out_dir, fake_experiment, force=True)
    assert len(forced.ran) == 2 and not forced.cached
    assert not [p for p in (out_dir / "runs" / fake_experiment).iterdir() if p.name.startswith(".")]


def test_changed_config_is_a_new_cache_entry(fake_experiment, out_dir):
    (a,), _ = _run(out_dir, fake_experiment, seeds=1)
    (b,), outcome = _run(out_dir, fake_experiment, seeds=1, sets=["lr=0.2"])
    assert a.config_hash != b.config_hash and len(outcome.ran) == 1


def test_a_crash_mid_write_leaves_no_run_folder(fake_experiment, out_dir, monkeypatch):
    _run(out_dir, fake_experiment, seeds=1)  # seed 0 finished before the crash
    calls = {"n": 0}
    real = runner.write_json

    def crash_on_second_file(path, obj):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real(path, obj)

    monkeypatch.setattr(runner, "write_json", crash_on_second_file)
    tasks, outcome = _run(out_dir, fake_experiment, seeds=2)
    assert len(outcome.failed) == 1 and "disk full" in outcome.failed[0][1]
    assert runner.is_done(tasks[0].path(out_dir)) and not tasks[1].path(out_dir).exists()
    assert sorted(p.name for p in (out_dir / "runs" / fake_experiment).iterdir()) == [tasks[0].name]


def test_a_failing_run_does_not_stop_the_others(fake_experiment, out_dir):
    tasks, outcome = _run(out_dir, fake_experiment, seeds=3, sets=["fail_seed=1"])
    assert [t.seed for t in outcome.ran] == [0, 2]
    assert "boom on seed 1" in outcome.failed[0][1]


def test_ctrl_c_keeps_finished_runs_and_report_builds_from_them(fake_experiment, out_dir):
    tasks, outcome = _run(out_dir, fake_experiment, seeds=3, sets=["interrupt_seed=1"])
    assert outcome.interrupted
    assert runner.is_done(tasks[0].path(out_dir)) and not tasks[1].path(out_dir).exists()
    assert not tasks[2].path(out_dir).exists()
    html = report.build(out_dir).read_text()
    assert "fake" in html and "only 1 seed" in html
    doc = json.loads((out_dir / "results.json").read_text())
    assert doc["experiments"]["fake"]["seeds"] == [0]
    assert doc["experiments"]["fake"]["verdict"] == "inconclusive"


def test_stale_temp_folders_are_ignored_and_cleaned(fake_experiment, out_dir):
    tasks, _ = _run(out_dir, fake_experiment, seeds=1)
    stale = out_dir / "runs" / fake_experiment / f".{tasks[0].name}.tmp-999999999-x"
    stale.mkdir()
    (stale / "config.json").write_text("{half")
    found, problems = runner.load_runs(out_dir)
    assert list(found) == [fake_experiment] and not problems
    runner.remove_stale_temps(out_dir)
    assert not stale.exists()


def test_report_skips_unreadable_runs(fake_experiment, out_dir):
    tasks, _ = _run(out_dir, fake_experiment, seeds=2)
    (tasks[1].path(out_dir) / "metrics.json").write_text("{not json")
    report.build(out_dir)
    doc = json.loads((out_dir / "results.json").read_text())
    assert doc["experiments"]["fake"]["seeds"] == [0] and doc["problems"]


def test_jsonable_turns_non_finite_into_null():
    import numpy as np

    assert runner.jsonable({"a": [np.float32(1.5), float("nan"), np.inf], "b": np.arange(2), "c": np.bool_(True)}) == \
        {"a": [1.5, None, None], "b": [0, 1], "c": True}
    # numpy scalars become Python ones (np.bool_ == True holds, so check the types: json.dump refuses numpy's)
    plain = runner.jsonable({"c": np.bool_(True), "i": np.int64(3)})
    assert type(plain["c"]) is bool and type(plain["i"]) is int
    assert json.dumps(plain) == '{"c": true, "i": 3}'


def test_ctrl_c_with_worker_processes_ends_them(out_dir, monkeypatch):
    import multiprocessing

    tasks = runner.plan(["convergence"], "smoke", 2)
    real, calls = runner.cf.wait, {"n": 0}

    def wait_then_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # 0.2 s in: the workers are still starting or running
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner.cf, "wait", wait_then_ctrl_c)
    outcome = runner.execute(tasks, out_dir, jobs=2, show_progress=False)
    assert outcome.interrupted and not outcome.ran
    assert not multiprocessing.active_children(), "workers must not outlive an interrupt"
    assert not any(t.path(out_dir).exists() for t in tasks)


def test_one_seed_is_inconclusive_whatever_the_rule_and_the_reason_says_why_once(fake_experiment, out_dir,
                                                                                  monkeypatch):
    from normlab.lab import experiments
    from normlab.lab.verdict import Verdict

    module = experiments.get(fake_experiment).module
    monkeypatch.setattr(module, "verdict", lambda s: Verdict("reproduced", "a rule that ignores the seed count"))
    _run(out_dir, fake_experiment, seeds=1)
    report.build(out_dir)
    shown = json.loads((out_dir / "results.json").read_text())["experiments"][fake_experiment]
    assert shown["verdict"] == "inconclusive" and shown["reason"].endswith("(only 1 seed: a verdict needs at least 2)")
    monkeypatch.setattr(module, "verdict", lambda s: Verdict("inconclusive", "mine (only 1 seed: a verdict needs "
                                                                             "at least 2)"))
    report.build(out_dir)
    shown = json.loads((out_dir / "results.json").read_text())["experiments"][fake_experiment]
    assert shown["reason"].count("only 1 seed") == 1  # invariance's rule says it itself


def test_last_run_keeps_the_config_asked_for_of_experiments_the_last_run_left_out(fake_experiment, out_dir):
    (a,), _ = _run(out_dir, fake_experiment, seeds=1)
    report.build(out_dir, prefer={fake_experiment: a.config_hash})
    _run(out_dir, fake_experiment, seeds=1, sets=["lr=0.2"])  # newer on disk, but never reported or asked for by name
    report.build(out_dir, prefer={"activations": "0" * 12})  # a run of other experiments
    shown = json.loads((out_dir / "results.json").read_text())["experiments"][fake_experiment]
    assert shown["config_hash"] == a.config_hash


def test_a_requested_config_whose_runs_all_failed_is_not_shown_as_an_older_configs_verdict(fake_experiment, out_dir):
    (a, _), _ = _run(out_dir, fake_experiment, seeds=2)
    report.build(out_dir, prefer={fake_experiment: a.config_hash})
    tasks, outcome = _run(out_dir, fake_experiment, seeds=1, sets=["fail_seed=0"])  # every run of it fails
    assert len(outcome.failed) == 1
    asked = tasks[0].config_hash
    for prefer in ({fake_experiment: asked}, None):  # what `run` passes, then `report` alone (last-run.json)
        html = report.build(out_dir, prefer=prefer).read_text()
        shown = json.loads((out_dir / "results.json").read_text())["experiments"][fake_experiment]
        assert shown["config_hash"] == asked and shown["seeds"] == [] and shown["verdict"] == "inconclusive"
        assert "no finished run of the config the last `run` asked for" in shown["reason"]
        assert "1 other config(s)" in shown["reason"] and "no finished run" in html


def test_an_experiment_asked_for_whose_every_run_failed_still_has_its_section(fake_experiment, out_dir, monkeypatch):
    """With no finished run of any config on disk, the experiment vanished from the report (and,
    after `report` alone, from its problems too) as if it had never been asked for."""
    monkeypatch.setitem(experiments.REGISTRY, "fake2", experiments.REGISTRY[fake_experiment])
    experiments.get.cache_clear()
    (ok, _), _ = _run(out_dir, "fake2", seeds=2)
    tasks, outcome = _run(out_dir, fake_experiment, seeds=1, sets=["fail_seed=0"])
    assert len(outcome.failed) == 1
    for prefer in ({"fake2": ok.config_hash, fake_experiment: tasks[0].config_hash}, None):
        report.build(out_dir, prefer=prefer)
        doc = json.loads((out_dir / "results.json").read_text())["experiments"]
        assert doc["fake2"]["verdict"] != "inconclusive" or doc["fake2"]["seeds"] == [0, 1]
        shown = doc[fake_experiment]
        assert shown["seeds"] == [] and shown["verdict"] == "inconclusive"
        assert "no finished run of the config" in shown["reason"] and "other config" not in shown["reason"]


def test_a_run_another_process_finished_first_is_kept_not_a_failure(tmp_path, monkeypatch):
    """Two `lab run` into one folder: the other process renamed its copy of the same run into
    place between write_run's check and its rename, and the rename failed ("Directory not
    empty"), failing a run that was on disk and done. Its copy now stands; ours is dropped."""
    final = tmp_path / "runs" / "exp" / "abc-seed0"
    rename = runner.os.rename

    def racing(src, dst):
        if str(dst) == str(final) and not final.exists():  # the other process wins the race here
            final.mkdir(parents=True)
            (final / "metrics.json").write_text('{"value": 1}')
        return rename(src, dst)
    monkeypatch.setattr(runner.os, "rename", racing)
    runner.write_run(final, {"metrics.json": {"value": 1}, "config.json": {}})
    assert json.loads((final / "metrics.json").read_text()) == {"value": 1}
    assert [p.name for p in final.parent.iterdir()] == ["abc-seed0"]  # no temporary folder left
    final2 = tmp_path / "runs" / "exp" / "def-seed0"  # a folder without a finished run is still an error
    monkeypatch.setattr(runner.os, "rename", lambda src, dst: (final2.mkdir(exist_ok=True),
                                                              (final2 / "x").write_text(""), rename(src, dst)))
    with pytest.raises(OSError):
        runner.write_run(final2, {"metrics.json": {}})


def test_the_scale_note_says_when_the_runs_shown_are_not_the_quick_scale(fake_experiment, out_dir, monkeypatch):
    """SCALE_NOTE describes the quick scale ("2000 steps ..."): shown over a --set or full-scale
    run it misstated what ran. The heading then says it is the quick scale's, and each field that
    differs is named with both values."""
    module = experiments.get(fake_experiment).module
    monkeypatch.setattr(module, "SCALE_NOTE", "Quick scale pretends 3 steps.", raising=False)
    _run(out_dir, fake_experiment)
    page = report.build(out_dir).read_text()
    assert "<b>What this scale can show.</b> Quick scale pretends 3 steps.</p>" in page
    _run(out_dir, fake_experiment, sets=["lr=0.3", "steps=7"])
    page = report.build(out_dir).read_text()
    assert "<b>What the quick scale can show.</b> Quick scale pretends 3 steps." in page
    assert "differ from the quick scale in lr 0.3 (quick: 0.1); steps 7 (quick: 3)" in page


def test_the_config_line_names_every_commit_and_torch_the_pooled_seeds_ran_on(fake_experiment, out_dir):
    """Seeds run on different commits are pooled under one config: the report showed seed 0's git
    SHA and torch version alone. Each value is now listed with its seeds when they differ."""
    tasks, _ = _run(out_dir, fake_experiment, seeds=3)
    for t, (sha, tv) in zip(tasks, [("a" * 40, "2.13.0"), ("a" * 40, "2.13.0"), ("b" * 40, "2.14.0")]):
        env_file = t.path(out_dir) / "env.json"
        env = json.loads(env_file.read_text())
        env.update(git_sha=sha, torch=tv)
        env_file.write_text(json.dumps(env))
    page = report.build(out_dir).read_text()
    assert "torch 2.13.0 (seeds 0, 1), 2.14.0 (seed 2), git aaaaaaaaaa (seeds 0, 1), bbbbbbbbbb (seed 2)" in page


def test_runs_of_an_older_experiment_version_are_marked_outdated(fake_experiment, out_dir, monkeypatch):
    """A VERSION bump means cached runs no longer mean what the code does; `lab report` on such a
    folder showed them with no mark."""
    _run(out_dir, fake_experiment)
    assert "Outdated runs" not in report.build(out_dir).read_text()
    monkeypatch.setattr(experiments.get(fake_experiment).module, "VERSION", 2, raising=False)
    page = report.build(out_dir).read_text()
    assert "<b>Outdated runs.</b> These runs were made by version 1 of the experiment; its code is now version 2" in page


def test_an_unfinished_section_shows_the_scale_note_without_a_list_of_differences():
    """A config asked for but with no finished runs has no config to compare: every field was
    listed as differing ("bins None (quick: 25); ...")."""
    page = report._section_html(report._unfinished_section("activations", "abc", 1))
    assert "<b>What this scale can show.</b>" in page and "differ from the quick scale" not in page


# -- mutation audit survivors: planning, output folder, --force swap, stale temps, jobs, threads --

def test_plan_refuses_zero_seeds_and_plans_a_repeated_name_once(fake_experiment):
    """Wrong versions: runner.py ``seeds < 1`` -> ``seeds < 0`` (0 seeds planned nothing and ran on
    to "every run failed"); ``list(dict.fromkeys(names))`` -> ``list(names)`` (``run fake fake``
    planned every run twice, two workers then writing the same run folder)."""
    with pytest.raises(runner.ConfigError, match="--seeds must be at least 1, got 0"):
        runner.plan([fake_experiment], "quick", 0)
    tasks = runner.plan([fake_experiment, fake_experiment], "quick", 2)
    assert [t.name for t in tasks] == [t.name for t in runner.plan([fake_experiment], "quick", 2)]


def test_set_for_an_experiment_not_being_run_and_an_empty_key_say_so():
    """Wrong versions: runner.py without the ``exp_name not in names`` check (the line read "no field
    'steps' in ", naming nothing); parse_sets without ``not key.strip()`` ("=5" read as field '')."""
    with pytest.raises(runner.ConfigError, match=r"--set bn-mnist\.steps: 'bn-mnist' is not among the experiments "
                                                 r"to run \(invariance\)"):
        runner.plan(["invariance"], "smoke", 1, ["bn-mnist.steps=5"])
    for item in ("=5", " =5"):
        with pytest.raises(runner.ConfigError, match="expected KEY=VALUE"):
            runner.parse_sets([item])


def test_an_output_folder_that_cannot_be_written_is_removed_if_this_call_created_it(tmp_path, monkeypatch):
    """Wrong version: prepare_output without its rmtree (bad input left an empty folder behind; the
    CLI test of it is skipped as root, who can write anywhere)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(runner.tempfile, "mkstemp", refuse)
    new = tmp_path / "a" / "report"
    with pytest.raises(runner.ConfigError, match="cannot write to output folder .*: Permission denied"):
        runner.prepare_output(new)
    assert not new.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(runner.ConfigError):
        runner.prepare_output(existing)
    assert existing.is_dir(), "a folder that was there before is the user's: never removed"


def test_force_whose_swap_fails_puts_the_old_run_back(tmp_path, monkeypatch):
    """--force moves the finished run aside, then renames the new one in; when that rename fails the
    old run must come back, not vanish. Wrong version: runner.py write_run without ``os.rename(old, final)``."""
    final = tmp_path / "runs" / "exp" / "abc-seed0"
    runner.write_run(final, {"metrics.json": {"value": 1}})
    rename = runner.os.rename

    def fail_new_into_place(src, dst):
        if str(dst) == str(final) and ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return rename(src, dst)
    monkeypatch.setattr(runner.os, "rename", fail_new_into_place)
    with pytest.raises(OSError):
        runner.write_run(final, {"metrics.json": {"value": 2}})
    assert json.loads((final / "metrics.json").read_text()) == {"value": 1}
    assert [p.name for p in final.parent.iterdir()] == ["abc-seed0"]  # no temporary or set-aside folder left


def test_temp_folders_of_a_live_process_stay_and_execute_cleans_dead_ones(fake_experiment, out_dir, monkeypatch):
    """A process of another user (os.kill says PermissionError) is alive: its folder is in use.
    execute itself removes dead processes' folders. Wrong versions: _alive returning False on
    PermissionError; execute without remove_stale_temps."""
    tasks, _ = _run(out_dir, fake_experiment, seeds=1)
    folder = out_dir / "runs" / fake_experiment / f".{tasks[0].name}.tmp-4242-x"
    folder.mkdir()

    def not_yours(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    with monkeypatch.context() as m:
        m.setattr(runner.os, "kill", not_yours)
        runner.remove_stale_temps(out_dir)
    assert folder.is_dir()
    monkeypatch.setattr(runner, "_alive", lambda pid: False)
    _run(out_dir, fake_experiment, seeds=1)
    assert not folder.exists()


def test_jobs_default_to_cores_per_process_of_a_run_and_never_exceed_the_runs(out_dir, monkeypatch):
    """Wrong versions: execute's ``cores // width`` -> ``cores`` (two 2-process runs on 4 cores ran
    at once on 8 processes); without ``min(..., len(todo))`` (more workers than runs)."""
    seen = []
    monkeypatch.setattr(runner, "_execute_pool", lambda todo, out, data_dir, jobs, threads, display, outcome:
                        seen.append(("pool", jobs, threads)))
    monkeypatch.setattr(runner, "_execute_here", lambda todo, out, data_dir, threads, display, outcome:
                        seen.append(("here", 1, threads)))
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 8)
    tasks = [runner.Task("x", {}, "h", s, 2) for s in range(6)]
    runner.execute(tasks, out_dir, show_progress=False)
    runner.execute(tasks[:2], out_dir, jobs=6, show_progress=False)
    runner.execute([runner.Task("x", {}, "h", s) for s in range(3)], out_dir, show_progress=False)
    assert seen == [("pool", 4, 2), ("pool", 2, 4), ("pool", 3, 2)]


def test_running_in_this_process_gives_back_the_callers_torch_threads(fake_experiment, out_dir, monkeypatch):
    """jobs=1 runs here with one thread per core, then restores the caller's count.
    Wrong version: _execute_here without ``torch.set_num_threads(before)``."""
    import torch

    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(out_dir, fake_experiment, seeds=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_hand_edited_last_run_file_with_a_non_string_hash_is_ignored(fake_experiment, out_dir):
    """Wrong version: report.py _remembered without its ``isinstance(v, str)`` filter (a number in
    last-run.json became the config asked for: "no finished run of the config ... (hash 5)")."""
    tasks, _ = _run(out_dir, fake_experiment, seeds=2)
    (out_dir / "last-run.json").write_text(json.dumps({fake_experiment: 5}))
    report.build(out_dir)
    shown = json.loads((out_dir / "results.json").read_text())["experiments"][fake_experiment]
    assert shown["config_hash"] == tasks[0].config_hash and shown["seeds"] == [0, 1]


def test_an_experiment_whose_analysis_fails_or_that_is_not_registered_does_not_take_the_report_down(
        fake_experiment, out_dir, monkeypatch):
    """One broken experiment: its section is inconclusive and says why (the rule's verdict, already
    decided before its plots failed, must not stand); runs of an experiment no longer registered are
    listed, not analysed. Wrong version: report.py _section's except without its INCONCLUSIVE verdict."""
    import shutil

    from normlab.lab.verdict import Verdict

    tasks, _ = _run(out_dir, fake_experiment, seeds=2)
    shutil.copytree(out_dir / "runs" / fake_experiment, out_dir / "runs" / "ghost")
    module = experiments.get(fake_experiment).module
    monkeypatch.setattr(module, "verdict", lambda s: Verdict("reproduced", "fine"))

    def no_ink(*args, **kwargs):
        raise RuntimeError("no ink")
    monkeypatch.setattr(module, "plots", no_ink)
    report.build(out_dir)
    doc = json.loads((out_dir / "results.json").read_text())["experiments"]
    assert doc[fake_experiment]["verdict"] == "inconclusive"
    assert doc[fake_experiment]["reason"] == "could not analyse the runs: RuntimeError: no ink"
    assert doc[fake_experiment]["errors"][0] == "RuntimeError: no ink"
    assert doc["ghost"]["verdict"] == "inconclusive" and doc["ghost"]["seeds"] == [0, 1]
    assert doc["ghost"]["errors"] == ["ghost is not a registered experiment; its runs are listed but not analysed"]


def test_the_page_colours_each_verdict_by_its_own_rule_and_lists_the_failed_runs(fake_experiment, out_dir, monkeypatch):
    """"not reproduced" has a space: its badge class must be the CSS rule's ``not-reproduced``, not
    the two classes ``not`` and ``reproduced`` (which painted it green, as reproduced). Failed
    runs passed to build are listed on the page, not only in results.json. Wrong versions:
    report.py _badge without ``.replace(" ", "-")``; _html without its "Failed or skipped" paragraph."""
    from normlab.lab.verdict import Verdict

    _run(out_dir, fake_experiment, seeds=2)
    monkeypatch.setattr(experiments.get(fake_experiment).module, "verdict", lambda s: Verdict("not reproduced", "no"))
    page = report.build(out_dir, failed=("fake seed 2 failed: RuntimeError: boom (errors.log)",)).read_text()
    assert '<span class="v not-reproduced">not reproduced</span>' in page and ".not-reproduced{" in page
    assert "Failed or skipped: fake seed 2 failed: RuntimeError: boom (errors.log)" in page
