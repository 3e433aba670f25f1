"""normlab.kernels.layer_norm against torch.nn.functional.layer_norm: outputs, dx, dw, db."""
import importlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the kernel tests need triton")

import normlab  # noqa: E402
from normlab import _backend, kernels  # noqa: E402
from kernels.ktest import assert_close, assert_grads_close, cpu, gpu, grads, leaf  # noqa: E402

ln_mod = importlib.import_module("normlab.kernels.layer_norm")

SHAPES = [((1, 1), 1), ((3, 37), 37), ((2, 1023), 1023), ((17, 64), 64), ((2, 3, 5, 7), (5, 7)), ((4, 2, 1), 1)]


def _case(shape, nshape, dtype, device, affine=(True, True)):
    nshape = (nshape,) if isinstance(nshape, int) else nshape
    x = leaf(torch.randn(shape, dtype=dtype, device=device))
    w = leaf(torch.randn(nshape, dtype=dtype, device=device)) if affine[0] else None
    b = leaf(torch.randn(nshape, dtype=dtype, device=device)) if affine[1] else None
    dy = torch.randn(shape, dtype=dtype, device=device)
    return x, nshape, w, b, dy


def _check(x, nshape, w, b, dy, dtype, ref_dtype=torch.float64, eps=1e-5):
    y, g = grads(lambda x, w, b: kernels.layer_norm(x, nshape, w, b, eps), (x, w, b), dy)
    assert y.dtype == x.dtype
    up = lambda t: None if t is None else leaf(t.to(ref_dtype), t.requires_grad)  # noqa: E731
    yr, gr = grads(lambda x, w, b: F.layer_norm(x, nshape, w, b, eps), (up(x), up(w), up(b)), dy.to(ref_dtype))
    assert_close(y, yr, dtype, "y")
    assert_grads_close(g, gr, dtype, check_dtype=True)


@cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,nshape", SHAPES)
def test_matches_torch(shape, nshape, dtype):
    _check(*_case(shape, nshape, dtype, "cpu"), dtype)


@cpu
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)])
def test_without_affine(affine):
    _check(*_case((5, 37), 37, torch.float64, "cpu", affine), torch.float64)


@cpu
def test_saves_native_layer_norm_stats():
    x = torch.randn(6, 37, dtype=torch.float64)
    _, mean, rstd = ln_mod.forward(x, None, None, 1e-5, rms=False)
    _, mean_r, rstd_r = torch.native_layer_norm(x, (37,), None, None, 1e-5)
    assert_close(mean, mean_r.view(-1), torch.float64, "mean")
    assert_close(rstd, rstd_r.view(-1), torch.float64, "rstd")


@cpu
def test_large_mean_is_stable():
    # 1000 +- 1 in float32: E[x^2] - E[x]^2 would lose ~all digits of the variance.
    x = leaf((1000 + torch.randn(8, 1023)).float())
    dy = torch.randn(8, 1023)
    y, (dx,) = grads(lambda x: kernels.layer_norm(x, (1023,)), (x,), dy)
    yr, (dxr,) = grads(lambda x: F.layer_norm(x, (1023,)), (leaf(x.double()),), dy.double())
    assert_close(y, yr, torch.float32, "y", scale=40)  # the input's own rounding at 1000 is 6e-5
    assert_close(dx, dxr, torch.float32, "dx", scale=40)


@cpu
def test_strided_rows_without_copy():
    base = torch.randn(6, 50, dtype=torch.float64)
    x = base[:, 3:40].detach().requires_grad_()  # row stride 50, columns contiguous
    assert not x.is_contiguous() and ln_mod.as_rows(x, 37) is not None
    _check(x, (37,), leaf(torch.randn(37, dtype=torch.float64)), None, torch.randn(6, 37, dtype=torch.float64), torch.float64)


@cpu
@pytest.mark.parametrize("prefetch", [True, False])
def test_many_programs_and_steps(prefetch, monkeypatch):
    # Small tiles: several rows per program, several steps per backward program, many partials.
    monkeypatch.setitem(ln_mod.TUNING, "bwd_prefetch", prefetch)
    monkeypatch.setitem(ln_mod.TUNING, "fwd_tile", 64)
    monkeypatch.setitem(ln_mod.TUNING, "fwd_tile_short", 64)
    monkeypatch.setitem(ln_mod.TUNING, "bwd_tile", 32)
    monkeypatch.setitem(ln_mod.TUNING, "bwd_programs_per_sm", 1)
    _check(*_case((37, 16), 16, torch.float64, "cpu"), torch.float64)
    _check(*_case((37, 5), 5, torch.float64, "cpu"), torch.float64)


@cpu
def test_dw_db_sum_partials_over_several_blocks(monkeypatch):
    # More backward programs (dw/db partial rows) than the final sum adds per step, as on a GPU
    monkeypatch.setitem(ln_mod.TUNING, "bwd_tile", 8)
    monkeypatch.setitem(ln_mod.TUNING, "partials_block", 4)
    _check(*_case((70, 8), 8, torch.float64, "cpu"), torch.float64)


@cpu
@pytest.mark.parametrize("affine", [(True, True), (False, False)])
def test_long_rows_split_over_programs(affine, monkeypatch):
    # The path of N = 16384 on a GPU: columns split over neighbouring backward programs.
    monkeypatch.setitem(ln_mod.TUNING, "bwd_max_own", 8)
    _check(*_case((6, 37), 37, torch.float64, "cpu", affine), torch.float64)


@cpu
def test_supports():
    x = torch.randn(4, 8)
    assert kernels.supports("layer_norm", x, (8,), torch.ones(8), torch.zeros(8))[0]
    assert kernels.supports("layer_norm", x, normalized_shape=8)[0]
    no = [
        kernels.supports("layer_norm", torch.randn(2, ln_mod.MAX_N + 1), (ln_mod.MAX_N + 1,)),
        kernels.supports("layer_norm", torch.randn(2, ln_mod.MAX_N_FLOAT64 + 1, dtype=torch.float64), (ln_mod.MAX_N_FLOAT64 + 1,)),
        kernels.supports("layer_norm", torch.randint(0, 3, (4, 8)), (8,)),
        kernels.supports("layer_norm", torch.randn(8, 4).t(), (8,)),  # columns not unit-stride
        kernels.supports("layer_norm", x, (8,), torch.ones(8, dtype=torch.int32)),
        kernels.supports("layer_norm", x, (8,), torch.ones(16)),
        kernels.supports("layer_norm", x, (4,)),
        kernels.supports("layer_norm", torch.randn(0, 8), (8,)),
        kernels.supports("no_such_norm", x),
    ]
    for ok, reason in no:
        assert not ok and reason


@cpu
def test_supports_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = kernels.supports("layer_norm", torch.randn(4, 8), (8,))
    assert not ok and "CUDA" in reason


@cpu
def test_dispatcher_picks_the_kernel():
    x, w = torch.randn(3, 37), torch.randn(37)
    try:
        normlab.set_backend("triton")
        assert _backend.use_triton("layer_norm", x, lambda: kernels.supports("layer_norm", x, (37,), w, None))
        assert _backend.last_choice()[:2] == ("layer_norm", "triton")
        y = kernels.layer_norm(x, (37,), w)
        normlab.set_backend("torch")
        assert not _backend.use_triton("layer_norm", x, lambda: kernels.supports("layer_norm", x, (37,), w, None))
    finally:
        normlab.set_backend(None)
    assert_close(y, F.layer_norm(x.double(), (37,), w.double()), torch.float32, "y")


@cpu
def test_bitwise_deterministic():
    x, nshape, w, b, dy = _case((37, 23), 23, torch.float32, "cpu")
    runs = [grads(lambda x, w, b: kernels.layer_norm(x, nshape, w, b), (x, w, b), dy) for _ in range(2)]
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


# ---------------------------------------------------------------------------- GPU
GPU_SHAPES = [(4096, 1024), (1000, 4096), (257, 16384), (4097, 37), (3, 1), (8192, 512)]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,N", GPU_SHAPES)
def test_gpu_matches_torch(M, N, dtype):
    x, nshape, w, b, dy = _case((M, N), N, dtype, "cuda")
    # Ground truth: the same rounded inputs, all math in float32.
    _check(x, nshape, w, b, dy, dtype, ref_dtype=torch.float32)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large_mean(dtype):
    x = leaf((1000 + torch.randn(512, 4096, device="cuda")).to(dtype))
    dy = torch.randn(512, 4096, device="cuda", dtype=dtype)
    y, (dx,) = grads(lambda x: kernels.layer_norm(x, (4096,)), (x,), dy)
    yr, (dxr,) = grads(lambda x: F.layer_norm(x, (4096,)), (leaf(x.double()),), dy.double())
    assert_close(y, yr, dtype, "y")
    assert_close(dx, dxr, dtype, "dx")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_bitwise_deterministic(dtype):
    x, nshape, w, b, dy = _case((8192, 1024), 1024, dtype, "cuda")
    (y1, g1), (y2, g2) = [grads(lambda x, w, b: kernels.layer_norm(x, nshape, w, b), (x, w, b), dy) for _ in range(2)]
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def _second_order_case(op: str, eps: float):
    """``(f(x, w, b), r, (x, w, b), (running_mean, running_var))`` for the second-order tests: a
    tiny float64 case of ``op`` (training ops update clones of the running buffers, evaluation
    ops read the buffers themselves) and ``r(*shape)``, more numbers from the same generator."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    rows = op in ("layer_norm", "rms_norm")
    x, w, b = leaf(r(2, 3, 4) if rows else r(2, 4, 3)), leaf(r(4)), leaf(r(4))
    rm, rv = r(4), r(4).abs() + 0.5
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    f = {
        "layer_norm": lambda x, w, b: kernels.layer_norm(x, (4,), w, b, eps),
        "rms_norm": lambda x, w, b: kernels.rms_norm(x, (4,), w, eps),
        "group_norm": lambda x, w, b: kernels.group_norm(x, 2, w, b, eps),
        "instance_norm": lambda x, w, b: kernels.instance_norm(x, w, b, eps),
        "batch_norm train": lambda x, w, b: kernels.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, eps),
        "batch_norm eval": lambda x, w, b: kernels.batch_norm(x, rm, rv, w, b, False, 0.1, eps),
        "masked train": lambda x, w, b: kernels.masked_batch_norm(x, mask, rm.clone(), rv.clone(), w, b, True, 0.1,
                                                                 eps),
        "masked eval": lambda x, w, b: kernels.masked_batch_norm(x, mask, rm, rv, w, b, False, 0.1, eps),
    }[op]
    return f, r, (x, w, b), (rm, rv)


@cpu
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm train",
                                "batch_norm eval", "masked train", "masked eval"])
def test_double_backward_is_exact(op):
    """With create_graph=True the gradients come from torch's differentiable ops on the saved
    inputs: second derivatives match (gradgradcheck), also for a constant incoming gradient
    (where a once-differentiable backward returned gradients without a graph: silent zeros)."""
    f, r, (x, w, b), _ = _second_order_case(op, 1e-5)
    assert torch.autograd.gradgradcheck(f, (x, w, b), fast_mode=True)
    weight = r(*x.shape)
    (gx,) = torch.autograd.grad((f(x, w, b) * weight).sum(), (x,), create_graph=True)
    assert gx.requires_grad  # a constant incoming gradient still gives a differentiable dx


@cpu
def test_double_backward_of_group_norm_with_a_bias_but_no_weight():
    """torch's own group_norm backward fails on a bias without a weight; the recompute passes ones."""
    x, b = leaf(torch.randn(2, 6, 3, dtype=torch.float64)), leaf(torch.randn(6, dtype=torch.float64))
    assert torch.autograd.gradgradcheck(lambda x, b: kernels.group_norm(x, 3, None, b), (x, b), fast_mode=True)


@cpu
@pytest.mark.parametrize("op", ["layer_norm", "group_norm"])
def test_create_graph_gradients_of_half_input_match_the_kernels(op):
    """bfloat16 input with float32 parameters: the recompute runs in float32 as the kernels do, so
    the first-order gradients with create_graph=True equal the fast backward's within bfloat16."""
    g = torch.Generator().manual_seed(0)
    x = leaf(torch.randn(4, 6, 8, generator=g).bfloat16())
    w, b = leaf(torch.randn(8 if op == "layer_norm" else 6, generator=g)), leaf(torch.randn(8 if op == "layer_norm" else 6, generator=g))
    f = (lambda x, w, b: kernels.layer_norm(x, (8,), w, b)) if op == "layer_norm" else (
        lambda x, w, b: kernels.group_norm(x, 3, w, b))
    dy = torch.randn(4, 6, 8, generator=g).bfloat16()
    fast = torch.autograd.grad(f(x, w, b), (x, w, b), dy)
    graph = torch.autograd.grad(f(x, w, b), (x, w, b), dy, create_graph=True)
    for a, r in zip(graph, fast):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2)


@cpu
@pytest.mark.parametrize("own", [8, 32])
@pytest.mark.parametrize("rms", [False, True])
def test_long_rows_split_last_part_holds_data(own, rms, monkeypatch):
    """Wrong version (layer_norm.py: ``range(0, SPLIT)`` -> ``range(0, SPLIT - 1)``): the row
    sums of split programs skip the last column part. The existing split test (N=37, own=8)
    has an all-padding last part (cols 56..63), so dropping it changed nothing; N=57 puts data
    there (own=32: SPLIT=2, the GPU's N=16384 layout)."""
    monkeypatch.setitem(ln_mod.TUNING, "bwd_max_own", own)
    N = 57
    x = leaf(torch.randn(5, N, dtype=torch.float64))
    w = leaf(torch.randn(N, dtype=torch.float64))
    b = None if rms else leaf(torch.randn(N, dtype=torch.float64))
    dy = torch.randn(5, N, dtype=torch.float64)
    if rms:
        f, ref = (lambda x, w: kernels.rms_norm(x, (N,), w, 1e-5)), (lambda x, w: F.rms_norm(x, (N,), w, 1e-5))
        ins = (x, w)
    else:
        f, ref = (lambda x, w, b: kernels.layer_norm(x, (N,), w, b)), (lambda x, w, b: F.layer_norm(x, (N,), w, b))
        ins = (x, w, b)
    y, g = grads(f, ins, dy)
    yr, gr = grads(ref, tuple(leaf(t) for t in ins), dy)
    assert_close(y, yr, torch.float64, "y")
    for name, a, r in zip(("dx", "dw", "db"), g, gr):
        assert_close(a, r, torch.float64, name)


@cpu
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_non_contiguous_output_gradient(op):
    """Wrong version (layer_norm.py: drop ``dy = dy.contiguous()``): the backward kernel reads dy
    as ``rows * N + cols``; a transposed (or expanded) incoming gradient must be made contiguous
    first. No existing test hands the kernels a non-contiguous dy."""
    x = leaf(torch.randn(6, 37, dtype=torch.float64))
    w = leaf(torch.randn(37, dtype=torch.float64))
    dy = torch.randn(37, 6, dtype=torch.float64).t()
    assert not dy.is_contiguous()
    if op == "layer_norm":
        f, ref = (lambda x, w: kernels.layer_norm(x, (37,), w)), (lambda x, w: F.layer_norm(x, (37,), w))
    else:
        f, ref = (lambda x, w: kernels.rms_norm(x, (37,), w, 1e-5)), (lambda x, w: F.rms_norm(x, (37,), w, 1e-5))
    _, g = grads(f, (x, w), dy)
    _, gr = grads(ref, (leaf(x), leaf(w)), dy.contiguous())
    assert_close(g[0], gr[0], torch.float64, "dx")
    assert_close(g[1], gr[1], torch.float64, "dw")


@cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_supports_takes_rows_of_exactly_max_n(dtype):
    """Wrong version (_supports.py: ``N > max_n`` -> ``N >= max_n``): the largest row the kernels
    hold is accepted (only MAX_N + 1 was tested). Meta tensors: nothing is allocated."""
    n = ln_mod.max_n(dtype)
    for op in ("layer_norm", "rms_norm"):
        ok, why = kernels.supports(op, torch.empty(2, n, dtype=dtype, device="meta"), (n,))
        assert ok, why


@cpu
def test_supports_refuses_2_to_the_31_elements():
    """Wrong version (_supports.py: ``n >= 2**31`` -> ``n > 2**31``): exactly 2**31 elements
    overflows the kernels' int32 offsets and is refused (a meta tensor, nothing allocated)."""
    ok, why = kernels.supports("layer_norm", torch.empty(2**28, 8, device="meta"), (8,))
    assert not ok and "2**31" in why
    ok, why = kernels.supports("layer_norm", torch.empty(2**31 - 8, device="meta").view(-1, 8), (8,))
    assert ok, why


@cpu
def test_supports_refuses_an_eps_that_is_not_a_number():
    """Wrong version (_supports.py: the eps check removed)."""
    ok, why = kernels.supports("layer_norm", torch.randn(4, 8), (8,), None, None, "1e-5")
    assert not ok and "eps" in why


@cpu
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_a_weight_of_another_shape_than_normalized_shape_is_refused(op):
    """Wrong version (_supports.py: the weight's element count checked, not its shape): a kernel
    called directly with a (4, 3) weight for normalized_shape (3, 4) read it flat and returned
    numbers with the weights on the wrong features, where torch raises. Now supports refuses it,
    so the call is a ValueError naming the shape (the functional tier refuses it before)."""
    x, w = torch.randn(2, 3, 4), torch.randn(3, 4)
    fn = getattr(kernels, op)
    for bad in (w.t().contiguous(), w.reshape(12), w.reshape(1, 3, 4)):
        with pytest.raises(ValueError, match=r"weight has shape .*expected normalized_shape \(3, 4\)"):
            fn(x, (3, 4), bad)
        with pytest.raises(RuntimeError):
            getattr(F, op)(x, (3, 4), bad)
    assert_close(fn(x, (3, 4), w), getattr(F, op)(x.double(), (3, 4), w.double()), torch.float32, "y")
    assert kernels.supports("layer_norm", torch.randn(2, 5), 5, torch.ones(5), torch.ones(5))[0]
    ok, why = kernels.supports("layer_norm", torch.randn(2, 5), 5, None, torch.ones(1, 5))
    assert not ok and why.startswith("bias has shape (1, 5)")


@cpu
@pytest.mark.parametrize("rms", [False, True])
def test_module_level_backward_matches_native_layer_norm_backward(rms):
    """Wrong version (layer_norm.py ``backward``: ``torch.cat([mean, rstd])`` -> ``[rstd, mean]``):
    the module-level ``forward``/``backward`` pair (the ``torch.native_layer_norm`` contract, for
    callers outside autograd) had its backward untested."""
    x = torch.randn(6, 37, dtype=torch.float64)
    w, b = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    dy = torch.randn(6, 37, dtype=torch.float64)
    if rms:
        _, mean, rstd = ln_mod.forward(x, w, None, 1e-5, rms=True)
        dx, dw, db = ln_mod.backward(dy, x, w, None, mean, rstd, True, True, False)
        _, gr = grads(lambda x, w: F.rms_norm(x, (37,), w, 1e-5), (leaf(x), leaf(w)), dy)
        assert db is None
        assert_grads_close((dx, dw), gr, torch.float64, names=("dx", "dw"))
        return
    _, mean, rstd = ln_mod.forward(x, w, b, 1e-5, rms=False)
    got = ln_mod.backward(dy, x, w, b, mean, rstd, False, True, True)
    _, m_r, r_r = torch.native_layer_norm(x, (37,), w, b, 1e-5)
    want = torch.ops.aten.native_layer_norm_backward(dy, x, (37,), m_r, r_r, w, b, (True, True, True))
    assert_grads_close(got, want, torch.float64)


@cpu
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "group_norm", "batch_norm train", "batch_norm eval",
                                "masked train", "masked eval"])
def test_create_graph_gradients_equal_the_closed_form_ones(op):
    """Wrong versions (layer_norm.py / _channel_norm.py ``_recompute``: ``ctx.eps`` -> ``1e-5``;
    ``ctx.fixed`` set to None or ignored, so evaluation recomputes with the batch's statistics;
    the evaluation statistics not copied, so a running buffer moved in place between forward and
    backward is what the recompute reads). ``gradgradcheck`` cannot see these: it checks the
    recompute against itself. With ``create_graph=True`` the first-order gradients must be those
    of the closed-form backward, which are torch's."""
    f3, r, (x, w, b), (rm, rv) = _second_order_case(op, 0.5)  # eps far from every default
    f = lambda: f3(x, w, b)  # noqa: E731
    ins = (x, w) if op == "rms_norm" else (x, w, b)
    dy = r(*x.shape)
    fast = torch.autograd.grad(f(), ins, dy)
    y = f()
    with torch.no_grad():  # the buffers move after the forward (another module's update, a reset)
        rm.add_(3.0)
        rv.mul_(4.0)
    graph = torch.autograd.grad(y, ins, dy, create_graph=True)
    for name, a, ref in zip(("dx", "dw", "db"), graph, fast):
        torch.testing.assert_close(a, ref, msg=lambda m, name=name: f"{op} {name}: {m}")
