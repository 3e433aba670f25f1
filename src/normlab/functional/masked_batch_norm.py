"""``masked_batch_norm``: batch norm over the valid positions of padded (N, C, L) sequences
(see :mod:`normlab.reference.masked_batch_norm` for the math and the conventions: the mask is
True at valid positions, padded outputs are 0 and get no gradient)."""
from __future__ import annotations

from typing import Optional

import torch

from normlab import _checks
from normlab.functional._core import (acc_dtype, check_channel_input, first_order_only, kernels, outside_autocast,
                                     untraced, update_running_, use_kernel)
from normlab.functional.batch_norm import batch_norm


def masked_batch_norm_composite(x, valid, weight, bias, fixed, eps):
    """The forward in plain differentiable torch ops (what the Triton kernel's double backward
    differentiates):
    ``valid`` the (N, L) bool mask, ``fixed`` ``(mean, var)`` in evaluation or ``None`` for
    the batch's statistics over the valid positions."""
    acc = acc_dtype(x.dtype)
    keep = valid[:, None, :]
    m3 = keep.to(acc)
    xa = x.to(acc).masked_fill(~keep, 0)  # whatever padding holds never enters
    if fixed is None:
        count = m3.sum()
        mean = xa.sum(dim=(0, 2), keepdim=True) / count
        d = (xa - mean) * m3
        var = (d * d).sum(dim=(0, 2), keepdim=True) / count
    else:
        mean, var = (t.view(1, -1, 1) for t in fixed)
        d = (xa - mean) * m3
    y = d * (var + eps).rsqrt()
    if weight is not None:
        y = y * weight.to(acc).view(1, -1, 1)
    if bias is not None:
        y = y + bias.to(acc).view(1, -1, 1) * m3
    return y.to(x.dtype)


class _MaskedBatchNorm(torch.autograd.Function):
    """Forward and the closed-form backward over the valid positions,
    ``dx = gamma rstd (dy - mean(dy) - xhat mean(dy xhat))`` (means over valid positions, 0 at
    padding), written to touch each full-size tensor as few times as possible: masked sums
    are batched matrix-vector products with the mask (no full-size temporary: ``vecdot`` with
    the broadcast mask made one, and was slower for it), and the centred input ``d = (x - mean) m``
    is kept instead of ``xhat`` (or ``x``: so there is no double backward, see
    :func:`~normlab.functional._core.first_order_only`)."""

    @staticmethod
    @outside_autocast
    def forward(ctx, x, m, weight, bias, running_mean, running_var, batch_stats, momentum, eps, count):
        n, c, length = x.shape
        if count is None:  # traced (see masked_batch_norm): the valid positions of the mask this call got
            count = int(torch.count_nonzero(m))
        acc = acc_dtype(x.dtype)
        xa = x.to(acc).contiguous()  # y contiguous, as batch norm's for (N, C, L)
        m3 = m.view(n, 1, length)
        mv = m.view(n, length, 1)
        # Padding is zeroed by a multiply with the mask (fast; torch's masked_fill with a
        # broadcast mask is ~20x slower on the CPU), but NaN * 0 is NaN: whatever padded positions
        # hold (NaN, inf) must not reach the statistics or the output. Such a value turns the
        # masked sums non-finite, which costs nothing to see where they are computed anyway
        # (batch statistics) and one matrix-vector pass otherwise; only then is the padding
        # zeroed with masked_fill first.
        sums = torch.bmm(xa, mv)
        dirty = not torch.isfinite(sums).all()
        if dirty:
            xa = xa.masked_fill(m3 == 0, 0)
            sums = torch.bmm(xa, mv)
        r = None
        if batch_stats:
            mean = sums.sum(dim=0).view(1, c, 1) / count
            d = (xa - mean).mul_(m3)
            # corrected two-pass (as SwitchableNorm's): the float32 sum behind mean rounds, and the
            # centred values' own mean r recovers it; d is kept as it is, x - mean being d - r at
            # valid positions, and r goes into the per-channel terms. Needed for outputs where the
            # mean is far from 0 against the spread, and for dx and dweight wherever dy's mean is
            # large (backward's sum(dy * d) takes sum(dy) * r), so on every call.
            r = d.sum(dim=(0, 2)).view(1, c, 1) / count  # (d is 0 at padding)
            mean = mean + r
            var = (torch.linalg.vecdot(d, d, dim=2).sum(dim=0).view(1, c, 1) / count - r * r).clamp_min(0)
            if running_mean is not None:
                with untraced():
                    update_running_(running_mean, running_var, mean, var, count, momentum)
        else:
            mean, var = running_mean.to(acc).view(1, c, 1), running_var.to(acc).view(1, c, 1)
            d = (xa - mean).mul_(m3)
        rstd = (var + eps).rsqrt_()
        scale = rstd if weight is None else rstd * weight.to(acc).view(1, c, 1)
        y = d * scale
        shift = None if r is None else -r * scale  # y = (d - r) * scale + bias at valid positions
        if bias is not None:
            shift = bias.to(acc).view(1, c, 1) if shift is None else shift + bias.to(acc).view(1, c, 1)
        if shift is not None:
            y.addcmul_(m3, shift)
        if dirty:  # a NaN at a valid position makes its channel's factors NaN: padding must still be 0
            y.masked_fill_(m3 == 0, 0)
        ctx.dirty = dirty
        ctx.save_for_backward(d, m, rstd, weight)
        ctx.r = r
        ctx.batch_stats, ctx.count, ctx.in_dtype = batch_stats, count, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    @first_order_only("MaskedBatchNorm1d")
    @outside_autocast
    def backward(ctx, dy):
        d, m, rstd, weight = ctx.saved_tensors
        n, c, length = d.shape
        m3 = m.view(n, 1, length)
        dy = dy.to(d.dtype)

        def masked_sums(g):  # per channel: sum of g over valid positions, and of g * d (d is 0 at padding)
            return (torch.bmm(g, m.view(n, length, 1)).sum(dim=0).view(1, c, 1),
                    torch.linalg.vecdot(g, d, dim=2).sum(dim=0).view(1, c, 1))

        s_dy, s_dyd = masked_sums(dy)
        dirty = ctx.dirty
        if not torch.isfinite(s_dy + s_dyd).all():  # one check (a finite overflow only takes the safe path)
            # NaN or inf in dy: at padding it must not count (NaN * 0 is NaN), as in the forward
            dy = dy.masked_fill(m3 == 0, 0)
            dirty = True
            s_dy, s_dyd = masked_sums(dy)
        r = ctx.r  # d is x - mean + r at valid positions (see forward)
        if r is not None:
            s_dyd = s_dyd - r * s_dy
        w = None if weight is None else weight.to(d.dtype).view(1, c, 1)
        scale = rstd if w is None else rstd * w
        dweight = (s_dyd * rstd).view(c).to(weight.dtype) if w is not None and ctx.needs_input_grad[2] else None
        dbias = s_dy.view(c).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[3] else None
        dx = None
        if ctx.needs_input_grad[0]:
            if ctx.batch_stats:
                k = ctx.count
                # dx = scale (dy - s_dy/k - (d - r) rstd^2 s_dyd/k) at valid positions, 0 at padding
                coef = -(scale * rstd) * (rstd * s_dyd) / k  # no rstd^3: it overflows
                dx = torch.addcmul(-scale * s_dy / k - coef * r, d, coef)  # (r: batch statistics have one)
                dx.addcmul_(dy, scale)
            else:
                dx = dy * scale
            # padding gets no gradient: a multiply by the mask, or, after non-finite input
            # (NaN * 0 is NaN), masked_fill
            dx = dx.masked_fill_(m3 == 0, 0) if dirty else dx.mul_(m3)
            dx = dx.to(ctx.in_dtype)
        return dx, None, dweight, dbias, None, None, None, None, None, None


def masked_batch_norm(
    input: torch.Tensor,
    mask: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalization of an (N, C, L) input over the positions where ``mask`` (N, L) is True.

    ``mask=None`` is plain :func:`normlab.functional.batch_norm`. Raises if the mask has the
    wrong shape, dtype or device, if a sequence (or the whole batch) is all padding, or if training
    sees a single valid position.
    """
    op = "masked_batch_norm"
    check_channel_input(input, op, (3,), "(N, C, L)", running_mean=running_mean, running_var=running_var,
                        weight=weight, bias=bias)
    _checks.check_running_args(running_mean, running_var, momentum, training, op)
    if mask is None:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op} expects the mask as a torch.Tensor (bool, shape (N, L)), got {type(mask).__name__}")
    _checks.check_mask(input.shape, mask, op)
    if mask.device != input.device:  # else a bare "no data" (meta) or a device mismatch deep in bmm
        raise ValueError(f"{op} expects the mask on the input's device ({input.device}), got a mask on {mask.device}")
    if input.shape[0] == 0:  # no sequences (none all padding): batch norm on an empty batch
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    valid_per_row = mask.sum(dim=1).tolist()
    _checks.check_no_empty_rows(valid_per_row, op)
    count = int(sum(valid_per_row))
    batch_stats = training or running_mean is None
    if batch_stats:
        _checks.check_training_eps(eps, op)  # as batch norm: a constant channel would give 0/0
        _checks.check_enough_valid(count, input.shape, op, running_stats=running_mean is not None)
    if use_kernel("masked_batch_norm", input, mask, running_mean, running_var, weight, bias, training):
        return kernels().unchecked.masked_batch_norm(input, mask, running_mean, running_var, weight, bias, training, momentum, eps)
    m = mask.to(acc_dtype(input.dtype))
    # torch.jit.trace would keep the count as a constant of the traced batch's mask, and a replay
    # with another mask divide by it; None lets the Function count the mask it is given
    traced_count = None if torch.jit.is_tracing() else count
    return _MaskedBatchNorm.apply(input, m, weight, bias, running_mean, running_var, batch_stats, momentum, eps,
                                  traced_count)
