"""normlab.kernels.group_norm / instance_norm against torch: outputs, dx, dw, db, both layouts."""
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

# (shape, num_groups): sizes 1, 37, 1023 and non-powers of two, ranks 2 to 5.
CASES = [
    ((2, 6, 5, 7), 3),
    ((3, 4, 37), 2),
    ((1, 6, 1023), 6),
    ((2, 8, 3, 3, 3), 4),
    ((4, 6), 3),
    ((1, 1, 1, 37), 1),
    ((2, 12, 2, 3), 1),
]


def _case(shape, dtype, device, channels_last, affine=True):
    C = shape[1]
    x = leaf(to_layout(torch.randn(shape, dtype=dtype, device=device), channels_last))
    w = leaf(torch.randn(C, dtype=dtype, device=device)) if affine else None
    b = leaf(torch.randn(C, dtype=dtype, device=device)) if affine else None
    dy = to_layout(torch.randn(shape, dtype=dtype, device=device), channels_last)
    return x, w, b, dy


def _check(fn, ref, x, w, b, dy, dtype, ref_dtype=torch.float64):
    y, g = grads(fn, (x, w, b), dy)
    # the input's dtype, and torch's layout: channels-last kept, an (N, L, C) transposed made contiguous
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=memory_format_of(x))
    up = lambda t: None if t is None else leaf(t.to(ref_dtype), t.requires_grad)  # noqa: E731
    yr, gr = grads(ref, (up(x), up(w), up(b)), dy.to(ref_dtype))
    # torch in the input's dtype sets the bar where the fixed tolerance is out of reach
    yb, gb = grads(ref, (x, w, b), dy) if x.device.type == "cpu" and dtype != ref_dtype else (None, (None,) * 3)
    assert_close(y, yr, dtype, "y", baseline=yb)
    assert_grads_close(g, gr, dtype, baselines=gb, check_dtype=True)


@cpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,G", CASES)
def test_group_norm_matches_torch(shape, G, dtype, channels_last):
    x, w, b, dy = _case(shape, dtype, "cpu", channels_last)
    _check(lambda x, w, b: kernels.group_norm(x, G, w, b), lambda x, w, b: F.group_norm(x, G, w, b), x, w, b, dy, dtype)


@cpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (3, 4, 37), (1, 3, 1023), (2, 5, 2, 3, 3)])
def test_instance_norm_matches_torch(shape, channels_last):
    x, w, b, dy = _case(shape, torch.float64, "cpu", channels_last)
    _check(kernels.instance_norm, lambda x, w, b: F.instance_norm(x, weight=w, bias=b), x, w, b, dy, torch.float64)


@cpu
def test_37_groups():
    # Many statistic groups (one program each in the finalize kernels: slow when interpreted).
    x, w, b, dy = _case((1, 37, 3), torch.float64, "cpu", True)
    _check(lambda x, w, b: kernels.group_norm(x, 37, w, b), lambda x, w, b: F.group_norm(x, 37, w, b), x, w, b, dy, torch.float64)


@cpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_without_affine(channels_last):
    x, w, b, dy = _case((2, 6, 5, 7), torch.float64, "cpu", channels_last, affine=False)
    _check(lambda x, w, b: kernels.group_norm(x, 2), lambda x, w, b: F.group_norm(x, 2), x, w, b, dy, torch.float64)


@cpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_chunks_blocks_and_loops(channels_last, monkeypatch):
    # Tiny tiles: many channel blocks, several position chunks per sample, multi-tile loops in
    # every kernel and several item tiles in the finalize kernels.
    monkeypatch.setitem(core.TUNING, "tile", 16)
    monkeypatch.setitem(core.TUNING, "max_channel_block", 4)
    monkeypatch.setitem(core.TUNING, "max_spatial_block", 8)
    monkeypatch.setitem(core.TUNING, "stats_programs_per_sm", 2)
    for shape, G in [((2, 6, 5, 7), 3), ((1, 4, 37), 2)]:
        x, w, b, dy = _case(shape, torch.float64, "cpu", channels_last)
        p = core.plan(core.geometry(x), x.device)
        assert p.K > 1 and p.CHUNK > p.BS and (p.CB > 1 or shape[1] == 4)
        _check(lambda x, w, b: kernels.group_norm(x, G, w, b), lambda x, w, b: F.group_norm(x, G, w, b), x, w, b, dy, torch.float64)


@cpu
@pytest.mark.parametrize("reverse", [False, True])
def test_apply_order_does_not_matter(reverse, monkeypatch):
    monkeypatch.setitem(core.TUNING, "reverse", reverse)
    x, w, b, dy = _case((2, 6, 5, 7), torch.float64, "cpu", True)
    _check(lambda x, w, b: kernels.group_norm(x, 3, w, b), lambda x, w, b: F.group_norm(x, 3, w, b), x, w, b, dy, torch.float64)


@cpu
def test_one_computation():
    # DESIGN.md: LayerNorm over (C, H, W) is GroupNorm(1, C); GroupNorm(C, C) is InstanceNorm.
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    assert_close(kernels.group_norm(x, 1), kernels.layer_norm(x, (6, 5, 7)), torch.float64, "GN(1) vs LN")
    assert_close(kernels.group_norm(x, 6), kernels.instance_norm(x), torch.float64, "GN(C) vs IN")


@cpu
def test_large_mean_is_stable():
    x = leaf(to_layout((1000 + torch.randn(2, 8, 33, 31)).float(), True))
    dy = torch.randn(2, 8, 33, 31)
    y, (dx,) = grads(lambda x: kernels.group_norm(x, 4), (x,), dy)
    yr, (dxr,) = grads(lambda x: F.group_norm(x, 4), (leaf(x.double()),), dy.double())
    assert_close(y, yr, torch.float32, "y", scale=40)
    assert_close(dx, dxr, torch.float32, "dx", scale=40)


@cpu
def test_supports():
    x = torch.randn(2, 6, 5, 7)
    assert kernels.supports("group_norm", x, 3, torch.ones(6), torch.zeros(6))[0]
    assert kernels.supports("group_norm", to_layout(x, True), 3)[0]
    assert kernels.supports("instance_norm", x)[0]
    for ok, reason in [
        kernels.supports("group_norm", x, 4),  # 4 does not divide 6
        kernels.supports("group_norm", x.transpose(2, 3), 3),  # neither layout
        kernels.supports("group_norm", x[:, :, ::2], 3),
        kernels.supports("group_norm", x, 3, torch.ones(5)),
        kernels.supports("group_norm", x.to(torch.int64), 3),
        kernels.supports("instance_norm", x, running_mean=torch.zeros(6), running_var=torch.ones(6)),
        kernels.supports("instance_norm", torch.randn(6)),
    ]:
        assert not ok and reason


@cpu
def test_dispatcher_picks_the_kernel():
    x = to_layout(torch.randn(2, 6, 5, 7), True)
    with normlab.backend("triton"):
        assert _backend.use_triton("group_norm", x, lambda: kernels.supports("group_norm", x, 3))
        y = kernels.group_norm(x, 3)
    assert_close(y, F.group_norm(x.double(), 3), torch.float32, "y")


@cpu
def test_bitwise_deterministic():
    x, w, b, dy = _case((2, 6, 5, 7), torch.float32, "cpu", True)
    (y1, g1), (y2, g2) = [grads(lambda x, w, b: kernels.group_norm(x, 3, w, b), (x, w, b), dy) for _ in range(2)]
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


# ---------------------------------------------------------------------------- GPU
GPU_CASES = [((8, 64, 28, 28), 32), ((4, 256, 14, 14), 32), ((3, 37, 17), 37), ((2, 32, 8, 9, 10), 8), ((16, 96, 7, 7), 3)]


@gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,G", GPU_CASES)
def test_gpu_group_norm(shape, G, dtype, channels_last):
    x, w, b, dy = _case(shape, dtype, "cuda", channels_last)
    _check(lambda x, w, b: kernels.group_norm(x, G, w, b), lambda x, w, b: F.group_norm(x, G, w, b), x, w, b, dy, dtype, torch.float32)


@gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_instance_norm(dtype, channels_last):
    x, w, b, dy = _case((8, 64, 28, 28), dtype, "cuda", channels_last)
    _check(kernels.instance_norm, lambda x, w, b: F.instance_norm(x, weight=w, bias=b), x, w, b, dy, dtype, torch.float32)


@gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large_mean(dtype, channels_last):
    x, w, b, dy = _case((8, 64, 28, 28), dtype, "cuda", channels_last)
    x = leaf(to_layout(1000 + x.detach().float(), channels_last).to(dtype))
    _check(lambda x, w, b: kernels.group_norm(x, 8, w, b), lambda x, w, b: F.group_norm(x, 8, w, b), x, w, b, dy, dtype, torch.float64)


@gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_bitwise_deterministic(channels_last):
    x, w, b, dy = _case((32, 256, 28, 28), torch.bfloat16, "cuda", channels_last)
    (y1, g1), (y2, g2) = [grads(lambda x, w, b: kernels.group_norm(x, 32, w, b), (x, w, b), dy) for _ in range(2)]
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


@cpu
def test_size_one_dims_with_any_stride_take_the_kernel():
    """Wrong version (_channel_norm.py ``_dense``: a size-1 dim must have its packed stride):
    an (N, L, C) tensor transposed to (N, C, L) and unsqueezed to (N, C, L, 1) is channels-last
    dense (torch gives the new dim stride 1, not C), so it takes the kernel in place."""
    x = torch.randn(2, 5, 6, dtype=torch.float64).transpose(1, 2).unsqueeze(-1)
    assert x.stride() == (30, 1, 6, 1)
    ok, why = kernels.supports("group_norm", x, 3)
    assert ok, why
    assert_close(kernels.group_norm(x, 3), F.group_norm(x, 3), torch.float64, "y")
