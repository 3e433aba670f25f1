"""Python host overhead of the kernel launchers, measured on the CPU with the launches stubbed out.

Not a test, and not GPU time: every ``@triton.jit`` kernel of ``normlab.kernels`` is replaced
by a stub whose ``kernel[grid](...)`` returns at once, and the ops run under
``TRITON_INTERPRET=1`` on small CPU tensors. What is left is the Python our launchers and
dispatch run per call: argument checks, ``supports``, layout and launch-shape computation,
output and partial-buffer allocations (CPU ``torch.empty`` here, the CUDA caching allocator on
a GPU), ``autograd.Function`` bookkeeping. **Triton's own launch cost (its binder and C
launcher, ~15 µs per launch on the H100 host with Triton 3.6) is excluded**; the number of
launches per call is printed beside each row so it can be added.

    python benchmarks/host_overhead.py                   # this checkout's src/
    python benchmarks/host_overhead.py --src OTHER/src   # another checkout, for before/after
    python benchmarks/host_overhead.py --json out.json

Rows (µs of CPU time per call, fastest of the rounds): ``supports`` (the dispatch check alone), ``functional``
(``normlab.functional.<op>`` forward with the backend set to triton: input checks, supports,
the launcher), and the kernel entry point's ``fwd``, ``bwd`` (``torch.autograd.grad`` of a
kept graph) and ``fwd+bwd``. The floor columns time an ``autograd.Function`` over the same
leaves that only allocates its outputs and gradients: the least a Python launcher can cost
here, most of it ``torch.autograd`` itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton or normlab.kernels are imported
ROOT = Path(__file__).resolve().parents[1]


class _Launches:
    """Stands in for a jitted kernel: ``k[grid](...)`` counts the launch and does nothing."""

    count = 0

    def __getitem__(self, grid):
        return self._launch

    @classmethod
    def _launch(cls, *args, **kwargs):
        cls.count += 1


def stub_kernels():
    import normlab.kernels  # noqa: F401  (imports every kernel module)

    stubbed = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("normlab.kernels"):
            continue
        for attr, obj in list(vars(mod).items()):
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and attr != "_ADD":
                setattr(mod, attr, _Launches())
                stubbed.append(f"{name}.{attr}")
    return stubbed


def timeit(fn, rounds=15, inner=200):
    """µs per call: the fastest of ``rounds`` rounds of ``inner`` calls, in this process's CPU
    time (the machine is shared: CPU time leaves out the time other jobs hold the core, and
    the fastest round is the one they disturbed least)."""
    for _ in range(20):
        fn()
    per = []
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(inner):
            fn()
        per.append((time.process_time() - t) / inner * 1e6)
    return min(per)


def make_floor(torch):
    class Floor(torch.autograd.Function):
        """The least a Python launcher costs: allocate the outputs, launch nothing."""

        @staticmethod
        def forward(ctx, x, *params):
            ctx.save_for_backward(x, *params)
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, dy):
            x, *params = ctx.saved_tensors
            return (torch.empty_like(x), *(torch.empty_like(p) for p in params))

    return Floor


def cases(torch):
    import normlab.functional as NF
    from normlab import kernels as K

    bf = torch.bfloat16

    def p(c, dt=bf):
        return torch.randn(c, dtype=dt).requires_grad_()

    out = []
    x = torch.randn(8, 1024, dtype=bf).requires_grad_()
    w, b = p(1024), p(1024)
    out.append(("layer_norm 8x1024 bf16", (x, w, b),
                lambda: K.unchecked.layer_norm(x, (1024,), w, b),
                lambda: NF.layer_norm(x, (1024,), w, b),
                lambda: K.supports("layer_norm", x, (1024,), w, b)))
    out.append(("rms_norm 8x1024 bf16", (x, w),
                lambda: K.unchecked.rms_norm(x, (1024,), w, 1e-6),
                lambda: NF.rms_norm(x, (1024,), w, 1e-6),
                lambda: K.supports("rms_norm", x, (1024,), w, 1e-6)))
    for layout in ("nchw", "cl"):
        xc = torch.randn(2, 64, 4, 4, dtype=bf)
        if layout == "cl":
            xc = xc.contiguous(memory_format=torch.channels_last)
        xc.requires_grad_()
        wc, bc = p(64), p(64)
        out.append((f"group_norm 2x64x4x4 bf16 {layout}", (xc, wc, bc),
                    lambda xc=xc, wc=wc, bc=bc: K.unchecked.group_norm(xc, 32, wc, bc),
                    lambda xc=xc, wc=wc, bc=bc: NF.group_norm(xc, 32, wc, bc),
                    lambda xc=xc, wc=wc, bc=bc: K.supports("group_norm", xc, 32, wc, bc)))
        wf, bf_ = p(64, torch.float32), p(64, torch.float32)
        rm, rv = torch.zeros(64), torch.ones(64)
        out.append((f"batch_norm 2x64x4x4 bf16 {layout} train", (xc, wf, bf_),
                    lambda xc=xc, wf=wf, bf_=bf_, rm=rm, rv=rv: K.unchecked.batch_norm(xc, rm, rv, wf, bf_, True, 0.1, 1e-5),
                    lambda xc=xc, wf=wf, bf_=bf_, rm=rm, rv=rv: NF.batch_norm(xc, rm, rv, wf, bf_, True, 0.1, 1e-5),
                    lambda xc=xc, wf=wf, bf_=bf_, rm=rm, rv=rv: K.supports("batch_norm", xc, rm, rv, wf, bf_, True, 0.1, 1e-5)))
    xi = torch.randn(2, 64, 4, 4, dtype=bf).requires_grad_()
    wi, bi = p(64), p(64)
    out.append(("instance_norm 2x64x4x4 bf16", (xi, wi, bi),
                lambda: K.unchecked.instance_norm(xi, wi, bi),
                lambda: NF.instance_norm(xi, weight=wi, bias=bi),
                lambda: K.supports("instance_norm", xi, wi, bi)))
    xm = torch.randn(4, 64, 32, dtype=bf).requires_grad_()
    mask = torch.arange(32)[None, :] < torch.tensor([32, 20, 9, 1])[:, None]
    wm, bm = p(64, torch.float32), p(64, torch.float32)
    rmm, rvm = torch.zeros(64), torch.ones(64)
    out.append(("masked_batch_norm 4x64x32 bf16 train", (xm, wm, bm),
                lambda: K.unchecked.masked_batch_norm(xm, mask, rmm, rvm, wm, bm, True, 0.1, 1e-5),
                lambda: NF.masked_batch_norm(xm, mask, rmm, rvm, wm, bm, True, 0.1, 1e-5),
                lambda: K.supports("masked_batch_norm", xm, mask, rmm, rvm, wm, bm, True, 0.1, 1e-5)))
    return out


def measure(torch, Floor, leaves, kfn, rounds, inner) -> dict:
    """fwd, bwd and fwd+bwd of ``kfn`` (launches counted) and of the floor, in µs."""
    y = kfn()
    dy = torch.randn_like(y)
    fy = Floor.apply(*leaves)
    row = {}
    for mode, fn in (("fwd", kfn),
                     ("bwd", lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)),
                     ("fwd+bwd", lambda: torch.autograd.grad(kfn(), leaves, dy))):
        _Launches.count = 0
        fn()
        row[f"{mode}_launches"] = _Launches.count
        row[f"{mode}_us"] = timeit(fn, rounds, inner)
    for mode, fn in (("fwd", lambda: Floor.apply(*leaves)),
                     ("bwd", lambda: torch.autograd.grad(fy, leaves, dy, retain_graph=True)),
                     ("fwd+bwd", lambda: torch.autograd.grad(Floor.apply(*leaves), leaves, dy))):
        row[f"floor_{mode}_us"] = timeit(fn, rounds, inner)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default=str(ROOT / "src"), help="the src/ folder whose normlab to measure")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(args.src).resolve()))
    import torch

    import normlab

    torch.set_num_threads(1)
    stubbed = stub_kernels()
    normlab.set_backend("triton")
    Floor = make_floor(torch)

    print(f"# normlab from {normlab.__file__}")
    print(f"# {len(stubbed)} kernels stubbed; µs of CPU time per call, fastest of {args.rounds} rounds x {args.inner} calls;"
          " Triton launch cost excluded (launches per call in brackets)")
    print("# floor: an autograd.Function over the same leaves that only allocates y, then dx, dw, db")
    print(f"{'case':40s} {'supports':>9s} {'functional':>11s} {'fwd':>12s} {'bwd':>12s} {'fwd+bwd':>12s}"
          f" {'floor fwd':>9s} {'bwd':>6s} {'fwd+bwd':>8s}")
    rows = []
    todo = cases(torch)
    for _ in range(100):  # warm every path first: the first case measured came out slow otherwise
        for _name, leaves, kfn, ffn, sfn in todo:
            sfn(), ffn()
            y = kfn()
            torch.autograd.grad(y, leaves, torch.ones_like(y))
    for name, leaves, kfn, ffn, sfn in todo:
        ok, why = sfn()
        assert ok, (name, why)
        row = measure(torch, Floor, leaves, kfn, args.rounds, args.inner)
        row.update(case=name, supports_us=timeit(sfn, args.rounds, args.inner),
                   functional_us=timeit(ffn, args.rounds, args.inner))
        rows.append(row)
        print(f"{name:40s} {row['supports_us']:9.1f} {row['functional_us']:11.1f} "
              + " ".join(f"{row[f'{m}_us']:9.1f} [{row[f'{m}_launches']}]" for m in ("fwd", "bwd", "fwd+bwd"))
              + f" {row['floor_fwd_us']:9.1f} {row['floor_bwd_us']:6.1f} {row['floor_fwd+bwd_us']:8.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"src": args.src, "rows": rows,
                                               "load_average": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
