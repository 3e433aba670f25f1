"""A/B of the kernels' GPU time between two checkouts, on one machine. Not a test.

    python benchmarks/ab_gpu.py OTHER/src      # one line of JSON per case
    for s in src OLD/src src OLD/src; do python benchmarks/ab_gpu.py $s; done   # alternate

Each case: the forward alone and fwd+bwd, each captured once in a CUDA graph and replayed
(``do_bench`` median; no host time), and their difference as the backward. Used on
2026-11-22 to find the LN backward regression that commit 6e77ddd fixed
(``results/ab_ln_bwd.json``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # import that checkout's normlab before bench_gpu puts ours first
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _timing import help_if_asked

    help_if_asked(__doc__, sys.argv)
    sys.path.insert(0, str(Path(sys.argv[1]).resolve()))
    import normlab  # noqa: F401

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu as B  # noqa: E402

CASES = [
    B.Case("ln", (32768, 1024), "bfloat16", "rows"),
    B.Case("ln", (32768, 16384), "float32", "rows"),
    B.Case("ln", (32768, 4096), "float32", "rows"),
    B.Case("ln", (4096, 4096), "bfloat16", "rows"),
    B.Case("rms", (32768, 1024), "bfloat16", "rows"),
]


def graphed_forward_ms(case, f) -> float:
    a, _, _ = B.make_inputs(case)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            f(**a)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        f(**a)
    return B.timed(graph.replay, 10, 100)


def main():
    for case in CASES:
        f = B.functions(case)["normlab"]
        r = {"src": sys.argv[1], "case": B.describe(case), "graph_fwd": round(graphed_forward_ms(case, f), 4),
             "graph_fwd_bwd": round(B.time_graphed(case, f, 10, 100), 4)}
        r["graph_bwd"] = round(r["graph_fwd_bwd"] - r["graph_fwd"], 4)
        print(json.dumps(r), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
