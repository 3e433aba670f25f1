"""``_common.Launch``: the first call goes through ``kernel[grid]``, later ones straight to the
compiled kernel's launcher, and a launcher that refuses the arguments turns that off. The CPU
tests drive it with stand-ins for a Triton kernel; the GPU tests check on real kernels that
the direct path is taken and gives the same numbers, also for inputs that are not 16-byte
aligned (a different specialization, so a different cache entry)."""
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the kernel tests need triton")

from normlab import kernels  # noqa: E402
from normlab.kernels import _common  # noqa: E402
from normlab.kernels._common import Launch  # noqa: E402
from kernels.ktest import assert_close, gpu, grads, leaf  # noqa: E402

ln_mod = importlib.import_module("normlab.kernels.layer_norm")
core = importlib.import_module("normlab.kernels._channel_norm")


class FakeKernel:
    """``kernel[grid](*args, **kw)`` records the call and returns a compiled stand-in whose
    ``[grid]`` launcher records its calls too (or raises TypeError, like a launcher handed the
    wrong number of arguments)."""

    def __init__(self, names, constexprs, launcher_fails=False):
        self.params = [SimpleNamespace(name=n, is_constexpr=n in constexprs) for n in names]
        self.jit_calls, self.direct_calls = [], []
        self.launcher_fails = launcher_fails

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.jit_calls.append((grid, args, kw))
            return _Compiled(self, grid)

        return run


class _Compiled:
    def __init__(self, kernel, grid):
        self.kernel, self.grid = kernel, grid

    def __getitem__(self, grid):
        def launcher(*args):
            if self.kernel.launcher_fails:
                raise TypeError("function takes exactly 3 arguments (4 given)")
            self.kernel.direct_calls.append((grid, args))

        return launcher


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(Launch, "fast", True)


def test_first_call_through_jit_then_direct(fast):
    k = FakeKernel(["x_ptr", "n", "BLOCK"], {"BLOCK"})
    launch = Launch(k, (3,), 4, BLOCK=64)
    launch("x", 10)
    assert k.jit_calls == [((3, 1, 1), ("x", 10), {"BLOCK": 64, "num_warps": 4})] and not k.direct_calls
    launch("y", 10)
    launch("z", 10)
    assert len(k.jit_calls) == 1
    assert k.direct_calls == [((3, 1, 1), ("y", 10, 64)), ((3, 1, 1), ("z", 10, 64))]  # constexprs appended


@pytest.mark.skipif(not _common._triton_at_least(3, 3), reason="no direct path before Triton 3.3")
def test_direct_path_through_tritons_own_launcher_code(fast, monkeypatch):
    """The runner of the installed Triton's ``CompiledKernel[grid]`` (driver and loaded kernel
    stood in for): it gets a 3-D grid and every argument, constexprs last, as ``run`` passes."""
    from triton import knobs
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver

    launched = []
    monkeypatch.setattr(driver, "_active", SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 7))
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
    compiled = object.__new__(CompiledKernel)
    compiled.module, compiled.function, compiled.packed_metadata = object(), "fn", "meta"
    compiled._run = lambda *a: launched.append(a)

    class Kernel(FakeKernel):
        def __getitem__(self, grid):
            return lambda *args, **kw: compiled

    launch = Launch(Kernel(["x_ptr", "n", "BLOCK"], {"BLOCK"}), (5,), 4, BLOCK=64)
    try:
        launch("x", 10)  # through the (stand-in) JIT
        launch("y", 11)  # direct
    finally:
        compiled.module = None  # nothing to unload
    ((gx, gy, gz, stream, fn, meta, _, _enter, _exit, *args),) = launched
    assert (gx, gy, gz, stream, fn, meta, args) == (5, 1, 1, 7, "fn", "meta", ["y", 11, 64]) and Launch.fast


def test_launcher_mismatch_falls_back_for_good(fast):
    k = FakeKernel(["x_ptr", "BLOCK"], {"BLOCK"}, launcher_fails=True)
    launch = Launch(k, (1,), 4, BLOCK=8)
    launch("a")
    with pytest.warns(UserWarning, match="direct Triton launches turned off"):
        launch("b")  # the direct call raises TypeError: relaunched through the JIT, fast path off
    assert [c[1] for c in k.jit_calls] == [("a",), ("b",)] and not Launch.fast
    launch("c")
    assert len(k.jit_calls) == 3 and not k.direct_calls


@pytest.mark.parametrize("names, constexprs", [
    (["x_ptr", "BLOCK", "n"], {"BLOCK"}),  # a constexpr before a runtime argument
    (["x_ptr", "n", "OTHER"], {"OTHER"}),  # constexpr names that differ from the launch's
])
def test_no_direct_path_unless_constexprs_trail_in_order(fast, names, constexprs):
    k = FakeKernel(names, constexprs)
    launch = Launch(k, (1,), 4, BLOCK=8)
    launch("a", 1)
    launch("b", 1)
    assert len(k.jit_calls) == 2 and not k.direct_calls


def test_switched_off(monkeypatch):
    monkeypatch.setattr(Launch, "fast", False)
    k = FakeKernel(["x_ptr", "BLOCK"], {"BLOCK"})
    launch = Launch(k, (1,), 4, BLOCK=8)
    launch("a")
    launch("b")
    assert len(k.jit_calls) == 2 and not k.direct_calls


def test_every_kernel_takes_its_constexprs_last():
    """The launchers' constexpr keywords are each kernel's trailing parameters, in order
    (else the direct path would silently stay off)."""
    import inspect

    import triton.language as tl

    def ok(launch):
        sig = inspect.signature(getattr(launch.kernel, "fn", None) or launch.kernel)
        names = list(sig.parameters)
        cex = [n for n, p in sig.parameters.items() if p.annotation in (tl.constexpr, "tl.constexpr")]
        return cex == [k for k in launch.kw if k != "num_warps"] and names[len(names) - len(cex):] == cex

    dev = "cuda" if torch.cuda.is_available() and not _common.interpreting() else "cpu"
    x, w = torch.randn(6, 37, device=dev), torch.randn(37, device=dev)
    r = ln_mod.plan(x, 37, w, w, False)
    bwd, _, total, _, _ = r.backward(True, True, True)
    launches = [r.fwd, bwd, total]
    xc, p = torch.randn(2, 6, 5, 3, device=dev), torch.ones(6, device=dev)
    for batch in (True, False):
        f = core.forward_plan(xc, 3, batch, True, None, p, p, p.clone(), p.clone())
        b = f.backward(True, True, True)
        launches += [f.stats, f.finalize, f.apply, b.partial, b.finalize, b.apply]
    assert all(ok(launch) for launch in launches)


@pytest.mark.parametrize("module", ["layer_norm", "_channel_norm"])
def test_float_scalars_reach_the_kernels_as_float64(module):
    """Triton passes a Python float to an unannotated parameter as fp32: float64 input would then
    get eps and momentum rounded to float32 (momentum 0.1 -> 0.10000000149: the running
    statistics ~1e-8 off torch's after one step). Those parameters are annotated ``tl.float64``,
    and this reads them as Triton does (a string annotation, under ``from __future__ import
    annotations``, must still be one Triton understands). The interpreter keeps Python floats as
    they are, so only this, the offline sm_90 compile check and the GPU float64 test can see it."""
    import inspect

    from triton.runtime.jit import KernelParam

    mod = importlib.import_module(f"normlab.kernels.{module}")
    found = 0
    for obj in vars(mod).values():
        fn = getattr(obj, "fn", None)
        if fn is None or not callable(fn):
            continue
        for i, p in enumerate(inspect.signature(fn).parameters.values()):
            if p.name in ("eps", "momentum"):
                found += 1
                assert KernelParam(i, p, False, False).annotation_type == "fp64", (fn.__name__, p.name, p.annotation)
    assert found >= (1 if module == "layer_norm" else 2)


# ------------------------------------------------------------------------------------ GPU
@gpu
@pytest.mark.parametrize("op", ["layer_norm", "batch_norm"])
def test_gpu_float64_eps_and_momentum_are_not_rounded_to_float32(op):
    """eps = momentum = 0.1 (not exact in float32) on float64 input: torch's float64 result to
    1e-12, running statistics included, over three steps (fp32 scalars were ~1e-8 off)."""
    torch.manual_seed(0)
    if op == "layer_norm":
        x = torch.randn(64, 333, device="cuda", dtype=torch.float64) * 0.3
        assert_close(kernels.layer_norm(x, (333,), None, None, 0.1), F.layer_norm(x, (333,), None, None, 0.1),
                     torch.float64, "y")
        return
    rm, rv = torch.zeros(16, device="cuda", dtype=torch.float64), torch.ones(16, device="cuda", dtype=torch.float64)
    rm_r, rv_r = rm.cpu(), rv.cpu()
    for _ in range(3):
        x = torch.randn(8, 16, 5, 7, device="cuda", dtype=torch.float64) * 0.3 + 2
        y = kernels.batch_norm(x, rm, rv, None, None, True, 0.1, 0.1)
        yr = F.batch_norm(x.cpu(), rm_r, rv_r, None, None, True, 0.1, 0.1)
        assert_close(y, yr, torch.float64, "y")
    torch.testing.assert_close(rm.cpu(), rm_r, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(rv.cpu(), rv_r, rtol=1e-13, atol=1e-15)


@gpu
def test_gpu_direct_path_taken_and_exact():
    """Three fwd+bwd of each op on one shape: the first through Triton's JIT, the others direct;
    all three bitwise equal and right against torch."""
    assert Launch.fast, "NORMLAB_FAST_LAUNCH=0 or Triton < 3.3: nothing to check"
    torch.manual_seed(0)
    x = leaf(torch.randn(96, 1000, device="cuda", dtype=torch.bfloat16))
    w, b = leaf(torch.randn(1000, device="cuda", dtype=torch.bfloat16)), leaf(torch.randn(1000, device="cuda", dtype=torch.bfloat16))
    dy = torch.randn_like(x)
    runs = [grads(lambda x, w, b: kernels.layer_norm(x, (1000,), w, b), (x, w, b), dy) for _ in range(3)]
    for y, g in runs[1:]:
        assert torch.equal(y, runs[0][0]) and all(torch.equal(a, c) for a, c in zip(g, runs[0][1]))
    r = ln_mod.plan(x, 1000, w, b, False)
    bwd, _, total, _, _ = r.backward(dy.data_ptr() % 16 == 0, True, True)
    assert r.fwd.runner is not None and bwd.runner is not None and total.runner is not None and Launch.fast
    yr, gr = grads(lambda x, w, b: F.layer_norm(x, (1000,), w, b), (leaf(x.float()), leaf(w.float()), leaf(b.float())), dy.float())
    assert_close(runs[2][0], yr, torch.bfloat16, "y")
    for name, a, c in zip(("dx", "dw", "db"), runs[2][1], gr):
        assert_close(a, c, torch.bfloat16, name)

    xc = leaf(torch.randn(4, 64, 9, 7, device="cuda").contiguous(memory_format=torch.channels_last))
    wc, bc = leaf(torch.randn(64, device="cuda")), leaf(torch.randn(64, device="cuda"))
    dyc = torch.randn_like(xc)
    runs = [grads(lambda x, w, b: kernels.group_norm(x, 8, w, b), (xc, wc, bc), dyc) for _ in range(3)]
    for y, g in runs[1:]:
        assert torch.equal(y, runs[0][0]) and all(torch.equal(a, c) for a, c in zip(g, runs[0][1]))
    f = core.forward_plan(xc, 8, False, True, None, wc, bc, None, None)
    bb = f.backward(dyc.data_ptr() % 16 == 0, True, True)
    assert all(launch.runner is not None for launch in (f.stats, f.finalize, f.apply, bb.partial, bb.finalize, bb.apply))
    yr, gr = grads(lambda x, w, b: F.group_norm(x, 8, w, b), (leaf(xc.double()), leaf(wc.double()), leaf(bc.double())), dyc.double())
    assert_close(runs[2][0], yr, torch.float32, "y")
    for name, a, c in zip(("dx", "dw", "db"), runs[2][1], gr):
        assert_close(a, c, torch.float32, name)


@gpu
@pytest.mark.parametrize("op", ["layer_norm", "batch_norm"])
def test_gpu_misaligned_input_after_aligned(op):
    """The same shape at a 2-byte offset after a 16-byte aligned call: Triton must not reuse the
    kernel it specialized for aligned pointers (the cache key holds the alignment)."""
    torch.manual_seed(0)
    buf = leaf(torch.randn(64 * 1024 + 1, device="cuda", dtype=torch.bfloat16))
    aligned, shifted = buf[:-1].view(64, 1024), buf[1:].view(64, 1024)
    assert aligned.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 != 0
    for x in (aligned, shifted, aligned, shifted):
        if op == "layer_norm":
            y, (dx,) = grads(lambda x: kernels.layer_norm(x, (1024,)), (x,), torch.ones_like(x))
            yr, (dxr,) = grads(lambda x: F.layer_norm(x, (1024,)), (leaf(x.float()),), torch.ones_like(x).float())
        else:
            x3 = x.view(8, 8, 1024)
            y, (dx,) = grads(lambda x: kernels.batch_norm(x.view(8, 8, 1024), None, None, training=True), (x,), torch.ones_like(x3))
            yr, (dxr,) = grads(lambda x: F.batch_norm(x.view(8, 8, 1024), None, None, training=True), (leaf(x.float()),), torch.ones_like(x3).float())
        assert_close(y, yr, torch.bfloat16, "y")
        assert_close(dx, dxr, torch.bfloat16, "dx")
