"""Sweep the launch heuristics (the ``TUNING`` dicts of the kernel files) on a GPU. Not a test.

Times normlab's forward+backward for a few heavy cases under each variant and writes
``benchmarks/results/tune.json``; the defaults in the kernel files were picked from it.

    python benchmarks/tune_gpu.py
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu as B  # noqa: E402

LN = importlib.import_module("normlab.kernels.layer_norm")
CH = importlib.import_module("normlab.kernels._channel_norm")

# One factor at a time around the defaults (a full grid costs too much device time).
FWD_VARIANTS = [{}, dict(fwd_tile=1024), dict(fwd_tile=2048), dict(fwd_tile=8192), dict(fwd_warps=4), dict(elems_per_thread=8)]
BWD_VARIANTS = [{}, dict(bwd_warps=8), dict(bwd_warps=32), dict(bwd_programs_per_sm=1), dict(bwd_programs_per_sm=2), dict(bwd_tile=2048)]
FWD_CASES = [("ln", (32768, 512), "bfloat16"), ("ln", (32768, 1024), "bfloat16"), ("ln", (32768, 4096), "bfloat16")]
BWD_CASES = [("ln", (32768, 1024), "bfloat16"), ("ln", (32768, 4096), "bfloat16"), ("ln", (4096, 16384), "bfloat16"), ("ln", (4096, 16384), "float32")]
CH_VARIANTS = [{}, dict(tile=2048), dict(tile=8192), dict(num_warps=4), dict(reverse=False), dict(stats_programs_per_sm=4), dict(stats_programs_per_sm=16)]
CH_CASES = [("gn", "cl"), ("gn", "nchw"), ("bn", "nchw"), ("bn", "cl")]


def sweep(module, base, case, mode, variants):
    out = []
    for v in variants:
        module.TUNING.update(base)
        module.TUNING.update(v)
        try:
            ms = B.time_case(case, B.functions(case)["normlab"], mode, warmup=10, rep=40)
        except Exception as e:
            ms, v = float("nan"), dict(v, error=str(e)[:200])
        out.append(dict(op=case.op, shape=list(case.shape), dtype=case.dtype, layout=case.layout, mode=mode, variant=v, ms=ms, gbs=B.nbytes(case, mode) / ms / 1e6))
        print(f"{B.describe(case)} {mode:7s} {ms:8.4f} ms {out[-1]['gbs']:6.0f} GB/s {v}", flush=True)
    module.TUNING.update(base)
    return out


def main():
    res = []
    ln_base, ch_base = dict(LN.TUNING), dict(CH.TUNING)
    for op, shape, dtype in FWD_CASES:
        res += sweep(LN, ln_base, B.Case(op, shape, dtype, "rows"), "fwd", FWD_VARIANTS)
    for op, shape, dtype in BWD_CASES:
        res += sweep(LN, ln_base, B.Case(op, shape, dtype, "rows"), "bwd", BWD_VARIANTS)
    for op, layout in CH_CASES:
        res += sweep(CH, ch_base, B.Case(op, (32, 256, 56, 56), "bfloat16", layout), "fwd+bwd", CH_VARIANTS)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "benchmarks" / "results" / "tune.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    # best variant per (case, mode)
    best = {}
    for r in res:
        k = (r["op"], tuple(r["shape"]), r["dtype"], r["layout"], r["mode"])
        if r["ms"] == r["ms"] and (k not in best or r["ms"] < best[k]["ms"]):
            best[k] = r
    print("\nbest:")
    for k, r in best.items():
        print(k, f"{r['ms']:.4f} ms {r['gbs']:.0f} GB/s", r["variant"])


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("tune_gpu.py needs a CUDA GPU")
    main()
