r"""LayerNorm (and, with ``RMS=True``, RMSNorm) over the trailing dims, as Triton kernels.

The input is viewed as ``M`` rows of ``N`` features; each row is normalized on its own:

.. math::

    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \, w + b, \qquad
    \mu = \tfrac1N \textstyle\sum_j x_j, \quad \sigma^2 = \tfrac1N \textstyle\sum_j (x_j - \mu)^2

(RMSNorm: :math:`\mu = 0` and no bias). A whole row sits in registers, so the variance is
an exact two-pass over registers (stable for inputs like 1000 ± 1) and the row is read from
memory once. Small rows are packed ``ROWS`` to a program so that each program still moves
a few thousand elements.

Backward, with :math:`\hat x = (x - \mu)\,r` and :math:`g = w\,dy`:

.. math::

    dx = r\,\big(g - \overline{g} - \hat x\,\overline{g \hat x}\big), \qquad
    dw = \textstyle\sum_{\text{rows}} dy\,\hat x, \qquad db = \textstyle\sum_{\text{rows}} dy

(RMSNorm drops :math:`\overline g`). A persistent grid of ``P`` programs walks the rows;
each program keeps float32 running sums of ``dy * xhat`` and ``dy`` in registers and writes
them to a ``[P, N]`` partial buffer, and a second kernel sums the ``P`` partials in a fixed
order. No atomics: the result is bitwise reproducible. Rows longer than ``bwd_max_own``
(N = 16384) would need more registers than a program has (x, dy, w, dw, db in float32:
320 KB against a 256 KB register file), so their columns are split over neighbouring
programs that share the row sums through L2.

The forward saves ``(mean, rstd)`` per row, the contract of ``torch.native_layer_norm``.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from normlab.functional._core import twice_differentiable, upcast_for_recompute
from normlab.kernels._common import (
    _ADD,
    Launch,
    acc_dtype,
    acc_torch,
    cdiv,
    next_pow2,
    num_sms,
    spec,
)

# Largest row a program holds in registers (elements). Past this, ``supports`` says no and
# torch runs the op: the backward would spill registers.
MAX_N = 16384
MAX_N_FLOAT64 = 8192

# Launch heuristics, named so that benchmarks/tune can sweep them without editing code.
TUNING = {
    "fwd_tile": 4096,  # elements per forward program: ROWS = tile // BLOCK_N rows when N is small
    "fwd_tile_short": 2048,  # the same for rows of 512 or fewer
    "fwd_elems_per_thread": 32,  # forward num_warps = tile / (32 * this), clamped to [4, 16]
    "bwd_tile": 4096,  # elements per backward step
    "bwd_programs_per_sm": 4,  # persistent backward grid = this * SMs (at most one step per program)
    "bwd_max_own": 8192,  # columns one backward program owns; longer rows split over programs
    "bwd_prefetch": True,  # load step i+1 while step i reduces (tiles up to 4096: beyond, it spills)
    "elems_per_thread": 16,  # sets num_warps = tile / (32 * this), clamped to [4, 16]
    "fwd_warps": None,  # fixed num_warps instead of the rule above
    "bwd_warps": None,
    "partials_block": 32,  # backward programs' dw/db partial rows the final sum adds per loop step
}


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    x_ptr,  # [M, N] input; row stride stride_x, unit column stride
    y_ptr,  # [M, N] output, contiguous, x's dtype
    w_ptr,  # [N] weight (only read if HAS_W)
    b_ptr,  # [N] bias (only read if HAS_B)
    stats_ptr,  # [2, M] ACC: row mean, then 1 / sqrt(var + eps); RMS: [M], rstd only
    M,
    N,
    stride_x,
    eps: tl.float64,  # a Python float is passed as fp32 unless annotated: float64 input would lose it
    RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(ACC)
    if RMS:
        xc = x
        rstd_ptr = stats_ptr
    else:
        mean = tl.reduce(x, 1, _ADD) / N
        xc = tl.where(ok, x - mean[:, None], 0.0)
        tl.store(stats_ptr + rows, mean, mask=row_ok)
        rstd_ptr = stats_ptr + M
    var = tl.reduce(xc * xc, 1, _ADD) / N
    rstd = (1.0 / tl.sqrt(var + eps)).to(ACC)  # eps is fp64: one row's sqrt in fp64, the row's math in ACC
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_kernel(
    x_ptr,  # [M, N] input; row stride stride_x
    dy_ptr,  # [M, N] output gradient, contiguous
    dx_ptr,  # [M, N] input gradient, contiguous, x's dtype
    w_ptr,  # [N] weight (only read if HAS_W)
    mean_ptr,  # [M] ACC (not read when RMS)
    rstd_ptr,  # [M] ACC
    dw_part_ptr,  # [P, N] ACC: row-block p's sum of dy * xhat (only if DW)
    db_part_ptr,  # [P, N] ACC: row-block p's sum of dy (only if DB)
    M,
    N,
    stride_x,
    rows_per_program,
    RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    DW: tl.constexpr,
    DB: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    OWN: tl.constexpr,
    SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    # Program (p, part) owns rows [p * rows_per_program, ...) and columns
    # [part * OWN, (part + 1) * OWN). With SPLIT > 1 (very long rows, whose x, dy, w, dw, db
    # would not fit one program's registers) the SPLIT programs of a row block are launched
    # side by side; each also reads the other parts of its rows, only for the two row sums,
    # and those reads mostly hit L2 behind its neighbours'.
    pid = tl.program_id(0)
    p = pid // SPLIT
    part = pid % SPLIT
    cols = part * OWN + tl.arange(0, OWN)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    dw_acc = tl.full([ROWS, OWN], 0.0, ACC)
    db_acc = tl.full([ROWS, OWN], 0.0, ACC)
    start = p.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, M)
    if PREFETCH:  # issue the next step's loads before this step's reductions (2 rows in flight)
        rows = start + tl.arange(0, ROWS)
        ok = (rows < end)[:, None] & col_ok[None, :]
        x_next = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
        dy_next = tl.load(dy_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0)
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < end
        ok = row_ok[:, None] & col_ok[None, :]
        if PREFETCH:
            x = x_next.to(ACC)
            dy = dy_next.to(ACC)
            nrows = rows + ROWS
            nok = (nrows < end)[:, None] & col_ok[None, :]
            x_next = tl.load(x_ptr + nrows[:, None] * stride_x + cols[None, :], mask=nok, other=0.0)
            dy_next = tl.load(dy_ptr + nrows[:, None] * N + cols[None, :], mask=nok, other=0.0)
        else:
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        s1 = tl.reduce(g * xhat, 1, _ADD)
        s2 = tl.reduce(g, 1, _ADD)
        if SPLIT > 1:
            for q in range(0, SPLIT):
                if q != part:
                    qcols = q * OWN + tl.arange(0, OWN)
                    qok = row_ok[:, None] & (qcols < N)[None, :]
                    xq = tl.load(x_ptr + rows[:, None] * stride_x + qcols[None, :], mask=qok, other=0.0).to(ACC)
                    gq = tl.load(dy_ptr + rows[:, None] * N + qcols[None, :], mask=qok, other=0.0).to(ACC)
                    if HAS_W:
                        gq = gq * tl.load(w_ptr + qcols, mask=qcols < N, other=0.0).to(ACC)[None, :]
                    if RMS:
                        xhq = xq * rstd[:, None]
                    else:
                        xhq = tl.where(qok, (xq - mean[:, None]) * rstd[:, None], 0.0)
                    s1 += tl.reduce(gq * xhq, 1, _ADD)
                    s2 += tl.reduce(gq, 1, _ADD)
        c1 = s1 / N
        if RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            dx = (g - (s2 / N)[:, None] - xhat * c1[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if DW:
            dw_acc += dy * xhat
        if DB:
            db_acc += dy
    if DW:
        tl.store(dw_part_ptr + p * N + cols, tl.reduce(dw_acc, 0, _ADD), mask=col_ok)
    if DB:
        tl.store(db_part_ptr + p * N + cols, tl.reduce(db_acc, 0, _ADD), mask=col_ok)


@triton.jit
def _sum_partials_kernel(
    part_ptr,  # [2, P, N] ACC partial sums: [0] of dy * xhat, [1] of dy
    dw_ptr,  # [N] weight gradient, weight's dtype (only if DW)
    db_ptr,  # [N] bias gradient, bias's dtype (only if DB)
    P,
    N,
    DW: tl.constexpr,
    DB: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grid (column blocks, 2): axis 1 picks dw (0) or db (1); a fixed order over P, no atomics.
    which = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < N
    base = part_ptr + which.to(tl.int64) * P * N
    acc = tl.full([BLOCK_P, BLOCK_C], 0.0, part_ptr.dtype.element_ty)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        ok = (ps < P)[:, None] & col_ok[None, :]
        acc += tl.load(base + ps[:, None] * N + cols[None, :], mask=ok, other=0.0)
    total = tl.reduce(acc, 0, _ADD)
    if which == 0:
        if DW:
            tl.store(dw_ptr + cols, total.to(dw_ptr.dtype.element_ty), mask=col_ok)
    else:
        if DB:
            tl.store(db_ptr + cols, total.to(db_ptr.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
# Everything a launch needs besides the tensors themselves depends only on (shape, strides,
# dtypes, pointer alignment, device, TUNING): it is computed once per such key, with the
# kernels' ``Launch`` objects, and a call then costs the allocations and the launches.
def max_n(dtype: torch.dtype) -> int:
    return MAX_N_FLOAT64 if dtype == torch.float64 else MAX_N


def as_rows(x: torch.Tensor, N: int):
    """``x`` as an ``[M, N]`` view with unit column stride, or ``None`` if no such view exists."""
    try:
        x2 = x.view(-1, N)
    except RuntimeError:
        return None
    if N > 1 and x2.stride(1) != 1:
        return None
    return x2


@functools.lru_cache(maxsize=4096)
def row_stride(shape, stride, N: int):
    """The row stride of ``as_rows`` for a tensor of this shape and strides, or ``None``
    (worked out once on a meta tensor: no memory, no view of the real one per call)."""
    x2 = as_rows(torch.empty_strided(tuple(shape), tuple(stride), device="meta"), N)
    return None if x2 is None else int(x2.stride(0))


def _warps(tile: int, fixed=None, per_thread=None) -> int:
    if fixed:
        return int(fixed)
    return int(min(16, max(4, tile // (32 * (per_thread or TUNING["elems_per_thread"])))))


def _rows_per_step(block_n: int, tile: int, M: int) -> int:
    return int(max(1, min(tile // block_n, next_pow2(M))))


class Rows:
    """The launches of one forward configuration (see ``_plan``) and of its backwards."""

    def __init__(self, shape, stride, N, dtype, w, b, rms, device):
        M = self.M = math.prod(shape) // N
        self.N, self.w, self.rms, self.device = N, w, rms, device
        self.acc = acc_torch(dtype)
        self.ACC = acc_dtype(dtype)
        self.stride_x = row_stride(shape, stride, N)
        block_n = next_pow2(N)
        rows = _rows_per_step(block_n, TUNING["fwd_tile_short" if block_n <= 512 else "fwd_tile"], M)
        self.fwd = Launch(
            _fwd_kernel, (cdiv(M, rows),), _warps(rows * block_n, TUNING["fwd_warps"], TUNING["fwd_elems_per_thread"]),
            RMS=rms, HAS_W=w is not None, HAS_B=b is not None, ACC=self.ACC, ROWS=rows, BLOCK_N=block_n,
        )
        self.fwd_ints = (M, N, self.stride_x)
        self.n_stats = M if rms else 2 * M
        self.backwards = {}

    def backward(self, dy_aligned: bool, has_w: bool, has_b: bool):
        """``(bwd launch, its ints, partial-sum launch or None, its ints, partial buffer size)``."""
        key = (dy_aligned, has_w, has_b)
        b = self.backwards.get(key)
        if b is None:
            b = self.backwards[key] = self._backward(has_w, has_b)
        return b

    def _backward(self, has_w, has_b):
        M, N = self.M, self.N
        block_n = next_pow2(N)
        own = min(block_n, next_pow2(TUNING["bwd_max_own"]))
        split = block_n // own
        rows = _rows_per_step(own, TUNING["bwd_tile"], M)
        steps = cdiv(M, rows)
        blocks = max(1, min(steps, num_sms(self.device) * TUNING["bwd_programs_per_sm"] // split))
        rows_per_program = cdiv(steps, blocks) * rows
        blocks = cdiv(M, rows_per_program)
        bwd = Launch(
            _bwd_kernel, (blocks * split,), _warps(rows * own, TUNING["bwd_warps"]),
            RMS=self.rms, HAS_W=self.w is not None, DW=has_w, DB=has_b, ACC=self.ACC, ROWS=rows, OWN=own, SPLIT=split,
            PREFETCH=bool(TUNING["bwd_prefetch"]) and rows * own <= 4096,
        )
        total = None
        if has_w or has_b:
            block_c = min(64, next_pow2(N))
            total = Launch(_sum_partials_kernel, (cdiv(N, block_c), 2), 4, DW=has_w, DB=has_b,
                           BLOCK_P=TUNING["partials_block"], BLOCK_C=block_c)
        return bwd, (M, N, self.stride_x, rows_per_program), total, (blocks, N), (2 * blocks * N if total else 0)


@functools.lru_cache(maxsize=1024)
def _plan(shape, stride, N, dtype, w, b, rms, device, _x_aligned, _tuning) -> Rows:
    return Rows(shape, stride, N, dtype, w, b, rms, device)


def plan(x, N: int, weight, bias, rms: bool) -> Rows:
    """The cached ``Rows`` of a call: keyed by everything Triton specializes the kernels on."""
    return _plan(x.shape, x.stride(), N, x.dtype, spec(weight), spec(bias), rms, x.device,
                 x.data_ptr() % 16 == 0, tuple(TUNING.values()))


def _forward(r: Rows, x, weight, bias, eps: float):
    """``(y, stats)``: ``y`` in ``x``'s shape (contiguous), ``stats`` as the kernels keep them
    (``[2 * M]``: means, then rstds; RMS: ``[M]`` rstds)."""
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    stats = x.new_empty(r.n_stats, dtype=r.acc)
    r.fwd(x, y, weight, bias, stats, *r.fwd_ints, eps)
    return y, stats


def _backward(r: Rows, dy, x, weight, stats, need_dw: bool, db_like=None):
    """``(dx, dw, db)``: ``dx`` in ``x``'s shape, ``dw`` like ``weight`` (when ``need_dw``), ``db``
    of ``db_like = (dtype, shape)`` (when given); ``None`` where not needed."""
    if not dy.is_contiguous():
        dy = dy.contiguous()
    has_w = weight is not None and bool(need_dw)
    has_b = db_like is not None
    bwd, ints, total, sums, n_part = r.backward(dy.data_ptr() % 16 == 0, has_w, has_b)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    part = x.new_empty(n_part, dtype=r.acc) if n_part else None
    # The backward kernel takes mean, rstd and the db partials as pointers of their own: a
    # version that offset one pointer per buffer in the kernel ran 5-20% slower on some LN
    # shapes on the H100 (bf16 32768x1024, fp32 32768x16384; RMS and the forward unchanged).
    mean, rstd = (stats, stats) if r.rms else (stats[: r.M], stats[r.M:])
    bwd(x, dy, dx, weight, mean, rstd, part, part[n_part // 2:] if has_b else None, *ints)
    dw = torch.empty_like(weight) if has_w else None
    db = x.new_empty(db_like[1], dtype=db_like[0]) if has_b else None
    if total is not None:
        total(part, dw, db, *sums)
    return dx, dw, db


def forward(x2: torch.Tensor, weight, bias, eps: float, rms: bool):
    """``(y, mean, rstd)`` for ``x2`` of shape ``[M, N]`` (``mean`` is ``None`` when ``rms``):
    the ``torch.native_layer_norm`` contract, for tests and callers outside autograd."""
    M, N = x2.shape
    y, stats = _forward(plan(x2, N, weight, bias, rms), x2, weight, bias, eps)
    return (y, None, stats) if rms else (y, stats[:M], stats[M:])


def backward(dy2, x2, weight, bias, mean, rstd, rms: bool, need_dw: bool, need_db: bool):
    """``(dx, dw, db)`` for ``[M, N]`` views; ``dw``/``db`` are ``None`` where not needed."""
    stats = rstd if rms else torch.cat([mean, rstd])
    db_like = (bias.dtype, bias.shape) if need_db and bias is not None else None
    r = plan(x2, x2.shape[1], weight, bias, rms)
    return _backward(r, dy2, x2, weight, stats, need_dw, db_like)


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------
def _recompute(ctx):
    """LN (or RMS norm) as torch's differentiable op on the saved inputs, for a double backward
    (in the accumulation dtype, as the kernels compute)."""
    x, weight, _ = ctx.saved_tensors
    bias, N = ctx.bias, ctx.plan_n
    xa, w, b = upcast_for_recompute(x, weight, bias)
    w = None if w is None else w.reshape(N)
    if ctx.rms:
        y = torch.nn.functional.rms_norm(xa.reshape(-1, N), (N,), w, ctx.eps)
        return y.view(x.shape).to(x.dtype), (x, None, weight, None)
    y = torch.nn.functional.layer_norm(xa.reshape(-1, N), (N,), w, None if b is None else b.reshape(N), ctx.eps)
    return y.view(x.shape).to(x.dtype), (x, None, weight, bias, None)


class LayerNormFunction(torch.autograd.Function):
    """Differentiable through x, weight and bias; saves ``(x, weight, stats)`` (``stats``:
    the row means then the row rstds, float32 (float64 for float64 input))."""

    @staticmethod
    def forward(ctx, x, N, weight, bias, eps):
        r = plan(x, N, weight, bias, False)
        y, stats = _forward(r, x, weight, bias, eps)
        ctx.save_for_backward(x, weight, stats)
        ctx.plan = r
        ctx.bias_like = None if bias is None else (bias.dtype, bias.shape)
        # a double backward's recompute only: bias as a plain reference (no gradient depends on
        # its value; saving it would make an in-place update before the backward an error)
        ctx.plan_n, ctx.eps, ctx.rms, ctx.bias = N, eps, False, bias
        return y

    @staticmethod
    @twice_differentiable(_recompute)
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = _backward(ctx.plan, dy, x, weight, stats, need[2], ctx.bias_like if need[3] else None)
        return dx, None, dw, db, None


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """``torch.nn.functional.layer_norm`` on Triton kernels (see ``supports`` for what it takes)."""
    N = math.prod(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else int(normalized_shape)
    return LayerNormFunction.apply(x, N, weight, bias, float(eps))  # a NumPy or 0-d tensor eps too
