"""Markdown tables of ``benchmarks/results/gpu.json`` for RESULTS.md. Not a test.

    python benchmarks/results_markdown.py [path/to/gpu.json]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fmt(v, spec=".3f"):
    return "-" if v is None or v != v else format(v, spec)


def main(path=None):
    rep = json.loads(Path(path or ROOT / "benchmarks" / "results" / "gpu.json").read_text())
    rows = rep["results"]
    comp = any("compile_ms" in r for r in rows)  # a run with --no-compile has no such columns
    cc = " compile ms | vs compile |" if comp else ""
    cs = "---:|---:|" if comp else ""

    print("Eager (host launch time included; what a training loop without CUDA graphs sees):\n")
    print(f"| op | shape | dtype | layout | mode | ms | GB/s | % copy | torch ms | vs torch |{cc}")
    print(f"|---|---|---|---|---|---:|---:|---:|---:|---:|{cs}")
    for r in rows:
        print(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} | {r['mode']} | "
            f"{fmt(r['normlab_ms'])} | {fmt(r['normlab_gbs'], '.0f')} | {fmt(r['pct_copy'], '.0f')}% | {fmt(r['torch_ms'])} | "
            f"{fmt(r.get('vs_torch'), '.2f')} |" + (f" {fmt(r.get('compile_ms'))} | {fmt(r.get('vs_compile'), '.2f')} |" if comp else "")
        )
    print(f"\nCUDA graph, fwd+bwd (one capture replayed: GPU time, no host overhead, for all {'three' if comp else 'both'}):\n")
    print(f"| op | shape | dtype | layout | ms | GB/s | % copy | torch ms | vs torch |{cc}")
    print(f"|---|---|---|---|---:|---:|---:|---:|---:|{cs}")
    for r in rows:
        if "normlab_graph_ms" not in r:
            continue
        print(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} | {fmt(r['normlab_graph_ms'])} | "
            f"{fmt(r['bytes'] / r['normlab_graph_ms'] / 1e6, '.0f')} | {fmt(r['graph_pct_copy'], '.0f')}% | {fmt(r['torch_graph_ms'])} | "
            f"{fmt(r.get('graph_vs_torch'), '.2f')} |"
            + (f" {fmt(r.get('compile_graph_ms'))} | {fmt(r.get('graph_vs_compile'), '.2f')} |" if comp else "")
        )
    t = rep.get("targets", [])
    for timing in ("eager", "graph"):
        tt = [x for x in t if x["timing"] == timing]
        print(f"\nTargets, {timing}: {sum(x['met'] for x in tt)} of {len(tt)} met.")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _timing import help_if_asked

    help_if_asked(__doc__, sys.argv)
    main(sys.argv[1] if len(sys.argv) > 1 else None)
