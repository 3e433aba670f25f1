"""Synchronized batch normalization on any device: statistics over the whole data-parallel batch.

Drop-in for ``torch.nn.SyncBatchNorm`` (same arguments and state_dict keys as batch norm), but
it also runs on the CPU with the gloo backend (torch's is CUDA-only), takes ranks with uneven
or zero batch sizes, and merges the per-rank statistics with Chan's parallel formula instead
of summing squares.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from normlab import _checks
from normlab.functional._core import acc_dtype, first_order_only, update_running_
from normlab.nn.batch_norm import _BatchNorm
from normlab.nn.factory import _no_arg, register_norm


def _gather_dtype(device: torch.device) -> torch.dtype:
    # counts above 2**24 (N*H*W per rank) are not exact in float32; MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def merge_moments(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """Chan et al.'s parallel merge of per-part statistics along dim 0.

    .. math:: n = \\sum_r n_r, \\quad \\mu = \\sum_r n_r \\mu_r / n, \\quad
              M_2 = \\sum_r M_{2,r} + \\sum_r n_r (\\mu_r - \\mu)^2

    Args:
        count: (R,) or (R, 1) values per part (0 for an empty part).
        mean, m2: (R, C) each part's mean and sum of squared deviations from it.

    Returns:
        ``(n, mean, m2)``: the total count (a 0-D tensor) and (C,) merged mean and M2.
        Parts with count 0 contribute nothing; if ``n`` is 0 the mean and M2 are 0.
    """
    count = count.reshape(-1, 1)
    n = count.sum()
    mu = (count * mean).sum(0) / n.clamp(min=1)
    return n, mu, m2.sum(0) + (count * (mean - mu).square()).sum(0)


def _normalized(xa, mean_hi, mean_lo, rstd, view):
    """``(x - mean) * rstd`` with the mean given as ``mean_hi + mean_lo``."""
    return (xa - mean_hi.view(view)).sub_(mean_lo.view(view)).mul_(rstd.view(view))


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm whose statistics and input gradient span every rank of ``group``.

    Forward: each rank computes (n_r, mean_r, M2_r) per channel (two-pass, locally), one
    ``all_gather`` brings all of them, and every rank merges them the same way
    (:func:`merge_moments`), so all ranks normalize with the same mean and biased variance
    ``M2 / n``. Backward, with ``xhat = (x - mean) * rstd`` and sums over every rank's batch
    and positions::

        dx = weight * rstd * (dy - sum(dy) / n - xhat * sum(dy * xhat) / n)

    so one ``all_reduce`` of (sum dy, sum dy*xhat) per channel is all it needs. The weight and
    bias gradients are this rank's own sums (``sum dy*xhat``, ``sum dy``): DDP (or the caller)
    reduces parameter gradients across ranks, as with torch's SyncBatchNorm.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group, world_size):
        c = x.shape[1]
        dims = (0,) + tuple(range(2, x.dim()))
        acc = acc_dtype(x.dtype)
        xa = x.to(acc)
        n_local = x.numel() // c if c else 0
        gdt = _gather_dtype(x.device)
        if n_local > 0:
            # the local mean to more than the accumulation dtype's digits: its rounding (5e-4 at a
            # mean of 1e4 in float32) shifted the merged mean and, through Chan's between-rank term,
            # the variance (0.03 off where one batch norm on the whole batch is 0.005 off): the
            # mean of what the rounded mean leaves, d = x - mean, corrects it, and gives M2 too
            rough = xa.mean(dim=dims, keepdim=True)
            var, fine = torch.var_mean(xa - rough, dim=dims, correction=0)
            packet = torch.cat([torch.tensor([n_local], dtype=gdt, device=x.device),
                                rough.reshape(c).to(gdt) + fine.to(gdt), (var.to(gdt) * n_local)])
        else:  # a rank with no samples still takes part, with count 0
            packet = torch.zeros(2 * c + 1, dtype=gdt, device=x.device)
        parts = [torch.empty_like(packet) for _ in range(world_size)]
        dist.all_gather(parts, packet, group=group)
        table = torch.stack(parts)
        n, mean, m2 = merge_moments(table[:, 0], table[:, 1:c + 1], table[:, c + 1:])
        n_total = int(n.item())
        ctx.n_total, ctx.group, ctx.has_bias = n_total, group, bias is not None
        if n_total == 0:  # every rank's batch is empty: as batch norm on an empty batch, an empty
            ctx.save_for_backward(x, weight)  # output, the running statistics left as they are
            return torch.empty_like(x)
        if n_total == 1:
            raise ValueError(
                f"SyncBatchNorm in training needs more than 1 value per channel across all ranks to compute its "
                f"statistics, got {n_total} (per-rank counts {[int(v) for v in table[:, 0].tolist()]}, this rank's "
                f"input shape {_checks.shape_str(x.shape)}); use eval mode or larger batches")
        var = m2 / n
        if running_mean is not None or running_var is not None:
            update_running_(running_mean, running_var, mean, var, n_total, momentum)
        # the mean as a sum of two acc-dtype parts, so x - mean keeps the merged mean's digits
        mean_hi = mean.to(acc)
        mean_lo = (mean - mean_hi.to(mean.dtype)).to(acc)
        rstd = (var + eps).rsqrt().to(acc)
        view = (1, c) + (1,) * (x.dim() - 2)
        xhat = _normalized(xa, mean_hi, mean_lo, rstd, view)
        y = xhat
        if weight is not None:
            y = y * weight.to(acc).view(view)
        if bias is not None:
            y = y + bias.to(acc).view(view)
        ctx.save_for_backward(x, weight, mean_hi, mean_lo, rstd)
        return y.to(x.dtype)

    @staticmethod
    @first_order_only("SyncBatchNorm", why="its backward all-reduces closed-form sums across the ranks")
    def backward(ctx, dy):
        if ctx.n_total == 0:  # every rank knows it (the same gathered table): none all-reduces
            x, weight = ctx.saved_tensors
            zeros = lambda t, i: torch.zeros_like(t) if t is not None and ctx.needs_input_grad[i] else None  # noqa: E731
            return (torch.zeros_like(x) if ctx.needs_input_grad[0] else None, zeros(weight, 1),
                    zeros(weight, 2) if ctx.has_bias else None, None, None, None, None, None, None)
        x, weight, mean_hi, mean_lo, rstd = ctx.saved_tensors
        c = x.shape[1]
        dims = (0,) + tuple(range(2, x.dim()))
        view = (1, c) + (1,) * (x.dim() - 2)
        acc = rstd.dtype
        dya = dy.to(acc)
        xhat = _normalized(x.to(acc), mean_hi, mean_lo, rstd, view)
        sums = torch.stack([dya.sum(dims), (dya * xhat).sum(dims)])  # (2, C): sum dy, sum dy*xhat (this rank)
        grad_weight = sums[1].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sums[0].to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            total = sums.clone()
            dist.all_reduce(total, group=ctx.group)
            scale = rstd if weight is None else rstd * weight.to(acc)
            grad_input = scale.view(view) * (dya - (total[0] / ctx.n_total).view(view)
                                             - xhat * (total[1] / ctx.n_total).view(view))
            grad_input = grad_input.to(x.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization whose statistics span every process of a data-parallel group.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    with mean and biased variance over the batch and positions of **all** ranks together, so
    training on R processes with batches B_1..B_R matches batch norm on their concatenation:
    outputs, input gradients and running statistics (parameter gradients once summed over
    ranks; DDP averages them, the gradient of the ranks' mean loss). Each rank sends its
    count, mean and M2 per channel (one ``all_gather``) and merges them with Chan's formula
    (:func:`merge_moments`), which stays accurate when the mean is large against the spread;
    backward all-reduces (sum dy, sum dy·xhat) per channel.

    - Any device and backend: gloo on the CPU, NCCL on CUDA.
    - Uneven batch sizes per rank; a rank with zero samples sends count 0 (it must still call
      forward and backward, as every rank must for any collective). One value per channel over
      all ranks is refused, as batch norm refuses it; none at all (every rank empty) is batch
      norm on an empty batch: an empty output, zero gradients, the running statistics as they
      were and the step counted.
    - Evaluation (and ``track_running_stats=False`` in evaluation) communicates nothing.
    - Without an initialized process group, in a group of one, or on a rank that is not in
      ``process_group``, it is plain batch norm (as torch's).
    - The first training forward checks once that every rank has the same ``num_features``.
    - State dict: batch norm's keys; loads from and into ``BatchNorm*d`` and torch's
      ``SyncBatchNorm``.

    All ranks must agree on whether the input needs a gradient (as in torch). Double backward
    (``create_graph=True``, e.g. a gradient penalty) raises: the backward's cross-rank sums are
    closed-form.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Default 1e-5.
        momentum: weight of the new statistics in the running estimates (``None`` =
            cumulative average). Default 0.1.
        affine: learn γ (ones) and β (zeros). Default True.
        track_running_stats: keep running estimates. Default True.
        process_group: the group to synchronize over; ``None`` = the default (world) group.

    Shape:
        Input (N, C, *) on each rank (N may differ between ranks, and be 0); output the same.

    Examples::

        >>> # in each process, after torch.distributed.init_process_group("gloo")
        >>> bn = normlab.nn.SyncBatchNorm(16)
        >>> y = bn(torch.randn(8, 16, 5, 5))          # statistics over every rank's 8 samples
        >>> model, changes = normlab.tools.convert(model, "sync_batch")   # a whole model
    """

    _layout = "(N, C, *)"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group
        # spatial dims of the layer this one replaced (set by normlab.tools.convert), so converting back
        # can rebuild BatchNorm1d/2d/3d; None when unknown
        self.spatial_dims: Optional[int] = None
        self._checked_group: Optional[int] = None  # id of the group whose ranks agreed on num_features

    def _check_input(self, input: torch.Tensor) -> None:
        name = type(self).__name__
        _checks.check_floating(input, name, "tensor")
        if input.dim() < 2:
            raise ValueError(f"{name} expects an input of shape {self._layout} with at least 2 dims, got a "
                             f"{input.dim()}-D input of shape {_checks.shape_str(input.shape)}")
        _checks.check_channels(input.shape, self.num_features, name)
        if input.shape[1] == 0:  # torch's SyncBatchNorm refuses it too (its BatchNorm raises an IndexError)
            raise ValueError(f"{name} needs at least one channel, got input of shape {_checks.shape_str(input.shape)}")

    def _group_size(self) -> int:
        """World size of the group to synchronize over; 1 when there is none (then: local batch
        norm), and on a rank outside ``process_group`` (where torch's ``get_world_size`` gives -1:
        torch's SyncBatchNorm runs plain batch norm there too)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return max(dist.get_world_size(self.process_group), 1)

    def _check_channels_across_ranks(self, device: torch.device, world_size: int) -> None:
        """Once per group: every rank must have built this layer with the same number of channels."""
        group = id(self.process_group if self.process_group is not None else dist.group.WORLD)
        if self._checked_group == group:
            return
        mine = torch.tensor([self.num_features], dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(parts, mine, group=self.process_group)
        counts = [int(p.item()) for p in parts]
        if len(set(counts)) > 1:
            raise ValueError(
                f"SyncBatchNorm: every rank must have the same num_features, got {counts} on ranks 0..{world_size - 1} "
                f"(this rank: {self.num_features}); build the same model on every rank")
        self._checked_group = group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        world_size = self._group_size() if self.training else 1
        if world_size == 1:
            return super().forward(input)
        _checks.check_training_eps(self.eps, type(self).__name__)  # before any collective
        self._check_channels_across_ranks(input.device, world_size)
        return self._step(lambda momentum, running_mean, running_var: _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, momentum, self.eps, self.process_group,
            world_size))

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Torch's spelling: every ``BatchNorm*d`` and ``SyncBatchNorm`` (torch's or normlab's) in
        ``module`` becomes a :class:`SyncBatchNorm` of ``process_group`` that holds the same parameter and buffer objects (not copies: an
        optimizer or EMA built before the conversion still updates the live ones) and the same
        ``qconfig`` attribute (quantization), as torch does; returns the module.
        :func:`normlab.tools.convert` does the same with copies, and more (and the reverse,
        ``to="batch"``)."""
        from normlab.tools.convert import convert

        # every name each layer has (a shared one has several); Change.name is one of them
        originals = dict(module.named_modules(remove_duplicate=False))
        # torch's converts its SyncBatchNorm too (a subclass of its _BatchNorm): into process_group
        out, changes = convert(module, "sync_batch", only=("batch", "sync_batch"), process_group=process_group)
        for change in changes:
            source, target = originals[change.name], (out.get_submodule(change.name) if change.name else out)
            for name in ("running_mean", "running_var", "num_batches_tracked"):  # (convert shares the parameters)
                if getattr(source, name, None) is not None and getattr(target, name, None) is not None:
                    setattr(target, name, getattr(source, name))
            if hasattr(source, "qconfig"):
                target.qconfig = source.qconfig
        return out


# any number of spatial dims; keyword arguments (process_group, momentum ...) pass on
register_norm("sync_batch", _no_arg("sync_batch", lambda c, dim, kw: SyncBatchNorm(c, **kw)))
