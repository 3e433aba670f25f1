"""The report: ``index.html`` (static, offline, no JavaScript) and ``results.json``, built only
from the finished runs on disk.

For each experiment found under ``<out>/runs`` the report takes the config the last ``run``
asked for (``prefer``, kept in ``<out>/last-run.json``, so ``normlab lab report`` shows the
same; when that config has no finished run on disk, because its runs failed or were
interrupted, the section says so and is inconclusive, rather than showing another config's
verdict as if it answered the settings asked for), or, for an experiment no ``run`` of this
folder recorded, the config whose newest run finished last. It summarizes every seed stored
for that config (seeds from earlier runs of the same config count too, so ``--seeds 1``
after ``--seeds 3`` still shows 3; a run cut short shows the seeds that finished), applies
the verdict rule (inconclusive, saying so, with fewer than
:data:`~normlab.lab.verdict.MIN_SEEDS` seeds) and draws the plots into
``<out>/plots/<experiment>/``. The summary table and each section say how many processes
trained the runs shown (``--nproc``; 1 for runs stored before it existed).

Plots are drawn only when they may have changed (drawing is most of a cached ``run``'s time).
Beside them, ``<out>/plots/<experiment>/plots.json`` keeps a key and what the plot function
returned: each (file, caption) with the file's size and SHA-256. The key (:func:`plot_key`) is a
hash of everything the plots depend on: the experiment's name, the config shown and its hash, the
seeds and the exact metrics of every run shown (canonical JSON of the content, not mtimes), the
summary passed to ``plots``, and the code that draws them (the source of the experiment module,
of the file defining its ``plots``, of every normlab module it refers to at top level, of
:mod:`~normlab.lab.plotting`, :mod:`~normlab.lab.verdict` and this module) with the versions of
normlab, matplotlib, numpy and Python. The plots are reused when the key matches and every listed
file is there with the recorded size and hash; anything else (no key file, an unreadable or
malformed one, a missing or changed PNG, a source file that cannot be read) redraws them, never
an error. The key file is removed before a redraw and written after it succeeds, so a redraw cut
short never leaves an old key vouching for new files. ``run --force`` redraws when the redone
runs' metrics differ (a deterministic experiment's come back bit-identical, and so would its
plots); ``normlab lab report`` applies the same rule (the key covers every input, so always
redrawing would only cost time): delete ``<out>/plots`` to force a redraw.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import html
import inspect
import json
import math
import platform
import sys
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import normlab
from normlab.lab import experiments, plotting, runner
from normlab.lab import verdict as verdict_rules
from normlab.lab._files import replacing
from normlab.lab.verdict import INCONCLUSIVE, MIN_SEEDS, Verdict, fmt, too_few_seeds


@dataclass
class Section:
    """What the report shows of one experiment."""

    name: str
    exp: Optional[experiments.Experiment]
    runs: list
    config: dict
    config_hash: str
    summary: dict = field(default_factory=dict)
    verdict: Verdict = Verdict(INCONCLUSIVE, "no runs")
    plots: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    other_configs: int = 0
    per_seed: set = field(default_factory=set)  # summary keys holding one number per seed

    @property
    def nproc(self) -> int:
        """Processes that trained these runs (part of the cache key, so the same for all of them)."""
        return max(int(r.env.get("nproc") or 1) for r in self.runs) if self.runs else 1


def _latest_group(groups: dict) -> tuple:
    """The config whose newest run finished last (run folders are renamed into place when complete)."""
    h = max(groups, key=lambda k: max(r.path.stat().st_mtime for r in groups[k]))
    return h, groups[h]


def _per_seed_keys(exp, config, metrics: list, summary: dict) -> set:
    """The summary's lists that hold one number per seed (shown as mean ± sd), told apart from
    lists that merely have as many entries (the learning rates swept, a [low, high] range).

    The test: summarize the runs in reverse order. A per-seed list comes back reversed; a
    config list or an aggregate comes back as it was. A list that reads the same both ways
    counts as per seed unless it is a value of the config."""
    def numbers(v):
        return (isinstance(v, list) and len(v) == len(metrics)
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))
    candidates = [k for k, v in summary.items() if k != "measured" and numbers(v)]
    if not candidates:
        return set()
    try:
        reversed_summary = exp.module.summarize(config, copy.deepcopy(metrics[::-1]))  # a copy: never touch the runs
    except Exception:  # the report shows the summary anyway; only the table layout needs this
        reversed_summary = None
    config_lists = [list(v) for v in dataclasses.asdict(config).values() if isinstance(v, (list, tuple))]

    def same(a, b) -> bool:  # list equality that counts NaN as equal to NaN (a seed that diverged)
        return (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
                and all(x == y or (x != x and y != y) for x, y in zip(a, b)))
    keys = set()
    for k in candidates:
        v = summary[k]
        if reversed_summary is not None and not same(v, v[::-1]):
            if same(reversed_summary.get(k), v[::-1]):
                keys.add(k)
        elif not any(same(v, c) for c in config_lists):
            keys.add(k)
    return keys


def _section(name: str, groups: dict, out: Path, prefer: Optional[str] = None) -> Section:
    if prefer is not None and prefer not in groups:
        return _unfinished_section(name, prefer, len(groups))
    h, runs = (prefer, groups[prefer]) if prefer in groups else _latest_group(groups)
    sec = Section(name, None, runs, runs[0].config.get("config", {}), h, other_configs=len(groups) - 1)
    try:
        sec.exp = experiments.get(name)
    except experiments.ConfigError:
        sec.errors.append(f"{name} is not a registered experiment; its runs are listed but not analysed")
        return sec
    try:
        config = sec.exp.from_dict(sec.config)
        metrics = [r.metrics for r in runs]
        sec.summary = sec.exp.module.summarize(config, metrics)
        sec.per_seed = _per_seed_keys(sec.exp, config, metrics, sec.summary)
        v = sec.exp.module.verdict(sec.summary)
        few = too_few_seeds(len(runs))  # the label and the reason say so, whatever the module's rule did
        sec.verdict = Verdict(INCONCLUSIVE if len(runs) < MIN_SEEDS else v.label,
                              v.reason if few.strip() in v.reason else v.reason + few)
        sec.plots = _plots(sec, config, metrics, out / "plots" / name)
    except Exception as e:  # one broken experiment must not take the report down
        sec.errors.append(f"{type(e).__name__}: {e}")
        sec.errors.append(traceback.format_exc())
        sec.verdict = Verdict(INCONCLUSIVE, f"could not analyse the runs: {type(e).__name__}: {e}")
    return sec


# -- plots, redrawn only when they may have changed ----------------------------------------------

PLOT_KEY_FILE = "plots.json"


def _plots(sec: Section, config, metrics: list, plot_dir: Path) -> list:
    """``sec``'s plots as ``[(file, caption)]``: the ones on disk when :func:`plot_key` vouches for
    them, else drawn by the experiment's ``plots`` into ``plot_dir`` and recorded for next time."""
    key = plot_key(sec, metrics)
    cached = _cached_plots(plot_dir, key) if key else None
    if cached is not None:
        return cached
    keyfile = plot_dir / PLOT_KEY_FILE
    try:
        keyfile.unlink()  # before drawing: a redraw cut short must not leave an old key over new files
    except FileNotFoundError:
        pass
    draw = sec.exp.module.plots
    kw = {"seeds": [r.seed for r in sec.runs]} if _takes_seeds(draw) else {}
    plots = list(draw(config, metrics, sec.summary, plot_dir, **kw))
    if key and all(isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) for x in p)
                   for p in plots):
        try:
            files = [[f, c, *_file_digest(plot_dir / f)] for f, c in plots]
            plot_dir.mkdir(parents=True, exist_ok=True)
            _write_text(keyfile, json.dumps({"key": key, "plots": files}, indent=1) + "\n")
        except OSError:  # a listed file that is not there, a read-only folder: redraw next time
            pass
    return plots


def _takes_seeds(plots) -> bool:
    """Whether an experiment's ``plots`` takes the optional ``seeds`` keyword (see
    :mod:`normlab.lab.experiments`); a callable whose signature cannot be read does not."""
    try:
        return "seeds" in inspect.signature(plots).parameters
    except (TypeError, ValueError):
        return False


def plot_key(sec: Section, metrics: list) -> Optional[str]:
    """SHA-256 of everything ``sec``'s plots depend on (see the module docstring), or None when some
    of it cannot be pinned down (a source file that cannot be read, a summary that is not JSON):
    then the plots are always drawn."""
    code = _code_digest(sec.exp.module)
    if code is None:
        return None
    doc = {"experiment": sec.name, "config_hash": sec.config_hash, "config": sec.config,
           "seeds": [r.seed for r in sec.runs], "metrics": metrics, "summary": sec.summary, "code": code}
    try:
        blob = json.dumps(doc, sort_keys=True, allow_nan=True, default=_plain)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(blob.encode()).hexdigest()


def _plain(obj):
    """numpy values as Python ones, for the key's canonical JSON (anything else: TypeError, no caching)."""
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON")


def _code_files(module: types.ModuleType) -> Optional[list]:
    """The source files the plots of ``module`` may run: the module's own, the file defining its
    ``plots``, every normlab module it refers to at top level (imported modules, functions and
    classes), plotting, verdict and this module. None when the module or ``plots`` has no file."""
    files = {plotting.__file__, verdict_rules.__file__, __file__}
    own = getattr(module, "__file__", None)
    code = getattr(getattr(module, "plots", None), "__code__", None)
    if own is None and code is None:
        return None
    files.update(f for f in (own, code and code.co_filename) if f)
    for v in vars(module).values():
        m = v if isinstance(v, types.ModuleType) else sys.modules.get(getattr(v, "__module__", None) or "")
        if (m is not None and m is not module and m.__name__.split(".")[0] == "normlab"
                and getattr(m, "__file__", None)):
            files.add(m.__file__)
    return sorted(files)


def _code_digest(module: types.ModuleType) -> Optional[str]:
    import matplotlib
    import numpy

    files = _code_files(module)
    if files is None:
        return None
    h = hashlib.sha256(json.dumps([normlab.__version__, matplotlib.__version__, numpy.__version__,
                                   platform.python_version()]).encode())
    try:
        for f in files:
            data = Path(f).read_bytes()
            h.update(f"{Path(f).name} {len(data)}\n".encode())
            h.update(data)
    except OSError:
        return None
    return h.hexdigest()


def _file_digest(path: Path) -> list:
    data = path.read_bytes()
    return [len(data), hashlib.sha256(data).hexdigest()]


def _unfinished_section(name: str, requested: str, others: int) -> Section:
    """The last ``run`` of ``name`` asked for config ``requested`` and none of its runs finished
    (they failed, or the run was interrupted): the section says so, inconclusive, and shows no
    older config in its place (its verdict would read as the answer for the settings asked for)."""
    sec = Section(name, None, [], {}, requested, other_configs=others)
    try:
        sec.exp = experiments.get(name)
    except experiments.ConfigError:
        pass
    shown_instead = (f" {others} other config(s) of this experiment on disk are not shown; run with their settings "
                     f"again to show one (finished runs are reused, not redone)") if others else ""
    sec.verdict = Verdict(INCONCLUSIVE, (
        f"no finished run of the config the last `run` asked for (hash {requested}): its runs failed (tracebacks "
        f"in errors.log), were interrupted or were removed.{shown_instead}"))
    return sec


def _cached_plots(plot_dir: Path, key: str) -> Optional[list]:
    """The ``[(file, caption)]`` recorded with ``key`` when every file is there unchanged, else None."""
    try:
        doc = json.loads((plot_dir / PLOT_KEY_FILE).read_text())
        if not (isinstance(doc, dict) and doc.get("key") == key and isinstance(doc.get("plots"), list)):
            return None
        plots = []
        for entry in doc["plots"]:
            f, caption, size, digest = entry
            if not (isinstance(f, str) and isinstance(caption, str)) or _file_digest(plot_dir / f) != [size, digest]:
                return None
            plots.append((f, caption))
        return plots
    except (OSError, ValueError, TypeError):  # missing, unreadable, not JSON, or not the expected shape
        return None


def build(out, prefer: Optional[dict] = None, failed: tuple = ()) -> Path:
    """Build ``<out>/index.html`` and ``<out>/results.json`` from the runs on disk; returns the HTML path.

    An experiment with runs of several configs shows ``prefer[experiment]`` (a config hash:
    what the ``run`` command just asked for, cached or not; inconclusive, saying why, when none
    of its runs finished), else the config whose newest run finished last, with every seed
    stored for it. ``prefer`` is added to ``<out>/last-run.json`` (:func:`remember`), and a
    build without it (``normlab lab report``) reads it from there. ``failed``: one line per run
    the command could not finish, listed with the report's problems. Raises ``FileNotFoundError`` when there is
    no finished run at all.
    """
    out = Path(out)
    # what the last `run` of each experiment asked for: `report` alone shows the same
    prefer = _remembered(out) if prefer is None else remember(out, prefer)
    found, problems = runner.load_runs(out)
    problems = list(failed) + problems
    if not found:
        raise FileNotFoundError(f"no finished runs in {out / 'runs'}; run `normlab lab run --out {out}` first")
    # an experiment the last `run` asked for with no finished run of any config is shown too
    # (inconclusive, saying so), not left out as if it had never been asked for
    shown = set(found) | {n for n in prefer if n in experiments.REGISTRY}
    order = [n for n in experiments.names() if n in shown] + sorted(n for n in found if n not in experiments.REGISTRY)
    sections = [_section(n, found.get(n, {}), out, prefer.get(n)) for n in order]
    _write_text(out / "results.json", _results_json(sections, problems))
    _write_text(out / "index.html", _html(sections, problems, out))
    return out / "index.html"


def remember(out, prefer: dict) -> dict:
    """Add ``prefer`` ({experiment: config hash}, what a ``run`` asked for) to ``<out>/last-run.json``
    for a later ``normlab lab report``, and return the whole file: for each experiment, the config
    the last ``run`` of it asked for. ``run`` calls it even when it builds no report (Ctrl-C,
    ``--no-report``)."""
    merged = {**_remembered(out), **prefer}
    _write_text(Path(out) / "last-run.json", json.dumps(merged, indent=1, sort_keys=True))
    return merged


def _remembered(out) -> dict:
    try:
        doc = json.loads((Path(out) / "last-run.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in doc.items() if isinstance(v, str)} if isinstance(doc, dict) else {}


def _write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def _results_json(sections, problems) -> str:
    doc = {"generated": datetime.datetime.now().isoformat(timespec="seconds"), "problems": problems,
           "experiments": {}}
    for s in sections:
        doc["experiments"][s.name] = {
            "claim": s.exp.claim if s.exp else None, "source": s.exp.source if s.exp else None,
            "published": s.exp.published if s.exp else None,
            "verdict": s.verdict.label, "reason": s.verdict.reason, "measured": s.summary.get("measured"),
            "config_hash": s.config_hash, "config": s.config, "seeds": [r.seed for r in s.runs], "nproc": s.nproc,
            "summary": s.summary, "plots": [f"plots/{s.name}/{f}" for f, _ in s.plots], "errors": s.errors,
            "runs": [{"seed": r.seed, "metrics": r.metrics, "env": r.env} for r in s.runs]}
    return json.dumps(runner.jsonable(doc), indent=1, allow_nan=False) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ccc;padding:.3em .5em;
vertical-align:top;text-align:left}th{background:#f3f3f3}
.v{font-weight:600;padding:.1em .45em;border-radius:.3em;white-space:nowrap}
.reproduced{background:#d9f2d9;color:#135913}.not-reproduced{background:#f8d7d7;color:#8a1414}
.inconclusive{background:#fff1c9;color:#6b5200}
figure{display:inline-block;margin:.5em 1em .5em 0;max-width:100%}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.88em;color:#444;max-width:600px}
.note{color:#555;font-size:.92em}pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
section{border-top:2px solid #eee;margin-top:2em}
"""


def _badge(v: Verdict) -> str:
    return f'<span class="v {v.label.replace(" ", "-")}">{html.escape(v.label)}</span>'


def _html(sections, problems, out: Path) -> str:
    e = html.escape
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    rows = "".join(
        f'<tr><td><a href="#{e(s.name)}">{e(s.name)}</a></td><td>{e(s.exp.claim if s.exp else "")}</td>'
        f'<td>{e(s.exp.source if s.exp else "")}</td><td>{e(str(s.summary.get("measured", "")))}</td>'
        f"<td>{_badge(s.verdict)}</td><td>{s.nproc}</td></tr>" for s in sections)
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>normlab lab report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>normlab lab report</h1>",
             f'<p class=note>Generated {e(now)} from the finished runs in <code>{e(str(out / "runs"))}</code>. '
             "Each claim about normalization is run as an experiment on real or generated data on a CPU; the "
             "verdict is decided by a rule written in the experiment, over every seed stored for the config shown, "
             "earlier runs' too (mean ± sample standard deviation). "
             "<em>reproduced</em>: every seed supports the claim; <em>not reproduced</em>: the mean does not; "
             f"<em>inconclusive</em>: the mean does but some seed does not, or fewer than {MIN_SEEDS} seeds.</p>",
             '<h2 id="summary">Summary</h2><table id="summary-table"><thead><tr><th>experiment</th><th>claim</th>'
             f"<th>source</th><th>measured</th><th>verdict</th><th title=\"processes that trained each run "
             f"(--nproc)\">processes</th></tr></thead><tbody>{rows}</tbody></table>"]
    if problems:
        parts.append("<p class=note>Failed or skipped: " + "; ".join(e(p) for p in problems) + "</p>")
    for s in sections:
        parts.append(_section_html(s))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _section_html(s: Section) -> str:
    e = html.escape
    p = [f'<section id="{e(s.name)}"><h2>{e(s.name)}</h2>']
    if s.exp:
        p.append(f"<p><b>Claim.</b> {e(s.exp.claim)}<br><b>Source.</b> {e(s.exp.source)}</p>")
        if s.exp.published:
            p.append(f"<p><b>Published.</b> {e(s.exp.published)}</p>")
    p.append(f"<p><b>Verdict.</b> {_badge(s.verdict)} {e(s.verdict.reason)}</p>")
    old = sorted({str(r.config.get("version")) for r in s.runs if s.exp and r.config.get("version") != s.exp.version})
    if old:
        p.append(f"<p class=note><b>Outdated runs.</b> These runs were made by version {e(', '.join(old))} of the "
                 f"experiment; its code is now version {s.exp.version}, whose runs mean something else (VERSION "
                 f"was bumped). Run <code>normlab lab run {e(s.name)}</code> again (with the same --scale and --set) "
                 f"for runs of this version; these stay on disk under their own config hash.</p>")
    if s.exp and s.exp.scale_note:
        p.append(_scale_note_html(s))
    for fname, caption in s.plots:
        src = f"plots/{s.name}/{fname}"
        p.append(f'<figure><img src="{e(src)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
    numbers = [(k, v) for k, v in s.summary.items() if k != "measured" and (k in s.per_seed or
                                                                            not isinstance(v, (dict, list)))]
    if numbers:
        p.append("<h3>Numbers</h3><table><tr><th>quantity</th><th>mean ± sd over seeds</th><th>per seed</th></tr>"
                 + "".join(f"<tr><td>{e(k)}</td><td>{e(_over_seeds(v) if k in s.per_seed else _num(v))}</td>"
                           f"<td>{e(_num(v) if k in s.per_seed else '')}</td></tr>" for k, v in numbers)
                 + "</table>")
    lists = [(k, v) for k, v in s.summary.items() if isinstance(v, (dict, list)) and k not in s.per_seed]
    if lists:
        p.append("<details><summary>More summary numbers (lists: over the seeds, or one entry per seed)</summary>"
                 "<pre>" + e("\n".join(
            f"{k}: {_num(v)}" for k, v in lists)) + "</pre></details>")
    if not s.runs:  # the config asked for has no finished run (see _unfinished_section)
        p.append(f"<h3>Config</h3><p class=note>hash <code>{e(s.config_hash)}</code>: no finished run</p>")
        p.append("</section>")
        return "\n".join(p)
    docs = s.exp.field_docs() if s.exp else {}
    seeds = ", ".join(str(r.seed) for r in s.runs)
    seconds = ", ".join(f"{r.env.get('seconds') or 0:.1f}" for r in s.runs)
    p.append(f"<h3>Config</h3><p class=note>hash <code>{e(s.config_hash)}</code>; seeds {e(seeds)} (every seed "
             f"stored for this config); "
             f"{_processes(s.nproc)}; seconds per run {e(seconds)}; "
             f"torch {e(_per_run(s.runs, lambda env: str(env.get('torch'))))}, "
             f"git {e(_per_run(s.runs, lambda env: str(env.get('git_sha') or 'n/a')[:10]))}"
             + (f"; {s.other_configs} other config(s) of this experiment on disk are not shown" if s.other_configs
                else "") + "</p>")
    p.append("<table><tr><th>field</th><th>value</th><th>meaning</th></tr>" + "".join(
        f"<tr><td><code>{e(k)}</code></td><td>{e(_num(v))}</td><td>{e(docs.get(k, ''))}</td></tr>"
        for k, v in s.config.items()) + "</table>")
    for err in s.errors:
        p.append(f"<pre>{e(err)}</pre>")
    p.append("</section>")
    return "\n".join(p)


def _processes(n: int) -> str:
    if n == 1:
        return "1 process per run"
    return f"{n} processes per run (data-parallel: each batch split across them, batch norm synchronized)"


def _over_seeds(v: list) -> str:
    """Mean ± sd of per-seed numbers; infinite ones (a target never reached) are counted, not averaged."""
    finite = [x for x in v if math.isfinite(x)]
    if len(finite) == len(v):
        return _mean_sd(v)
    rest = f"{len(v) - len(finite)} of {len(v)} seeds not finite" + (
        " (never reached)" if all(math.isinf(x) for x in v if not math.isfinite(x)) else "")
    return f"{_mean_sd(finite)} over the other {len(finite)}; {rest}" if finite else rest


def _mean_sd(v: list) -> str:
    """``fmt``'s 4 decimals, or significant digits for numbers that they would show as 0.0000
    (a masked error of 8e-08, an invariance residue of 1e-15) or that are very large."""
    m, sd = verdict_rules.mean_sd(v)
    size = max(abs(m), sd)
    return verdict_rules.pm(f"{m:.4g}", f"{sd:.2g}", len(v)) if size and not 1e-3 <= size < 1e6 else fmt(v, 4)


def _per_run(runs: list, what) -> str:
    """``what(env)`` of the runs: one value when they agree, else each with its seeds ("abc
    (seeds 0, 1), def (seed 2)"): seeds pooled from different commits or torch versions say so."""
    seen: dict = {}
    for r in runs:
        seen.setdefault(what(r.env), []).append(r.seed)
    if len(seen) == 1:
        return next(iter(seen))
    return ", ".join(f"{v} (seed{'s' if len(sd) > 1 else ''} {', '.join(map(str, sd))})" for v, sd in seen.items())


def _scale_note_html(s: Section) -> str:
    """The experiment's SCALE_NOTE, written for its quick scale: when the runs shown used another
    config (``--scale full``, a ``--set``), the note says so and names each field that differs,
    so its figures (steps, widths, data) are not read as this run's."""
    e = html.escape
    try:
        quick = json.loads(json.dumps(dataclasses.asdict(s.exp.module.SCALES["quick"])))  # tuples as lists
    except (AttributeError, KeyError, TypeError, ValueError):
        quick = None
    # (fields present in both: one added to Config since the runs were made is not theirs to differ in)
    diff = [] if quick is None or not s.runs else [
        f"{k} {_num(s.config[k])} (quick: {_num(quick[k])})" for k in sorted(set(quick) & set(s.config))
        if quick[k] != s.config[k]]
    if not diff:
        return f"<p class=note><b>What this scale can show.</b> {e(s.exp.scale_note)}</p>"
    return (f"<p class=note><b>What the quick scale can show.</b> {e(s.exp.scale_note)} <em>These runs differ "
            f"from the quick scale in {e('; '.join(diff))}: the note's figures are the quick scale's.</em></p>")


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_num(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_num(x)}" for k, x in v.items()) + "}"
    return str(v)
