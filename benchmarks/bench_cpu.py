"""CPU benchmark of the core: normlab.nn against its torch twin (or torch BatchNorm on the same
shape, for the layers torch lacks) and the NumPy reference, forward and forward+backward.

Run:  python benchmarks/bench_cpu.py [--rounds 15] [--repeat 3] [--quick]
Writes benchmarks/results/cpu.json (``--quick``: cpu-quick.json, not a result to cite) and
prints medians (ms) and ratios measured in this run.
With ``--repeat K`` every case is measured K times (each time interleaved over all its
candidates); the times are the medians over the K measurements, each ratio the median of the
K ratios, and its range (min-max over the K) is printed beside it and kept in the JSON: on a
noisy machine one measurement moves a ratio by 10% and more.

Targets (issue 2): normlab.nn <= 1.05x its torch twin; our own layers <= 2x torch BatchNorm on
the same shape; the NumPy reference forward+backward <= 2x torch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, interleaved, positive_int, write_json  # noqa: E402

import normlab.nn as N  # noqa: E402
import normlab.reference as R  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu.json"


def fwd(module, x, *extra):
    def f():
        with torch.no_grad():
            module(x, *extra)
    return f


def fwd_bwd(module, x, dy, *extra):
    xr = x.clone().requires_grad_()

    def f():
        xr.grad = None
        for p in module.parameters():
            p.grad = None
        module(xr, *extra).backward(dy)
    return f


def np_params(c):
    return np.ones(c, np.float32), np.zeros(c, np.float32)


def cases(quick: bool):
    """(name, shape, normlab module, twin module or None (= torch BatchNorm on the shape), reference fwd, reference bwd, extra args)."""
    g = torch.Generator().manual_seed(0)
    big = (32, 64, 32, 32) if not quick else (8, 64, 16, 16)
    rows = (4096, 1024) if not quick else (512, 1024)
    seq = (32, 64, 1024) if not quick else (8, 64, 256)
    out = []

    x = torch.randn(rows, generator=g)
    gam, bet = np_params(rows[1])
    out.append(("LayerNorm", x, N.LayerNorm(rows[1]), torch.nn.LayerNorm(rows[1]),
                lambda xn, gam=gam, bet=bet: R.layer_norm_forward(xn, rows[1], gam, bet), R.layer_norm_backward, ()))
    out.append(("RMSNorm", x, N.RMSNorm(rows[1]), torch.nn.RMSNorm(rows[1]),
                lambda xn, gam=gam: R.rms_norm_forward(xn, rows[1], gam), R.rms_norm_backward, ()))
    x = torch.randn(big, generator=g)
    c = big[1]
    gam, bet = np_params(c)
    out.append(("BatchNorm2d", x, N.BatchNorm2d(c), torch.nn.BatchNorm2d(c),
                lambda xn: R.batch_norm_forward(xn, gam, bet)[:2], R.batch_norm_backward, ()))
    out.append(("GroupNorm(8)", x, N.GroupNorm(8, c), torch.nn.GroupNorm(8, c),
                lambda xn: R.group_norm_forward(xn, 8, gam, bet), R.group_norm_backward, ()))
    out.append(("InstanceNorm2d", x, N.InstanceNorm2d(c, affine=True), torch.nn.InstanceNorm2d(c, affine=True),
                lambda xn: R.instance_norm_forward(xn, gam, bet)[:2], R.instance_norm_backward, ()))
    mw, vw = np.ones(3), np.ones(3)
    out.append(("SwitchableNorm2d", x, N.SwitchableNorm2d(c), None,
                lambda xn: R.switchable_norm_forward(xn, gam, bet, mw, vw)[:2], R.switchable_norm_backward, ()))
    run = R.RunningStats(np.zeros(c, np.float32), np.ones(c, np.float32))
    out.append(("BatchRenorm2d", x, N.BatchRenorm2d(c), None,
                lambda xn: R.batch_renorm_forward(xn, gam, bet, run)[:2], R.batch_renorm_backward, ()))
    x = torch.randn(seq, generator=g)
    lengths = torch.randint(seq[2] // 4, seq[2] + 1, (seq[0],), generator=g)
    mask = torch.arange(seq[2])[None, :] < lengths[:, None]
    mask_np = mask.numpy()
    out.append(("MaskedBatchNorm1d", x, N.MaskedBatchNorm1d(c), None,
                lambda xn: R.masked_batch_norm_forward(xn, mask_np, gam, bet)[:2], R.masked_batch_norm_backward,
                (mask,)))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=positive_int, default=15, help="interleaved timing rounds per measurement; each "
                                                                    "time is the median over them (default 15)")
    ap.add_argument("--repeat", type=positive_int, default=1, help="measure each case this many times; report medians")
    ap.add_argument("--quick", action="store_true", help="small shapes, for a smoke run (written to cpu-quick.json)")
    ap.add_argument("--out", type=Path, default=None, help=f"default {RESULTS} ({RESULTS.stem}-quick.json with --quick)")
    args = ap.parse_args(argv)
    if args.out is None:  # a smoke run must not overwrite the figures RESULTS.md cites
        args.out = RESULTS.with_name(f"{RESULTS.stem}-quick.json") if args.quick else RESULTS
    torch.manual_seed(0)
    results = []
    header = f"{'layer':<18} {'shape':<18} {'pass':<8} {'normlab':>9} {'torch':>9} {'numpy':>9} {'nl/torch':>9} {'np/torch':>9}"
    print(header)
    print("-" * len(header))
    for name, x, ours, twin, ref_fwd, ref_bwd, extra in cases(args.quick):
        baseline = twin if twin is not None else torch.nn.BatchNorm1d(x.shape[1]) if x.dim() == 3 else torch.nn.BatchNorm2d(x.shape[1])
        base_label = "twin" if twin is not None else "torch BatchNorm"
        dy = torch.randn_like(x)
        xn, dyn = x.numpy(), dy.numpy()

        def ref_fb():
            y, cache = ref_fwd(xn)
            ref_bwd(dyn, cache)

        fns = {
            "fwd_normlab": fwd(ours, x, *extra), "fwd_torch": fwd(baseline, x), "fwd_numpy": lambda: ref_fwd(xn),
            "fb_normlab": fwd_bwd(ours, x, dy, *extra), "fb_torch": fwd_bwd(baseline, x, dy),
            "fb_numpy": ref_fb,
        }
        runs = [interleaved(fns, rounds=args.rounds) for _ in range(args.repeat)]
        for pas in ("fwd", "fb"):
            row = {
                "layer": name, "shape": list(x.shape), "pass": "forward" if pas == "fwd" else "forward+backward",
                "baseline": base_label,
                **{f"{who}_ms": statistics.median(r[f"{pas}_{who}"] for r in runs) * 1e3
                   for who in ("normlab", "torch", "numpy")},
            }
            for who in ("normlab", "numpy"):
                ratios = [r[f"{pas}_{who}"] / r[f"{pas}_torch"] for r in runs]
                row[f"{who}_over_torch"] = statistics.median(ratios)
                row[f"{who}_over_torch_runs"] = ratios
            results.append(row)

            def spread(who):
                r = row[f"{who}_over_torch_runs"]
                return f" ({min(r):.2f}-{max(r):.2f})" if len(r) > 1 else ""
            print(f"{name:<18} {'x'.join(map(str, x.shape)):<18} {pas:<8} {row['normlab_ms']:>9.2f} {row['torch_ms']:>9.2f} "
                  f"{row['numpy_ms']:>9.2f} {row['normlab_over_torch']:>9.2f}{spread('normlab')} "
                  f"{row['numpy_over_torch']:>9.2f}{spread('numpy')}"
                  + ("" if twin is not None else "  (vs torch BatchNorm)"))
    payload = {"environment": environment(), "rounds": args.rounds, "repeat": args.repeat, "quick": args.quick,
               "results": results}
    write_json(args.out, payload)
    print(f"\nwrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
