"""Contracts of the scripts in ``benchmarks/``: what they count, how they aggregate and what they
write, checked on the CPU in seconds. Nothing here times anything or asserts a speed: timings are
replaced by fake clocks or fake measurements wherever a number is checked, and the one real
benchmark run (``bench_cpu.py --quick --rounds 1``) is a smoke run whose figures are only checked
for consistency with each other. GPU-only paths run with ``torch`` inside ``bench_gpu`` replaced by
a CPU stand-in (tensors made on the CPU, no compile) and the CUDA timings faked. Tests found by
mutating a script end with the wrong version they fail on.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread  # noqa: F401  (autouse: the smoke run on one thread)
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the scripts import each other and _timing this way
if not torch.cuda.is_available():  # bench_gpu imports normlab.kernels: as tests/kernels/conftest.py would have them
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bench_cpu
import bench_gpu as B
import bench_lab
import bench_monitor
import results_markdown

LAYERS = ["LayerNorm", "RMSNorm", "BatchNorm2d", "GroupNorm(8)", "InstanceNorm2d", "SwitchableNorm2d",
          "BatchRenorm2d", "MaskedBatchNorm1d"]
TWINLESS = {"SwitchableNorm2d", "BatchRenorm2d", "MaskedBatchNorm1d"}  # timed against torch BatchNorm
CPU_SHAPES = {  # per layer: (--quick, full); the full ones are those of RESULTS.md's CPU table
    "LayerNorm": ([512, 1024], [4096, 1024]), "RMSNorm": ([512, 1024], [4096, 1024]),
    **{name: ([8, 64, 16, 16], [32, 64, 32, 32]) for name in LAYERS[2:7]},
    "MaskedBatchNorm1d": ([8, 64, 256], [32, 64, 1024]),
}
CPU_ROW_KEYS = {"layer", "shape", "pass", "baseline", "normlab_ms", "torch_ms", "numpy_ms", "normlab_over_torch",
                "normlab_over_torch_runs", "numpy_over_torch", "numpy_over_torch_runs"}


def cpu_table_line(r: dict) -> str:
    """A row of RESULTS.md's CPU table, from a row of cpu.json (the fields that table relies on)."""
    label = r["layer"] + ("" if r["baseline"] == "twin" else " (vs torch BatchNorm)")

    def ratio(who):
        runs = r[f"{who}_over_torch_runs"]
        return f"{r[f'{who}_over_torch']:.2f} ({min(runs):.2f}–{max(runs):.2f})"
    return (f"| {label} | {'×'.join(map(str, r['shape']))} | {r['pass']} | {r['normlab_ms']:.2f} | "
            f"{r['torch_ms']:.2f} | {r['numpy_ms']:.2f} | {ratio('normlab')} | {ratio('numpy')} |")


# ------------------------------------------------------------------------------ bench_cpu
def test_bench_cpu_quick_smoke_writes_every_case_with_ratios_of_its_own_times(tmp_path, capsys):
    """``bench_cpu.py --quick --rounds 1 --out F`` (a real run, one round) writes F with the
    environment, the options and one row per layer and pass, in order, at the quick shapes, each with
    the fields RESULTS.md's table is built from; with one repeat each ratio is the ratio of the
    stored times (normlab / torch, numpy / torch) and its run list holds just that ratio. The printed
    table has a line per row and names the file.
    Wrong version: bench_cpu.py ``row[f"{who}_over_torch_runs"] = ratios`` -> ``_over_torch_range``;
    ``base_label = "twin" if twin is not None else "torch BatchNorm"`` -> ``"twin"``."""
    out = tmp_path / "cpu.json"
    payload = bench_cpu.main(["--quick", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    assert set(payload) == {"environment", "rounds", "repeat", "quick", "results"}
    assert (payload["rounds"], payload["repeat"], payload["quick"]) == (1, 1, True)
    assert {"date", "python", "torch", "numpy", "torch_threads", "cpus", "machine", "git"} <= set(payload["environment"])
    rows = payload["results"]
    assert [(r["layer"], r["pass"]) for r in rows] == [(n, p) for n in LAYERS for p in ("forward", "forward+backward")]
    for r in rows:
        assert set(r) == CPU_ROW_KEYS
        assert r["shape"] == CPU_SHAPES[r["layer"]][0]
        assert r["baseline"] == ("torch BatchNorm" if r["layer"] in TWINLESS else "twin")
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("normlab_ms", "torch_ms", "numpy_ms"))
        for who in ("normlab", "numpy"):
            assert r[f"{who}_over_torch"] == pytest.approx(r[f"{who}_ms"] / r["torch_ms"], rel=1e-12)
            assert r[f"{who}_over_torch_runs"] == [r[f"{who}_over_torch"]]
        cpu_table_line(r)
    printed = capsys.readouterr().out
    assert printed.count("(vs torch BatchNorm)") == 6 and f"wrote {out}" in printed
    assert len([line for line in printed.splitlines() if line.split()[:1] and line.split()[0] in LAYERS]) == 16


def _fake_interleaved(calls, times):
    """Stands in for ``_timing.interleaved``: the k-th call of each case returns ``times[k % K]``."""
    def fake(fns, rounds=15, **kw):
        assert set(fns) == {f"{p}_{w}" for p in ("fwd", "fb") for w in ("normlab", "torch", "numpy")}
        calls.append(rounds)
        return dict(times[(len(calls) - 1) % len(times)])
    return fake


# seconds per call of the three measurements of every case (--repeat 3): medians, ratio medians,
# ratios of medians, means, minima and maxima all differ
REPEATS = [
    {"fwd_normlab": 0.001, "fwd_torch": 0.002, "fwd_numpy": 0.001, "fb_normlab": 0.03, "fb_torch": 0.01, "fb_numpy": 0.05},
    {"fwd_normlab": 0.004, "fwd_torch": 0.001, "fwd_numpy": 0.003, "fb_normlab": 0.01, "fb_torch": 0.05, "fb_numpy": 0.10},
    {"fwd_normlab": 0.004, "fwd_torch": 0.004, "fwd_numpy": 0.008, "fb_normlab": 0.06, "fb_torch": 0.04, "fb_numpy": 0.02},
]


def test_bench_cpu_repeat_reports_median_times_and_median_ratios_with_every_ratio_kept(monkeypatch, tmp_path, capsys):
    """With ``--repeat 3`` each case is measured 3 times (each with --rounds): the times are the medians
    of the 3 (in ms), each ratio (normlab / torch, numpy / torch) the median of the 3 per-measurement
    ratios (not the ratio of the medians, nor a mean), the 3 ratios are kept in order in ``*_runs``,
    and the printed range is their min-max. Forward uses the ``fwd_*`` figures, forward+backward the
    ``fb_*`` ones.
    Wrong version: bench_cpu.py ``statistics.median(r[...] for r in runs)`` -> ``statistics.mean``;
    ``row[f"{who}_over_torch"] = statistics.median(ratios)`` -> ``statistics.mean(ratios)`` and ->
    ``row[f"{who}_ms"] / row["torch_ms"]``; ratio ``r[f"{pas}_{who}"] / r[f"{pas}_torch"]`` -> inverted;
    ``f" ({min(r):.2f}-{max(r):.2f})"`` -> ``({min(r):.2f}-{min(r):.2f})``; ``range(args.repeat)`` -> ``range(1)``;
    ``interleaved(fns, rounds=args.rounds)`` -> ``interleaved(fns)``; ``"forward" if pas == "fwd"`` -> ``pas == "fb"``."""
    calls = []
    monkeypatch.setattr(bench_cpu, "interleaved", _fake_interleaved(calls, REPEATS))
    payload = bench_cpu.main(["--quick", "--rounds", "7", "--repeat", "3", "--out", str(tmp_path / "c.json")])
    assert calls == [7] * (3 * len(LAYERS)) and payload["repeat"] == 3
    want = {
        "forward": {"normlab_ms": 4.0, "torch_ms": 2.0, "numpy_ms": 3.0, "normlab_over_torch": 1.0,
                    "numpy_over_torch": 2.0, "normlab_over_torch_runs": [0.5, 4.0, 1.0],
                    "numpy_over_torch_runs": [0.5, 3.0, 2.0]},
        "forward+backward": {"normlab_ms": 30.0, "torch_ms": 40.0, "numpy_ms": 50.0, "normlab_over_torch": 1.5,
                             "numpy_over_torch": 2.0, "normlab_over_torch_runs": [3.0, 0.2, 1.5],
                             "numpy_over_torch_runs": [5.0, 2.0, 0.5]},
    }
    for r in payload["results"]:
        for k, v in want[r["pass"]].items():
            assert r[k] == pytest.approx(v, rel=1e-12), (r["layer"], r["pass"], k)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("LayerNorm")]
    assert "1.00 (0.50-4.00)" in lines[0] and "2.00 (0.50-3.00)" in lines[0]
    assert "1.50 (0.20-3.00)" in lines[1] and "2.00 (0.50-5.00)" in lines[1]


def test_bench_cpu_candidates_run_what_their_names_say(monkeypatch, tmp_path):
    """Each timed function runs what its key says: ``*_normlab`` the normlab.nn layer, ``*_torch`` its
    torch twin or, for the layers torch lacks, torch BatchNorm on the same shape (BatchNorm1d for the
    masked 3-d input), ``*_numpy`` no module (the NumPy reference).
    Wrong version: bench_cpu.py ``"fwd_torch": fwd(baseline, x)`` -> ``fwd(ours, x, *extra)``; ``BatchNorm1d(x.shape[1])
    if x.dim() == 3`` -> ``BatchNorm2d``; ``"fb_normlab": fwd_bwd(ours, ...`` -> ``fwd_bwd(baseline, x, dy)``."""
    seen = []

    def fake(fns, rounds=15, **kw):
        ran, case = [], {}
        hook = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: ran.append(type(m)))
        try:
            for k, f in fns.items():
                ran.clear()
                f()
                case[k] = [(t.__module__.split(".")[0], t.__name__) for t in ran]
        finally:
            hook.remove()
        seen.append(case)
        return {k: 1.0 for k in fns}
    monkeypatch.setattr(bench_cpu, "interleaved", fake)
    bench_cpu.main(["--quick", "--out", str(tmp_path / "c.json")])
    for name, case in zip(LAYERS, seen):
        cls = name.split("(")[0]
        twin = {"SwitchableNorm2d": "BatchNorm2d", "BatchRenorm2d": "BatchNorm2d", "MaskedBatchNorm1d": "BatchNorm1d"}.get(name, cls)
        for pas in ("fwd", "fb"):
            assert case[f"{pas}_normlab"] == [("normlab", cls)], (name, pas)
            assert case[f"{pas}_torch"] == [("torch", twin)], (name, pas)
            assert case[f"{pas}_numpy"] == [], (name, pas)


@pytest.mark.parametrize("quick", [True, False])
def test_bench_cpu_default_output_and_shapes_follow_quick(monkeypatch, tmp_path, quick):
    """Without --out, ``--quick`` writes ``cpu-quick.json`` beside ``cpu.json`` and leaves cpu.json
    (the figures RESULTS.md cites) alone; a full run writes cpu.json. --quick measures the small
    shapes, a full run the big ones (RESULTS.md's), every layer against the same baseline either way.
    Wrong version: bench_cpu.py ``f"{RESULTS.stem}-quick.json") if args.quick else RESULTS`` -> branches
    swapped; ``big = (32, 64, 32, 32) if not quick`` -> ``if quick``; ``rows = (4096, 1024) if not quick
    else (512, 1024)`` -> ``(512, 512)``; ``seq = (32, 64, 1024) if not quick`` -> ``(8, 64, 1024)``."""
    monkeypatch.setattr(bench_cpu, "RESULTS", tmp_path / "results" / "cpu.json")
    monkeypatch.setattr(bench_cpu, "interleaved", _fake_interleaved([], REPEATS[:1]))
    bench_cpu.main(["--quick"] if quick else [])
    written = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert written == (["cpu-quick.json"] if quick else ["cpu.json"])
    rows = json.loads((tmp_path / "results" / written[0]).read_text())["results"]
    assert [r["shape"] for r in rows] == [CPU_SHAPES[r["layer"]][0 if quick else 1] for r in rows]
    assert [r["layer"] for r in rows[::2]] == LAYERS
    assert [r["baseline"] for r in rows[::2]] == ["torch BatchNorm" if n in TWINLESS else "twin" for n in LAYERS]


def committed(name: str) -> str:
    """``benchmarks/<name>`` as committed: a benchmark run rewrites its results file in the working
    tree, and that must not turn the suite red until RESULTS.md is re-written (outside a git
    checkout, the file on disk)."""
    try:
        return subprocess.run(["git", "show", f"HEAD:benchmarks/{name}"], cwd=BENCH, capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return (BENCH / name).read_text()


def test_committed_cpu_json_is_the_table_results_md_shows():
    """RESULTS.md's CPU table is ``results/cpu.json`` (a full run: not --quick), row for row: label,
    shape, pass, the three times and both ratios with their min-max range; each stored ratio is the
    median of its stored runs. Fails when one is re-measured without the other."""
    doc = json.loads(committed("results/cpu.json"))
    assert doc["quick"] is False
    md = set(committed("RESULTS.md").splitlines())
    for r in doc["results"]:
        assert cpu_table_line(r) in md, cpu_table_line(r)
        for who in ("normlab", "numpy"):
            runs = sorted(r[f"{who}_over_torch_runs"])
            assert len(runs) == doc["repeat"] and r[f"{who}_over_torch"] == pytest.approx(runs[len(runs) // 2])


# ------------------------------------------------------------------------------ bench_gpu on the CPU
class CpuTorch:
    """``torch`` as bench_gpu sees it, on a machine without CUDA: tensors asked for on "cuda" are made
    on the CPU, ``torch.compile`` wraps without compiling (and says so), ``torch.cuda`` does nothing."""

    def __init__(self, cuda_available: bool = False):
        self.cuda = SimpleNamespace(is_available=lambda: cuda_available, empty_cache=lambda: None,
                                    synchronize=lambda: None)
        self._dynamo = SimpleNamespace(config=SimpleNamespace())

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def randn(*a, device=None, **k):
        return torch.randn(*a, **k)

    @staticmethod
    def zeros(*a, device=None, **k):
        return torch.zeros(*a, **k)

    @staticmethod
    def ones(*a, device=None, **k):
        return torch.ones(*a, **k)

    @staticmethod
    def compile(f, dynamic=None):
        assert dynamic is False  # one compilation per shape
        return Impl("compiled " + getattr(f, "impl", "?"), f)


class Impl:
    """A benchmarked function that says which implementation it is."""

    def __init__(self, impl, f):
        self.impl, self.f = impl, f

    def __call__(self, *a, **k):
        return self.f(*a, **k)


@pytest.fixture
def gpu_on_cpu(monkeypatch):
    fake = CpuTorch(cuda_available=True)
    monkeypatch.setattr(B, "torch", fake)
    return fake


CH0, CH1 = (32, 256, 56, 56), (8, 512, 28, 28)
ROWS_FULL = [(4096, 512), (4096, 1024), (4096, 4096), (4096, 16384), (32768, 512), (32768, 1024), (32768, 4096),
             (32768, 16384)]
ROWS_QUICK = [(4096, 1024), (32768, 4096), (4096, 16384)]


def _channel(shape):
    return [(op, shape, "bfloat16", layout) for op in ("gn", "bn", "in") for layout in ("nchw", "cl")]


def _rows(shapes, dtype):
    return [(op, s, dtype, "rows") for op in ("ln", "rms") for s in shapes]


FULL_CASES = _channel(CH0) + _rows(ROWS_FULL, "bfloat16") + _channel(CH1) + _rows(ROWS_FULL, "float32")
QUICK_CASES = _channel(CH0) + _rows(ROWS_QUICK, "bfloat16")


def _as_tuples(cases):
    return [(c.op, c.shape, c.dtype, c.layout) for c in cases]


def test_bench_gpu_case_lists_for_quick_only_and_dtypes():
    """The full run: the big channel shape (GN, BN, IN, NCHW and channels-last, bf16), then bf16 rows
    (LN, RMS, 8 shapes), the small channel shape, then float32 rows: 44 cases, main ones first.
    ``--quick``: the big channel shape and 3 bf16 row shapes only (12). ``--only`` and ``--dtypes``
    keep that order and drop the rest.
    Wrong version: bench_gpu.py ``CHANNEL_SHAPES[:1] if quick`` -> ``CHANNEL_SHAPES``; ``ROW_SHAPES_QUICK``
    ``(4096, 1024)`` -> ``(4096, 512)``; ``if not quick:`` (float32 rows) removed; ``c.op in only`` -> ``not in``;
    ``c.dtype in dtypes`` -> ``True``; ``if shape == channel_shapes[0]`` -> ``[-1]``."""
    assert _as_tuples(B.cases(False, None)) == FULL_CASES
    assert _as_tuples(B.cases(True, None)) == QUICK_CASES
    assert _as_tuples(B.cases(False, {"ln", "gn"})) == [c for c in FULL_CASES if c[0] in ("ln", "gn")]
    assert _as_tuples(B.cases(True, {"rms"})) == _rows(ROWS_QUICK, "bfloat16")[3:]
    assert _as_tuples(B.cases(False, None, {"float32"})) == _rows(ROWS_FULL, "float32")
    assert _as_tuples(B.cases(False, {"bn"}, {"bfloat16"})) == [c for c in FULL_CASES if c[0] == "bn"]
    assert B.cases(True, None, {"float32"}) == []


def doc_bytes(op, shape, dtype, layout, mode) -> int:
    """The module docstring's rule, tensor by tensor: forward reads x, w, b and writes y; backward
    reads x, dy, w, mean, rstd and writes dx, dw, db; w/b/dw/db only where the op has them (RMSNorm:
    no bias, no mean); mean/rstd float32 per statistic group (row, (n, group), (n, c), channel);
    parameters in the input's dtype except BN's (float32, as make_inputs builds them)."""
    es = {"bfloat16": 2, "float32": 4}[dtype]
    numel = math.prod(shape)
    C = shape[-1] if layout == "rows" else shape[1]
    groups = {"ln": numel // C, "rms": numel // C, "gn": shape[0] * B.GN_GROUPS, "in": shape[0] * C, "bn": C}[op]
    p_es = 4 if op == "bn" else es
    x = y = dy = dx = numel * es
    w = dw = C * p_es
    b = db = 0 if op == "rms" else C * p_es
    rstd = groups * 4
    mean = 0 if op == "rms" else groups * 4
    fwd = x + w + b + y
    bwd = x + dy + w + mean + rstd + dx + dw + db
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# worked by hand from the docstring (bytes): x/y/dy/dx, w/b/dw/db, mean/rstd
HAND_BYTES = [
    # ln 4096x1024 bf16: x 4096*1024*2 = 8388608; w, b 1024*2 = 2048; mean, rstd 4096*4 = 16384
    (("ln", (4096, 1024), "bfloat16", "rows"), 2 * 8388608 + 2 * 2048, 3 * 8388608 + 2048 + 2 * 16384 + 2 * 2048),
    # rms 32768x4096 bf16: x 268435456; w 8192 (no b); rstd 32768*4 (no mean)
    (("rms", (32768, 4096), "bfloat16", "rows"), 2 * 268435456 + 8192, 3 * 268435456 + 8192 + 131072 + 8192),
    # gn 32x256x56x56 bf16: x 25690112*2; w, b 512; mean, rstd (32 images * 32 groups)*4 = 4096
    (("gn", CH0, "bfloat16", "nchw"), 102761472, 3 * 51380224 + 512 + 2 * 4096 + 2 * 512),
    # bn 32x256x56x56 bf16 channels-last: float32 w, b 256*4 = 1024; mean, rstd 256*4 = 1024
    (("bn", CH0, "bfloat16", "cl"), 2 * 51380224 + 2 * 1024, 3 * 51380224 + 1024 + 2 * 1024 + 2 * 1024),
    # in 8x512x28x28 bf16: x 3211264*2 = 6422528; w, b 1024; mean, rstd (8*512)*4 = 16384
    (("in", CH1, "bfloat16", "nchw"), 2 * 6422528 + 2 * 1024, 3 * 6422528 + 1024 + 2 * 16384 + 2 * 1024),
    # ln 32768x16384 float32: x 536870912*4; w, b 16384*4 = 65536; mean, rstd 32768*4 = 131072
    (("ln", (32768, 16384), "float32", "rows"), 4294967296 + 131072, 3 * 2147483648 + 65536 + 262144 + 131072),
]


@pytest.mark.parametrize("case,fwd,bwd", HAND_BYTES, ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else None)
def test_nbytes_matches_the_docstrings_rule_worked_by_hand(case, fwd, bwd):
    """nbytes per mode on cases worked out by hand from the docstring (gn's forward is the 102761472
    bytes of results/gpu.json's first row); fwd+bwd is their sum.
    Wrong version: bench_gpu.py nbytes ``fwd = 2 * total * es`` -> ``3 *``; ``bwd = 3 * total * es`` ->
    ``2 *``; ``+ C * pes`` (the w read) removed; ``n_stats = 1 if rms`` -> ``2``; ``n_params = 1 if rms`` -> ``2``;
    ``pes = 4 if bn`` -> ``pes = es``; gn ``shape[0] * GN_GROUPS`` -> ``GN_GROUPS``; in ``shape[0] * C`` -> ``C``;
    rows ``total // shape[-1]`` -> ``total // shape[0]``; ``n_stats * nstat * 4`` -> ``* es``;
    ``"fwd+bwd": fwd + bwd`` -> ``bwd``."""
    c = B.Case(*case)
    assert (B.nbytes(c, "fwd"), B.nbytes(c, "bwd"), B.nbytes(c, "fwd+bwd")) == (fwd, bwd, fwd + bwd)
    assert (doc_bytes(*case, "fwd"), doc_bytes(*case, "bwd")) == (fwd, bwd)


def test_nbytes_of_every_benchmarked_case_follows_the_docstring():
    """All 44 cases x 3 modes of the full run against the docstring's rule, tensor by tensor."""
    for case in B.cases(False, None):
        for mode in B.MODES:
            assert B.nbytes(case, mode) == doc_bytes(case.op, case.shape, case.dtype, case.layout, mode), (case, mode)


@pytest.mark.parametrize("op,shape,layout", [("ln", (6, 16), "rows"), ("rms", (6, 16), "rows"), ("gn", (2, 64, 3, 3), "nchw"),
                                             ("gn", (2, 64, 3, 3), "cl"), ("in", (2, 8, 3, 3), "nchw"), ("bn", (2, 8, 3, 3), "cl")])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_nbytes_counts_the_tensors_make_inputs_builds(gpu_on_cpu, op, shape, dtype, layout):
    """The count is that of the tensors the benchmark really passes (make_inputs, on the CPU here):
    x, w, b read and y (x's size) written forward; backward reads x, dy, w and the float32 statistics
    and writes a gradient per leaf. Channels-last cases get a channels-last x, RMSNorm no bias, BN
    float32 parameters and running statistics (not counted)."""
    case = B.Case(op, shape, dtype, layout)
    args, leaves, dy = B.make_inputs(case)
    x, w, b = args["x"], args["w"], args["b"]
    assert x.dtype == case.torch_dtype and x.requires_grad and dy.shape == x.shape
    assert x.is_contiguous(memory_format=torch.channels_last) == (layout == "cl")
    assert (b is None) == (op == "rms") and (args["rm"] is None) == (op != "bn")
    assert w.dtype == (torch.float32 if op == "bn" else x.dtype)
    assert leaves == [t for t in (x, w, b) if t is not None]
    params = sum(t.nbytes for t in leaves[1:])
    C = shape[-1] if layout == "rows" else shape[1]
    groups = {"ln": x.numel() // C, "rms": x.numel() // C, "gn": shape[0] * B.GN_GROUPS, "in": shape[0] * C, "bn": C}[op]
    stats = (1 if op == "rms" else 2) * groups * 4
    assert B.nbytes(case, "fwd") == 2 * x.nbytes + params
    assert B.nbytes(case, "bwd") == 3 * x.nbytes + w.nbytes + stats + params


def _kernels_by_torch():
    """The kernels' signatures, computed by torch: what the normlab lambdas must pass through."""
    return SimpleNamespace(unchecked=SimpleNamespace(
        layer_norm=lambda x, ns, w=None, b=None, eps=1e-5: F.layer_norm(x, ns, w, b, eps),
        rms_norm=lambda x, ns, w=None, eps=None: F.rms_norm(x, ns, w, eps),
        group_norm=lambda x, g, w=None, b=None, eps=1e-5: F.group_norm(x, g, w, b, eps),
        instance_norm=lambda x, w=None, b=None, eps=1e-5: F.instance_norm(x, weight=w, bias=b, eps=eps),
        batch_norm=lambda x, rm, rv, w=None, b=None, tr=False, mom=0.1, eps=1e-5: F.batch_norm(x, rm, rv, w, b, tr, mom, eps),
    ))


@pytest.mark.parametrize("op,shape,layout", [("ln", (4, 8), "rows"), ("rms", (4, 8), "rows"), ("gn", (2, 64, 3, 3), "cl"),
                                             ("in", (2, 4, 3, 3), "nchw"), ("bn", (2, 4, 3, 3), "nchw")])
def test_normlab_and_torch_candidates_compute_the_same_op(gpu_on_cpu, monkeypatch, op, shape, layout):
    """functions(case): normlab's kernel and the torch baseline get the same arguments (groups, eps,
    training, momentum), so the two timings are of the same computation; compile starts as the torch
    function (run() compiles it)."""
    monkeypatch.setattr(B, "kernels", _kernels_by_torch())
    case = B.Case(op, shape, "float32", layout)
    fs = B.functions(case)
    assert fs["compile"] is fs["torch"]
    args, _, _ = B.make_inputs(case)
    torch.testing.assert_close(fs["normlab"](**args), fs["torch"](**args), rtol=0, atol=0)
    with pytest.raises(ValueError):
        B.functions(B.Case("lrn", shape, "float32", layout))


# ---- targets()
def grow(op, shape, layout="rows", mode="fwd+bwd", dtype="bfloat16", **vals):
    return dict(op=op, shape=list(shape), dtype=dtype, layout=layout, mode=mode, **vals)


def test_targets_verdicts_at_and_just_below_each_bar():
    """fwd+bwd rows only: LN/RMS with N >= 1024 need >= 85% of copy and >= 1.2x torch; GN/BN/IN >= 70%
    of copy, channels-last GN also >= 1.5x torch. A value at the bar meets it, one just below does not;
    eager reads pct_copy / vs_torch, the CUDA-graph timing graph_pct_copy / graph_vs_torch (only
    where the row has them). The case is named "op shape dtype layout".
    Wrong version: bench_gpu.py targets ``85`` -> ``80`` and -> ``86``; ``1.2`` -> ``1.1`` and -> ``1.25``; ``70`` -> ``65``
    and -> ``75``; ``1.5`` -> ``1.4`` and -> ``1.6``; ``value >= bar`` -> ``value > bar``; ``("graph", "graph_pct_copy",
    "graph_vs_torch")`` -> ``"vs_torch"``; ``r["layout"] == "cl"`` -> ``== "nchw"``."""
    rows = [
        grow("ln", (4096, 1024), pct_copy=85.0, vs_torch=1.2, graph_pct_copy=84.99, graph_vs_torch=1.19),
        grow("rms", (32768, 16384), dtype="float32", pct_copy=84.99, vs_torch=1.19, graph_pct_copy=85.0, graph_vs_torch=1.2),
        grow("gn", CH0, "cl", pct_copy=70.0, vs_torch=1.5, graph_pct_copy=69.99, graph_vs_torch=1.49),
        grow("gn", CH1, "nchw", pct_copy=69.99, vs_torch=9.0),
        grow("bn", CH0, "cl", pct_copy=70.0, vs_torch=0.1),
        grow("in", CH0, "nchw", pct_copy=69.99, vs_torch=9.0),
    ]
    got = [(t["case"], t["timing"], t["target"], t["value"], t["met"]) for t in B.targets(rows)]
    assert got == [
        ("ln 4096x1024 bfloat16 rows", "eager", ">= 85% copy", 85.0, True),
        ("ln 4096x1024 bfloat16 rows", "eager", ">= 1.2x torch", 1.2, True),
        ("ln 4096x1024 bfloat16 rows", "graph", ">= 85% copy", 84.99, False),
        ("ln 4096x1024 bfloat16 rows", "graph", ">= 1.2x torch", 1.19, False),
        ("rms 32768x16384 float32 rows", "eager", ">= 85% copy", 84.99, False),
        ("rms 32768x16384 float32 rows", "eager", ">= 1.2x torch", 1.19, False),
        ("rms 32768x16384 float32 rows", "graph", ">= 85% copy", 85.0, True),
        ("rms 32768x16384 float32 rows", "graph", ">= 1.2x torch", 1.2, True),
        ("gn 32x256x56x56 bfloat16 cl", "eager", ">= 70% copy", 70.0, True),
        ("gn 32x256x56x56 bfloat16 cl", "eager", ">= 1.5x torch", 1.5, True),
        ("gn 32x256x56x56 bfloat16 cl", "graph", ">= 70% copy", 69.99, False),
        ("gn 32x256x56x56 bfloat16 cl", "graph", ">= 1.5x torch", 1.49, False),
        ("gn 8x512x28x28 bfloat16 nchw", "eager", ">= 70% copy", 69.99, False),
        ("bn 32x256x56x56 bfloat16 cl", "eager", ">= 70% copy", 70.0, True),
        ("in 32x256x56x56 bfloat16 nchw", "eager", ">= 70% copy", 69.99, False),
    ]


def test_targets_skip_small_rows_other_modes_and_miss_nan_or_missing_values():
    """LN/RMS rows with N < 1024 have no target (N = 1024 has); fwd and bwd rows none; a failed
    normlab timing (NaN) or a run without a torch ratio misses the target rather than meeting it.
    Wrong version: bench_gpu.py ``r["shape"][-1] >= 1024`` -> ``> 1024`` and -> ``>= 512``; ``if r["mode"] != "fwd+bwd"``
    -> ``if r["mode"] == "fwd"``; ``value is not None and`` removed (TypeError)."""
    nan = float("nan")
    rows = [grow("ln", (32768, 512), pct_copy=99.0, vs_torch=9.0),
            grow("rms", (4096, 1024), mode="bwd", pct_copy=99.0, vs_torch=9.0),
            grow("ln", (4096, 1024), mode="fwd", pct_copy=99.0, vs_torch=9.0),
            grow("rms", (4096, 1024), pct_copy=nan, vs_torch=nan),
            grow("ln", (32768, 1024), pct_copy=90.0)]
    got = [(t["case"], t["target"], t["met"]) for t in B.targets(rows)]
    assert got == [("rms 4096x1024 bfloat16 rows", ">= 85% copy", False), ("rms 4096x1024 bfloat16 rows", ">= 1.2x torch", False),
                   ("ln 32768x1024 bfloat16 rows", ">= 85% copy", True), ("ln 32768x1024 bfloat16 rows", ">= 1.2x torch", False)]


def test_targets_of_a_full_run_are_the_62_checks_results_md_counts():
    """On every case of the full run, each timing checks 24 LN/RMS rows (N >= 1024) for 85% of copy and
    for 1.2x torch, 12 GN/BN/IN rows for 70% of copy and the 2 channels-last GN rows for 1.5x: 62,
    as RESULTS.md's "Targets, plainly" table counts them."""
    rows = [grow(c.op, c.shape, c.layout, mode, c.dtype, pct_copy=1.0, vs_torch=1.0, graph_pct_copy=1.0, graph_vs_torch=1.0)
            for c in B.cases(False, None) for mode in B.MODES]
    got = B.targets(rows)
    for timing in ("eager", "graph"):
        count = {}
        for t in got:
            if t["timing"] == timing:
                count[t["target"]] = count.get(t["target"], 0) + 1
        assert count == {">= 85% copy": 24, ">= 1.2x torch": 24, ">= 70% copy": 12, ">= 1.5x torch": 2}


def test_committed_gpu_json_agrees_with_the_code_and_results_md(tmp_path):
    """results/gpu.json was written by this byte count and these targets, for exactly the full run's
    cases x modes; RESULTS.md's GPU tables are results_markdown.py's output on it, line for line."""
    doc = json.loads(committed("results/gpu.json"))
    rows = doc["results"]
    assert doc["byte_counting"] == B.BYTE_COUNTING
    assert [(r["op"], tuple(r["shape"]), r["dtype"], r["layout"], r["mode"]) for r in rows] == \
        [c + (m,) for c in FULL_CASES for m in B.MODES]
    assert all(r["bytes"] == B.nbytes(B.Case(r["op"], tuple(r["shape"]), r["dtype"], r["layout"]), r["mode"]) for r in rows)
    assert B.targets(rows) == doc["targets"]
    md = set(committed("RESULTS.md").splitlines())
    gpu_json = tmp_path / "gpu.json"
    gpu_json.write_text(committed("results/gpu.json"))
    out = _markdown(gpu_json)
    assert [line for line in out.splitlines() if line.strip() and line not in md] == []


# ---- run() with the CUDA timings faked
COPY_GBS = 2000.0
MS = {("normlab", "fwd"): 0.5, ("normlab", "bwd"): 1.0, ("normlab", "fwd+bwd"): 2.0,
      ("torch", "fwd"): 0.75, ("torch", "bwd"): 1.5, ("torch", "fwd+bwd"): 2.5,
      ("compiled compile", "fwd"): 0.4, ("compiled compile", "fwd+bwd"): 1.0}  # compiled bwd fails
GRAPH_MS = {"normlab": 1.0, "torch": 2.0, "compiled compile": 0.8}


def _fake_gpu(monkeypatch, seen, stop_at=None):
    monkeypatch.setattr(B, "environment", lambda: {"device": "fake"})
    monkeypatch.setattr(B, "copy_bandwidth", lambda: {"bytes": 2 * 2**30, "ms": 2**31 / COPY_GBS / 1e6, "gbs": COPY_GBS})
    real = B.functions
    monkeypatch.setattr(B, "functions", lambda case: {k: Impl(k, f) for k, f in real(case).items()})

    def time_case(case, f, mode, warmup=10, rep=50):
        seen.append((case.shape, f.impl, mode))
        if stop_at is not None and len(seen) > stop_at:
            raise KeyboardInterrupt
        if (f.impl, mode) not in MS:
            raise RuntimeError("boom")
        return MS[f.impl, mode]
    monkeypatch.setattr(B, "time_case", time_case)
    monkeypatch.setattr(B, "time_graphed", lambda case, f, warmup=10, rep=50: GRAPH_MS[f.impl])


def _run_args(out, **kw):
    defaults = {"quick": True, "only": {"ln"}, "dtypes": None, "no_compile": False, "no_graph": False, "out": str(out)}
    return SimpleNamespace(**{**defaults, **kw})


def test_run_derives_every_figure_from_the_timings_as_documented(gpu_on_cpu, monkeypatch, tmp_path, capsys):
    """run(): per case and mode, bytes = nbytes; GB/s = bytes / ms / 1e6; % copy = 100 GB/s / the copy's
    GB/s; vs_<impl> = baseline ms / normlab ms (above 1: normlab faster); fwd+bwd rows add the CUDA-graph
    times, graph_pct_copy from the graph time and graph_vs_<impl> = baseline graph ms / normlab graph ms.
    A failing baseline is recorded (NaN and its error), not fatal; the compiled candidate is the torch
    function compiled. The JSON holds the environment, the copy, the byte counting, every row and the
    targets of those rows, and the table ends with the targets met.
    Wrong version: bench_gpu.py ``row[f"vs_{impl}"] = row[f"{impl}_ms"] / row["normlab_ms"]`` -> inverted;
    ``row["bytes"] / ms / 1e6`` -> ``/ 1e9``; ``pct_copy = 100 * row["normlab_gbs"]`` -> ``row["normlab_gbs"]``;
    ``graph_pct_copy`` from ``normlab_graph_ms`` -> ``normlab_ms``; ``graph_vs_{impl}`` -> inverted;
    ``torch.compile(fs["compile"], dynamic=False)`` -> ``dynamic=True``."""
    seen = []
    _fake_gpu(monkeypatch, seen)
    out = tmp_path / "r" / "gpu.json"
    report = B.run(_run_args(out))
    doc = json.loads(out.read_text())
    assert set(doc) == {"environment", "copy", "byte_counting", "results", "targets"}
    assert doc["byte_counting"] == B.BYTE_COUNTING and doc["copy"]["gbs"] == COPY_GBS
    rows = doc["results"]
    assert [(r["op"], tuple(r["shape"]), r["mode"]) for r in rows] == \
        [("ln", s, m) for s in ROWS_QUICK for m in B.MODES]
    assert [i for _, i, _ in seen[:3]] == ["normlab", "torch", "compiled compile"]
    for r in rows:
        case = B.Case(r["op"], tuple(r["shape"]), r["dtype"], r["layout"])
        m = r["mode"]
        assert r["bytes"] == doc_bytes(r["op"], tuple(r["shape"]), r["dtype"], r["layout"], m)
        for impl, key in (("normlab", "normlab"), ("torch", "torch"), ("compile", "compiled compile")):
            want = MS.get((key, m), math.nan)
            assert r[f"{impl}_ms"] == want or (math.isnan(want) and math.isnan(r[f"{impl}_ms"]))
            if not math.isnan(want):
                assert r[f"{impl}_gbs"] == pytest.approx(r["bytes"] / (want * 1e-3) / 1e9)
        assert r["pct_copy"] == pytest.approx(100 * r["bytes"] / (MS["normlab", m] * 1e-3) / 1e9 / COPY_GBS)
        assert r["vs_torch"] == pytest.approx(MS["torch", m] / MS["normlab", m])
        if m == "bwd":
            assert math.isnan(r["vs_compile"]) and r["compile_error"] == "RuntimeError: boom"
        else:
            assert r["vs_compile"] == pytest.approx(MS["compiled compile", m] / MS["normlab", m])
        has_graph = {"normlab_graph_ms", "torch_graph_ms", "compile_graph_ms", "graph_pct_copy", "graph_vs_torch", "graph_vs_compile"}
        assert has_graph <= set(r) if m == "fwd+bwd" else not has_graph & set(r)
        if m == "fwd+bwd":
            assert r["graph_pct_copy"] == pytest.approx(100 * r["bytes"] / 1e-3 / 1e9 / COPY_GBS)
            assert (r["graph_vs_torch"], r["graph_vs_compile"]) == pytest.approx((2.0, 0.8))
        assert B.nbytes(case, m) == r["bytes"]
    assert doc["targets"] == B.targets(rows) == report["targets"]
    printed = capsys.readouterr().out
    assert "# copy: 2000 GB/s (1 GiB, read + write)" in printed
    assert "targets met (eager): 3 / 6" in printed and "targets met (graph): 3 / 6" in printed


def test_run_without_compile_or_graph_has_no_such_columns(gpu_on_cpu, monkeypatch, tmp_path):
    """--no-compile times normlab and torch only; --no-graph leaves out the CUDA-graph timings."""
    seen = []
    _fake_gpu(monkeypatch, seen)
    rows = B.run(_run_args(tmp_path / "g.json", no_compile=True, no_graph=True, only={"gn"}))["results"]
    assert {i for _, i, _ in seen} == {"normlab", "torch"}
    assert len(rows) == 2 * 3 and not any("compile" in k or "graph" in k for r in rows for k in r)
    assert all(r["vs_torch"] == pytest.approx(MS["torch", r["mode"]] / MS["normlab", r["mode"]]) for r in rows)


def test_run_cut_short_keeps_what_it_measured(gpu_on_cpu, monkeypatch, tmp_path):
    """The JSON is rewritten after every row: interrupted during the second case, it holds the first
    case's three rows (the docstring's promise for a run cut short).
    Wrong version: bench_gpu.py ``out_path.write_text(...)`` inside the loop removed (written at the end only)."""
    _fake_gpu(monkeypatch, [], stop_at=3 * 3)  # 3 impls x 3 modes of the first case
    out = tmp_path / "gpu.json"
    with pytest.raises(KeyboardInterrupt):
        B.run(_run_args(out))
    rows = json.loads(out.read_text())["results"]
    assert [(tuple(r["shape"]), r["mode"]) for r in rows] == [(ROWS_QUICK[0], m) for m in B.MODES]


def test_print_table_on_synthetic_rows(capsys):
    """print_table: the eager table (ms to 3 places, GB/s and % copy to units, ratios to 2; "- | -"
    where a row has no compile timing), the CUDA-graph table for the rows that have one, and per
    timing the targets met and each one missed with its value (or without, when there is none).
    Wrong version: bench_gpu.py print_table ``met = sum(1 for x in tt if x["met"])`` -> ``if not x["met"]``;
    ``if not x["met"]`` (missed lines) -> ``if x["met"]``; eager ``{r['vs_torch']:.2f}`` -> ``{r['torch_ms']:.2f}``."""
    report = {"results": [
        grow("ln", (4096, 1024), normlab_ms=0.25, normlab_gbs=167.9, pct_copy=5.6, torch_ms=0.4, vs_torch=1.6,
             compile_ms=0.3, vs_compile=1.2, normlab_graph_ms=0.2, graph_pct_copy=7.0, torch_graph_ms=0.5,
             graph_vs_torch=2.5, compile_graph_ms=0.22, graph_vs_compile=1.1),
        grow("gn", CH0, "cl", "fwd", normlab_ms=1.0, normlab_gbs=102.8, pct_copy=3.4, torch_ms=2.0, vs_torch=2.0),
    ], "targets": [
        {"case": "ln 4096x1024 bfloat16 rows", "timing": "eager", "target": ">= 85% copy", "value": 5.6, "met": False},
        {"case": "ln 4096x1024 bfloat16 rows", "timing": "eager", "target": ">= 1.2x torch", "value": 1.6, "met": True},
        {"case": "gn 32x256x56x56 bfloat16 cl", "timing": "eager", "target": ">= 1.5x torch", "value": None, "met": False},
        {"case": "ln 4096x1024 bfloat16 rows", "timing": "graph", "target": ">= 1.2x torch", "value": 2.5, "met": True},
    ]}
    B.print_table(report)
    lines = capsys.readouterr().out.splitlines()
    assert "| ln | 4096x1024 | bfloat16 | rows | fwd+bwd | 0.250 | 168 | 6% | 0.400 | 1.60 | 0.300 | 1.20 |" in lines
    assert "| gn | 32x256x56x56 | bfloat16 | cl | fwd | 1.000 | 103 | 3% | 2.000 | 2.00 | - | - |" in lines
    assert "CUDA graph (fwd+bwd, GPU time only)" in lines
    assert "| ln | 4096x1024 | bfloat16 | rows | 0.200 | 7% | 0.500 | 2.50 | 0.220 | 1.10 |" in lines
    i = lines.index("targets met (eager): 1 / 3")
    assert lines[i + 1:i + 3] == ["  missed: ln 4096x1024 bfloat16 rows: >= 85% copy (got 5.60)",
                                  "  missed: gn 32x256x56x56 bfloat16 cl: >= 1.5x torch"]
    assert lines[-1] == "targets met (graph): 1 / 1"
    B.print_table({"results": report["results"][1:]})
    assert "CUDA graph" not in capsys.readouterr().out


def test_warm_shards_partition_the_cases(gpu_on_cpu, monkeypatch, capsys):
    """--warmup-only --shard i/n warms every n-th case from the i-th: the shards 0/3, 1/3, 2/3 together
    warm each selected case exactly once (gpu_session.sh runs the three side by side).
    Wrong version: bench_gpu.py warm ``todo[i::n]`` -> ``todo[i::n + 1]`` and -> ``todo[i:]``."""
    warmed = []
    monkeypatch.setattr(B, "make_inputs", lambda case: (warmed.append(case) or {}, [], None))
    monkeypatch.setattr(B, "functions", lambda case: {"normlab": lambda: torch.zeros(1, requires_grad=True) * 1})
    monkeypatch.setattr(B.torch, "autograd", SimpleNamespace(grad=lambda *a: None), raising=False)
    for i in range(3):
        B.warm(SimpleNamespace(quick=False, only={"ln", "bn"}, dtypes=None, shard=f"{i}/3"))
    assert sorted(_as_tuples(warmed)) == sorted(c for c in FULL_CASES if c[0] in ("ln", "bn"))
    assert _as_tuples(warmed[:2]) == [c for c in FULL_CASES if c[0] in ("ln", "bn")][0:6:3]


def test_bench_gpu_without_cuda_exits_with_its_message(monkeypatch):
    """``python benchmarks/bench_gpu.py`` (run as a script) on a machine without CUDA stops at once with
    one line (a non-zero exit), before measuring or writing anything; so does tune_gpu.py."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for script in ("bench_gpu.py", "tune_gpu.py"):
        monkeypatch.setattr(sys, "argv", [script, "--quick"])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(BENCH / script), run_name="__main__")
        assert e.value.code == f"{script} needs a CUDA GPU"


def test_bench_gpu_main_parses_its_options(gpu_on_cpu, monkeypatch):
    """--only and --dtypes are comma lists (sets); --warmup-only goes to warm() instead of run();
    the default output is benchmarks/results/gpu.json of this checkout.
    Wrong version: bench_gpu.py ``--only`` ``type=lambda s: set(s.split(","))`` -> ``s.split(",")``."""
    called = []
    monkeypatch.setattr(B, "run", lambda args: called.append(("run", args)))
    monkeypatch.setattr(B, "warm", lambda args: called.append(("warm", args)))
    B.main(["--only", "ln,gn", "--dtypes", "float32", "--no-compile", "--no-graph", "--quick"])
    B.main(["--warmup-only", "--shard", "1/3"])
    (k1, a1), (k2, a2) = called
    assert (k1, a1.only, a1.dtypes, a1.no_compile, a1.no_graph, a1.quick) == ("run", {"ln", "gn"}, {"float32"}, True, True, True)
    assert (k2, a2.only, a2.shard, a2.out) == ("warm", None, "1/3", str(BENCH / "results" / "gpu.json"))


@pytest.mark.parametrize("argv,name", [([], "gpu.json"), (["--quick"], "gpu-quick.json"),
                                       (["--quick", "--only", "ln"], "gpu-quick.json"),
                                       (["--only", "ln,gn"], "gpu-partial.json"),
                                       (["--dtypes", "float32"], "gpu-partial.json"),
                                       (["--no-compile"], "gpu-partial.json"), (["--no-graph"], "gpu-partial.json")])
def test_bench_gpu_default_output_keeps_quick_and_partial_runs_off_gpu_json(gpu_on_cpu, monkeypatch, argv, name):
    """Without --out only the full run writes results/gpu.json (the figures RESULTS.md cites and
    ``test_committed_gpu_json_agrees_with_the_code_and_results_md`` checks against the full case
    list); ``--quick`` writes gpu-quick.json and a subset gpu-partial.json beside it (git ignores
    both), as bench_cpu's --quick does; --out still wins.
    Wrong version: bench_gpu.py ``args.out`` defaulting to gpu.json whatever the options."""
    seen = []
    monkeypatch.setattr(B, "run", lambda args: seen.append(args.out))
    B.main(argv)
    B.main([*argv, "--out", "/elsewhere/g.json"])
    assert seen == [str(BENCH / "results" / name), "/elsewhere/g.json"]
    ignored = (BENCH.parent / ".gitignore").read_text().splitlines()
    assert name == "gpu.json" or any(Path(f"benchmarks/results/{name}").match(p) for p in ignored)


def test_gpu_session_sh_calls_bench_gpu_with_options_it_accepts(gpu_on_cpu, monkeypatch):
    """Every bench_gpu.py command line of gpu_session.sh parses (a renamed flag would otherwise cost a
    device session), and the script is valid bash."""
    text = (BENCH / "gpu_session.sh").read_text()
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_session.sh")], check=False).returncode == 0
    monkeypatch.setattr(B, "run", lambda args: None)
    monkeypatch.setattr(B, "warm", lambda args: None)
    lines = re.findall(r"bench_gpu\.py([^>]*)>", text)
    assert len(lines) == 4
    for line in lines:
        B.main(shlex.split(line.replace("$i", "0").replace("$OUT", "/tmp/x")))


def test_scripts_built_on_bench_gpu_import_and_name_valid_cases():
    """ab_gpu.py, profile_gpu.py and tune_gpu.py import on the CPU; their cases are bench_gpu cases
    whose bytes count, and every launch setting tune_gpu sweeps is a key of the kernels' TUNING."""
    import ab_gpu
    import profile_gpu
    import tune_gpu

    for case in ab_gpu.CASES + profile_gpu.CASES:
        assert case.op in ("ln", "rms", "gn", "bn", "in") and B.nbytes(case, "fwd+bwd") > 0
        assert set(B.functions(case)) == {"normlab", "torch", "compile"}
    for variants, module in ((tune_gpu.FWD_VARIANTS + tune_gpu.BWD_VARIANTS, tune_gpu.LN), (tune_gpu.CH_VARIANTS, tune_gpu.CH)):
        assert all(set(v) <= set(module.TUNING) for v in variants)


# ------------------------------------------------------------------------------ results_markdown
def _markdown(path=None) -> str:
    from contextlib import redirect_stdout
    from io import StringIO

    buf = StringIO()
    with redirect_stdout(buf):
        results_markdown.main(path)
    return buf.getvalue()


def test_results_markdown_tables_of_a_run(gpu_on_cpu, monkeypatch, tmp_path):
    """results_markdown on run()'s JSON: the eager table (ms, GB/s, % copy, torch ms, vs torch, compile
    ms, vs compile; "-" for a failed timing), the CUDA-graph table of the fwd+bwd rows with GB/s from
    the graph time, and the targets met per timing. Worked by hand for LN 4096x1024 (bytes fwd
    16781312, bwd 25204736, fwd+bwd 41986048; copy 2000 GB/s).
    Wrong version: results_markdown.py graph GB/s ``r['bytes'] / r['normlab_graph_ms'] / 1e6`` -> ``/ 1e3``;
    fmt ``v is None or v != v`` -> ``v is None``; ``sum(x['met'] for x in tt)`` -> ``len(tt)``; eager
    ``r.get('vs_torch')`` -> ``r.get('vs_compile')``; graph ``r['graph_pct_copy']`` -> ``r['pct_copy']``."""
    _fake_gpu(monkeypatch, [])
    out = tmp_path / "gpu.json"
    B.run(_run_args(out))
    lines = _markdown(out).splitlines()
    assert "| op | shape | dtype | layout | mode | ms | GB/s | % copy | torch ms | vs torch | compile ms | vs compile |" in lines
    assert "| ln | 4096x1024 | bfloat16 | rows | fwd | 0.500 | 34 | 2% | 0.750 | 1.50 | 0.400 | 0.80 |" in lines
    assert "| ln | 4096x1024 | bfloat16 | rows | bwd | 1.000 | 25 | 1% | 1.500 | 1.50 | - | - |" in lines
    assert "| ln | 4096x1024 | bfloat16 | rows | fwd+bwd | 2.000 | 21 | 1% | 2.500 | 1.25 | 1.000 | 0.50 |" in lines
    assert "| ln | 4096x1024 | bfloat16 | rows | 1.000 | 42 | 2% | 2.000 | 2.00 | 0.800 | 0.80 |" in lines
    assert sum(line.startswith("| ln |") for line in lines) == 9 + 3
    assert lines[-3:] == ["Targets, eager: 3 of 6 met.", "", "Targets, graph: 3 of 6 met."]
    assert any("for all three" in line for line in lines)


def test_results_markdown_without_compile_columns_and_from_the_command_line(gpu_on_cpu, monkeypatch, tmp_path, capsys):
    """A --no-compile run has no compile columns ("for all both" in the graph heading); the script
    takes the JSON's path as its argument.
    Wrong version: results_markdown.py ``comp = any("compile_ms" in r ...)`` -> ``comp = True``."""
    _fake_gpu(monkeypatch, [])
    out = tmp_path / "gpu.json"
    B.run(_run_args(out, no_compile=True, only={"rms"}))
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["results_markdown.py", str(out)])
    runpy.run_path(str(BENCH / "results_markdown.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert "| op | shape | dtype | layout | mode | ms | GB/s | % copy | torch ms | vs torch |" in lines
    assert "| rms | 4096x1024 | bfloat16 | rows | fwd | 0.500 | 34 | 2% | 0.750 | 1.50 |" in lines
    assert not any("compile" in line for line in lines) and any("for all both" in line for line in lines)


# ------------------------------------------------------------------------------ bench_monitor
class Clock:
    """A fake clock for measure()'s blocks: read at a block's start and end; each end comes
    ``durations[k]`` after its start."""

    def __init__(self, durations):
        self.left, self.t, self.started = list(durations), 0.0, False

    def __call__(self):
        if self.started:
            self.t += self.left.pop(0)
        self.started = not self.started
        return self.t


def test_monitor_overhead_is_the_ratio_of_median_block_times_of_alternating_blocks(monkeypatch):
    """measure(): blocks of 10 steps alternate (without, with; then with, without; ...) after the
    warm-up blocks, which are not counted; the overhead is median(with) / median(without) - 1 (the
    mean ratio and the CPU-time ratio beside it), step times are the median block time / 10 in ms.
    Each of the watched model's blocks holds one recorded step.
    Wrong version: bench_monitor.py ``med["with"] / med["without"] - 1`` -> inverted; ``statistics.median``
    (med) -> ``statistics.fmean``; ``first if i % 2 == 0 else first[::-1]`` -> ``first``; ``if i >= warmup_blocks``
    -> ``if i >= 0``; ``1e3 * med["without"] / EVERY`` -> ``1e3 * med["without"]``; ``cpu_med["with"] / cpu_med["without"]``
    -> ``med["with"] / med["without"]``."""
    wall = {"without": [50.0, 1.0, 1.0, 1.5, 5.0], "with": [50.0, 2.0, 1.0, 3.0, 10.0]}
    cpu = {"without": [9.0, 1.0, 2.0, 3.0, 4.0], "with": [9.0, 2.0, 2.0, 2.0, 8.0]}
    order = [("without", "with") if i % 2 == 0 else ("with", "without") for i in range(5)]
    monkeypatch.setattr(bench_monitor, "time", SimpleNamespace(
        perf_counter=Clock([wall[k][i] for i, pair in enumerate(order) for k in pair]),
        process_time=Clock([cpu[k][i] for i, pair in enumerate(order) for k in pair])))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    out = bench_monitor.measure("tiny", model, (torch.randn(6, 4), torch.randint(0, 3, (6,))), blocks=4, warmup_blocks=1)
    assert bench_monitor.time.perf_counter.left == [] and bench_monitor.time.process_time.left == []
    assert out["step_ms_without"] == pytest.approx(1e3 * 1.25 / 10) and out["step_ms_with"] == pytest.approx(1e3 * 2.5 / 10)
    assert out["overhead_median"] == pytest.approx(2.5 / 1.25 - 1)
    assert out["overhead_mean"] == pytest.approx(4.0 / 2.125 - 1)
    assert out["overhead_cpu_time_median"] == pytest.approx(2.0 / 2.5 - 1)
    assert (out["model"], out["device"], out["blocks"], out["steps_per_block"]) == ("tiny", "cpu", 4, 10)
    assert out["recorded_steps"] == 5 and out["layers_watched"] == 4


@pytest.mark.parametrize("argv,blocks,steps,out,suffix", [
    (["--quick"], 6, 100, "results/monitor-quick.json", "-quick"),
    ([], 60, 3000, "results/monitor.json", ""),
    (["--blocks", "3", "--figure-steps", "7", "--out", "{tmp}/o/m.json"], 3, 7, "o/m.json", ""),
    (["--quick", "--no-figure", "--out", "{tmp}/o/m.json"], 6, None, "o/m.json", "-quick"),
])
def test_bench_monitor_main_options_and_output(monkeypatch, tmp_path, argv, blocks, steps, out, suffix):
    """--quick is 6 blocks and a 100-step figure written as ``monitor-quick.json`` and ``*-quick.png``
    (the defaults: 60 blocks, 3000 steps, monitor.json); --out moves the JSON and the figures with it;
    --no-figure skips the figure. The JSON holds both models' measurements, CNN first, and the figures.
    Wrong version: bench_monitor.py ``args.blocks, args.figure_steps = 6, 100`` -> ``60, 100`` and -> ``6, 3000``;
    ``suffix = "-quick" if args.quick else ""`` -> ``""``; ``paper_figure(..., out.parent, suffix)`` -> ``RESULTS``."""
    measured, drawn = [], []
    monkeypatch.setattr(bench_monitor, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench_monitor, "measure", lambda name, model, batch, b, device="cpu":
                        measured.append((name, b, device)) or {"model": name})
    monkeypatch.setattr(bench_monitor, "paper_figure", lambda s, folder, sfx="":
                        drawn.append((s, folder, sfx)) or [{"figure": f"f{sfx}.png"}])
    monkeypatch.setattr(sys, "argv", ["bench_monitor.py", *[a.format(tmp=tmp_path) for a in argv]])
    bench_monitor.main()
    path = tmp_path / out
    doc = json.loads(path.read_text())
    assert [b for _, b, _ in measured] == [blocks, blocks] and measured[0][0].startswith("small CNN")
    assert drawn == ([] if steps is None else [(steps, path.parent, suffix)])
    assert doc["overhead"] == [{"model": n} for n, _, _ in measured] and doc["every"] == 10
    assert doc["figures"] == ([] if steps is None else [{"figure": f"f{suffix}.png"}])
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert (tmp_path / "results").exists() == (path.parent == tmp_path / "results")


# ------------------------------------------------------------------------------ bench_lab
@pytest.mark.parametrize("argv,msg", [(["no-such-experiment"], "unknown experiment 'no-such-experiment'"),
                                      (["--seeds", "0"], "must be at least 1, got 0")])
def test_bench_lab_refuses_a_misspelt_experiment_or_zero_seeds_in_one_line(monkeypatch, capsys, tmp_path, argv, msg):
    """A usage error (exit 2, the message on stderr) before anything runs or is written."""
    monkeypatch.setattr(sys, "argv", ["bench_lab.py", *argv, "--json", str(tmp_path / "lab.json")])
    with pytest.raises(SystemExit) as e:
        bench_lab.main()
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "lab.json").exists()


def _fake_lab(monkeypatch, found, verdicts, failed=()):
    from normlab.lab import report, runner

    calls = {}
    monkeypatch.setattr(runner, "plan", lambda names, scale, seeds: calls.setdefault("plan", (list(names), scale, seeds)))

    def execute(tasks, out, force=False, jobs=None):
        calls["execute"] = {"force": force, "jobs": jobs}
        return SimpleNamespace(failed=list(failed), interrupted=False)

    def build(out):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "results.json").write_text(json.dumps({"experiments": {n: {"verdict": v} for n, v in verdicts.items()}}))
    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(report, "build", build)
    monkeypatch.setattr(runner, "load_runs", lambda out: (found, []))
    return calls


def _lab_run(seconds, cpu):
    return SimpleNamespace(env={"seconds": seconds, "cpu_seconds": cpu})


def test_bench_lab_sums_worker_and_cpu_seconds_and_keeps_the_slowest_seed(monkeypatch, tmp_path, capsys):
    """Per experiment (in the lab's order): seeds = runs found, worker seconds = their wall times summed,
    CPU seconds summed (a run without the figure counts 0), the slowest seed = the largest wall time,
    and the report's verdict; every run is forced afresh with the --jobs given.
    Wrong version: bench_lab.py ``round(sum(secs), 1)`` -> ``round(max(secs), 1)``; ``round(max(secs), 1)``
    -> ``round(min(secs), 1)``; ``round(sum(cpu), 1)`` -> ``round(max(cpu), 1)``; ``for name in [n for n in
    experiments.names() if n in found]`` -> ``for name in found``; ``force=True`` -> ``force=False``."""
    found = {"init-scale": {"h": [_lab_run(1.04, 0.5)]},
             "activations": {"h1": [_lab_run(2.0, 1.5), _lab_run(3.0, None)], "h2": [_lab_run(4.5, 2.0)]}}
    calls = _fake_lab(monkeypatch, found, {"activations": "reproduced", "init-scale": "inconclusive"})
    out = tmp_path / "lab.json"
    monkeypatch.setattr(sys, "argv", ["bench_lab.py", "activations", "init-scale", "--seeds", "2", "--jobs", "1",
                                      "--json", str(out)])
    bench_lab.main()
    doc = json.loads(out.read_text())
    assert calls["plan"] == (["activations", "init-scale"], "quick", 2) and calls["execute"] == {"force": True, "jobs": 1}
    assert doc["experiments"] == [
        {"experiment": "activations", "seeds": 3, "worker_seconds": 9.5, "cpu_seconds": 3.5,
         "slowest_seed_seconds": 4.5, "verdict": "reproduced"},
        {"experiment": "init-scale", "seeds": 1, "worker_seconds": 1.0, "cpu_seconds": 0.5,
         "slowest_seed_seconds": 1.0, "verdict": "inconclusive"}]
    assert (doc["scale"], doc["seeds"], doc["jobs"]) == ("quick", 2, 1)
    assert doc["report_seconds"] == pytest.approx(doc["suite_wall_seconds"] - doc["runs_wall_seconds"], abs=0.11)
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize("argv,name", [([], "lab.json"), (["--scale", "full"], "lab-full.json"),
                                       (["activations"], "lab-quick-activations.json"),
                                       (["activations", "rnn", "--scale", "full"], "lab-full-activations-rnn.json"),
                                       (["--seeds", "1"], "lab-quick-1seed.json"),
                                       (["--seeds", "3"], "lab.json"),
                                       (["--scale", "full", "--seeds", "1"], "lab-full-1seed.json"),
                                       (["activations", "--seeds", "5"], "lab-quick-activations-5seed.json")])
def test_bench_lab_default_output_keeps_partial_runs_off_lab_json(monkeypatch, tmp_path, argv, name):
    """Without --json only the whole suite at quick scale with 3 seeds writes results/lab.json; another
    scale, a subset or another seed count writes lab-<scale>[-<names>][-<K>seed].json, so a partial run
    cannot overwrite the suite's figures (``--seeds 1`` overwrote them with a one-seed run).
    Wrong version: bench_lab.py ``not args.names and args.scale == "quick"`` -> ``or``; the
    ``f"{args.seeds}seed"`` part left out of the name."""
    _fake_lab(monkeypatch, {}, {})
    monkeypatch.setattr(bench_lab, "__file__", str(tmp_path / "bench_lab.py"))
    monkeypatch.setattr(sys, "argv", ["bench_lab.py", *argv])
    bench_lab.main()
    assert [p.name for p in (tmp_path / "results").iterdir()] == [name]


def test_bench_lab_incomplete_run_writes_nothing(monkeypatch, tmp_path):
    """A failed run ends the benchmark with one line saying how many failed; no JSON is written.
    Wrong version: bench_lab.py ``if outcome.failed or outcome.interrupted`` -> ``if outcome.interrupted``."""
    _fake_lab(monkeypatch, {}, {}, failed=[("task", "boom")])
    monkeypatch.setattr(sys, "argv", ["bench_lab.py", "activations", "--json", str(tmp_path / "l.json")])
    with pytest.raises(SystemExit, match=r"benchmark incomplete: 1 failed, interrupted=False"):
        bench_lab.main()
    assert not (tmp_path / "l.json").exists()


# ------------------------------------------------------------------------------ host_overhead
@pytest.fixture
def host_overhead(monkeypatch):
    """The module, imported without leaving TRITON_INTERPRET=1 behind (it sets it at import)."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    import host_overhead as H

    return H


def test_host_overhead_timeit_is_the_fastest_rounds_cpu_time_per_call_in_us(host_overhead, monkeypatch):
    """timeit: after 20 untimed calls, ``rounds`` rounds of ``inner`` calls in process CPU time; the
    result is the fastest round's time per call, in µs.
    Wrong version: host_overhead.py ``return min(per)`` -> ``statistics.median(per)``; ``/ inner * 1e6`` -> ``* 1e6``."""
    clock = SimpleNamespace(t=0.0, n=0)
    cost = [5e-6, 1e-6, 2e-6]  # seconds per call in rounds 1, 2, 3

    def f():
        clock.n += 1
        if clock.n > 20:
            clock.t += cost[(clock.n - 21) // 4]
    monkeypatch.setattr(host_overhead, "time", SimpleNamespace(process_time=lambda: clock.t))
    assert host_overhead.timeit(f, rounds=3, inner=4) == pytest.approx(1.0)
    assert clock.n == 20 + 3 * 4


def test_host_overhead_counts_launches_per_mode(host_overhead):
    """measure(): the launches of one fwd, one bwd (of a kept graph) and one fwd+bwd, each counted from
    zero, beside the times and the floor's.
    Wrong version: host_overhead.py ``_Launches.count = 0`` (per mode) removed."""
    H = host_overhead
    stub = H._Launches()

    class Two(torch.autograd.Function):  # two launches forward, one backward
        @staticmethod
        def forward(ctx, x):
            stub[(1,)](x)
            stub[(2,)](x)
            return x * 2

        @staticmethod
        def backward(ctx, dy):
            stub[(1,)](dy)
            return dy * 2

    x = torch.randn(3, requires_grad=True)
    row = H.measure(torch, H.make_floor(torch), (x,), lambda: Two.apply(x), rounds=1, inner=1)
    assert (row["fwd_launches"], row["bwd_launches"], row["fwd+bwd_launches"]) == (2, 1, 3)
    assert {"fwd_us", "bwd_us", "fwd+bwd_us", "floor_fwd_us", "floor_bwd_us", "floor_fwd+bwd_us"} <= set(row)


def test_host_overhead_smoke_stubs_the_kernels_and_measures_every_case(tmp_path):
    """``host_overhead.py --rounds 1 --inner 1 --json F`` (a subprocess: it stubs normlab's kernels)
    measures this checkout's src/, finds jitted kernels to stub, and writes a row per case with at least
    one launch per mode (no kernel left unstubbed runs under the interpreter)."""
    out = tmp_path / "h.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, str(BENCH / "host_overhead.py"), "--rounds", "1", "--inner", "1", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"# normlab from {BENCH.parent / 'src' / 'normlab' / '__init__.py'}" in p.stdout
    assert int(re.search(r"# (\d+) kernels stubbed", p.stdout).group(1)) > 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"].split()[0] for r in rows] == ["layer_norm", "rms_norm", "group_norm", "batch_norm", "group_norm",
                                                    "batch_norm", "instance_norm", "masked_batch_norm"]
    assert all(r[f"{m}_launches"] >= 1 for r in rows for m in ("fwd", "bwd", "fwd+bwd"))


@pytest.mark.parametrize("script", ["ab_gpu.py", "results_markdown.py", "compile_check_record.py",
                                    "compile_check_sm90.py"])
def test_scripts_without_argparse_print_their_docstring_for_help(script):
    """``--help`` was taken as a source folder (ab_gpu), a JSON path (results_markdown), or ran
    ~30 s of kernel tests and wrote /tmp/launches.json (compile_check_record): it prints the
    script's docstring, the usage, and exits 0 without running anything."""
    out = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=BENCH.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ast.get_docstring(ast.parse((BENCH / script).read_text()), clean=False).strip()
