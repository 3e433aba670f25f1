"""GPU benchmark of normlab's Triton kernels against torch, torch.compile and a plain copy.

Not a test: it needs a CUDA GPU and prints a table, writing every figure to
``benchmarks/results/gpu.json`` (rewritten after each case, so a run cut short keeps what
it measured); ``--quick`` writes ``gpu-quick.json`` and a subset (``--only``, ``--dtypes``,
``--no-compile``, ``--no-graph``) ``gpu-partial.json`` instead, unless ``--out`` says where.

    python benchmarks/bench_gpu.py            # all shapes, with torch.compile
    python benchmarks/bench_gpu.py --quick    # a subset
    python benchmarks/bench_gpu.py --no-compile --only ln,gn

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every repetition),
median of the repetitions, in milliseconds.

Byte counting (the least traffic each pass must move: every tensor read or written once):

* forward:  read x, w, b; write y
* backward: read x, dy, w, mean, rstd; write dx, dw, db
* fwd+bwd:  the sum of the two

``w``/``b``/``dw``/``db`` count only where the op has them (RMSNorm: no bias, no mean);
``mean``/``rstd`` are float32 per statistic group (row, (n, group), (n, c), channel);
running statistics are not counted. GB/s = bytes / time (10^9 bytes per second).
"% copy" compares that with a device-to-device copy (``dst.copy_(src)`` of 1 GiB, counted
as bytes read + written) measured in the same run: the practical bandwidth ceiling.
Ratios are baseline time / normlab time (above 1: normlab is faster).

Baselines: ``torch`` is eager ``torch.nn.functional`` (native CUDA kernels); ``compile`` is
``torch.compile`` of that same function, one compilation per shape (``dynamic=False``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from normlab import kernels  # noqa: E402

ROW_SHAPES = [(4096, 512), (4096, 1024), (4096, 4096), (4096, 16384), (32768, 512), (32768, 1024), (32768, 4096), (32768, 16384)]
ROW_SHAPES_QUICK = [(4096, 1024), (32768, 4096), (4096, 16384)]
CHANNEL_SHAPES = [(32, 256, 56, 56), (8, 512, 28, 28)]
MODES = ("fwd", "bwd", "fwd+bwd")
GN_GROUPS = 32
BYTE_COUNTING = (
    "forward: read x, w, b; write y. backward: read x, dy, w, mean, rstd; write dx, dw, db. "
    "fwd+bwd: the sum. Each tensor once; w/b/dw/db only where the op has them; mean/rstd float32 "
    "per statistic group; running statistics not counted. GB/s = bytes / median ms / 1e6."
)


@dataclass
class Case:
    op: str  # ln, rms, gn, in, bn
    shape: tuple
    dtype: str
    layout: str  # rows, nchw, cl

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)


def cases(quick: bool, only, dtypes=None):
    """Ordered so that a run cut short has the main cases: big channel shape, bf16 rows, ..."""
    row_shapes = ROW_SHAPES_QUICK if quick else ROW_SHAPES
    channel_shapes = CHANNEL_SHAPES[:1] if quick else CHANNEL_SHAPES
    groups = []
    for shape in channel_shapes:
        # convolutional nets train in bf16 autocast; float32 channel cases would cost device time
        groups.append([Case(op, shape, "bfloat16", layout) for op in ("gn", "bn", "in") for layout in ("nchw", "cl")])
        if shape == channel_shapes[0]:
            groups.append([Case(op, rs, "bfloat16", "rows") for op in ("ln", "rms") for rs in row_shapes])
    if not quick:
        groups.append([Case(op, rs, "float32", "rows") for op in ("ln", "rms") for rs in row_shapes])
    out = [c for g in groups for c in g]
    return [c for c in out if (only is None or c.op in only) and (dtypes is None or c.dtype in dtypes)]


# ------------------------------------------------------------------------------ inputs
def make_inputs(case: Case):
    """``(args, grads_of, dy)``: the call's tensors, which of them get gradients, and dy."""
    dt, dev = case.torch_dtype, "cuda"
    x = torch.randn(case.shape, device=dev, dtype=dt)
    if case.layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    C = case.shape[-1] if case.layout == "rows" else case.shape[1]
    # BN keeps float32 parameters and statistics (what autocast training has; cuDNN wants it).
    pdt = torch.float32 if case.op == "bn" else dt
    w = torch.randn(C, device=dev, dtype=pdt, requires_grad=True)
    b = torch.randn(C, device=dev, dtype=pdt, requires_grad=True) if case.op != "rms" else None
    dy = torch.randn_like(x)
    rm = torch.zeros(C, device=dev) if case.op == "bn" else None
    rv = torch.ones(C, device=dev) if case.op == "bn" else None
    return dict(x=x, w=w, b=b, rm=rm, rv=rv), [t for t in (x, w, b) if t is not None], dy


def functions(case: Case):
    """``{impl: f(x, w, b, rm, rv)}`` for normlab, torch and (lazily compiled) torch.compile."""
    N = case.shape[-1]
    if case.op == "ln":
        ours = lambda x, w, b, rm, rv: kernels.unchecked.layer_norm(x, (N,), w, b)  # noqa: E731
        ref = lambda x, w, b, rm, rv: F.layer_norm(x, (N,), w, b)  # noqa: E731
    elif case.op == "rms":
        ours = lambda x, w, b, rm, rv: kernels.unchecked.rms_norm(x, (N,), w, 1e-6)  # noqa: E731
        ref = lambda x, w, b, rm, rv: F.rms_norm(x, (N,), w, 1e-6)  # noqa: E731
    elif case.op == "gn":
        ours = lambda x, w, b, rm, rv: kernels.unchecked.group_norm(x, GN_GROUPS, w, b)  # noqa: E731
        ref = lambda x, w, b, rm, rv: F.group_norm(x, GN_GROUPS, w, b)  # noqa: E731
    elif case.op == "in":
        ours = lambda x, w, b, rm, rv: kernels.unchecked.instance_norm(x, w, b)  # noqa: E731
        ref = lambda x, w, b, rm, rv: F.instance_norm(x, weight=w, bias=b)  # noqa: E731
    elif case.op == "bn":
        ours = lambda x, w, b, rm, rv: kernels.unchecked.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)  # noqa: E731
        ref = lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)  # noqa: E731
    else:
        raise ValueError(case.op)
    return {"normlab": ours, "torch": ref, "compile": ref}


def nbytes(case: Case, mode: str) -> int:
    """The byte count of the module docstring."""
    es = case.torch_dtype.itemsize
    pes = 4 if case.op == "bn" else es
    total = math.prod(case.shape)
    if case.layout == "rows":
        C, nstat = case.shape[-1], total // case.shape[-1]
    else:
        C = case.shape[1]
        nstat = {"gn": case.shape[0] * GN_GROUPS, "in": case.shape[0] * C, "bn": C}[case.op]
    n_params = 1 if case.op == "rms" else 2
    n_stats = 1 if case.op == "rms" else 2
    fwd = 2 * total * es + n_params * C * pes
    bwd = 3 * total * es + C * pes + n_stats * nstat * 4 + n_params * C * pes
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# ------------------------------------------------------------------------------ timing
def timed(fn, warmup=10, rep=50) -> float:
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def time_case(case: Case, f, mode: str, warmup=10, rep=50) -> float:
    args, leaves, dy = make_inputs(case)
    call = lambda: f(**args)  # noqa: E731
    if mode == "fwd":
        return timed(call, warmup, rep)
    if mode == "bwd":
        y = call()
        return timed(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), warmup, rep)
    return timed(lambda: torch.autograd.grad(call(), leaves, dy), warmup, rep)


def time_graphed(case: Case, f, warmup=10, rep=50) -> float:
    """fwd+bwd captured once in a CUDA graph and replayed: the GPU time without host overhead."""
    args, leaves, dy = make_inputs(case)
    step = lambda: torch.autograd.grad(f(**args), leaves, dy)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return timed(graph.replay, warmup, rep)


def copy_bandwidth() -> dict:
    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 10, 100)
    del src, dst
    return {"bytes": 2 * n * 2, "ms": ms, "gbs": 2 * n * 2 / ms / 1e6}


def environment() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0),
        "sms": p.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git": os.environ.get("NORMLAB_GIT", ""),
    }


def describe(case: Case) -> str:
    shape = "x".join(str(s) for s in case.shape)
    return f"{case.op:4s} {shape:15s} {case.dtype:8s} {case.layout:4s}"


def run(args):
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "copy": copy_bandwidth(), "byte_counting": BYTE_COUNTING, "results": []}
    copy_gbs = report["copy"]["gbs"]
    print(f"# {report['environment']}", flush=True)
    print(f"# copy: {copy_gbs:.0f} GB/s (1 GiB, read + write)", flush=True)
    impls = ["normlab", "torch"] + ([] if args.no_compile else ["compile"])
    # One compiled entry per shape: the lambdas of one op share a code object, and dynamo
    # falls back to eager after cache_size_limit (8) recompilations of it.
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    for case in cases(args.quick, args.only, args.dtypes):
        fs = functions(case)
        if "compile" in impls:
            fs["compile"] = torch.compile(fs["compile"], dynamic=False)
        for mode in MODES:
            row = dict(asdict(case), shape=list(case.shape), mode=mode, bytes=nbytes(case, mode))
            for impl in impls:
                t0 = time.time()
                try:
                    ms = time_case(case, fs[impl], mode)
                except Exception as e:  # a baseline that fails is reported, not fatal
                    row[f"{impl}_error"] = f"{type(e).__name__}: {e}"[:300]
                    ms = float("nan")
                row[f"{impl}_ms"] = ms
                row[f"{impl}_gbs"] = row["bytes"] / ms / 1e6
                row[f"{impl}_s_wall"] = round(time.time() - t0, 1)
            row["pct_copy"] = 100 * row["normlab_gbs"] / copy_gbs
            for impl in impls[1:]:
                row[f"vs_{impl}"] = row[f"{impl}_ms"] / row["normlab_ms"]
            if mode == "fwd+bwd" and not args.no_graph:
                for impl in impls:
                    try:
                        ms = time_graphed(case, fs[impl])
                    except Exception as e:
                        row[f"{impl}_graph_error"] = f"{type(e).__name__}: {e}"[:300]
                        ms = float("nan")
                    row[f"{impl}_graph_ms"] = ms
                row["graph_pct_copy"] = 100 * row["bytes"] / row["normlab_graph_ms"] / 1e6 / copy_gbs
                for impl in impls[1:]:
                    row[f"graph_vs_{impl}"] = row[f"{impl}_graph_ms"] / row["normlab_graph_ms"]
            report["results"].append(row)
            extra = "".join(f" {impl} {row[f'{impl}_ms']:.3f} ms (x{row[f'vs_{impl}']:.2f})" for impl in impls[1:])
            if "graph_pct_copy" in row:
                extra += f" || graph: normlab {row['normlab_graph_ms']:.3f} ms {row['graph_pct_copy']:.1f}% copy" + "".join(
                    f" {impl} x{row[f'graph_vs_{impl}']:.2f}" for impl in impls[1:])
            print(f"{describe(case)} {mode:7s} normlab {row['normlab_ms']:.3f} ms {row['normlab_gbs']:6.0f} GB/s {row['pct_copy']:5.1f}% copy |{extra}", flush=True)
            out_path.write_text(json.dumps(report, indent=1))
        torch.cuda.empty_cache()
    report["targets"] = targets(report["results"])
    out_path.write_text(json.dumps(report, indent=1))
    print_table(report)
    return report


def targets(rows):
    """The issue's targets, checked on the fwd+bwd rows, eager (host included) and CUDA graph."""
    res = []
    for r in rows:
        if r["mode"] != "fwd+bwd":
            continue
        name = f"{r['op']} {'x'.join(map(str, r['shape']))} {r['dtype']} {r['layout']}"
        for timing, pct, vs in (("eager", "pct_copy", "vs_torch"), ("graph", "graph_pct_copy", "graph_vs_torch")):
            if pct not in r:
                continue
            checks = []
            if r["op"] in ("ln", "rms") and r["shape"][-1] >= 1024:
                checks = [(">= 85% copy", r[pct], 85), (">= 1.2x torch", r.get(vs), 1.2)]
            if r["op"] in ("gn", "bn", "in"):
                checks = [(">= 70% copy", r[pct], 70)]
                if r["op"] == "gn" and r["layout"] == "cl":
                    checks.append((">= 1.5x torch", r.get(vs), 1.5))
            for target, value, bar in checks:
                ok = value is not None and value == value and value >= bar
                res.append({"case": name, "timing": timing, "target": target, "value": value, "met": ok})
    return res


def print_table(report):
    rows = report["results"]
    print("\n| op | shape | dtype | layout | mode | normlab ms | GB/s | % copy | torch ms | vs torch | compile ms | vs compile |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cm = r.get("compile_ms")
        print(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} | {r['mode']} | "
            f"{r['normlab_ms']:.3f} | {r['normlab_gbs']:.0f} | {r['pct_copy']:.0f}% | {r['torch_ms']:.3f} | {r['vs_torch']:.2f} | "
            + (f"{cm:.3f} | {r['vs_compile']:.2f} |" if cm is not None else "- | - |")
        )
    if any("normlab_graph_ms" in r for r in rows):
        print("\nCUDA graph (fwd+bwd, GPU time only)\n| op | shape | dtype | layout | normlab ms | % copy | torch ms | vs torch | compile ms | vs compile |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "normlab_graph_ms" in r:
                cm = r.get("compile_graph_ms")
                print(
                    f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['layout']} | {r['normlab_graph_ms']:.3f} | "
                    f"{r['graph_pct_copy']:.0f}% | {r['torch_graph_ms']:.3f} | {r['graph_vs_torch']:.2f} | "
                    + (f"{cm:.3f} | {r['graph_vs_compile']:.2f} |" if cm is not None else "- | - |")
                )
    t = report.get("targets", [])
    for timing in ("eager", "graph"):
        tt = [x for x in t if x["timing"] == timing]
        if not tt:
            continue
        met = sum(1 for x in tt if x["met"])
        print(f"\ntargets met ({timing}): {met} / {len(tt)}")
        for x in tt:
            if not x["met"]:
                v = x["value"]
                print(f"  missed: {x['case']}: {x['target']} (got {v:.2f})" if v is not None else f"  missed: {x['case']}: {x['target']}")


def warm(args):
    """Compile (or load from Triton's disk cache) every kernel the selected cases use: one
    fwd+bwd of each, untimed. Run beside the GPU tests, in shards, so that the timed run
    compiles nothing."""
    todo = cases(args.quick, args.only, args.dtypes)
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        todo = todo[i::n]
    t0 = time.time()
    for case in todo:
        a, leaves, dy = make_inputs(case)
        torch.autograd.grad(functions(case)["normlab"](**a), leaves, dy)
        torch.cuda.synchronize()
        del a, leaves, dy
    torch.cuda.empty_cache()
    print(f"warmed {len(todo)} cases in {time.time() - t0:.0f} s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset: fewer shapes, bfloat16 only")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph (GPU time only) fwd+bwd timings")
    ap.add_argument("--only", type=lambda s: set(s.split(",")), default=None, help="ops, e.g. ln,rms,gn,bn,in")
    ap.add_argument("--dtypes", type=lambda s: set(s.split(",")), default=None, help="e.g. bfloat16,float32")
    ap.add_argument("--out", default=None, help="where to write the results (default: benchmarks/results/gpu.json "
                                                "for the full run; gpu-quick.json with --quick, gpu-partial.json "
                                                "with --only, --dtypes, --no-compile or --no-graph)")
    ap.add_argument("--warmup-only", action="store_true", help="compile the kernels of the selected cases; time nothing")
    ap.add_argument("--shard", default=None, help="with --warmup-only: i/n, every n-th case from the i-th")
    args = ap.parse_args(argv)
    if args.out is None:  # a smoke or partial run must not overwrite the figures RESULTS.md cites
        partial = args.only or args.dtypes or args.no_compile or args.no_graph
        tag = "-quick" if args.quick else "-partial" if partial else ""
        args.out = str(ROOT / "benchmarks" / "results" / f"gpu{tag}.json")
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    warm(args) if args.warmup_only else run(args)


if __name__ == "__main__":
    main()
