"""normlab.kernels.batch_norm against torch.nn.functional.batch_norm: training steps with
running statistics, then eval; outputs, dx, dw, db; NCHW and channels-last."""
import importlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the kernel tests need triton")

import normlab  # noqa: E402
from normlab import _backend, kernels  # noqa: E402
from kernels.ktest import assert_close, assert_grads_close, cpu, gpu, grads, leaf, to_layout  # noqa: E402
from normlab.functional._core import memory_format_of  # noqa: E402

core = importlib.import_module("normlab.kernels._channel_norm")

SHAPES = [(37, 5), (4, 3, 37), (2, 3, 5, 7), (2, 3, 2, 3, 4), (1, 2, 1023)]


def _steps(shape, dtype, device, channels_last, steps=3, momentum=0.1, eps=1e-5, affine=True, ref_dtype=torch.float64, buffers=True):
    """``steps`` training steps then one eval step, each checked against torch."""
    C = shape[1]
    w = leaf(torch.randn(C, dtype=dtype, device=device)) if affine else None
    b = leaf(torch.randn(C, dtype=dtype, device=device)) if affine else None
    rm = torch.randn(C, dtype=dtype, device=device) if buffers else None
    rv = torch.rand(C, dtype=dtype, device=device) + 0.5 if buffers else None
    rm_r = rm.to(ref_dtype) if buffers else None
    rv_r = rv.to(ref_dtype) if buffers else None
    up = lambda t: None if t is None else leaf(t.to(ref_dtype), t.requires_grad)  # noqa: E731
    for step in range(steps + (1 if buffers else 0)):
        training = step < steps
        x = leaf(to_layout(torch.randn(shape, dtype=dtype, device=device) * 2 + 3, channels_last))
        dy = to_layout(torch.randn(shape, dtype=dtype, device=device), channels_last)
        y, g = grads(lambda x, w, b: kernels.batch_norm(x, rm, rv, w, b, training, momentum, eps), (x, w, b), dy)
        yr, gr = grads(lambda x, w, b: F.batch_norm(x, rm_r, rv_r, w, b, training, momentum, eps), (up(x), up(w), up(b)), dy.to(ref_dtype))
        assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format_of(x))  # torch's layout
        tag = f"step {step} ({'train' if training else 'eval'})"
        assert_close(y, yr, dtype, f"{tag} y")
        assert_grads_close(g, gr, dtype, tag=tag)
        if buffers:
            assert_close(rm, rm_r, dtype, f"{tag} running_mean")
            assert_close(rv, rv_r, dtype, f"{tag} running_var")


@cpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_over_steps(shape, dtype, channels_last):
    _steps(shape, dtype, "cpu", channels_last)


@cpu
@pytest.mark.parametrize("momentum", [0.0, 0.5, 1.0])
def test_momentum(momentum):
    _steps((4, 3, 6), torch.float64, "cpu", False, steps=2, momentum=momentum)


@cpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_no_buffers_no_affine(channels_last):
    _steps((2, 3, 5, 7), torch.float64, "cpu", channels_last, steps=1, affine=False, buffers=False)


@cpu
def test_chunks_blocks_and_loops(monkeypatch):
    monkeypatch.setitem(core.TUNING, "tile", 16)
    monkeypatch.setitem(core.TUNING, "max_channel_block", 4)
    monkeypatch.setitem(core.TUNING, "max_spatial_block", 8)
    monkeypatch.setitem(core.TUNING, "stats_programs_per_sm", 2)
    monkeypatch.setitem(core.TUNING, "finalize_items", 2)  # dw, db: several steps over each channel's partials
    _steps((3, 6, 5, 7), torch.float64, "cpu", False, steps=1)
    _steps((3, 6, 5, 7), torch.float64, "cpu", True, steps=1)
    _steps((37, 5), torch.float64, "cpu", False, steps=1)


@cpu
def test_channels_last_folds_the_batch():
    x = to_layout(torch.randn(4, 3, 5, 7), True)
    g = core.geometry(x, fold_batch=True)
    assert (g.N, g.S, g.cl) == (1, 4 * 35, True)
    assert core.geometry(torch.randn(37, 5), fold_batch=True) == core.Geometry(1, 5, 37, 0, True)


@cpu
def test_large_mean_is_stable():
    x = leaf(to_layout((1000 + torch.randn(8, 4, 33, 31)).float(), True))
    dy = torch.randn(8, 4, 33, 31)
    y, (dx,) = grads(lambda x: kernels.batch_norm(x, None, None, training=True), (x,), dy)
    yr, (dxr,) = grads(lambda x: F.batch_norm(x, None, None, training=True), (leaf(x.double()),), dy.double())
    assert_close(y, yr, torch.float32, "y", scale=40)
    assert_close(dx, dxr, torch.float32, "dx", scale=40)


@cpu
def test_supports():
    x, rm, rv = torch.randn(4, 3, 5), torch.zeros(3), torch.ones(3)
    assert kernels.supports("batch_norm", x, rm, rv, None, None, True)[0]
    assert kernels.supports("batch_norm", x, None, None, training=True)[0]
    assert kernels.supports("batch_norm", to_layout(torch.randn(2, 3, 4, 5), True), rm, rv)[0]
    for ok, reason in [
        kernels.supports("batch_norm", x, None, None, training=False),
        kernels.supports("batch_norm", x, rm, None, training=True),
        kernels.supports("batch_norm", x, rm, rv, training=True, momentum=None),
        kernels.supports("batch_norm", x, torch.zeros(4), rv, training=True),
        kernels.supports("batch_norm", x, rm, torch.ones(4), training=True),
        kernels.supports("batch_norm", x, rm, rv, torch.ones(4), training=True),
        kernels.supports("batch_norm", x, rm, rv, None, torch.ones(2), training=True),
        kernels.supports("batch_norm", x, rm, rv, torch.ones(1, 3, 1), training=True),  # 3 values, not a vector
        kernels.supports("batch_norm", x.transpose(0, 2), rm, rv),
        kernels.supports("batch_norm", torch.randn(5), None, None, training=True),
    ]:
        assert not ok and reason


@cpu
def test_dispatcher_picks_the_kernel():
    x, rm, rv = torch.randn(4, 3, 5), torch.zeros(3), torch.ones(3)
    with normlab.backend("triton"):
        assert _backend.use_triton("batch_norm", x, lambda: kernels.supports("batch_norm", x, rm, rv, None, None, True))
        y = kernels.batch_norm(x, rm, rv, training=True)
    assert_close(y, F.batch_norm(x.double(), None, None, training=True), torch.float32, "y")


@cpu
def test_functional_momentum_none_with_running_buffers_is_torchs_error_on_either_backend():
    """normlab.functional.batch_norm(momentum=None) with running buffers to update is torch's
    TypeError on the torch path; the triton backend skipped the update silently (the dispatcher
    was not given momentum, so its refusal never fired): now it falls back, with that reason."""
    import normlab.functional as NF

    x = torch.randn(4, 3, 5)
    for name in ("torch", "triton"):
        rm, rv = torch.zeros(3), torch.ones(3)
        with normlab.backend(name), pytest.raises(TypeError, match="momentum"):
            NF.batch_norm(x, rm, rv, training=True, momentum=None)
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
        if name == "triton":
            assert _backend.last_choice()[1] == "torch" and "momentum=None" in _backend.last_choice()[2]


@cpu
def test_interpreter_switched_on_after_the_kernels_were_defined_falls_back(monkeypatch):
    """TRITON_INTERPRET=1 set after normlab.kernels was imported: the kernels are compiled (CUDA
    only), so a CPU input must take torch's path, saying why, instead of failing in Triton's
    launcher ("0 active drivers")."""
    from normlab.kernels import _supports

    monkeypatch.setattr(_supports, "_INTERPRET_AT_IMPORT", False)
    ok, reason = kernels.supports("batch_norm", torch.randn(4, 3, 5), None, None, training=True)
    assert not ok and "set after normlab.kernels was imported" in reason


@cpu
def test_bitwise_deterministic():
    x = leaf(torch.randn(4, 3, 5, 7))
    w, b, dy = leaf(torch.randn(3)), leaf(torch.randn(3)), torch.randn(4, 3, 5, 7)
    (y1, g1), (y2, g2) = [grads(lambda x, w, b: kernels.batch_norm(x, None, None, w, b, True), (x, w, b), dy) for _ in range(2)]
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


# ---------------------------------------------------------------------------- GPU
GPU_SHAPES = [(256, 1000), (32, 64, 1023), (8, 64, 28, 28), (16, 256, 14, 14), (2, 32, 8, 9, 10), (4, 37, 7, 7)]


@gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_matches_torch_over_steps(shape, dtype, channels_last):
    _steps(shape, dtype, "cuda", channels_last, steps=2, ref_dtype=torch.float32)


@gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large_mean(dtype, channels_last):
    x = leaf(to_layout((1000 + torch.randn(16, 64, 28, 28, device="cuda")).to(dtype), channels_last))
    dy = to_layout(torch.randn(16, 64, 28, 28, device="cuda", dtype=dtype), channels_last)
    y, (dx,) = grads(lambda x: kernels.batch_norm(x, None, None, training=True), (x,), dy)
    yr, (dxr,) = grads(lambda x: F.batch_norm(x, None, None, training=True), (leaf(x.double()),), dy.double())
    assert_close(y, yr, dtype, "y")
    assert_close(dx, dxr, dtype, "dx")


@gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_bitwise_deterministic(channels_last):
    x = leaf(to_layout(torch.randn(32, 256, 28, 28, device="cuda", dtype=torch.bfloat16), channels_last))
    w, b = leaf(torch.randn(256, device="cuda")), leaf(torch.randn(256, device="cuda"))
    dy = to_layout(torch.randn_like(x), channels_last)
    runs = []
    for _ in range(2):
        rm, rv = torch.zeros(256, device="cuda"), torch.ones(256, device="cuda")
        runs.append((grads(lambda x, w, b: kernels.batch_norm(x, rm, rv, w, b, True), (x, w, b), dy), rm, rv))
    ((y1, g1), rm1, rv1), ((y2, g2), rm2, rv2) = runs
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)


@gpu
def test_gpu_mixed_precision_parameters():
    # bf16 activations with float32 weight, bias and running statistics (autocast-style).
    x = leaf(torch.randn(16, 64, 14, 14, device="cuda", dtype=torch.bfloat16))
    w, b = leaf(torch.randn(64, device="cuda")), leaf(torch.randn(64, device="cuda"))
    rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
    rm_r, rv_r = rm.clone(), rv.clone()
    dy = torch.randn_like(x)
    y, g = grads(lambda x, w, b: kernels.batch_norm(x, rm, rv, w, b, True), (x, w, b), dy)
    yr, gr = grads(lambda x, w, b: F.batch_norm(x, rm_r, rv_r, w, b, True), (leaf(x.float()), w, b), dy.float())
    assert y.dtype == torch.bfloat16 and g[1].dtype == torch.float32
    assert_close(y, yr, torch.bfloat16, "y")
    for name, a, r in zip(("dx", "dw", "db"), g, gr):
        assert_close(a, r, torch.bfloat16, name)
    assert_close(rm, rm_r, torch.float32, "running_mean")
    assert_close(rv, rv_r, torch.float32, "running_var")


@cpu
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_one_value_per_channel_leaves_the_running_variance_finite():
    """A kernel called directly in training on one value per channel (torch raises there; the
    functional tier checks it before dispatch) took the unbiased variance as 0 * 1 / 0 and wrote
    NaN into running_var. Plain batch norm is now refused as torch refuses it (its shape says
    so); masked batch norm's count is in the mask's contents, which the kernel does not read
    on the host, so there the factor is ``n / max(n - 1, 1)``, as in normlab's own
    ``update_running_``: the batch variance 0 enters as 0."""
    x = torch.randn(1, 3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="one value per channel in training"):
        kernels.batch_norm(x, rm, rv, training=True, momentum=0.1)
    assert torch.equal(rm, torch.zeros(3, dtype=torch.float64)) and torch.equal(rv, torch.ones(3, dtype=torch.float64))
    kernels.batch_norm(x, rm, rv, training=False)  # evaluation takes it
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    kernels.masked_batch_norm(x, mask, rm, rv, training=True, momentum=0.1)
    torch.testing.assert_close(rm, 0.1 * x[1, :, 2])
    torch.testing.assert_close(rv, torch.full((3,), 0.9, dtype=torch.float64))
