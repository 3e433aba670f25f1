"""Where does the time go? Host (launch) time versus kernel time for a few cases. Not a test.

For each case: the host time of one call (enqueue only, averaged over many calls without
synchronizing), the same with a synchronize, and the CUDA time of every kernel from
torch.profiler. Writes ``profile.txt`` next to ``--out``.

    python benchmarks/profile_gpu.py [--out benchmarks/results/profile.txt]
    python benchmarks/profile_gpu.py --host-only --json host.json [--src OTHER/src]

``--host-only`` keeps the host times (no profiler tables, no A/B sweep); ``--src`` measures
the normlab of another checkout (for a before/after in one session); ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and "--src" in sys.argv:  # import that normlab before bench_gpu picks ours
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--src") + 1]).resolve()))
    import normlab  # noqa: F401

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu as B  # noqa: E402

CASES = [
    B.Case("ln", (4096, 1024), "bfloat16", "rows"),
    B.Case("ln", (32768, 1024), "bfloat16", "rows"),
    B.Case("ln", (4096, 16384), "bfloat16", "rows"),
    B.Case("gn", (32, 256, 56, 56), "bfloat16", "nchw"),
    B.Case("gn", (32, 256, 56, 56), "bfloat16", "cl"),
    B.Case("bn", (32, 256, 56, 56), "bfloat16", "cl"),
]


@triton.jit
def _empty(a, b, c, n, m, k, X: tl.constexpr, Y: tl.constexpr):
    pass


def host_ms(fn, n=50):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e3, (t2 - t0) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile.txt"))
    ap.add_argument("--host-only", action="store_true", help="host times only: no profiler tables, no A/B")
    ap.add_argument("--src", default=None, help="the src/ folder whose normlab to measure (read before imports)")
    ap.add_argument("--json", default=None, help="write the host times here")
    ap.add_argument("--n", type=int, default=50, help="calls per host timing")
    args = ap.parse_args()
    lines = []
    host = {"normlab": B.kernels.__file__, "cases": []}

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    t = torch.empty(16, device="cuda")
    enq, tot = host_ms(lambda: _empty[(1,)](t, t, t, 16, 32, 48, X=True, Y=tl.float32), 200)
    say(f"empty triton launch: host {enq * 1e3:.1f} us per launch (with sync {tot * 1e3:.1f} us)")
    host["empty_launch_us"] = enq * 1e3
    enq, tot = host_ms(lambda: torch.empty(1000, device="cuda"), 200)
    say(f"torch.empty: host {enq * 1e3:.1f} us")
    host["torch_empty_us"] = enq * 1e3
    for case in CASES:
        say(f"\n=== {B.describe(case)}")
        for impl in ("normlab", "torch"):
            f = B.functions(case)[impl]
            a, leaves, dy = B.make_inputs(case)
            fwd = lambda: f(**a)  # noqa: E731
            y = fwd()
            rec = {"case": B.describe(case).split(), "impl": impl}
            for mode, fn in (("fwd", fwd), ("bwd", lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)),
                             ("fwd+bwd", lambda: torch.autograd.grad(fwd(), leaves, dy))):
                enq, tot = min(host_ms(fn, args.n) for _ in range(3))  # the least disturbed of 3
                say(f"{impl:8s} {mode:8s} host {enq:.3f} ms/call, with sync {tot:.3f} ms/call")
                rec[f"{mode}_host_ms"], rec[f"{mode}_sync_ms"] = enq, tot
            host["cases"].append(rec)
            if args.host_only:
                continue
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    torch.autograd.grad(fwd(), leaves, dy)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
            say(f"{impl} profile (5 x fwd+bwd):\n{table}")
    if args.json:
        Path(args.json).write_text(json.dumps(host, indent=1))
    if args.host_only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines))
        return
    # A/B of launch heuristics, GPU-bound shapes, median of do_bench
    import importlib

    LN = importlib.import_module("normlab.kernels.layer_norm")
    CH = importlib.import_module("normlab.kernels._channel_norm")
    say("\n=== A/B")
    for shape in ((32768, 1024), (32768, 4096), (4096, 16384)):
        case = B.Case("ln", shape, "bfloat16", "rows")
        for v in ({"bwd_prefetch": True}, {"bwd_prefetch": False}, {"bwd_prefetch": True, "bwd_warps": 16}, {"bwd_prefetch": True, "bwd_max_own": 4096}):
            base = dict(LN.TUNING)
            LN.TUNING.update(v)
            ms = B.time_case(case, B.functions(case)["normlab"], "bwd", 10, 40)
            LN.TUNING.update(base)
            say(f"{B.describe(case)} bwd {ms:.4f} ms {B.nbytes(case, 'bwd') / ms / 1e6:.0f} GB/s {v}")
    for layout in ("nchw", "cl"):
        case = B.Case("gn", (32, 256, 56, 56), "bfloat16", layout)
        for v in ({"num_warps": 8}, {"num_warps": 4}):
            base = dict(CH.TUNING)
            CH.TUNING.update(v)
            for mode in ("fwd", "bwd"):
                ms = B.time_case(case, B.functions(case)["normlab"], mode, 10, 40)
                say(f"{B.describe(case)} {mode} {ms:.4f} ms {B.nbytes(case, mode) / ms / 1e6:.0f} GB/s {v}")
            CH.TUNING.update(base)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
