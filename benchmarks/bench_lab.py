"""Time the lab: the whole suite as ``normlab lab run`` runs it, and each experiment.

    python benchmarks/bench_lab.py                   # quick scale, 3 seeds, every experiment
    python benchmarks/bench_lab.py --scale full --seeds 3 --jobs 2
    python benchmarks/bench_lab.py bn-mnist batch-size

Runs everything afresh (no cache) in a temporary folder, builds the report, prints a table
and writes ``benchmarks/results/lab.json`` for the default run (every experiment, quick scale,
3 seeds), ``lab-<scale>[-<names>][-<K>seed].json`` for any other unless ``--json`` says where.
Per experiment: the wall time of its runs summed over seeds (worker seconds), their CPU
seconds, and the slowest seed; for the suite: the wall time from start to report on this
machine, with the load average before and after (other processes on the machine inflate wall
time, not CPU time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import positive_int  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="experiments (default: all)")
    ap.add_argument("--scale", default="quick", help="smoke, quick (default) or full, as `normlab lab run --scale`")
    ap.add_argument("--seeds", type=positive_int, default=3, help="seeds per experiment (default 3)")
    ap.add_argument("--jobs", type=positive_int, default=None, help="worker processes (default: one per core)")
    ap.add_argument("--json", default=None, help="where to write the results (default: benchmarks/results/lab.json "
                                                  "for every experiment at quick scale with 3 seeds, else "
                                                  "lab-<scale>[-<names>][-<K>seed].json)")
    args = ap.parse_args()
    if args.json is None:  # a partial run must not overwrite the whole suite's figures
        parts = [args.scale, *args.names] + ([f"{args.seeds}seed"] if args.seeds != 3 else [])
        tag = "" if parts == ["quick"] else "-" + "-".join(parts)
        args.json = str(Path(__file__).parent / "results" / f"lab{tag}.json")

    from normlab.lab import experiments, report, runner

    try:
        tasks = runner.plan(args.names, args.scale, args.seeds)
    except experiments.ConfigError as e:  # a misspelt experiment or scale: one line, as the CLI says it
        ap.error(str(e))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report"
        start = time.time()
        outcome = runner.execute(tasks, out, force=True, jobs=args.jobs)
        runs_done = time.time()
        report.build(out)
        total = time.time() - start
        found, _ = runner.load_runs(out)
        doc = json.loads((out / "results.json").read_text())
    load_after = os.getloadavg()
    if outcome.failed or outcome.interrupted:
        raise SystemExit(f"benchmark incomplete: {len(outcome.failed)} failed, interrupted={outcome.interrupted}")

    rows = []
    for name in [n for n in experiments.names() if n in found]:
        runs = [r for group in found[name].values() for r in group]
        secs = [r.env["seconds"] for r in runs]
        cpu = [r.env.get("cpu_seconds") or 0.0 for r in runs]
        rows.append({"experiment": name, "seeds": len(runs), "worker_seconds": round(sum(secs), 1),
                     "cpu_seconds": round(sum(cpu), 1), "slowest_seed_seconds": round(max(secs), 1),
                     "verdict": doc["experiments"][name]["verdict"]})
    result = {"date": time.strftime("%Y-%m-%d"), "scale": args.scale, "seeds": args.seeds,
              "jobs": args.jobs or os.cpu_count(), "cpu_count": os.cpu_count(), "machine": platform.platform(),
              "suite_wall_seconds": round(total, 1), "runs_wall_seconds": round(runs_done - start, 1),
              "report_seconds": round(total - (runs_done - start), 1),
              "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
              "experiments": rows}

    print(f"{'experiment':<16}{'seeds':>6}{'worker s':>10}{'cpu s':>8}{'slowest':>9}  verdict")
    for r in rows:
        print(f"{r['experiment']:<16}{r['seeds']:>6}{r['worker_seconds']:>10.1f}{r['cpu_seconds']:>8.1f}"
              f"{r['slowest_seed_seconds']:>9.1f}  {r['verdict']}")
    print(f"suite ({args.scale}, {args.seeds} seeds, {result['jobs']} workers on {os.cpu_count()} cores): "
          f"{total:.1f} s wall ({result['runs_wall_seconds']:.1f} s runs + {result['report_seconds']:.1f} s report); "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
