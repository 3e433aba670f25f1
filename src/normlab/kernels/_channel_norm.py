r"""The one statistics-and-normalize core behind BatchNorm, GroupNorm, InstanceNorm and masked BatchNorm.

All four normalize an ``(N, C, *spatial)`` input per *statistic group* and differ only in
which (sample, channel) pairs share a group (see DESIGN.md, "the one idea"):

==============  =========================  ===============================
technique       statistic group of (n, c)  reduced over
==============  =========================  ===============================
batch norm      c                          samples and positions
group norm      (n, c // (C / G))          a channel group and positions
instance norm   (n, c)                     positions
masked BN       c                          samples and valid positions
==============  =========================  ===============================

So one set of kernels serves them all, on a ``[N, C, S]`` view (``S`` = product of the
spatial dims) in either layout: ``NCHW`` (strides ``(C*S, S, 1)``, contiguous) or
channels-last (strides ``(S*C, 1, C)``: ``torch.channels_last``, ``channels_last_3d``, or
an ``(N, L, C)`` tensor transposed to ``(N, C, L)``). The layout is a compile-time flag;
no copy to NCHW is ever made.

Forward, three launches:

1. ``_stats_kernel``: each program takes a block of channels and a chunk of positions of
   one sample; every register lane keeps a Welford ``(count, mean, M2)`` of the values it
   sees, and at the end the lanes of a channel are merged with Chan's formula (mean first,
   then deviations), so inputs like 1000 ± 1 lose nothing and the loop has no reduction
   across threads. Writes partials ``[N, K, C]``.
2. ``_finalize_kernel``: one program per statistic group merges its partials in a fixed
   order (two passes: the mean, then ``sum(M2_i + n_i (mean_i - mean)^2)``), writes
   ``mean``, ``rstd``, ``count`` and, for batch norm in training, updates the running
   statistics in place (unbiased variance, ``count / max(count - 1, 1)``).
3. ``_apply_kernel``: ``y = (x - mean) * rstd * w + b`` per element (0 at masked positions).
   It walks the tensor in the reverse order of step 1, so the part of ``x`` that step 1
   read last is still in L2 when step 3 starts.

Backward, with ``xhat = (x - mean) * rstd`` and ``g = w * dy``:
``dx = rstd * (g - mean_G(g) - xhat * mean_G(g * xhat))`` (means over the statistic group),
``dw = sum dy * xhat``, ``db = sum dy``. Again three launches: per-(n, chunk, c) partial
sums of ``dy`` and ``dy * xhat``; a fixed-order reduction of those into the two group means
and into ``dw``/``db``; the elementwise ``dx``. No atomics anywhere: bitwise reproducible.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from normlab.functional._core import memory_format_of, twice_differentiable, upcast_for_recompute
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

TUNING = {
    "tile": 4096,  # elements per tile in the stats, apply and gradient kernels
    "max_channel_block": 256,  # channels-last: channels per tile (contiguous run)
    "max_spatial_block": 2048,  # NCHW: positions per tile (contiguous run)
    "stats_programs_per_sm": 8,  # split positions into chunks until the stats grid is this full
    "num_warps": 8,
    "reverse": True,  # apply kernels walk the tensor backwards (L2 reuse, see module doc)
    "finalize_items": 256,  # partial sums per channel the gradient finalize kernel adds per loop step
}


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _stats_kernel(
    x_ptr,  # [N, C, S] input: NCHW strides (sn, S, 1), channels-last (sn, 1, C)
    mask_ptr,  # [N, S] uint8, 1 = valid position (only read if HAS_MASK)
    part_ptr,  # ACC, out: [N, K, C] mean of each (sample, chunk, channel), then [N, K, C] sum of
    #            squared deviations from that mean, then (only if HAS_MASK) [N, K] valid positions
    N,
    C,
    S,
    sn,
    K,
    CB,
    CHUNK,
    CL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
):
    pm2_ptr = part_ptr + N * K * C
    pcnt_ptr = part_ptr + 2 * N * K * C
    pid = tl.program_id(0)
    # program -> (sample n, position block k, channel block cb), in memory order:
    # channels-last (n, k, cb), NCHW (n, cb, k). (Inlined: a jitted helper costs ms per
    # call in the interpreter.)
    if CL:
        n = pid // (K * CB)
        k = (pid // CB) % K
        cb = pid % CB
    else:
        n = pid // (CB * K)
        cb = (pid // K) % CB
        k = pid % K
    c = cb * BC + tl.arange(0, BC)
    c_ok = c < C
    base = x_ptr + n.to(tl.int64) * sn
    # Welford per register lane (a position row of the tile, one channel): each lane sees one
    # value per tile, so the update needs no reduction across threads inside the loop.
    lane_n = tl.full([BS], 0.0, ACC)
    lane_mean = tl.full([BS, BC], 0.0, ACC)
    lane_m2 = tl.full([BS, BC], 0.0, ACC)
    s_lo = k * CHUNK
    s_hi = tl.minimum(s_lo + CHUNK, S)
    for s0 in range(s_lo, s_hi, BS):
        s = s0 + tl.arange(0, BS)
        s_ok = s < s_hi
        if HAS_MASK:
            s_ok = s_ok & (tl.load(mask_ptr + n.to(tl.int64) * S + s, mask=s_ok, other=0) != 0)
        ok = s_ok[:, None] & c_ok[None, :]
        if CL:
            offs = s[:, None].to(tl.int64) * C + c[None, :]
        else:
            offs = s[:, None] + c[None, :].to(tl.int64) * S
        x = tl.load(base + offs, mask=ok, other=0.0).to(ACC)
        v = s_ok.to(ACC)
        lane_n += v
        step = v / tl.maximum(lane_n, 1.0)  # 1/n for a lane that takes this value, else 0
        delta = x - lane_mean
        lane_mean += delta * step[:, None]
        lane_m2 += delta * (x - lane_mean) * v[:, None]
    # Chan et al.: merge the BS lanes of each channel, the mean first, then the deviations.
    count = tl.reduce(lane_n, 0, _ADD)
    mean = tl.reduce(lane_mean * lane_n[:, None], 0, _ADD) / tl.maximum(count, 1.0)
    d = lane_mean - mean[None, :]
    m2 = tl.reduce(lane_m2 + lane_n[:, None] * d * d, 0, _ADD)
    out = (n.to(tl.int64) * K + k) * C + c
    tl.store(part_ptr + out, mean, mask=c_ok)
    tl.store(pm2_ptr + out, m2, mask=c_ok)
    if HAS_MASK:
        if cb == 0:
            tl.store(pcnt_ptr + n * K + k, count)


@triton.jit
def _finalize_kernel(
    part_ptr,  # ACC partials of _stats_kernel: means, M2 ([N, K, C] each), counts ([N, K], if HAS_MASK;
    #            else counts follow CHUNK)
    stats_ptr,  # [3, NSTAT] ACC out: mean, 1 / sqrt(var + eps) (biased variance) and element count
    #             of each statistic group; the grid is (NSTAT,)
    rmean_ptr,  # [C] running mean, updated in place (only if UPDATE_RUNNING)
    rvar_ptr,  # [C] running variance, updated in place with the unbiased variance
    N,
    C,
    K,
    S,
    CHUNK,
    G,
    CG,
    eps: tl.float64,  # Python floats are passed as fp32 unless annotated: float64 input would lose them
    momentum: tl.float64,
    REDUCE_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    ACC: tl.constexpr,
    BK: tl.constexpr,
    BJ: tl.constexpr,
):
    # Partials of group o: items i = n * K + k (sample n, chunk k) over [i_lo, i_hi), and
    # channels c0 + j, j < CG. Batch norm: group o is channel o over all samples; group or
    # instance norm: group o is (n, g) = (o // G, o % G).
    o = tl.program_id(0)
    NSTAT = tl.num_programs(0)
    pmean_ptr = part_ptr
    pm2_ptr = part_ptr + N * K * C
    pcnt_ptr = part_ptr + 2 * N * K * C
    if REDUCE_N:
        i_lo = 0
        i_hi = N * K
        c0 = o
    else:
        i_lo = (o // G) * K
        i_hi = i_lo + K
        c0 = (o % G) * CG
    acc_n = tl.full([BK, BJ], 0.0, ACC)
    acc_s = tl.full([BK, BJ], 0.0, ACC)
    for j0 in range(0, CG, BJ):
        for i0 in range(i_lo, i_hi, BK):
            ii = i0 + tl.arange(0, BK)
            jj = j0 + tl.arange(0, BJ)
            ok = (ii < i_hi)[:, None] & (jj < CG)[None, :]
            offs = ii[:, None] * C + (c0 + jj)[None, :]
            m = tl.load(pmean_ptr + offs, mask=ok, other=0.0)
            if HAS_MASK:
                cnt = tl.load(pcnt_ptr + ii, mask=ii < i_hi, other=0.0)[:, None]
            else:
                cnt = tl.minimum(CHUNK, S - (ii % K) * CHUNK).to(ACC)[:, None]
            cnt = tl.where(ok, cnt, 0.0)
            acc_n += cnt
            acc_s += cnt * m
    count = tl.reduce(acc_n, None, _ADD)
    mean = tl.reduce(acc_s, None, _ADD) / tl.maximum(count, 1.0)
    acc_m2 = tl.full([BK, BJ], 0.0, ACC)
    for j0 in range(0, CG, BJ):
        for i0 in range(i_lo, i_hi, BK):
            ii = i0 + tl.arange(0, BK)
            jj = j0 + tl.arange(0, BJ)
            ok = (ii < i_hi)[:, None] & (jj < CG)[None, :]
            offs = ii[:, None] * C + (c0 + jj)[None, :]
            m = tl.load(pmean_ptr + offs, mask=ok, other=0.0)
            m2 = tl.load(pm2_ptr + offs, mask=ok, other=0.0)
            if HAS_MASK:
                cnt = tl.load(pcnt_ptr + ii, mask=ii < i_hi, other=0.0)[:, None]
            else:
                cnt = tl.minimum(CHUNK, S - (ii % K) * CHUNK).to(ACC)[:, None]
            cnt = tl.where(ok, cnt, 0.0)
            d = m - mean
            acc_m2 += m2 + cnt * d * d
    var = tl.reduce(acc_m2, None, _ADD) / tl.maximum(count, 1.0)
    tl.store(stats_ptr + o, mean)
    tl.store(stats_ptr + NSTAT + o, (1.0 / tl.sqrt(var + eps)).to(ACC))  # (eps and momentum are fp64: ACC after)
    tl.store(stats_ptr + 2 * NSTAT + o, count)
    if UPDATE_RUNNING:
        rm = tl.load(rmean_ptr + o).to(ACC)
        rv = tl.load(rvar_ptr + o).to(ACC)
        unbiased = var * count / tl.maximum(count - 1.0, 1.0)  # one value (direct calls only): var 0, not 0/0
        tl.store(rmean_ptr + o, ((1.0 - momentum) * rm + momentum * mean).to(rmean_ptr.dtype.element_ty))
        tl.store(rvar_ptr + o, ((1.0 - momentum) * rv + momentum * unbiased).to(rvar_ptr.dtype.element_ty))


@triton.jit
def _apply_kernel(
    x_ptr,  # [N, C, S] input (layout as in _stats_kernel)
    y_ptr,  # [N, C, S] output, same strides as x
    mask_ptr,  # [N, S] uint8 (only if HAS_MASK): y = 0 where 0
    stats_ptr,  # [2, NSTAT] ACC: mean, rstd (a count may follow)
    w_ptr,  # [C] (only if HAS_W)
    b_ptr,  # [C] (only if HAS_B)
    C,
    S,
    sn,
    ST,
    CB,
    STAT_SN,
    CG,
    NSTAT,
    CL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
):
    pid = tl.program_id(0)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    # program -> (sample n, position block k, channel block cb), in memory order:
    # channels-last (n, k, cb), NCHW (n, cb, k). (Inlined: a jitted helper costs ms per
    # call in the interpreter.)
    if CL:
        n = pid // (ST * CB)
        k = (pid // CB) % ST
        cb = pid % CB
    else:
        n = pid // (CB * ST)
        cb = (pid // ST) % CB
        k = pid % ST
    st = k
    c = cb * BC + tl.arange(0, BC)
    c_ok = c < C
    s = st * BS + tl.arange(0, BS)
    s_ok = s < S
    ok = s_ok[:, None] & c_ok[None, :]
    if CL:
        offs = n.to(tl.int64) * sn + s[:, None].to(tl.int64) * C + c[None, :]
    else:
        offs = n.to(tl.int64) * sn + s[:, None] + c[None, :].to(tl.int64) * S
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
    stat = n * STAT_SN + c // CG
    mean = tl.load(stats_ptr + stat, mask=c_ok, other=0.0)
    scale = tl.load(stats_ptr + NSTAT + stat, mask=c_ok, other=0.0)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_B:
        y += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
    if HAS_MASK:
        valid = tl.load(mask_ptr + n.to(tl.int64) * S + s, mask=s_ok, other=0) != 0
        y = tl.where(valid[:, None], y, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_partial_kernel(
    x_ptr,  # [N, C, S] input
    dy_ptr,  # [N, C, S] output gradient, same strides as x
    mask_ptr,  # [N, S] uint8 (only if HAS_MASK): dy counts only where 1
    stats_ptr,  # [2, NSTAT] ACC: mean, rstd
    gpart_ptr,  # ACC out: [N, K, C] sums of dy per (sample, chunk, channel), then [N, K, C] of dy * xhat
    N,
    C,
    S,
    sn,
    K,
    CB,
    CHUNK,
    STAT_SN,
    CG,
    NSTAT,
    CL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
):
    psdyx_ptr = gpart_ptr + N * K * C
    pid = tl.program_id(0)
    # program -> (sample n, position block k, channel block cb), in memory order:
    # channels-last (n, k, cb), NCHW (n, cb, k). (Inlined: a jitted helper costs ms per
    # call in the interpreter.)
    if CL:
        n = pid // (K * CB)
        k = (pid // CB) % K
        cb = pid % CB
    else:
        n = pid // (CB * K)
        cb = (pid // K) % CB
        k = pid % K
    c = cb * BC + tl.arange(0, BC)
    c_ok = c < C
    stat = n * STAT_SN + c // CG
    mean = tl.load(stats_ptr + stat, mask=c_ok, other=0.0)
    rstd = tl.load(stats_ptr + NSTAT + stat, mask=c_ok, other=0.0)
    base = n.to(tl.int64) * sn
    acc_dy = tl.full([BS, BC], 0.0, ACC)
    acc_dyx = tl.full([BS, BC], 0.0, ACC)
    s_lo = k * CHUNK
    s_hi = tl.minimum(s_lo + CHUNK, S)
    for s0 in range(s_lo, s_hi, BS):
        s = s0 + tl.arange(0, BS)
        s_ok = s < s_hi
        if HAS_MASK:
            s_ok = s_ok & (tl.load(mask_ptr + n.to(tl.int64) * S + s, mask=s_ok, other=0) != 0)
        ok = s_ok[:, None] & c_ok[None, :]
        if CL:
            offs = base + s[:, None].to(tl.int64) * C + c[None, :]
        else:
            offs = base + s[:, None] + c[None, :].to(tl.int64) * S
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(ACC)
        acc_dy += dy
        acc_dyx += dy * ((x - mean[None, :]) * rstd[None, :])
    out = (n.to(tl.int64) * K + k) * C + c
    tl.store(gpart_ptr + out, tl.reduce(acc_dy, 0, _ADD), mask=c_ok)
    tl.store(psdyx_ptr + out, tl.reduce(acc_dyx, 0, _ADD), mask=c_ok)


@triton.jit
def _finalize_grad_kernel(
    gpart_ptr,  # ACC: [N, K, C] partial sums of dy, [N, K, C] of dy * xhat, then (out, only if
    #             STAT_GRAD) [2, NSTAT]: the group means of w * dy and of w * dy * xhat
    w_ptr,  # [C] weight (only if HAS_W)
    stats_ptr,  # [3, NSTAT] ACC: mean, rstd, element count per statistic group (count read if STAT_GRAD)
    dw_ptr,  # [C] out, weight's dtype: sum of dy * xhat (only if DW)
    db_ptr,  # [C] out, bias's dtype: sum of dy (only if DB)
    N,
    C,
    K,
    G,
    CG,
    NSTAT,
    REDUCE_N: tl.constexpr,
    HAS_W: tl.constexpr,
    STAT_GRAD: tl.constexpr,
    DW: tl.constexpr,
    DB: tl.constexpr,
    ACC: tl.constexpr,
    BK: tl.constexpr,
    BJ: tl.constexpr,
    BI: tl.constexpr,
):
    # Programs [0, NSTAT) take role 1 (only when STAT_GRAD; NSTAT is 0 otherwise), the next C
    # programs role 2 (only when DW or DB).
    pid = tl.program_id(0)
    psdy_ptr = gpart_ptr
    psdyx_ptr = gpart_ptr + N * K * C
    if pid >= NSTAT:  # role 2: dw, db of channel c, over all samples and chunks
        c = pid - NSTAT
        acc_dy = tl.full([BI], 0.0, ACC)
        acc_dyx = tl.full([BI], 0.0, ACC)
        for i0 in range(0, N * K, BI):
            i = i0 + tl.arange(0, BI)
            ok = i < N * K
            offs = i.to(tl.int64) * C + c
            acc_dy += tl.load(psdy_ptr + offs, mask=ok, other=0.0)
            acc_dyx += tl.load(psdyx_ptr + offs, mask=ok, other=0.0)
        if DW:
            tl.store(dw_ptr + c, tl.reduce(acc_dyx, 0, _ADD).to(dw_ptr.dtype.element_ty))
        if DB:
            tl.store(db_ptr + c, tl.reduce(acc_dy, 0, _ADD).to(db_ptr.dtype.element_ty))
    else:  # role 1: the two group means that dx needs
        if STAT_GRAD:
            o = pid  # items as in _finalize_kernel
            if REDUCE_N:
                i_lo = 0
                i_hi = N * K
                c0 = o
            else:
                i_lo = (o // G) * K
                i_hi = i_lo + K
                c0 = (o % G) * CG
            acc1 = tl.full([BK, BJ], 0.0, ACC)
            acc2 = tl.full([BK, BJ], 0.0, ACC)
            for j0 in range(0, CG, BJ):
                jj = j0 + tl.arange(0, BJ)
                if HAS_W:
                    w = tl.load(w_ptr + c0 + jj, mask=jj < CG, other=0.0).to(ACC)
                else:
                    w = tl.where(jj < CG, 1.0, 0.0).to(ACC)
                for i0 in range(i_lo, i_hi, BK):
                    ii = i0 + tl.arange(0, BK)
                    ok = (ii < i_hi)[:, None] & (jj < CG)[None, :]
                    offs = ii[:, None] * C + (c0 + jj)[None, :]
                    acc1 += w[None, :] * tl.load(psdy_ptr + offs, mask=ok, other=0.0)
                    acc2 += w[None, :] * tl.load(psdyx_ptr + offs, mask=ok, other=0.0)
            inv = 1.0 / tl.maximum(tl.load(stats_ptr + 2 * NSTAT + o), 1.0)
            c_ptr = gpart_ptr + 2 * N * K * C
            tl.store(c_ptr + o, tl.reduce(acc1, None, _ADD) * inv)
            tl.store(c_ptr + NSTAT + o, tl.reduce(acc2, None, _ADD) * inv)


@triton.jit
def _apply_grad_kernel(
    x_ptr,  # [N, C, S] input
    dy_ptr,  # [N, C, S] output gradient, same strides as x
    dx_ptr,  # [N, C, S] input gradient, same strides as x
    mask_ptr,  # [N, S] uint8 (only if HAS_MASK): dx = 0 where 0
    stats_ptr,  # [2, NSTAT] ACC: mean, rstd
    gpart_ptr,  # ACC: at C_OFF, [2, NSTAT] the group means of w * dy and w * dy * xhat (if STAT_GRAD)
    w_ptr,  # [C] (only if HAS_W)
    C,
    S,
    sn,
    ST,
    CB,
    STAT_SN,
    CG,
    NSTAT,
    C_OFF,
    CL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr,
    STAT_GRAD: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
):
    pid = tl.program_id(0)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    # program -> (sample n, position block k, channel block cb), in memory order:
    # channels-last (n, k, cb), NCHW (n, cb, k). (Inlined: a jitted helper costs ms per
    # call in the interpreter.)
    if CL:
        n = pid // (ST * CB)
        k = (pid // CB) % ST
        cb = pid % CB
    else:
        n = pid // (CB * ST)
        cb = (pid // ST) % CB
        k = pid % ST
    st = k
    c = cb * BC + tl.arange(0, BC)
    c_ok = c < C
    s = st * BS + tl.arange(0, BS)
    s_ok = s < S
    ok = s_ok[:, None] & c_ok[None, :]
    if CL:
        offs = n.to(tl.int64) * sn + s[:, None].to(tl.int64) * C + c[None, :]
    else:
        offs = n.to(tl.int64) * sn + s[:, None] + c[None, :].to(tl.int64) * S
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(ACC)
    stat = n * STAT_SN + c // CG
    rstd = tl.load(stats_ptr + NSTAT + stat, mask=c_ok, other=0.0)
    if HAS_W:
        g = dy * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
    else:
        g = dy
    if STAT_GRAD:
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
        mean = tl.load(stats_ptr + stat, mask=c_ok, other=0.0)
        c_ptr = gpart_ptr + C_OFF
        c1 = tl.load(c_ptr + stat, mask=c_ok, other=0.0)
        c2 = tl.load(c_ptr + NSTAT + stat, mask=c_ok, other=0.0)
        xhat = (x - mean[None, :]) * rstd[None, :]
        dx = (g - c1[None, :] - xhat * c2[None, :]) * rstd[None, :]
    else:
        dx = g * rstd[None, :]
    if HAS_MASK:
        valid = tl.load(mask_ptr + n.to(tl.int64) * S + s, mask=s_ok, other=0) != 0
        dx = tl.where(valid[:, None], dx, 0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------
# Geometry and launch shapes
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """``x`` seen as ``[N, C, S]``: batch stride ``sn``; ``cl`` = channels contiguous (stride 1)."""

    N: int
    C: int
    S: int
    sn: int
    cl: bool


def _dense(shape, stride, order) -> bool:
    """True if the dims in ``order`` (outermost first) are densely packed, as torch counts it
    (size-1 dims may have any stride)."""
    expected = 1
    for d in reversed(order):
        if shape[d] != 1 and stride[d] != expected:
            return False
        expected *= shape[d]
    return True


def geometry(x: torch.Tensor, fold_batch: bool = False):
    """The ``[N, C, S]`` view of ``x``, or ``None`` for a layout the kernels do not take.

    ``fold_batch`` (batch norm): a channels-last tensor is one long run of positions, so the
    batch folds into the positions (``N = 1``, ``S = N * S``) and every program sees more data.
    """
    return _geometry(tuple(x.shape), tuple(x.stride()), bool(fold_batch))


@functools.lru_cache(maxsize=1024)
def _geometry(shape, stride, fold_batch):
    if len(shape) < 2:
        return None
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    dims = tuple(range(len(shape)))
    if _dense(shape, stride, dims):
        g = Geometry(N, C, S, C * S, S == 1)  # S == 1: channels are the contiguous dim
    elif _dense(shape, stride, (0, *dims[2:], 1)):
        g = Geometry(N, C, S, S * C, True)
    else:
        return None
    if fold_batch and g.cl and g.N > 1:
        g = Geometry(1, C, N * S, 0, True)
    return g


@dataclass(frozen=True)
class Plan:
    BS: int
    BC: int
    CB: int  # channel blocks
    ST: int  # position tiles (apply kernels)
    K: int  # position chunks (stats and gradient-partial kernels)
    CHUNK: int  # positions per chunk, a multiple of BS


def plan(g: Geometry, device: torch.device) -> Plan:
    return _plan(g, num_sms(device), tuple(TUNING.values()))


@functools.lru_cache(maxsize=1024)
def _plan(g: Geometry, sms: int, _tuning) -> Plan:
    tile = TUNING["tile"]
    if g.cl:
        BC = min(next_pow2(g.C), TUNING["max_channel_block"])
        BS = min(max(1, tile // BC), next_pow2(g.S))
    else:
        BS = min(next_pow2(g.S), TUNING["max_spatial_block"])
        BC = min(max(1, tile // BS), next_pow2(g.C))
    CB = cdiv(g.C, BC)
    ST = cdiv(g.S, BS)
    target = sms * TUNING["stats_programs_per_sm"]
    K = max(1, min(ST, cdiv(target, g.N * CB)))
    CHUNK = cdiv(ST, K) * BS
    K = cdiv(g.S, CHUNK)
    return Plan(BS, BC, CB, ST, K, CHUNK)


def _item_blocks(items: int, CG: int):
    """Tile of the finalize kernels: ``BK`` (sample, chunk) items by ``BJ`` channels."""
    BJ = min(next_pow2(CG), 64)
    BK = min(next_pow2(items), max(1, 1024 // BJ))
    return BK, BJ


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
# What a call launches depends only on (shape, strides, dtypes, pointer alignment, device,
# flags, TUNING): a ``Forward`` holds it, built once per such key, and holds the ``Backward``s
# of its calls (keyed by what the backward adds: dy's alignment and which gradients are
# needed). A call then costs its allocations and its launches.
@dataclass(frozen=True)
class Stats:
    """Which (n, c) pairs share statistics: group ``n * STAT_SN + c // CG`` of ``NSTAT``."""

    NSTAT: int
    STAT_SN: int
    CG: int
    G: int  # groups per sample (group/instance norm); unused when reduce_n
    reduce_n: bool  # batch norm: statistics over the samples too


@functools.lru_cache(maxsize=1024)
def batch_stats(g: Geometry) -> Stats:
    return Stats(NSTAT=g.C, STAT_SN=0, CG=1, G=g.C, reduce_n=True)


@functools.lru_cache(maxsize=1024)
def group_stats(g: Geometry, num_groups: int) -> Stats:
    return Stats(NSTAT=g.N * num_groups, STAT_SN=num_groups, CG=g.C // num_groups, G=num_groups, reduce_n=False)


class Forward:
    """The launches of one forward configuration (see ``_forward_plan``) and its backwards."""

    def __init__(self, shape, stride, dtype, num_groups, batch, batch_stats_, mask, w, b, update, device):
        g = self.g = _geometry(shape, stride, batch)
        p = self.p = plan(g, device)
        st = self.st = batch_stats(g) if batch else group_stats(g, num_groups)
        self.acc = acc_torch(dtype)
        self.ACC = acc_dtype(dtype)
        self.dtype, self.mask, self.w, self.b, self.device, self.update = dtype, mask, w, b, device, update
        self.batch_stats = batch_stats_  # statistics from the batch (else running stats: BN eval)
        has_mask = mask is not None
        if batch_stats_:
            self.n_part = 2 * g.N * p.K * g.C + (g.N * p.K if has_mask else 0)
            self.stats = Launch(
                _stats_kernel, (g.N * p.K * p.CB,), TUNING["num_warps"],
                CL=g.cl, HAS_MASK=has_mask, ACC=self.ACC, BS=p.BS, BC=p.BC,
            )
            self.stats_ints = (g.N, g.C, g.S, g.sn, p.K, p.CB, p.CHUNK)
            BK, BJ = _item_blocks(p.K * (g.N if st.reduce_n else 1), st.CG)
            self.finalize = Launch(
                _finalize_kernel, (st.NSTAT,), 4,
                REDUCE_N=st.reduce_n, HAS_MASK=has_mask, UPDATE_RUNNING=update, ACC=self.ACC, BK=BK, BJ=BJ,
            )
            self.finalize_ints = (g.N, g.C, p.K, g.S, p.CHUNK, st.G, st.CG)
        self.apply = Launch(
            _apply_kernel, (g.N * p.CB * p.ST,), TUNING["num_warps"],
            CL=g.cl, HAS_MASK=has_mask, HAS_W=w is not None, HAS_B=b is not None, REVERSE=bool(TUNING["reverse"]),
            ACC=self.ACC, BS=p.BS, BC=p.BC,
        )
        self.apply_ints = (g.C, g.S, g.sn, p.ST, p.CB, st.STAT_SN, st.CG, st.NSTAT)
        self.backwards = {}

    def backward(self, dy_aligned: bool, need_dw: bool, need_db: bool) -> Backward:
        key = (dy_aligned, need_dw, need_db)
        bwd = self.backwards.get(key)
        if bwd is None:
            bwd = self.backwards[key] = Backward(self, need_dw, need_db)
        return bwd


class Backward:
    """The launches of one backward: gradient partials, their reduction, the elementwise dx."""

    def __init__(self, f: Forward, need_dw: bool, need_db: bool):
        g, p, st = f.g, f.p, f.st
        stat_grad = f.batch_stats  # with running statistics (BN eval) mean and rstd are constants
        self.need_dw, self.need_db = need_dw, need_db
        has_mask = f.mask is not None
        self.partial = self.finalize = None
        self.n_work = 0
        c_off = 2 * g.N * p.K * g.C
        if stat_grad or need_dw or need_db:
            self.n_work = c_off + (2 * st.NSTAT if stat_grad else 0)
            self.partial = Launch(
                _grad_partial_kernel, (g.N * p.K * p.CB,), TUNING["num_warps"],
                CL=g.cl, HAS_MASK=has_mask, ACC=f.ACC, BS=p.BS, BC=p.BC,
            )
            self.partial_ints = (g.N, g.C, g.S, g.sn, p.K, p.CB, p.CHUNK, st.STAT_SN, st.CG, st.NSTAT)
            nstat = st.NSTAT if stat_grad else 0
            BK, BJ = _item_blocks(p.K * (g.N if st.reduce_n else 1), st.CG)
            self.finalize = Launch(
                _finalize_grad_kernel, (nstat + (g.C if (need_dw or need_db) else 0),), 4,
                REDUCE_N=st.reduce_n, HAS_W=f.w is not None, STAT_GRAD=stat_grad, DW=need_dw, DB=need_db,
                ACC=f.ACC, BK=BK, BJ=BJ, BI=TUNING["finalize_items"],
            )
            self.finalize_ints = (g.N, g.C, p.K, st.G, st.CG, nstat)
        self.apply = Launch(
            _apply_grad_kernel, (g.N * p.CB * p.ST,), TUNING["num_warps"],
            CL=g.cl, HAS_MASK=has_mask, HAS_W=f.w is not None, STAT_GRAD=stat_grad,
            REVERSE=bool(TUNING["reverse"]), ACC=f.ACC, BS=p.BS, BC=p.BC,
        )
        self.apply_ints = (g.C, g.S, g.sn, p.ST, p.CB, st.STAT_SN, st.CG, st.NSTAT, c_off)


@functools.lru_cache(maxsize=1024)
def _forward_plan(shape, stride, dtype, num_groups, batch, batch_stats_, mask, w, b, update, device,
                  _x_aligned, _running, _tuning) -> Forward:
    # _x_aligned, _running (the running statistics' specs) and _tuning only key the cache
    return Forward(shape, stride, dtype, num_groups, batch, batch_stats_, mask, w, b, update, device)


def forward_plan(x, num_groups, batch, training, mask, weight, bias, running_mean, running_var) -> Forward:
    """The cached ``Forward`` for this call (``mask``: the uint8 view the kernels read)."""
    update = batch and training and running_mean is not None
    return _forward_plan(
        x.shape, x.stride(), x.dtype, num_groups, batch, not (batch and not training),
        None if mask is None else mask.data_ptr() % 16 == 0, spec(weight), spec(bias), update, x.device,
        x.data_ptr() % 16 == 0, (spec(running_mean), spec(running_var)) if update else None, tuple(TUNING.values()),
    )


def forward(f: Forward, x, mask, weight, bias, running_mean, running_var, momentum, eps):
    """``(y, stats)``: ``y`` with ``x``'s strides; ``stats`` the per-group mean, rstd and count
    (``[3, NSTAT]`` flat, ACC); with running statistics (``f.batch_stats`` false) mean and rstd
    come from them. Updates the running statistics in place when ``f`` says so."""
    if f.batch_stats:
        part = x.new_empty(f.n_part, dtype=f.acc)
        stats = x.new_empty(3 * f.st.NSTAT, dtype=f.acc)
        f.stats(x, mask, part, *f.stats_ints)
        rm, rv = (running_mean, running_var) if f.update else (None, None)
        f.finalize(part, stats, rm, rv, *f.finalize_ints, eps, momentum)
    else:
        stats = torch.cat([running_mean.to(f.acc), torch.rsqrt(running_var.to(f.acc) + eps)])
    y = torch.empty_like(x)
    f.apply(x, y, mask, stats, weight, bias, *f.apply_ints)
    return y, stats


def backward(f: Forward, dy, x, mask, stats, weight, need_dw: bool, need_db: bool):
    """``(dx, dw, db)``: ``dx`` with ``x``'s strides, ``dw`` (``db``) in the weight's (bias's)
    dtype when ``need_dw`` (``need_db``) and the parameter exists, else ``None``."""
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    need_dw = bool(need_dw) and f.w is not None
    need_db = bool(need_db) and f.b is not None
    b = f.backward(dy.data_ptr() % 16 == 0, need_dw, need_db)
    work = x.new_empty(b.n_work, dtype=f.acc) if b.n_work else None
    dw = db = None
    if b.partial is not None:
        b.partial(x, dy, mask, stats, work, *b.partial_ints)
        C = f.g.C
        dw = x.new_empty(C, dtype=f.w[0]) if need_dw else None
        db = x.new_empty(C, dtype=f.b[0]) if need_db else None
        b.finalize(work, weight, stats, dw, db, *b.finalize_ints)
    dx = torch.empty_like(x)
    b.apply(x, dy, dx, mask, stats, work, weight, *b.apply_ints)
    return dx, dw, db


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------
def _recompute(ctx):
    """The forward as differentiable torch ops on the saved inputs, for a double backward:
    group norm, batch norm with the batch's statistics or, in evaluation, the running ones as
    they were in the forward, masked batch norm over the valid positions."""
    x, weight, m, _ = ctx.saved_tensors
    bias = ctx.bias
    F = torch.nn.functional
    xa, w, b = upcast_for_recompute(x, weight, bias)  # in float32 for half input, as the kernels compute
    if not ctx.batch:
        if w is None and b is not None:  # torch's group_norm backward fails on a bias without a weight
            w = torch.ones_like(b)
        # contiguous: torch's group_norm backward asks a channels-last input for its layout, which
        # vmap does not answer (a vmapped backward comes here), and on the CPU crashes on such an
        # input when only the weight or bias needs a gradient (see functional.group_norm)
        y = F.group_norm(xa.contiguous(), ctx.num_groups, w, b, ctx.eps)
    elif m is not None:
        from normlab.functional.masked_batch_norm import masked_batch_norm_composite

        y = masked_batch_norm_composite(xa, m.view(torch.bool), w, b, ctx.fixed, ctx.eps)
    else:
        rm, rv = ctx.fixed if ctx.fixed is not None else (None, None)
        y = F.batch_norm(xa, rm, rv, w, b, ctx.fixed is None, 0.0, ctx.eps)
    return y.to(x.dtype), (x, weight, bias) + (None,) * 8


class ChannelNormFunction(torch.autograd.Function):
    """Batch norm (``batch=True``, optionally masked) or group norm (``num_groups``) in one Function.

    Differentiable through x, weight and bias. Saves ``x``, the weight, the mask and the
    per-group ``(mean, rstd, count)``; the running statistics of batch norm in training are
    updated in place by the forward, as torch does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mask, running_mean, running_var, num_groups, batch, training, momentum, eps):
        m = None if mask is None else mask.contiguous().view(torch.uint8)
        f = forward_plan(x, num_groups, batch, training, m, weight, bias, running_mean, running_var)
        y, stats = forward(f, x, m, weight, bias, running_mean, running_var, float(momentum or 0.0), eps)
        fmt = memory_format_of(x)  # torch's layout: channels-last kept, any other layout made contiguous
        if not y.is_contiguous(memory_format=fmt):  # (e.g. an (N, L, C) tensor transposed to (N, C, L))
            y = y.contiguous(memory_format=fmt)
        ctx.save_for_backward(x, weight, m, stats)
        ctx.plan = f
        # a double backward's recompute only: bias as a plain reference (no gradient depends on
        # its value; saving it would make an in-place update before the backward an error), and
        # the evaluation statistics it holds fixed, copied (the buffers may move) when a
        # backward can come at all
        ctx.batch, ctx.num_groups, ctx.eps, ctx.bias = batch, num_groups, eps, bias
        ctx.fixed = None if not batch or training or not any(ctx.needs_input_grad) else (
            running_mean.detach().to(acc_torch(x.dtype)).clone(), running_var.detach().to(acc_torch(x.dtype)).clone())
        return y

    @staticmethod
    @twice_differentiable(_recompute)
    def backward(ctx, dy):
        x, weight, m, stats = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = backward(ctx.plan, dy, x, m, stats, weight, need[1], need[2])
        return dx, dw, db, None, None, None, None, None, None, None, None
