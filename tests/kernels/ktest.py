"""Shared pieces of the kernel tests (and the baselines the GPU benchmark imports).

Ground truth is torch: the same (dtype-rounded) inputs, math in float64 on the CPU tests and
in float32 (float64 for the large-mean checks) on the GPU tests. Never the kernel itself.
"""
from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

# Marks: CPU tests need the interpreter; GPU tests need CUDA with the interpreter off.
cpu = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1 (set by conftest without CUDA)")
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA with TRITON_INTERPRET unset")]


def gpu(f):
    for m in gpu_only:
        f = m(f)
    return f


# Tolerances per dtype: (norm-relative error ||out - ref|| / ||ref||, max error / max |ref|).
# fp16/bf16 figures are a few output roundings (2^-11, 2^-8); reductions are float32 inside.
TOL = {
    torch.float64: (1e-12, 1e-11),
    torch.float32: (1e-5, 5e-5),  # reductions over thousands of terms (dw, db) land near 1e-5
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.2e-2, 3e-2),
}


def _errors(o, r):
    rel = (o - r).norm().item() / max(r.norm().item(), r.numel() ** 0.5)
    mx = (o - r).abs().max().item() / max(r.abs().max().item(), 1.0)
    return rel, mx


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "", scale: float = 1.0, baseline=None):
    """``out`` (any dtype) against ``ref`` with the tolerance of ``dtype``; NaN never passes.

    Errors are relative to the reference, but never to less than unit magnitude per element:
    normalized outputs and their gradients (with ``dy ~ N(0, 1)``) are of order 1, and an
    exactly-zero reference (``N = 1``) must not demand exact zeros of rounding noise.
    ``baseline``: torch's own result in ``dtype``; the kernel may then be off by up to twice
    torch's error (ill-conditioned cases, e.g. groups of two elements, where no float32
    implementation meets the fixed tolerance).
    """
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(o).all(), f"{what}: non-finite values in the kernel output"
    tol_norm, tol_max = (t * scale for t in TOL[dtype])
    rel, mx = _errors(o, r)
    if baseline is not None:
        b_rel, b_mx = _errors(baseline.detach().double().cpu(), r)
        tol_norm, tol_max = max(tol_norm, 2 * b_rel), max(tol_max, 2 * b_mx)
    assert rel <= tol_norm and mx <= tol_max, f"{what}: relative error {rel:.3g} (tol {tol_norm:.3g}), max error {mx:.3g} of max|ref| (tol {tol_max:.3g})"


def assert_grads_close(g, gr, dtype, names=("dx", "dw", "db"), tag="", baselines=None, check_dtype=False):
    """Each gradient in ``g`` against ``gr`` (:func:`assert_close`): the same ones are None; with
    ``check_dtype`` each is in ``dtype``; ``baselines`` as in :func:`assert_close`, one per gradient."""
    for i, (name, a, r) in enumerate(zip(names, g, gr)):
        assert (a is None) == (r is None), name
        if a is not None:
            if check_dtype:
                assert a.dtype == dtype
            assert_close(a, r, dtype, f"{tag} {name}" if tag else name,
                         baseline=None if baselines is None else baselines[i])


def grads(fn, inputs, dy):
    """``(y, [d input for each tensor in inputs that requires grad, None otherwise])``."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    y = fn(*inputs)
    gs = torch.autograd.grad(y, leaves, dy)
    it = iter(gs)
    return y, [next(it) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]


def leaf(t: torch.Tensor, requires_grad=True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` (N, C, *) in NCHW or channels-last strides (rank 3: an (N, L, C) tensor transposed)."""
    if not channels_last:
        return x.contiguous()
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if x.dim() == 3:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous()


def masked_batch_norm_reference(x, mask, running_mean, running_var, weight, bias, training, momentum, eps):
    """Masked batch norm in plain torch ops: statistics over valid positions (mask True) only."""
    m = torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device) if mask is None else mask
    mf = m[:, None, :].to(x.dtype)
    if training:
        n = mf.sum() * 1.0
        mean = (x * mf).sum((0, 2)) / n
        var = (((x - mean[None, :, None]) ** 2) * mf).sum((0, 2)) / n
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean.detach().to(running_mean.dtype))
                running_var.mul_(1 - momentum).add_(momentum * (var.detach() * n / (n - 1)).to(running_var.dtype))
    else:
        mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    y = (x - mean[None, :, None]) / torch.sqrt(var[None, :, None] + eps)
    if weight is not None:
        y = y * weight[None, :, None]
    if bias is not None:
        y = y + bias[None, :, None]
    return y * mf
