"""Contracts of synchronized batch norm and of the lab's data-parallel helpers that
``test_sync_batch_norm.py`` and ``tests/lab/test_nproc.py`` leave open. SyncBatchNorm: one
value across all ranks refused on every rank with nothing moved, two accepted, none (every rank
empty) batch norm on an empty batch; a process group
smaller than the world; evaluation without running statistics sending nothing; one collective
per forward and per backward once a group is checked; half inputs; float32 input gradients at
a large mean; statistics bit-identical on every rank; :func:`merge_moments` of empty parts.
``normlab.lab.parallel``: the run marker, spec rewriting, shards, ``prepare``'s broadcast from
rank 0, gradient and loss sums, the launcher's start method, results, progress, failures and
clean-up, and the torchrun environment. Each was found by mutating the code: the test fails on
the wrong version named in its docstring.

Three forked ranks (gloo through a ``FileStore``: no port) run every SyncBatchNorm scenario
and the in-group lab helpers once per module (:func:`_sbn_rank`) and save what they saw; the
tests compare it with torch's ``BatchNorm`` on the concatenated batch in float64, computed
here, or with what the docstrings promise. The launcher's tests start their own two ranks
with :func:`normlab.lab.parallel.launch` (forked: well under a second each).
"""
from __future__ import annotations

import datetime
import glob
import multiprocessing
import os
import shutil
import signal
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab.nn as NN
from helpers import assert_lowp_close, big_mean_input
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from normlab.lab import parallel
from normlab.nn.sync_batch_norm import merge_moments

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()
                                     and "fork" in multiprocessing.get_all_start_methods()),
                                reason="needs torch.distributed with gloo and fork")

WORLD = 3
TOL = dict(rtol=1e-9, atol=1e-9)
SUB = (0, 2)  # the subgroup of the group scenario; rank 1 is outside it
SUB_SIZES = {0: 3, 2: 5}


def _data(n, c, seed, shift=0.0, scale=1.0, tail=(), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n, c) + tail, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def _cat_shards(sizes, c, seed, **kw):
    """(full batch, [rank r's slice]) for per-rank batch sizes."""
    full = _data(sum(sizes), c, seed, **kw)
    return full, list(torch.split(full, list(sizes)))


# -- the SyncBatchNorm ranks ----------------------------------------------------------------------

class _Counter:
    """Counts calls of the torch.distributed collectives, by name."""

    NAMES = ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "reduce_scatter")

    def __init__(self):
        self.calls, self.originals = [], {}
        for name in self.NAMES:
            fn = self.originals[name] = getattr(dist, name)
            setattr(dist, name, lambda *a, _fn=fn, _name=name, **k: (self.calls.append(_name), _fn(*a, **k))[1])

    def take(self):
        out, self.calls = self.calls, []
        return out

    def remove(self):
        for name, fn in self.originals.items():
            setattr(dist, name, fn)


def _run_one_value(rank, sizes):
    """Training forward on fewer than 2 values across the ranks: the error on this rank and the
    buffers afterwards."""
    bn = NN.SyncBatchNorm(2).double()
    _, shards = _cat_shards(sizes, 2, 1)
    try:
        bn(shards[rank])
        err = None
    except ValueError as e:
        err = str(e)
    return {"err": err, "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "num_batches_tracked": int(bn.num_batches_tracked)}


def _run_two_values(rank):
    """Two values in all (ranks 0 and 2 one each): accepted, as batch norm accepts 2."""
    bn = NN.SyncBatchNorm(2, momentum=0.5).double()
    _, shards = _cat_shards((1, 0, 1), 2, 2)
    x = shards[rank].requires_grad_(True)
    y = bn(x)
    (y * torch.arange(1.0, 3.0, dtype=torch.float64)).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "running_mean": bn.running_mean.clone(),
            "running_var": bn.running_var.clone()}


def _run_all_empty(rank, counter):
    """Every rank's batch empty, twice (momentum=None: the cumulative average, which counts steps),
    then a real batch: what came out and what moved, and the collectives sent."""
    bn = NN.SyncBatchNorm(2, momentum=None).double()
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
        bn.weight.fill_(1.5)
    out = {}
    for step in range(2):
        x = torch.zeros(0, 2, 3, dtype=torch.float64, requires_grad=True)
        counter.take()
        y = bn(x)
        y.sum().backward()
        out[step] = {"y": y.detach(), "dx": x.grad, "calls": counter.take(),
                     "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
                     "num_batches_tracked": int(bn.num_batches_tracked),
                     "grads": (bn.weight.grad.clone(), bn.bias.grad.clone())}
    x = _data(2 + rank, 2, 30 + rank, tail=(3,))
    y = bn(x)
    out["after"] = {"x": x, "y": y.detach(), "running_mean": bn.running_mean.clone(),
                    "running_var": bn.running_var.clone(), "num_batches_tracked": int(bn.num_batches_tracked)}
    return out


def _run_eval_without_running_stats(rank, counter):
    """track_running_stats=False in evaluation: this rank's own batch statistics, no collective."""
    bn = NN.SyncBatchNorm(3, track_running_stats=False).double().eval()
    x = _data(4 + rank, 3, 10 + rank, tail=(2,))
    counter.take()
    with torch.no_grad():
        y = bn(x)
    return {"x": x, "y": y, "calls": counter.take()}


def _run_collective_counts(rank, counter, sub):
    """Collectives per training forward/backward: the channel check once per group."""
    bn = NN.SyncBatchNorm(3).double()
    out = {}
    for step in range(3):
        x = _data(2 + rank, 3, 20 + step + rank).requires_grad_(True)
        counter.take()
        y = bn(x)
        out[f"forward{step}"] = counter.take()
        y.sum().backward()
        out[f"backward{step}"] = counter.take()
    bn.process_group = sub  # another group: checked again there (rank 1 is outside it: plain batch norm)
    with torch.no_grad():
        bn(_data(3, 3, 30 + rank))
    out["forward_new_group"] = counter.take()
    return out


def _run_half(rank):
    """float16 and bfloat16 input over the ranks, at a mean of 1000 (float32 module)."""
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        sizes = (3, 4, 5)
        full = big_mean_input((sum(sizes), 4, 6), dtype, seed=3)
        r = _data(sum(sizes), 4, 4, tail=(6,))
        bn = NN.SyncBatchNorm(4)
        x = torch.split(full, sizes)[rank].clone().requires_grad_(True)
        y = bn(x)
        (y.double() * torch.split(r, sizes)[rank]).sum().backward()
        out[str(dtype)] = {"y": y.detach(), "dx": x.grad, "running_mean": bn.running_mean.clone(),
                           "running_var": bn.running_var.clone()}
    return out


LARGE_SIZES = (3, 5, 4)


def _large_mean_data():
    """float32 channels of spread 0.01 at means 1e4 and -3e3."""
    x = _data(sum(LARGE_SIZES), 2, 11, tail=(4,), dtype=torch.float32)
    x[:, 0] = x[:, 0] * 0.01 + 1e4
    x[:, 1] = x[:, 1] * 0.01 - 3e3
    return x, _data(sum(LARGE_SIZES), 2, 12, tail=(4,), dtype=torch.float32)


def _run_large_mean_backward(rank):
    """float32 at a large mean: the input gradient needs the merged mean's digits too."""
    x, r = _large_mean_data()
    bn = NN.SyncBatchNorm(2, momentum=1.0)
    x = torch.split(x, LARGE_SIZES)[rank].clone().requires_grad_(True)
    (bn(x) * torch.split(r, LARGE_SIZES)[rank]).sum().backward()
    return {"dx": x.grad}


def _run_identical_statistics(rank):
    """Running statistics from very different per-rank batches: the same bits on every rank."""
    out = []
    for seed in range(4):
        bn = NN.SyncBatchNorm(5, momentum=1.0).double()
        x = _data(3 + 2 * rank, 5, 40 + 3 * seed + rank, shift=[1e3, -7.0, 0.3][rank] * (seed + 1),
                  scale=[1.0, 1e-3, 50.0][rank])
        bn(x)
        out.append((bn.running_mean.clone(), bn.running_var.clone()))
    return out


def _run_subgroup(rank, sub):
    """A SyncBatchNorm of ranks {0, 2} (rank 1 outside: plain batch norm) with uneven batches."""
    bn = NN.SyncBatchNorm(3, momentum=0.3, process_group=sub).double()
    out = {}
    for step in range(2):
        if rank in SUB:
            full, shards = _cat_shards([SUB_SIZES[r] for r in SUB], 3, 50 + step, shift=2.0, scale=3.0, tail=(2,))
            x = shards[SUB.index(rank)]
        else:
            x = _data(4, 3, 60 + step, tail=(2,))
        x = x.clone().requires_grad_(True)
        y = bn(x)
        (y * y.detach().cos()).sum().backward()
        out[step] = {"x": x.detach(), "y": y.detach(), "dx": x.grad}
    out["running_mean"], out["running_var"] = bn.running_mean.clone(), bn.running_var.clone()
    return out


SPECS = ["batch", " Batch ", "BATCH", "batch_renorm", "group:4", "sync_batch", "none"]
SHARD_SIZES = (0, 1, 2, 4, 8)  # global batch sizes: below, at and above the world size
BIG = 2 ** 60  # an int64 buffer value no float type holds exactly


def _lab_model(rank):
    """A model with batch norm, float32 and float64 parameters and an int64 buffer, initialized
    differently on each rank."""
    torch.manual_seed(100 + rank)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2).double())
    with torch.no_grad():
        model[1].running_mean.uniform_()
        model[1].num_batches_tracked.fill_(BIG + 1 + rank)
    return model


def _run_lab_helpers(rank):
    """normlab.lab.parallel inside the group: before, and inside, a data-parallel run."""
    out = {"outside": (parallel.world(), [parallel.sync_spec(s) for s in SPECS])}
    parallel.init_from_env()  # a group is initialized: joins nothing
    with parallel.active():
        with parallel.active():
            pass
        out["world"] = parallel.world()
        out["specs"] = [parallel.sync_spec(s) for s in SPECS]
        out["shards"] = {n: parallel.shard(torch.arange(n)).tolist() for n in SHARD_SIZES}
        model = _lab_model(rank)
        out["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        prepared = parallel.prepare(model)
        out["prepared"] = {"same": prepared is model, "types": [type(m).__name__ for m in prepared],
                           "state": {k: v.clone() for k, v in prepared.state_dict().items()}}
        p64 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        p32 = torch.zeros(2, requires_grad=True)
        missing = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # no gradient on rank 1
        p64.grad = _data(3, 1, 70 + rank).reshape(3)
        p32.grad = _data(2, 1, 80 + rank, dtype=torch.float32).reshape(2)
        if rank != 1:
            missing.grad = _data(2, 1, 90 + rank).reshape(2)
        out["grads_in"] = [p64.grad.clone(), p32.grad.clone(), None if missing.grad is None else missing.grad.clone()]
        loss = torch.tensor(1.0 / 3.0 + rank * 1e-9, dtype=torch.float64)
        out["loss_in"] = float(loss)
        out["loss"] = parallel.all_reduce_grads([p64, p32, missing], loss)
        out["grads"] = [p64.grad, p32.grad, missing.grad]
        out["loss_no_params"] = parallel.all_reduce_grads([], loss)
        out["sums"] = parallel.sum_over_ranks(2.0 ** 24 + 1, 0.1 * (rank + 1))
    out["after"] = parallel.world()
    return out


def _guard(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - saved for the test to show
        return {"error": f"{type(e).__name__}: {e}"}


def _sbn_rank(rank, world, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    res = {}
    counter = _Counter()
    try:
        sub = dist.new_group(list(SUB))  # every rank must call new_group
        res["one_value"] = _guard(_run_one_value, rank, (0, 1, 0))
        res["two_values"] = _guard(_run_two_values, rank)
        res["all_empty"] = _guard(_run_all_empty, rank, counter)
        res["eval_no_stats"] = _guard(_run_eval_without_running_stats, rank, counter)
        res["counts"] = _guard(_run_collective_counts, rank, counter, sub)
        res["half"] = _guard(_run_half, rank)
        res["large_mean"] = _guard(_run_large_mean_backward, rank)
        res["identical"] = _guard(_run_identical_statistics, rank)
        res["lab"] = _guard(_run_lab_helpers, rank)
        res["subgroup"] = _guard(_run_subgroup, rank, sub)  # last: a wrong group's collective hangs
    finally:
        counter.remove()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the three ranks once; returns [rank 0's results, rank 1's, rank 2's]."""
    out = tmp_path_factory.mktemp("sync_contracts")
    mp.start_processes(_sbn_rank, args=(WORLD, str(out / "store"), str(out)), nprocs=WORLD, start_method="fork")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _ok(result):
    assert not (isinstance(result, dict) and "error" in result), result.get("error")
    return result


# -- SyncBatchNorm --------------------------------------------------------------------------------

def test_one_value_over_all_ranks_is_refused_on_every_rank_moving_nothing(ranks):
    """Batch norm on the concatenated batch refuses 1 value per channel before touching its
    running statistics; so does every rank here (rank 1 holds that value, ranks 0 and 2 none),
    naming the per-rank counts, with the running statistics as torch leaves them and the
    refused step not counted.
    Wrong version: sync_batch_norm.py ``n_total <= 1`` -> ``n_total < 1``; the running update
    moved before that check; the per-rank counts left out of the message."""
    sizes = (0, 1, 0)
    bn = nn.BatchNorm1d(2).double()
    full, _ = _cat_shards(sizes, 2, 1)
    with pytest.raises(ValueError):
        bn(full)
    for rank, r in enumerate(ranks):
        res = r["one_value"]
        assert res["err"] is not None, f"rank {rank} did not refuse {sizes}"
        assert "more than 1 value per channel" in res["err"] and f"per-rank counts {list(sizes)}" in res["err"]
        torch.testing.assert_close(res["running_mean"], bn.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(res["running_var"], bn.running_var, rtol=0, atol=0)
        assert res["num_batches_tracked"] == 0


def test_two_values_over_all_ranks_are_batch_norm_on_them(ranks):
    """Two values per channel in all (one each on ranks 0 and 2, none on rank 1) are enough, as
    for batch norm: outputs, input gradients and running statistics as BatchNorm1d on the two.
    Wrong version: sync_batch_norm.py ``n_total <= 1`` -> ``n_total <= 2``."""
    bn = nn.BatchNorm1d(2, momentum=0.5).double()
    full, _ = _cat_shards((1, 0, 1), 2, 2)
    x = full.clone().requires_grad_(True)
    y = bn(x)
    (y * torch.arange(1.0, 3.0, dtype=torch.float64)).sum().backward()
    got = [_ok(r["two_values"]) for r in ranks]
    torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach(), **TOL)
    torch.testing.assert_close(torch.cat([g["dx"] for g in got]), x.grad, **TOL)
    for g in got:
        torch.testing.assert_close(g["running_mean"], bn.running_mean, **TOL)
        torch.testing.assert_close(g["running_var"], bn.running_var, **TOL)


def test_every_rank_empty_is_batch_norm_on_an_empty_batch(ranks):
    """No values at all over the ranks: as torch's BatchNorm1d on an empty batch, an empty output,
    zero gradients, the running statistics unmoved and the step counted (with momentum=None the
    next real batch then weighs 1/3, as after torch's two empty steps); every rank sends one
    all_gather per forward (after the first's channel check) and nothing in backward. The batch after that is batch norm on the
    concatenation.
    Wrong version: sync_batch_norm.py ``if n_total == 0:`` branch removed (a ValueError "got 0",
    or NaN statistics if the check says ``n_total == 1``)."""
    bn = nn.BatchNorm1d(2, momentum=None).double()
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
        bn.weight.fill_(1.5)
    got = [_ok(r["all_empty"]) for r in ranks]
    for step in range(2):
        x = torch.zeros(0, 2, 3, dtype=torch.float64, requires_grad=True)
        y = bn(x)
        y.sum().backward()
        for g in got:
            res = g[step]
            assert res["y"].shape == (0, 2, 3) and res["dx"].shape == (0, 2, 3)
            assert res["calls"] == ["all_gather"] * (2 if step == 0 else 1)  # step 0: the channel check too
            torch.testing.assert_close(res["running_mean"], bn.running_mean, rtol=0, atol=0)
            torch.testing.assert_close(res["running_var"], bn.running_var, rtol=0, atol=0)
            assert res["num_batches_tracked"] == int(bn.num_batches_tracked) == step + 1
            for ours, theirs in zip(res["grads"], (bn.weight.grad, bn.bias.grad)):
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    full = torch.cat([g["after"]["x"] for g in got])
    y = bn(full)
    torch.testing.assert_close(torch.cat([g["after"]["y"] for g in got]), y.detach(), **TOL)
    for g in got:
        torch.testing.assert_close(g["after"]["running_mean"], bn.running_mean, **TOL)
        torch.testing.assert_close(g["after"]["running_var"], bn.running_var, **TOL)
        assert g["after"]["num_batches_tracked"] == 3


def test_evaluation_without_running_statistics_is_local_and_sends_nothing(ranks):
    """With track_running_stats=False, evaluation normalizes with this rank's own batch (as
    torch's SyncBatchNorm, which syncs only in training) and calls no collective.
    Wrong version: sync_batch_norm.py ``if self.training`` -> ``if self._use_batch_stats()``."""
    for rank, r in enumerate(ranks):
        res = _ok(r["eval_no_stats"])
        want = nn.BatchNorm1d(3, track_running_stats=False).double().eval()(res["x"])
        torch.testing.assert_close(res["y"], want, **TOL)
        assert res["calls"] == [], f"rank {rank}: {res['calls']}"


def test_one_collective_per_forward_and_backward_once_the_group_is_checked(ranks):
    """The first training forward in a group checks num_features (one all_gather) before the
    statistics' all_gather; later forwards send only the statistics, each backward one
    all_reduce; moving the layer to another group checks again there.
    Wrong version: sync_batch_norm.py ``self._checked_group = group`` dropped; the group's id
    left out of the check's key."""
    for rank, r in enumerate(ranks):
        res = _ok(r["counts"])
        assert res["forward0"] == ["all_gather", "all_gather"], rank
        assert res["forward1"] == res["forward2"] == ["all_gather"], rank
        assert res["backward0"] == res["backward1"] == res["backward2"] == ["all_reduce"], rank
        assert res["forward_new_group"] == ([] if rank not in SUB else ["all_gather", "all_gather"]), rank


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_over_ranks_keep_their_dtype_and_float32_accuracy(ranks, dtype):
    """float16/bfloat16 input at a mean of 1000: each rank's output and input gradient in the
    input's dtype, within half rounding of float64 batch norm on the same rounded inputs, and
    float32 running statistics to float32 accuracy.
    Wrong version: sync_batch_norm.py ``return y.to(x.dtype)`` -> ``return y``;
    ``acc = acc_dtype(x.dtype)`` -> ``acc = x.dtype``."""
    sizes = (3, 4, 5)
    full = big_mean_input((sum(sizes), 4, 6), dtype, seed=3)
    x = full.double().requires_grad_(True)
    bn = nn.BatchNorm1d(4).double()
    y = bn(x)
    (y * _data(sum(sizes), 4, 4, tail=(6,))).sum().backward()
    for rank, r in enumerate(ranks):
        got = _ok(r["half"])[str(dtype)]
        assert got["y"].dtype == dtype and got["dx"].dtype == dtype, rank
        assert_lowp_close(got["y"], torch.split(y.detach(), sizes)[rank], dtype, what=f"rank {rank} y")
        assert_lowp_close(got["dx"], torch.split(x.grad, sizes)[rank], dtype, what=f"rank {rank} dx")
        torch.testing.assert_close(got["running_mean"].double(), bn.running_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(got["running_var"].double(), bn.running_var, rtol=1e-6, atol=0)


def test_float32_input_gradient_at_a_large_mean_is_as_accurate_as_float64_statistics(ranks):
    """float32 channels of spread 0.01 at means 1e4 and -3e3: the backward's x - mean must keep
    the merged mean's digits beyond float32 (as the forward does), or the input gradient is off
    by a few percent.
    Wrong version: sync_batch_norm.py backward's ``mean_lo`` -> zeros."""
    x, r = _large_mean_data()
    x = x.double().requires_grad_(True)
    (nn.BatchNorm1d(2).double()(x) * r.double()).sum().backward()
    got = torch.cat([_ok(rk["large_mean"])["dx"] for rk in ranks]).double()
    torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-4 * float(x.grad.abs().max()))


def test_every_rank_merges_to_the_same_bits(ranks):
    """Every rank merges the gathered table in the same (rank) order, so the statistics are
    bit-identical on every rank, not equal up to rounding (a model's replicas must not drift).
    Wrong version: sync_batch_norm.py the table rolled to start at this rank."""
    stats = [_ok(r["identical"]) for r in ranks]
    for rank in (1, 2):
        for (m0, v0), (m, v) in zip(stats[0], stats[rank]):
            assert torch.equal(m, m0) and torch.equal(v, v0), rank


def test_a_process_group_smaller_than_the_world_synchronizes_over_its_ranks_only(ranks):
    """A SyncBatchNorm of ranks {0, 2} of three: forward gathers and backward reduces over that
    group (global ranks 0 and 2, group ranks 0 and 1), matching batch norm on their
    concatenated batches; rank 1, outside it, is plain batch norm on its own batch.
    Wrong version: sync_batch_norm.py the all_gather, the all_reduce, or the Function's group
    on the default group instead of ``process_group``."""
    res = [_ok(r["subgroup"]) for r in ranks]
    for members in (SUB, (1,)):
        bn = nn.BatchNorm1d(3, momentum=0.3).double()
        for step in range(2):
            x = torch.cat([res[r][step]["x"] for r in members]).requires_grad_(True)
            y = bn(x)
            (y * y.detach().cos()).sum().backward()
            torch.testing.assert_close(torch.cat([res[r][step]["y"] for r in members]), y.detach(), **TOL)
            torch.testing.assert_close(torch.cat([res[r][step]["dx"] for r in members]), x.grad, **TOL)
        for r in members:
            torch.testing.assert_close(res[r]["running_mean"], bn.running_mean, **TOL)
            torch.testing.assert_close(res[r]["running_var"], bn.running_var, **TOL)


def test_merge_moments_of_empty_parts_is_zero_not_nan():
    """Parts that are all empty: n = 0 with mean and M2 0, as the docstring says (no 0/0); empty
    parts beside full ones change nothing.
    Wrong version: sync_batch_norm.py ``n.clamp(min=1)`` -> ``n``."""
    zeros = torch.zeros(3, 2, dtype=torch.float64)
    n, mu, m2 = merge_moments(torch.zeros(3, dtype=torch.float64), zeros, zeros)
    assert int(n) == 0 and torch.equal(mu, torch.zeros(2, dtype=torch.float64)) and torch.equal(m2, mu)
    full = _data(6, 2, 5)
    n, mu, m2 = merge_moments(torch.tensor([[0.0], [6.0]], dtype=torch.float64),
                              torch.stack([torch.zeros(2, dtype=torch.float64), full.mean(0)]),
                              torch.stack([torch.zeros(2, dtype=torch.float64), full.var(0, unbiased=False) * 6]))
    torch.testing.assert_close(mu, full.mean(0), **TOL)
    torch.testing.assert_close(m2 / n, full.var(0, unbiased=False), **TOL)


# -- normlab.lab.parallel: helpers inside the three ranks ---------------------------------------------

def test_a_process_group_is_a_data_parallel_run_only_inside_active(ranks):
    """In an initialized group that runs no data-parallel lab run (torchrun's rank 0 running an
    experiment alone) world() is (0, 1) and batch norm stays plain; inside active() it is
    (rank, world size), also after a nested active() ends, and (0, 1) again after.
    init_from_env() in a process that already has a group joins nothing.
    Wrong version: parallel.py world() without ``_ACTIVE``; active() restoring False, not the
    value before it; sync_spec's ``world()[1] > 1`` -> ``>= 1``; init_from_env's
    ``if not dist.is_initialized()`` dropped."""
    for rank, r in enumerate(ranks):
        lab = _ok(r["lab"])
        assert lab["outside"] == ((0, 1), SPECS)
        assert lab["world"] == (rank, WORLD)
        assert lab["after"] == (0, 1)


def test_sync_spec_rewrites_only_batch_in_any_spelling(ranks):
    """During a run "batch" however spelt (spaces, case) becomes "sync_batch", as make_norm
    reads specs; every other spec is left as it is.
    Wrong version: parallel.py sync_spec without ``.strip().lower()``."""
    want = ["sync_batch" if s.strip().lower() == "batch" else s for s in SPECS]
    for r in ranks:
        assert _ok(r["lab"])["specs"] == want


def test_shard_gives_rank_r_the_slice_r_times_b_over_n_rounded_down(ranks):
    """Each rank's slice of a global batch of B is ``[r*B//N, (r+1)*B//N)``, as the docstrings of
    shard() and the module say (evaluate() splits the test set the same way): the slices cover
    the batch in rank order, and where B is not a multiple of N the later ranks get the larger
    ones.
    Wrong version: parallel.py shard's bounds rounded up (the earlier ranks the larger slices)."""
    for rank, r in enumerate(ranks):
        got = _ok(r["lab"])["shards"]
        for n in SHARD_SIZES:
            assert got[n] == list(range(n))[rank * n // WORLD:(rank + 1) * n // WORLD], (rank, n)
    assert [x for r in ranks for x in r["lab"]["shards"][8]] == list(range(8))


def test_prepare_converts_batch_norm_and_starts_every_rank_from_rank_0s_state(ranks):
    """prepare() keeps the model object, makes its BatchNorm a SyncBatchNorm, and overwrites
    every parameter and buffer (float32, float64, and an int64 count beyond 2**53) with rank
    0's, exactly.
    Wrong version: parallel.py prepare's convert dropped; its broadcast dropped, or of the
    parameters only; broadcast from the last rank; one broadcast for all dtypes (the int64
    count rounded)."""
    labs = [_ok(r["lab"]) for r in ranks]
    want = labs[0]["before"]
    assert not torch.equal(labs[1]["before"]["0.weight"], want["0.weight"])  # the ranks did differ
    for rank, lab in enumerate(labs):
        got = lab["prepared"]
        assert got["same"] and got["types"] == ["Linear", "SyncBatchNorm", "Linear"], rank
        assert list(got["state"]) == list(want)
        for k, v in want.items():
            assert got["state"][k].dtype == v.dtype and torch.equal(got["state"][k], v), (rank, k)
    assert int(want["1.num_batches_tracked"]) == BIG + 1


def test_all_reduce_grads_sums_gradients_and_the_loss_exactly_per_dtype(ranks):
    """Gradients summed over the ranks in their own dtype (a missing one counted as zeros and
    made zeros), the loss summed in float64 with the float64 group, also with no parameters
    at all; sum_over_ranks in float64.
    Wrong version: parallel.py the loss cast to float32; no all-reduce without parameters
    (``or [[]]`` dropped); sum_over_ranks in float32."""
    labs = [_ok(r["lab"]) for r in ranks]
    for i, dtype in enumerate((torch.float64, torch.float32, torch.float64)):
        parts = [lab["grads_in"][i] for lab in labs]
        want = sum(torch.zeros(2 if i else 3, dtype=torch.float64) if g is None else g.double() for g in parts)
        for lab in labs:
            assert lab["grads"][i].dtype == dtype
            torch.testing.assert_close(lab["grads"][i].double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-15,
                                       atol=0)
    loss = sum(lab["loss_in"] for lab in labs)
    sums = [sum(2.0 ** 24 + 1 for _ in labs), sum(0.1 * (rank + 1) for rank in range(WORLD))]
    for lab in labs:
        assert lab["loss"] == pytest.approx(loss, rel=1e-15) and lab["loss_no_params"] == pytest.approx(loss, rel=1e-15)
        assert lab["sums"] == pytest.approx(sums, rel=1e-15)


# -- normlab.lab.parallel: one process -------------------------------------------------------------------

def test_active_needs_an_initialized_group():
    """Wrong version: parallel.py active() without its check: a run marked data-parallel with no
    group to run it."""
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        with parallel.active():
            pass


def test_rank_rng_leaves_a_one_process_run_on_the_callers_stream():
    """Without a data-parallel run rank_rng changes nothing: draws inside continue the caller's
    stream, as the 1-process run it must match draws them.
    Wrong version: parallel.py rank_rng ``size == 1`` -> ``size == 0`` (reseeded always)."""
    torch.manual_seed(5)
    want = torch.rand(4)
    torch.manual_seed(5)
    with parallel.rank_rng(7):
        got = torch.rand(2)
    assert torch.equal(torch.cat([got, torch.rand(2)]), want)


def test_rank_rng_streams_differ_between_seeds(monkeypatch):
    """Each seed of a run draws its own dropout masks on a rank, as it does in one process.
    Wrong version: parallel.py rank_rng's seed left out of the stream's seed (every seed of a
    data-parallel run the same masks)."""
    monkeypatch.setattr(parallel, "world", lambda: (1, 2))
    draws = []
    for seed in (7, 8):
        with parallel.rank_rng(seed):
            draws.append(torch.rand(5))
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("env, world, rank", [({"WORLD_SIZE": "4"}, 1, 0), ({"RANK": "3", "WORLD_SIZE": "1"}, 1, 0),
                                              ({"RANK": "1", "WORLD_SIZE": "0"}, 1, 0),
                                              ({"RANK": "1", "WORLD_SIZE": "2"}, 2, 1)])
def test_torchrun_environment_needs_rank_and_world_size(monkeypatch, env, world, rank):
    """torchrun sets both RANK and WORLD_SIZE: WORLD_SIZE alone is no launch, a world below 1 is
    1, and RANK counts only in a world above 1.
    Wrong version: parallel.py env_world without ``"RANK" in os.environ``; without ``max(1, .)``;
    env_rank without ``if env_world() > 1``."""
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert (parallel.env_world(), parallel.env_rank()) == (world, rank)


def test_check_norms_reads_specs_as_make_norm_does():
    """Wrong version: parallel.py check_norms without ``.strip().lower()``: " Batch_Renorm " passed
    as synchronizable."""
    assert parallel.check_norms(["batch", " Sync_Batch", "group:4", "layer", "none"]) is None
    reason = parallel.check_norms(["group:4", " Batch_Renorm "])
    assert reason is not None and " Batch_Renorm " in reason and "no synchronized version" in reason


# -- normlab.lab.parallel.launch ------------------------------------------------------------------------

def _launch_ok(progress):
    rank, size = parallel.world()
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaches every process of the terminal's group
    progress(0.25 + rank / 10)
    return {"rank": rank, "size": size, "threads": torch.get_num_threads()}


def test_launch_returns_rank_0s_result_with_rank_0s_progress_only():
    """launch(): rank 0's return value, only rank 0's progress, each rank on the torch threads
    asked for (not the parent's), Ctrl-C ignored in the ranks, and a live launcher's store
    folder left alone.
    Wrong version: parallel.py every rank's progress forwarded, or none; the last rank's
    result returned; ``torch.set_num_threads(threads)`` dropped; SIGINT not ignored;
    _remove_stale_stores removing live launchers' folders."""
    live = tempfile.mkdtemp(prefix=f"normlab-ranks-{os.getpid()}-")  # this process is alive
    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = parallel.launch(2, _launch_ok, threads=1, progress=seen.append, timeout_s=30)
    finally:
        torch.set_num_threads(before)
        alive = os.path.isdir(live)
        os.rmdir(live) if alive else None
    assert got == {"rank": 0, "size": 2, "threads": 1}
    assert seen == [0.25]
    assert alive


def _launch_dies(progress):
    dist.barrier()  # both ranks past start-up: the failure is rank 1's alone
    if parallel.world()[0] == 1:
        os._exit(3)
    return "rank 0 finished"


def test_a_rank_that_dies_without_a_result_fails_the_launch():
    """Wrong version: parallel.py _collect ignoring a rank that ended without a result (rank 0's
    value returned as if the run had succeeded)."""
    with pytest.raises(parallel.RankError, match=r"^rank 1 of 2 ended \(exit code 3\) without a result"):
        parallel.launch(2, _launch_dies, timeout_s=30)


def _launch_fails(progress):
    dist.barrier()  # both ranks past start-up: the failure is rank 1's alone
    if parallel.world()[0] == 1:
        raise ValueError("the first line\nthe second line")
    time.sleep(30)  # a long step that no collective interrupts
    return "rank 0 finished"


def test_a_failing_rank_ends_the_others_at_once_and_is_named_by_its_first_line():
    """Rank 1 fails while rank 0 is in a long step: the launch raises at once with the first line
    of rank 1's error, ending rank 0 (not waiting for it, nor 5 s for it to end by itself).
    Wrong version: parallel.py launch's ``p.terminate()`` dropped; the message's last line."""
    start = time.perf_counter()
    with pytest.raises(parallel.RankError) as info:
        parallel.launch(2, _launch_fails, timeout_s=30)
    took = time.perf_counter() - start
    assert str(info.value).splitlines()[0] == "rank 1 of 2: ValueError: the first line"
    assert took < 4.0, f"{took:.1f} s"
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("threads, method", [(1, "fork"), (2, "spawn")])
def test_launch_forks_single_threaded_ranks_and_spawns_the_others(monkeypatch, threads, method):
    """A rank on several threads must not be forked (GNU OpenMP hangs in a forked child that uses
    several threads after the parent did): it is spawned. The start method is read at
    get_context (stopped there: spawning would cost seconds).
    Wrong version: parallel.py ``threads == 1 and`` dropped from the start method's choice."""
    asked = []

    class Stop(Exception):
        pass

    def get_context(name=None):
        asked.append(name)
        raise Stop

    monkeypatch.setattr(multiprocessing, "get_context", get_context)
    with pytest.raises(Stop):
        parallel.launch(2, _launch_ok, threads=threads)
    assert asked == [method]


def _launch_sleeps(folder, progress):
    path = os.path.join(folder, f"rank{parallel.world()[0]}")
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)  # whole, or not there
    time.sleep(30)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc (Linux)")
def test_ranks_die_with_a_launcher_that_is_killed(tmp_path):
    """A launcher killed outright (a pool worker terminated on Ctrl-C) runs no clean-up: its
    ranks must end with it, not train on as orphans.
    Wrong version: parallel.py _rank_main without ``_die_with_parent(parent)``."""
    launcher = multiprocessing.get_context("fork").Process(
        target=parallel.launch, args=(2, _launch_sleeps, (str(tmp_path),)), kwargs={"timeout_s": 30})
    launcher.start()
    pids = []
    try:
        deadline = time.monotonic() + 20
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [int((tmp_path / f"rank{r}").read_text()) for r in range(2) if (tmp_path / f"rank{r}").exists()]
        assert len(pids) == 2, "the ranks did not start"
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.join()
        deadline = time.monotonic() + 3
        while any(map(_running, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_running, pids)), "ranks outlived their launcher"
    finally:
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.is_alive():
            launcher.kill()
            launcher.join()
        for folder in glob.glob(os.path.join(tempfile.gettempdir(), f"normlab-ranks-{launcher.pid}-*")):
            shutil.rmtree(folder, ignore_errors=True)  # the killed launcher's store: no clean-up ran there


def test_launch_refuses_fewer_than_one_process():
    """Wrong version: parallel.py ``nproc < 1`` -> ``nproc < 0`` (0 ranks: None returned)."""
    with pytest.raises(ValueError, match="nproc must be at least 1, got 0"):
        parallel.launch(0, _launch_ok)
