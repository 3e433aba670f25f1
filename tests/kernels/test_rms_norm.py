"""normlab.kernels.rms_norm against torch.nn.functional.rms_norm: outputs, dx, dw."""
import importlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the kernel tests need triton")

import normlab  # noqa: E402
from normlab import _backend, kernels  # noqa: E402
from kernels.ktest import assert_close, assert_grads_close, cpu, gpu, grads, leaf  # noqa: E402

ln_mod = importlib.import_module("normlab.kernels.layer_norm")

SHAPES = [((1, 1), 1), ((3, 37), 37), ((2, 1023), 1023), ((17, 64), 64), ((2, 3, 5, 7), (5, 7))]


def _case(shape, nshape, dtype, device, affine=True):
    nshape = (nshape,) if isinstance(nshape, int) else nshape
    x = leaf(torch.randn(shape, dtype=dtype, device=device))
    w = leaf(torch.randn(nshape, dtype=dtype, device=device)) if affine else None
    dy = torch.randn(shape, dtype=dtype, device=device)
    return x, nshape, w, dy


def _check(x, nshape, w, dy, dtype, ref_dtype=torch.float64, eps=None):
    y, g = grads(lambda x, w: kernels.rms_norm(x, nshape, w, eps), (x, w), dy)
    assert y.dtype == x.dtype
    up = lambda t: None if t is None else leaf(t.to(ref_dtype), t.requires_grad)  # noqa: E731
    # eps=None means the epsilon of the computation dtype (float32 for half inputs), as torch,
    # also for the upcast reference
    e = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps if eps is None else eps
    yr, gr = grads(lambda x, w: F.rms_norm(x, nshape, w, e), (up(x), up(w)), dy.to(ref_dtype))
    assert_close(y, yr, dtype, "y")
    assert_grads_close(g, gr, dtype, names=("dx", "dw"), check_dtype=True)


@cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,nshape", SHAPES)
def test_matches_torch(shape, nshape, dtype):
    _check(*_case(shape, nshape, dtype, "cpu"), dtype)


@cpu
def test_dw_sums_partials_over_several_blocks(monkeypatch):
    # More backward programs (dw partial rows) than the final sum adds per step, as on a GPU
    monkeypatch.setitem(ln_mod.TUNING, "bwd_tile", 8)
    monkeypatch.setitem(ln_mod.TUNING, "partials_block", 4)
    _check(*_case((70, 8), 8, torch.float64, "cpu"), torch.float64)


@cpu
@pytest.mark.parametrize("eps", [None, 1e-6, 0.5])
def test_eps_and_no_weight(eps):
    _check(*_case((5, 37), 37, torch.float64, "cpu", affine=eps is None), torch.float64, eps=eps)


@cpu
def test_eps_none_is_finfo_eps():
    x = torch.randn(3, 37) * 1e-4  # small enough for eps to matter
    assert_close(kernels.rms_norm(x, (37,)), F.rms_norm(x.double(), (37,), eps=torch.finfo(torch.float32).eps), torch.float32, "y")


@cpu
def test_many_programs_and_steps(monkeypatch):
    monkeypatch.setitem(ln_mod.TUNING, "fwd_tile", 64)
    monkeypatch.setitem(ln_mod.TUNING, "fwd_tile_short", 64)
    monkeypatch.setitem(ln_mod.TUNING, "bwd_tile", 32)
    monkeypatch.setitem(ln_mod.TUNING, "bwd_programs_per_sm", 1)
    _check(*_case((37, 16), 16, torch.float64, "cpu"), torch.float64)


@cpu
def test_long_rows_split_over_programs(monkeypatch):
    monkeypatch.setitem(ln_mod.TUNING, "bwd_max_own", 8)
    _check(*_case((6, 37), 37, torch.float64, "cpu"), torch.float64)


@cpu
def test_supports():
    assert kernels.supports("rms_norm", torch.randn(4, 8), (8,), torch.ones(8), None)[0]
    for ok, reason in [
        kernels.supports("rms_norm", torch.randn(2, ln_mod.MAX_N + 1), (ln_mod.MAX_N + 1,)),
        kernels.supports("rms_norm", torch.randn(8, 4).t(), (8,)),
        kernels.supports("rms_norm", torch.randn(4, 8), (8,), torch.ones(7)),
        kernels.supports("rms_norm", torch.randn(4, 8), (8,), None, None, "extra"),
    ]:
        assert not ok and reason


@cpu
def test_dispatcher_picks_the_kernel():
    x = torch.randn(3, 37)
    with normlab.backend("triton"):
        assert _backend.use_triton("rms_norm", x, lambda: kernels.supports("rms_norm", x, (37,)))
        y = kernels.rms_norm(x, (37,))
    assert _backend.last_choice()[1] == "triton"
    assert_close(y, F.rms_norm(x.double(), (37,), eps=torch.finfo(torch.float32).eps), torch.float32, "y")


# ---------------------------------------------------------------------------- GPU
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,N", [(4096, 1024), (1000, 4096), (257, 16384), (4097, 37), (8192, 512)])
def test_gpu_matches_torch(M, N, dtype):
    x, nshape, w, dy = _case((M, N), N, dtype, "cuda")
    _check(x, nshape, w, dy, dtype, ref_dtype=torch.float32)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large_mean(dtype):
    x = leaf((1000 + torch.randn(512, 4096, device="cuda")).to(dtype))
    w = leaf(torch.randn(4096, device="cuda", dtype=dtype))
    dy = torch.randn(512, 4096, device="cuda", dtype=dtype)
    _check(x, (4096,), w, dy, dtype, ref_dtype=torch.float64)


@gpu
def test_gpu_bitwise_deterministic():
    x, nshape, w, dy = _case((8192, 2048), 2048, torch.bfloat16, "cuda")
    (y1, g1), (y2, g2) = [grads(lambda x, w: kernels.rms_norm(x, nshape, w), (x, w), dy) for _ in range(2)]
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


@cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eps_none_for_half_inputs_is_float32s_epsilon_as_torch(dtype):
    # float16's own epsilon (9.8e-4) would swamp the mean square of small inputs
    x = (torch.randn(4, 64) * 0.03).to(dtype)
    y = kernels.rms_norm(x, (64,))
    want = F.rms_norm(x.double(), (64,), eps=torch.finfo(torch.float32).eps)
    assert_close(y, want, dtype, "y")
    assert_close(F.rms_norm(x, (64,)).double(), want, dtype, "torch's own")  # torch's rule, checked
