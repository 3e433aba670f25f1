"""One rank of the SyncBatchNorm tests, started the way torchrun starts a process.

The tests call :func:`run_rank` in forked processes (they inherit the imported torch, which
saves most of the start-up). As a script it runs under torchrun, which sets RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT::

    torchrun --nproc-per-node 2 tests/tools/_sync_worker.py OUT_DIR [DEVICE [BACKEND]]

Every scenario runs in this one process launch (process start-up dominates the cost) and
saves what this rank saw and computed to OUT_DIR/rank{RANK}.pt; the test process compares it
with an independent single-process computation (torch's BatchNorm on the full batch,
population statistics, single-process training). Helpers that build the shared inputs live
here so the test builds exactly the same ones.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import normlab.nn as nlnn
from normlab.nn.sync_batch_norm import _SyncBatchNormFunction
from normlab.tools import convert, precise_bn

# scenario name -> (per-rank batch sizes, sample shape after C, C, momentum)
SCENARIOS = {
    "even": ((4, 4), (5, 5), 3, 0.1),
    "uneven": ((3, 7), (6,), 4, None),
    "empty": ((0, 6), (), 5, 0.3),
}
STEPS = 2  # training steps per scenario, so running statistics compound


def scenario_data(name: str, step: int):
    """Full batch (x, r) for one step of a scenario; ``r`` weighs the loss ``sum(y * r)``."""
    sizes, spatial, c, _ = SCENARIOS[name]
    g = torch.Generator().manual_seed(1000 * step + len(name))
    shape = (sum(sizes), c) + spatial
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, r


def scenario_params(name: str):
    _, _, c, _ = SCENARIOS[name]
    g = torch.Generator().manual_seed(7 + c)
    return (torch.rand(c, generator=g, dtype=torch.float64) + 0.5), torch.randn(c, generator=g, dtype=torch.float64)


def shard(t: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def make_cnn() -> nn.Module:
    """A small CNN with normlab batch norm, float64, deterministic initial weights."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nlnn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2), nlnn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 8), nlnn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3),
    ).double()


DDP_STEPS, DDP_BATCH, DDP_LR = 4, 8, 0.1


def ddp_data(step: int):
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(DDP_BATCH, 2, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (DDP_BATCH,), generator=g)


def make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=DDP_LR, momentum=0.9)


PRECISE_SIZES = ((5, 2, 9), (3, 8, 1))  # batch sizes per rank, one batch per entry


def precise_data():
    g = torch.Generator().manual_seed(99)
    n = sum(map(sum, PRECISE_SIZES))
    return torch.randn(n, 3, 4, generator=g, dtype=torch.float64) * 2 + 1


def precise_batches(rank: int):
    x = precise_data()
    start = sum(sum(s) for s in PRECISE_SIZES[:rank])
    out = []
    for size in PRECISE_SIZES[rank]:
        out.append(x[start:start + size])
        start += size
    return out


class _Counter:
    """Counts calls of torch.distributed collectives (to show evaluation sends nothing)."""

    def __init__(self):
        self.calls = 0
        self.originals = {}

    def install(self):
        for name in ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "reduce_scatter"):
            fn = getattr(dist, name)
            self.originals[name] = fn

            def wrapped(*a, _fn=fn, **k):
                self.calls += 1
                return _fn(*a, **k)
            setattr(dist, name, wrapped)


def run_scenario(name, rank, device):
    sizes, spatial, c, momentum = SCENARIOS[name]
    w, b = scenario_params(name)
    bn = nlnn.SyncBatchNorm(c, momentum=momentum).double().to(device)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    out = {}
    for step in range(STEPS):
        x, r = scenario_data(name, step)
        x = shard(x, sizes, rank).to(device).requires_grad_(True)
        r = shard(r, sizes, rank).to(device)
        bn.weight.grad = bn.bias.grad = None
        y = bn(x)
        (y * r).sum().backward()
    out.update(y=y.detach().cpu(), dx=x.grad.cpu(), dw=bn.weight.grad.cpu(), db=bn.bias.grad.cpu(),
               running_mean=bn.running_mean.cpu().clone(), running_var=bn.running_var.cpu().clone(),
               num_batches_tracked=int(bn.num_batches_tracked))
    # evaluation: local, no communication at all
    counter = _Counter()
    counter.install()
    try:
        bn.eval()
        x, _ = scenario_data(name, STEPS)
        x = shard(x, sizes, rank).to(device)
        with torch.no_grad():
            out["eval_y"] = bn(x).cpu()
        out["eval_calls"] = counter.calls
        bn.train()
        if x.shape[0] > 1:
            # training communicates: so the counter above could have seen it
            bn(x)
        else:
            bn(torch.randn((2, c) + spatial, dtype=torch.float64, device=device))
        out["train_calls"] = counter.calls - out["eval_calls"]
    finally:
        for k, fn in counter.originals.items():
            setattr(dist, k, fn)
    return out


PRECISION_SIZES = (3, 5)  # float32, a channel at 1e4 with spread 0.01


def precision_data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(sum(PRECISION_SIZES), 2, 4, generator=g)
    x[:, 1] = x[:, 1] * 0.01 + 1e4
    return x


def run_precision(rank, device):
    """float32 at a large mean: the merged statistics had the per-rank means' float32 rounding."""
    bn = nlnn.SyncBatchNorm(2, momentum=1.0).to(device)
    y = bn(shard(precision_data(), PRECISION_SIZES, rank).to(device))
    return {"y": y.detach().cpu(), "running_mean": bn.running_mean.cpu().clone(),
            "running_var": bn.running_var.cpu().clone()}


def run_double_backward(rank, device):
    """A gradient penalty (create_graph=True) through SyncBatchNorm: an error on every rank (it
    returned a gradient without a graph: the penalty's gradient silently 0)."""
    bn = nlnn.SyncBatchNorm(2).double().to(device)
    x = (torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)) + 1).to(device)
    x.requires_grad_(True)
    try:
        (gx,) = torch.autograd.grad((bn(x) * x).sum(), x, create_graph=True)
        gx.square().sum().backward()
    except RuntimeError as e:
        return str(e)
    return None


def run_mismatch(rank, device):
    c = 3 + rank
    bn = nlnn.SyncBatchNorm(c).to(device)
    try:
        bn(torch.randn(4, c, 2, device=device))
    except ValueError as e:
        return str(e)
    return None


def run_eps_zero(device):
    """eps=0 over several ranks: refused before any collective, as a single process refuses it
    (it returned NaN for a constant channel)."""
    try:
        nlnn.SyncBatchNorm(2, eps=0.0).to(device)(torch.ones(3, 2, device=device))
    except ValueError as e:
        return str(e)
    return None


def run_ddp(rank, world, device):
    model, _ = convert(make_cnn(), "sync_batch")
    model = model.to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(ddp)
    per = DDP_BATCH // world
    losses = []
    for step in range(DDP_STEPS):
        x, t = ddp_data(step)
        x, t = x[rank * per:(rank + 1) * per].to(device), t[rank * per:(rank + 1) * per].to(device)
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x), t)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "losses": losses,
            "types": sorted({type(m).__name__ for m in model.modules()})}


def run_precise(rank, device):
    model = nn.Sequential(nn.Identity(), nlnn.SyncBatchNorm(3, momentum=0.25)).double().to(device)
    report = precise_bn(model, [b.to(device) for b in precise_batches(rank)])
    bn = model[1]
    return {"running_mean": bn.running_mean.cpu().clone(), "running_var": bn.running_var.cpu().clone(),
            "momentum": bn.momentum,
            "training": bn.training, "count": report["1"]}


UNEVEN_BATCHES = ((6, 5), (4,))  # precise_bn with a batch more on rank 0: every rank stops after one


def run_precise_uneven(rank, device):
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, 3, 2, generator=g, dtype=torch.float64) + 10 * rank for n in UNEVEN_BATCHES[rank]]
    model = nn.Sequential(nlnn.SyncBatchNorm(3)).double().to(device)
    report = precise_bn(model, [b.to(device) for b in batches])
    return {"batches": batches, "count": report["0"], "running_mean": model[0].running_mean.cpu().clone(),
            "running_var": model[0].running_var.cpu().clone()}


class CpuTorchSyncBatchNorm(nn.SyncBatchNorm):
    """torch's SyncBatchNorm as it trains on CUDA, for the CPU (where its training forward in a process
    group refuses the input): statistics over the group, one all_gather per training forward."""

    def forward(self, input):
        if not (self.training and dist.is_initialized()):
            return super().forward(input)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, None, None, 0.0, self.eps,
                                            self.process_group, dist.get_world_size(self.process_group))


def _uneven_precise_batches(rank):
    g = torch.Generator().manual_seed(6)
    return [torch.randn(n, 3, 2, generator=g, dtype=torch.float64) + 10 * rank for n in UNEVEN_BATCHES[rank]]


def run_precise_other_sync_layers(rank, device):
    """precise_bn with a batch more on rank 0 and sync layers it used to leave out of the ranks' agreement on
    each batch: torch's SyncBatchNorm (its statistics not merged either), and normlab's without running
    statistics (which precise_bn does not update, but which gathers on every training forward)."""
    batches = [b.to(device) for b in _uneven_precise_batches(rank)]
    out = {"batches": _uneven_precise_batches(rank)}
    torch_sync = nn.SyncBatchNorm if device.type == "cuda" else CpuTorchSyncBatchNorm
    for key, model in (("untracked", nn.Sequential(nn.Identity(), nlnn.BatchNorm1d(3),
                                                   nlnn.SyncBatchNorm(3, track_running_stats=False))),
                       ("torch", nn.Sequential(nn.Identity(), torch_sync(3)))):
        model = model.double().to(device)
        try:
            report = precise_bn(model, batches)
        except RuntimeError as e:  # a collective paired with another one
            out[key] = str(e)
            continue
        out[key] = {"count": report["1"], "running_mean": model[1].running_mean.cpu().clone(),
                    "running_var": model[1].running_var.cpu().clone()}
    return out


def run_outside_group(rank, device):
    """A SyncBatchNorm of the group {rank 0}: rank 0 normalizes alone (a group of one), and rank 1,
    outside the group, runs plain batch norm, as torch's SyncBatchNorm does."""
    group = dist.new_group([0])  # every rank must call new_group
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)) * 2 + 1
    bn = nlnn.SyncBatchNorm(3, process_group=group).double().to(device)
    return {"x": x, "y": bn(x.to(device)).detach().cpu(), "running_mean": bn.running_mean.cpu().clone()}


def run_rank(rank: int, world: int, init_method: str, out_dir: str, device: str = "cpu", backend: str = "gloo"):
    """Everything one rank does; results go to OUT_DIR/rank{rank}.pt."""
    torch.set_num_threads(1)  # two ranks share two cores
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name in SCENARIOS:
            results[name] = run_scenario(name, rank, device)
        results["mismatch"] = run_mismatch(rank, device)
        results["eps_zero"] = run_eps_zero(device)
        results["ddp"] = run_ddp(rank, world, device)
        results["precise"] = run_precise(rank, device)
        results["precise_uneven"] = run_precise_uneven(rank, device)
        results["outside_group"] = run_outside_group(rank, device)
        results["precision"] = run_precision(rank, device)
        results["double_backward"] = run_double_backward(rank, device)
        results["precise_other_sync"] = run_precise_other_sync_layers(rank, device)  # last: a mismatch hangs
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def main():
    """Entry point under torchrun (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    args = sys.argv[1:]
    run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", *args)


if __name__ == "__main__":
    main()
