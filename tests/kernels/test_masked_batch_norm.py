"""normlab.kernels.masked_batch_norm against a plain-torch reference (statistics over valid
positions only, written in kernels/ktest.py): outputs, dx, dw, db, running statistics."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the kernel tests need triton")

import normlab  # noqa: E402
from normlab import _backend, kernels  # noqa: E402
from kernels.ktest import assert_close, cpu, gpu, grads, leaf, masked_batch_norm_reference, to_layout  # noqa: E402
from normlab.functional._core import memory_format_of  # noqa: E402


def _mask(N, L, kind, device):
    if kind == "none":
        return None
    if kind == "lengths":  # padding at the end of each sequence, as a padded batch has it
        lengths = torch.randint(1, L + 1, (N,), device=device)
        lengths[0] = L
        return torch.arange(L, device=device)[None, :] < lengths[:, None]
    m = torch.rand(N, L, device=device) < 0.6  # scattered
    m[0, :2] = True
    return m


def _steps(shape, kind, dtype, device, channels_last, steps=2, ref_dtype=torch.float64, momentum=0.1, eps=1e-5):
    N, C, L = shape
    w, b = leaf(torch.randn(C, dtype=dtype, device=device)), leaf(torch.randn(C, dtype=dtype, device=device))
    rm, rv = torch.randn(C, dtype=dtype, device=device), torch.rand(C, dtype=dtype, device=device) + 0.5
    rm_r, rv_r = rm.to(ref_dtype), rv.to(ref_dtype)
    up = lambda t: leaf(t.to(ref_dtype), t.requires_grad)  # noqa: E731
    for step in range(steps + 1):
        training = step < steps
        mask = _mask(N, L, kind, device)
        x = leaf(to_layout(torch.randn(shape, dtype=dtype, device=device) * 2 + 3, channels_last))
        dy = to_layout(torch.randn(shape, dtype=dtype, device=device), channels_last)
        y, g = grads(lambda x, w, b: kernels.masked_batch_norm(x, mask, rm, rv, w, b, training, momentum, eps), (x, w, b), dy)
        yr, gr = grads(
            lambda x, w, b: masked_batch_norm_reference(x, mask, rm_r, rv_r, w, b, training, momentum, eps),
            (up(x), up(w), up(b)), dy.to(ref_dtype),
        )
        tag = f"step {step} ({'train' if training else 'eval'}, mask {kind})"
        assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format_of(x))  # batch norm's layout
        assert_close(y, yr, dtype, f"{tag} y")
        for name, a, r in zip(("dx", "dw", "db"), g, gr):
            assert_close(a, r, dtype, f"{tag} {name}")
        assert_close(rm, rm_r, dtype, f"{tag} running_mean")
        assert_close(rv, rv_r, dtype, f"{tag} running_var")
        if mask is not None:  # padding: exactly zero output, exactly zero input gradient
            pad = ~mask[:, None, :].expand(shape)
            assert (y.detach()[pad] == 0).all() and (g[0][pad] == 0).all()


@cpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncl", "nlc"])
@pytest.mark.parametrize("kind", ["lengths", "scattered", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 37), (4, 2, 7), (2, 1, 1023)])
def test_matches_reference(shape, dtype, kind, channels_last):
    _steps(shape, kind, dtype, "cpu", channels_last)


@cpu
def test_all_valid_is_batch_norm():
    x = torch.randn(3, 4, 9, dtype=torch.float64)
    mask = torch.ones(3, 9, dtype=torch.bool)
    assert_close(kernels.masked_batch_norm(x, mask, None, None, training=True), F.batch_norm(x, None, None, training=True), torch.float64, "y")


@cpu
def test_padding_does_not_leak():
    # Values at padded positions must not change anything, however large.
    x = torch.randn(3, 4, 9, dtype=torch.float64)
    mask = _mask(3, 9, "lengths", "cpu")
    for value in (1e6, float("nan"), float("inf")):
        x2 = torch.where(mask[:, None, :], x, torch.full_like(x, value))
        assert torch.equal(kernels.masked_batch_norm(x, mask, None, None, training=True), kernels.masked_batch_norm(x2, mask, None, None, training=True))


@cpu
def test_supports():
    x, m = torch.randn(2, 3, 5), torch.ones(2, 5, dtype=torch.bool)
    assert kernels.supports("masked_batch_norm", x, m, None, None, training=True)[0]
    assert kernels.supports("masked_batch_norm", x, None, torch.zeros(3), torch.ones(3))[0]
    for ok, reason in [
        kernels.supports("masked_batch_norm", torch.randn(2, 3, 5, 5), None, None, None, training=True),
        kernels.supports("masked_batch_norm", x, m.float(), None, None, training=True),
        kernels.supports("masked_batch_norm", x, m[:, :4], None, None, training=True),
        kernels.supports("masked_batch_norm", x, m, None, None, training=False),
    ]:
        assert not ok and reason


@cpu
def test_dispatcher_picks_the_kernel():
    x, m = torch.randn(2, 3, 5), _mask(2, 5, "lengths", "cpu")
    with normlab.backend("triton"):
        assert _backend.use_triton("masked_batch_norm", x, lambda: kernels.supports("masked_batch_norm", x, m, None, None, training=True))
        y = kernels.masked_batch_norm(x, m, None, None, training=True)
    assert_close(y, masked_batch_norm_reference(x.double(), m, None, None, None, None, True, 0.1, 1e-5), torch.float32, "y")


# ---------------------------------------------------------------------------- GPU
@gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncl", "nlc"])
@pytest.mark.parametrize("kind", ["lengths", "scattered"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 256, 500), (8, 37, 1023)])
def test_gpu_matches_reference(shape, dtype, kind, channels_last):
    _steps(shape, kind, dtype, "cuda", channels_last, ref_dtype=torch.float32)


@gpu
def test_gpu_bitwise_deterministic():
    x = leaf(torch.randn(64, 256, 500, device="cuda", dtype=torch.bfloat16))
    mask = _mask(64, 500, "lengths", "cuda")
    w, b, dy = leaf(torch.randn(256, device="cuda")), leaf(torch.randn(256, device="cuda")), torch.randn_like(x)
    (y1, g1), (y2, g2) = [grads(lambda x, w, b: kernels.masked_batch_norm(x, mask, None, None, w, b, True), (x, w, b), dy) for _ in range(2)]
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
