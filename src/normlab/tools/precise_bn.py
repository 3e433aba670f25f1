"""Precise batch-norm statistics: replace the running averages by the exact population statistics.

Running averages (``momentum`` 0.1) weigh the last few dozen batches and lag behind weights
that were still moving; evaluation then normalizes with statistics no network ever produced
(Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", section 3). After training,
:func:`precise_bn` runs the model over many batches and sets, per channel of every
batch-statistics layer, the exact mean and unbiased variance of all the values it received.
"""
from __future__ import annotations

import itertools
import warnings
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from normlab.nn.sync_batch_norm import merge_moments
from normlab.tools.convert import norm_kind

# layers whose running statistics are batch statistics of their input (per channel, over N and positions)
PRECISE_KINDS = ("batch", "sync_batch", "batch_renorm", "switchable", "masked_batch")


class _Moments:
    """Per-channel count, mean and M2, merged batch by batch with Chan's formula (float64)."""

    def __init__(self):
        self.n = self.mean = self.m2 = None

    @torch.no_grad()
    def add(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        c = x.shape[1]
        xd = x.detach().to(torch.float64).transpose(0, 1).reshape(c, -1)  # (C, N * positions)
        if mask is not None:  # masked batch norm: only the valid positions (mask (N, L), True = valid)
            xd = xd[:, mask.reshape(-1).to(torch.bool)]
        n = xd.shape[1]
        if n == 0:
            return
        mean = xd.mean(1)
        m2 = (xd - mean[:, None]).square().sum(1)
        if self.n is None:
            self.n, self.mean, self.m2 = torch.tensor(float(n), dtype=torch.float64, device=x.device), mean, m2
            return
        counts = torch.stack([self.n, torch.tensor(float(n), dtype=torch.float64, device=x.device)])
        self.n, self.mean, self.m2 = merge_moments(counts, torch.stack([self.mean, mean]), torch.stack([self.m2, m2]))

    def merge_across(self, group, device, channels: int) -> None:
        """Merge this rank's moments with every other rank's in ``group`` (all must call it)."""
        world = dist.get_world_size(group)
        mine = torch.zeros(2 * channels + 1, dtype=torch.float64, device=device)
        if self.n is not None:
            mine[0], mine[1:channels + 1], mine[channels + 1:] = self.n, self.mean, self.m2
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        table = torch.stack(parts)
        if table[:, 0].sum() > 0:
            self.n, self.mean, self.m2 = merge_moments(table[:, 0], table[:, 1:channels + 1], table[:, channels + 1:])


Batches = Union[Iterable[Any], Callable[[], Iterable[Any]]]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return model(batch[0])  # (x, y, ...): the input comes first
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(f"precise_bn: a batch must be a tensor, an (x, y, ...) tuple whose first item is a tensor, or a "
                    f"dict of forward arguments, got {type(batch).__name__}; pass forward=lambda model, batch: ... "
                    f"for anything else")


def precise_bn(model: nn.Module, batches: Batches, num_batches: int = 200,
               forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> Dict[str, int]:
    """Set the running statistics of every batch-norm-like layer to their exact population values.

    For each layer with running statistics of the batch (``BatchNorm*d``, ``SyncBatchNorm``,
    batch renorm, switchable norm's batch branch, masked batch norm: torch's and normlab's),
    over all ``n`` values per channel it receives (batches and positions, all of them weighted
    equally, so batches of different sizes count by their size)::

        running_mean = mean(x)          running_var = sum((x - mean)^2) / (n - 1)

    The model runs with these layers in training mode (each normalizes with its batch's
    statistics, as in training, so every layer sees the inputs it saw in training); other
    modules keep their mode (call ``model.eval()`` first to run with dropout off, which is
    what evaluation will see). Statistics are accumulated in float64 and merged batch by
    batch with Chan's formula. A ``SyncBatchNorm`` (normlab's, or torch's on the GPU) in an
    initialized process group merges its statistics across ranks too (every rank must call
    ``precise_bn``; the ranks of every sync layer's group, with running statistics or not,
    agree before each batch, so with unequal batch counts all of them stop at the smallest
    count, and the returned counts say how many values each layer saw). Afterwards
    each layer's ``momentum``, ``num_batches_tracked`` and mode are what they were; the
    optimizer state and parameters are never touched. No gradients are computed.

    Args:
        model: the model (changed in place).
        batches: an iterable of batches (a DataLoader, a list) or a function returning one.
            A batch is a tensor, an ``(x, y, ...)`` tuple (``x`` is fed), or a dict of keyword
            arguments.
        num_batches: use at most this many batches. Default 200.
        forward: ``forward(model, batch)`` when a batch needs more than ``model(x)``.

    Returns:
        ``{layer name: values per channel it saw}`` for every layer updated (a layer that saw
        no values keeps its old statistics and is reported with 0).

    Raises:
        ValueError: ``batches`` yields nothing, or ``num_batches`` < 1.

    Examples::

        >>> counts = precise_bn(model, train_loader, num_batches=200)
        >>> counts   # {'layer1.0.bn1': 2508800, ...}
    """
    if num_batches < 1:
        raise ValueError(f"precise_bn: num_batches must be at least 1, got {num_batches}")
    layers = {name: m for name, m in model.named_modules()
              if norm_kind(m) in PRECISE_KINDS and getattr(m, "running_mean", None) is not None}
    if not layers:
        warnings.warn("precise_bn: the model has no layer with running statistics of its batches (batch norm, "
                      "sync batch norm, batch renorm, switchable or masked batch norm); nothing to update",
                      stacklevel=2)
        return {}
    moments = {name: _Moments() for name in layers}
    saved = {name: (m.training, m.momentum, m.num_batches_tracked.clone()
                    if getattr(m, "num_batches_tracked", None) is not None else None) for name, m in layers.items()}

    def hook_for(name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            c = getattr(module, "num_features", None)
            if isinstance(x, torch.Tensor) and c is not None and (x.dim() < 2 or x.shape[1] != c):
                raise ValueError(f"precise_bn: {name or '<root>'} ({type(module).__name__}) was built for {c} channels (dim 1) "
                                 f"but gets an input of shape {tuple(x.shape)}")
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            moments[name].add(x, mask if norm_kind(module) == "masked_batch" else None)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, m in layers.items()]
    run = forward or _default_forward
    used = 0
    try:
        for m in layers.values():
            m.train()
            m.momentum = 0.0  # the layers' own running updates leave the buffers as they are
        source = batches() if callable(batches) else batches
        groups = _sync_groups(model)
        stopped_by_other_rank = False
        with torch.no_grad():
            for batch in itertools.islice(iter(source), num_batches):
                if not _every_rank_has_a_batch(groups, True):
                    stopped_by_other_rank = True
                    break
                run(model, batch)
                used += 1
            else:  # this rank ran out (or reached num_batches): tell the ranks still going
                _every_rank_has_a_batch(groups, False)
        if used == 0:
            if stopped_by_other_rank:
                raise ValueError("precise_bn: another rank of a SyncBatchNorm's process group had no batch, so no "
                                 "rank ran any; every rank needs at least one")
            raise ValueError("precise_bn: `batches` yielded no batch (an empty iterator or data loader); it needs at "
                             "least one batch, ideally a few hundred, of training data")
        for name, m in layers.items():
            _merge_ranks(m, moments[name])
    finally:
        for h in handles:
            h.remove()
        for name, m in layers.items():
            training, momentum, nbt = saved[name]
            m.train(training)
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
    out = {}
    with torch.no_grad():
        for name, m in layers.items():
            acc = moments[name]
            if acc.n is None or acc.n < 1:
                out[name] = 0
                continue
            n = float(acc.n)
            m.running_mean.copy_(acc.mean)
            m.running_var.copy_(acc.m2 / max(n - 1.0, 1.0))
            out[name] = int(n)
    return out


def _sync_world(module: nn.Module) -> int:
    """How many ranks ``module``'s training forward gathers statistics over: a SyncBatchNorm's
    group size (normlab's, or torch's, which syncs only on the GPU but refuses the CPU in a
    process group), else 1 (also with no group, and on a rank outside the layer's group)."""
    from normlab.nn.sync_batch_norm import SyncBatchNorm

    if isinstance(module, SyncBatchNorm):
        return module._group_size()
    if isinstance(module, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized():
        return max(dist.get_world_size(module.process_group), 1)  # -1 outside the group
    return 1


def _sync_groups(model: nn.Module) -> list:
    """(process group, device) of each distinct group that a SyncBatchNorm of ``model``
    synchronizes over with more than one rank, in model order (the same on every rank). Every
    one counts, not only the layers precise_bn updates: one without running statistics still
    gathers on each training forward, and a batch more on one rank would pair with another
    collective there."""
    fallback = next(itertools.chain(model.parameters(), model.buffers()), None)
    groups = {}
    for m in model.modules():
        if _sync_world(m) > 1 and id(m.process_group) not in groups:
            t = next(itertools.chain(m.buffers(), m.parameters()), fallback)  # a tensor on the group's device
            groups[id(m.process_group)] = (m.process_group, t.device if t is not None else torch.device("cpu"))
    return list(groups.values())


def _every_rank_has_a_batch(groups, mine: bool) -> bool:
    """Whether every rank of every group has a batch for the next step (one all_reduce per group).

    A SyncBatchNorm in training gathers statistics on every forward, so every rank of its group
    must run the same number of batches: with one batch more on one rank, its forward would pair
    with the others' final merge (a packet of the same size) and mix up the statistics. So the
    ranks agree before each batch and all stop at the shortest rank's count; a rank that has run
    out (or reached ``num_batches``) answers False once more, then stops."""
    everyone = mine
    for group, device in groups:
        flag = torch.tensor([1.0 if mine else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        everyone = everyone and bool(flag.item())
    return everyone


def _merge_ranks(module: nn.Module, acc: _Moments) -> None:
    # torch's SyncBatchNorm too: its forward normalized every rank with the group's statistics,
    # and each rank's own would leave the replicas with different running statistics
    if _sync_world(module) > 1:
        acc.merge_across(module.process_group, module.running_mean.device, module.num_features)
