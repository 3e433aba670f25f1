"""The training loop every experiment shares: mini-batch SGD (or Adam) on a classifier,
test accuracy at chosen steps, divergence detection, progress reports.

Kept small on purpose: on two CPU cores the cost of a step is mostly Python and small
kernels, so the loop indexes tensors directly (no DataLoader) and evaluates rarely.

During a data-parallel run (``normlab lab run --nproc N``, :mod:`normlab.lab.parallel`)
:func:`train` and :func:`evaluate` split each global batch, and the test set, across the
processes, synchronize batch norm and sum gradients, so they compute what one process
would (up to float rounding) with no change to the experiment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normlab.lab import parallel
from normlab.lab.data import Dataset


@dataclass
class Tensors:
    """A :class:`~normlab.lab.data.Dataset` as torch tensors (masks None for non-sequence sets)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mask_train: Optional[torch.Tensor] = None
    mask_test: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, ds: Dataset) -> "Tensors":
        t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return cls(t(ds.x_train), t(ds.y_train), t(ds.x_test), t(ds.y_test), t(ds.mask_train), t(ds.mask_test))


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batch indices, epoch after epoch; the last partial batch of an
    epoch is dropped (a batch of one would break batch norm)."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i: i + batch_size]


def _forward(model: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return model(x) if mask is None else model(x, mask)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None,
             batch_size: int = 1000) -> tuple:
    """``(accuracy, mean cross-entropy)`` in eval mode (running statistics); restores the mode.

    In a data-parallel run each process evaluates its share of the rows and the sums are
    added up, so every process returns the numbers for all of ``x``."""
    was_training = model.training
    model.eval()
    rank, size = parallel.world()
    lo, hi = rank * len(x) // size, (rank + 1) * len(x) // size
    correct, loss = 0, 0.0
    for i in range(lo, hi, batch_size):
        j = min(i + batch_size, hi)
        out = _forward(model, x[i: j], None if mask is None else mask[i: j])
        loss += F.cross_entropy(out, y[i: j], reduction="sum").item()
        correct += (out.argmax(1) == y[i: j]).sum().item()
    model.train(was_training)
    correct, loss = parallel.sum_over_ranks(correct, loss)
    return correct / len(x), loss / len(x)


class SGD:
    """``torch.optim.SGD``'s update (momentum without dampening, L2 weight decay), in a few lines.

    The lab's own optimizers exist for start-up time: the first ``torch.optim`` optimizer of a
    process imports ``torch._dynamo``, about 5 s on a small CPU, paid again by every worker.
    ``tests/lab/test_models.py`` checks both against ``torch.optim`` step by step.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.bufs: Optional[list] = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.weight_decay:
            grads = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        if self.momentum:
            if self.bufs is None:
                self.bufs = [g.clone() for g in grads]
            else:
                torch._foreach_mul_(self.bufs, self.momentum)
                torch._foreach_add_(self.bufs, grads)
            grads = self.bufs
        torch._foreach_add_(self.params, grads, alpha=-self.lr)


class Adam(SGD):
    """``torch.optim.Adam``'s update (betas 0.9, 0.999, eps 1e-8, L2 weight decay, bias correction)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, lr, 0.0, weight_decay)
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if self.weight_decay:
                g = g + self.weight_decay * p
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.t))


def make_optimizer(name: str, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    if name == "sgd":
        return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        if momentum:
            raise ValueError("adam takes no momentum (its betas are fixed at 0.9, 0.999)")
        return Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: sgd, adam")


def eval_points(steps: int, count: int) -> list:
    """``count`` evaluation steps spread evenly over ``1..steps``, always including ``steps``."""
    return sorted({max(1, round(steps * (i + 1) / count)) for i in range(count)})


def train(model: nn.Module, data: Tensors, *, steps: int, batch_size: int, lr: float, seed: int,
          eval_at: Sequence[int] = (), optimizer: str = "sgd", momentum: float = 0.0, weight_decay: float = 0.0,
          diverge_loss: float = 1e3, on_eval: Optional[Callable[[int, nn.Module], dict]] = None,
          progress: Optional[Callable[[float], None]] = None) -> dict:
    """Train ``model`` for ``steps`` mini-batch steps on ``data`` and return its history.

    Test accuracy and loss are measured (eval mode) at each step in ``eval_at`` (step 0 = before
    training). Training stops early when the loss is not finite or exceeds ``diverge_loss``; the
    remaining evaluation points then repeat the diverged model's accuracy, and ``on_eval`` is
    called on the diverged model at each of them (every list stays as long as ``step``).

    Returns a dict of lists keyed ``step``, ``test_acc``, ``test_loss``, ``train_loss`` (the mean
    training loss since the previous point), plus whatever ``on_eval(step, model)`` returns,
    and ``diverged`` (bool), ``diverged_step`` (int or None), ``final_acc``, ``best_acc``.

    Data-parallel (:mod:`normlab.lab.parallel`): every process draws the same global batch and
    trains on its slice; batch norm is synchronized (:func:`~normlab.lab.parallel.prepare`:
    other batch-statistics layers are refused); the loss is summed over the slice and divided
    by the global batch size, and the gradients summed over the processes, which is the
    1-process gradient whatever the slice sizes; the loss that is recorded and checked for
    divergence is the global batch's, so every process stops at the same step.
    """
    size = parallel.world()[1]
    if size > 1:
        model = parallel.prepare(model)
    with parallel.rank_rng(seed):
        return _train(model, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_at=eval_at,
                      optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, diverge_loss=diverge_loss,
                      on_eval=on_eval, progress=progress, data_parallel=size > 1)


def _train(model, data, *, steps, batch_size, lr, seed, eval_at, optimizer, momentum, weight_decay, diverge_loss,
           on_eval, progress, data_parallel) -> dict:
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    points = sorted(set(int(s) for s in eval_at) | {steps})
    point_set = set(points)
    hist = {"step": [], "test_acc": [], "test_loss": [], "train_loss": []}
    diverged_step = None
    window, window_n = 0.0, 0

    def record(step: int) -> None:
        nonlocal window, window_n
        acc, loss = evaluate(model, data.x_test, data.y_test, data.mask_test)
        hist["step"].append(step)
        hist["test_acc"].append(acc)
        hist["test_loss"].append(loss if math.isfinite(loss) else float("inf"))
        hist["train_loss"].append(window / window_n if window_n else float("nan"))
        window, window_n = 0.0, 0
        for k, v in ((on_eval(step, model) or {}) if on_eval else {}).items():
            hist.setdefault(k, []).append(v)

    if 0 in points:
        record(0)
    model.train()
    it = batches(len(data.x_train), batch_size, gen)
    report_every = max(1, steps // 100)
    for step in range(1, steps + 1):
        idx = next(it)
        if data_parallel:
            value = _parallel_step(model, data, idx, opt)
        else:
            mask = None if data.mask_train is None else data.mask_train[idx]
            loss = F.cross_entropy(_forward(model, data.x_train[idx], mask), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            value = loss.item()
        opt.step()
        if not math.isfinite(value) or value > diverge_loss:
            diverged_step = step
            break
        window += value
        window_n += 1
        if step in point_set:
            record(step)
        if progress is not None and step % report_every == 0:
            progress(step / steps)
    if diverged_step is not None:
        acc, _ = evaluate(model, data.x_test, data.y_test, data.mask_test)
        for s in points:
            if s >= diverged_step:
                hist["step"].append(s)
                hist["test_acc"].append(acc)
                hist["test_loss"].append(float("inf"))
                hist["train_loss"].append(float("nan"))
                # on_eval's lists must stay as long as "step": it measures the diverged model too
                for k, v in ((on_eval(s, model) or {}) if on_eval else {}).items():
                    hist.setdefault(k, []).append(v)
    hist["diverged"] = diverged_step is not None
    hist["diverged_step"] = diverged_step
    hist["final_acc"] = hist["test_acc"][-1]
    hist["best_acc"] = max(hist["test_acc"])
    return hist


def _parallel_step(model: nn.Module, data: Tensors, idx: torch.Tensor, opt) -> float:
    """Gradients of the global batch ``idx`` from this process's slice of it; returns its mean loss."""
    mine = parallel.shard(idx)
    mask = None if data.mask_train is None else data.mask_train[mine]
    loss_sum = F.cross_entropy(_forward(model, data.x_train[mine], mask), data.y_train[mine], reduction="sum")
    opt.zero_grad(set_to_none=True)
    (loss_sum / len(idx)).backward()
    return parallel.all_reduce_grads(opt.params, loss_sum) / len(idx)
