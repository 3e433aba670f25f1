"""normlab.nn.SyncBatchNorm: two real processes (gloo on 127.0.0.1) against torch's BatchNorm on the
full batch, float64, 1e-6; plus the single-process behaviour (local batch norm, state dicts).

The two ranks are started once for the whole module (see ``_sync_worker.py``) and every test
compares one part of what they saved with an independent computation made here.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import normlab.nn as nlnn
from normlab.nn import make_norm

WORLD = 2
TOL = dict(rtol=1e-6, atol=1e-6)


def _load_worker():
    path = pathlib.Path(__file__).with_name("_sync_worker.py")
    spec = importlib.util.spec_from_file_location("_normlab_sync_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _load_worker()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run both ranks once; returns [rank0 results, rank1 results]."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build of torch")
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("the ranks are forked; this platform cannot fork (run the worker under torchrun instead)")
    out = tmp_path_factory.mktemp("sync_bn")
    importlib.import_module("torch._dynamo")  # DDP imports it: once here, not once per forked rank

    # fork: the ranks inherit the imported torch (spawning two fresh interpreters costs ~20 s here)
    mp.start_processes(W.run_rank, args=(WORLD, f"tcp://127.0.0.1:{_free_port()}", str(out)), nprocs=WORLD,
                       start_method="fork")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _reference(name):
    """torch.nn.BatchNorm on the full batch, the same steps: (y, dx, dw, db, bn)."""
    sizes, spatial, c, momentum = W.SCENARIOS[name]
    cls = nn.BatchNorm2d if len(spatial) == 2 else nn.BatchNorm1d
    bn = cls(c, momentum=momentum).double()
    w, b = W.scenario_params(name)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    for step in range(W.STEPS):
        x, r = W.scenario_data(name, step)
        x.requires_grad_(True)
        bn.weight.grad = bn.bias.grad = None
        y = bn(x)
        (y * r).sum().backward()
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_outputs_and_input_gradients_match_batch_norm_on_the_full_batch(ranks, name):
    y, dx, _, _, _ = _reference(name)
    torch.testing.assert_close(torch.cat([r[name]["y"] for r in ranks]), y, **TOL)
    torch.testing.assert_close(torch.cat([r[name]["dx"] for r in ranks]), dx, **TOL)


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_parameter_gradients_summed_over_ranks_match(ranks, name):
    _, _, dw, db, _ = _reference(name)
    torch.testing.assert_close(sum(r[name]["dw"] for r in ranks), dw, **TOL)
    torch.testing.assert_close(sum(r[name]["db"] for r in ranks), db, **TOL)


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_running_statistics_match_and_agree_across_ranks(ranks, name):
    *_, bn = _reference(name)
    for r in ranks:
        torch.testing.assert_close(r[name]["running_mean"], bn.running_mean, **TOL)
        torch.testing.assert_close(r[name]["running_var"], bn.running_var, **TOL)
        assert r[name]["num_batches_tracked"] == W.STEPS


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_eval_is_local_and_sends_nothing(ranks, name):
    sizes = W.SCENARIOS[name][0]
    *_, bn = _reference(name)
    bn.eval()
    x, _ = W.scenario_data(name, W.STEPS)
    with torch.no_grad():
        expected = bn(x)
    for rank, r in enumerate(ranks):
        assert r[name]["eval_calls"] == 0
        assert r[name]["train_calls"] > 0  # the counter does see training's collectives
        torch.testing.assert_close(r[name]["eval_y"], W.shard(expected, sizes, rank), **TOL)


def test_mismatched_channel_counts_fail_on_every_rank_naming_both(ranks):
    for rank, r in enumerate(ranks):
        msg = r["mismatch"]
        assert msg is not None, f"rank {rank} did not raise"
        assert "same num_features" in msg and "[3, 4]" in msg


def test_float32_at_a_large_mean_is_as_accurate_as_float64_statistics(ranks):
    """Each rank's float32 mean was rounded (5e-4 at 1e4) before the merge: outputs 0.03 off on a
    channel of spread 0.01, where the float64 truth of the same inputs is met to 1e-6 now."""
    x = W.precision_data()
    bn = nn.BatchNorm1d(2, momentum=1.0).double()
    want = bn(x.double())
    for rank, r in enumerate(ranks):
        got = r["precision"]
        torch.testing.assert_close(got["y"].double(), W.shard(want, W.PRECISION_SIZES, rank).detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(got["running_mean"].double(), bn.running_mean, rtol=1e-7, atol=0)
        torch.testing.assert_close(got["running_var"].double(), bn.running_var, rtol=1e-5, atol=0)


def test_double_backward_raises_on_every_rank(ranks):
    for rank, r in enumerate(ranks):
        msg = r["double_backward"]
        assert msg is not None and "SyncBatchNorm has no double backward" in msg, f"rank {rank}: {msg}"


def test_eps_zero_is_refused_on_every_rank(ranks):
    for rank, r in enumerate(ranks):
        assert r["eps_zero"] is not None and "eps must be positive in training" in r["eps_zero"], f"rank {rank}"


def test_ddp_training_with_sync_bn_matches_single_process_training(ranks):
    model = W.make_cnn()
    opt = W.make_optimizer(model)
    losses = []
    for step in range(W.DDP_STEPS):
        x, t = W.ddp_data(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    expected = model.state_dict()
    assert "SyncBatchNorm" in ranks[0]["ddp"]["types"] and "BatchNorm2d" not in ranks[0]["ddp"]["types"]
    for r in ranks:
        got = r["ddp"]["state"]
        assert list(got) == list(expected)  # batch norm's state-dict keys
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")
    # equal halves: the mean of the two ranks' losses is the full batch's loss
    mean_loss = [(a + b) / 2 for a, b in zip(ranks[0]["ddp"]["losses"], ranks[1]["ddp"]["losses"])]
    assert mean_loss == pytest.approx(losses, rel=1e-9)


def test_precise_bn_merges_statistics_across_ranks(ranks):
    x = W.precise_data()  # (n, C, L): statistics over n and L
    mean = x.mean(dim=(0, 2))
    var = x.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True)
    for r in ranks:
        p = r["precise"]
        torch.testing.assert_close(p["running_mean"], mean, **TOL)
        torch.testing.assert_close(p["running_var"], var, **TOL)
        assert p["count"] == x.shape[0] * x.shape[2]
        assert p["momentum"] == 0.25 and p["training"] is True


def test_precise_bn_with_a_batch_more_on_one_rank_stops_every_rank_at_the_shortest(ranks):
    """Rank 0 has two batches, rank 1 one: a SyncBatchNorm gathers on every forward, so rank 0's
    second forward would pair with rank 1's final merge (the same packet size) and mix them up.
    Both ranks stop after one batch and agree on that batch's statistics."""
    first = torch.cat([r["precise_uneven"]["batches"][0] for r in ranks])
    flat = first.transpose(0, 1).reshape(3, -1)
    for r in ranks:
        p = r["precise_uneven"]
        assert p["count"] == flat.shape[1]
        torch.testing.assert_close(p["running_mean"], flat.mean(1), **TOL)
        torch.testing.assert_close(p["running_var"], flat.var(1, unbiased=True), **TOL)


def test_precise_bn_agrees_on_batches_for_every_sync_layer_and_merges_torchs(ranks):
    """With a batch more on rank 0, a layer that gathers on every training forward but that precise_bn
    left out (normlab's SyncBatchNorm without running statistics, torch's SyncBatchNorm) paired rank 0's
    extra forward with another collective of rank 1 (an error, a hang, or mixed statistics); torch's
    SyncBatchNorm also kept each rank's own statistics. Both ranks stop after one batch; torch's layer
    gets the statistics of both ranks' first batches, a plain batch norm those of its rank's."""
    first = [r["precise_other_sync"]["batches"][0] for r in ranks]
    both = torch.cat(first).transpose(0, 1).reshape(3, -1)
    for rank, r in enumerate(ranks):
        p = r["precise_other_sync"]
        for key, seen in (("untracked", first[rank].transpose(0, 1).reshape(3, -1)), ("torch", both)):
            assert isinstance(p[key], dict), f"rank {rank}, {key}: {p[key]}"
            assert p[key]["count"] == seen.shape[1], (rank, key)
            torch.testing.assert_close(p[key]["running_mean"], seen.mean(1), **TOL)
            torch.testing.assert_close(p[key]["running_var"], seen.var(1, unbiased=True), **TOL)


def test_a_rank_outside_the_process_group_runs_plain_batch_norm(ranks):
    for r in ranks:
        o = r["outside_group"]
        bn = nn.BatchNorm1d(3).double()
        torch.testing.assert_close(o["y"], bn(o["x"]), **TOL)
        torch.testing.assert_close(o["running_mean"], bn.running_mean, **TOL)


@pytest.mark.gpu
def test_two_ranks_on_cuda(tmp_path):
    """The same checks with CUDA tensors, the ranks started by torchrun: NCCL with a GPU per rank, else
    gloo on the one GPU (NCCL refuses two ranks on one device)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    backend = "nccl" if torch.cuda.device_count() >= WORLD else "gloo"
    worker = pathlib.Path(__file__).with_name("_sync_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pathlib.Path(nlnn.__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), str(worker), str(tmp_path), "cuda", backend]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in W.SCENARIOS:
        test_outputs_and_input_gradients_match_batch_norm_on_the_full_batch(ranks, name)
        test_parameter_gradients_summed_over_ranks_match(ranks, name)
        test_running_statistics_match_and_agree_across_ranks(ranks, name)
        test_eval_is_local_and_sends_nothing(ranks, name)
    test_mismatched_channel_counts_fail_on_every_rank_naming_both(ranks)
    test_ddp_training_with_sync_bn_matches_single_process_training(ranks)
    test_precise_bn_merges_statistics_across_ranks(ranks)
    test_precise_bn_agrees_on_batches_for_every_sync_layer_and_merges_torchs(ranks)  # torch's own SyncBatchNorm


# -- one process, no process group ---------------------------------------------------------------

def test_without_a_process_group_it_is_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    sbn, bn = nlnn.SyncBatchNorm(4).double(), nn.BatchNorm2d(4).double()
    y1, y2 = sbn(x), bn(x)
    torch.testing.assert_close(y1, y2)
    g1, = torch.autograd.grad(y1.square().sum(), x)
    g2, = torch.autograd.grad(y2.square().sum(), x)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(sbn.running_var, bn.running_var)


def test_state_dict_is_batch_norms_both_ways():
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.uniform_()
        bn.weight.uniform_()
    sbn = nlnn.SyncBatchNorm(5)
    assert list(sbn.state_dict()) == list(bn.state_dict())
    sbn.load_state_dict(bn.state_dict())
    nn.BatchNorm2d(5).load_state_dict(sbn.state_dict())
    sbn.load_state_dict(nn.SyncBatchNorm(5).state_dict())
    torch.testing.assert_close(sbn.running_mean, torch.zeros(5))


def test_factory_spec_and_torch_spelling_of_conversion():
    m = make_norm("sync_batch", 8, dim=2, momentum=0.3)
    assert isinstance(m, nlnn.SyncBatchNorm) and m.momentum == 0.3
    with pytest.raises(ValueError, match="takes no argument"):
        make_norm("sync_batch:2", 8)
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.GroupNorm(1, 3))
    out = nlnn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(out[1], nlnn.SyncBatchNorm) and isinstance(out[2], nn.GroupNorm)


def test_input_errors_name_what_was_expected():
    sbn = nlnn.SyncBatchNorm(4)
    with pytest.raises(ValueError, match="at least 2 dims"):
        sbn(torch.randn(4))
    with pytest.raises(ValueError, match="built for 4 channels"):
        sbn(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="at least one channel"):  # torch's refuses it too, not an IndexError
        nlnn.SyncBatchNorm(0)(torch.randn(2, 0, 5))


def test_merge_moments_is_the_statistics_of_the_concatenation():
    from normlab.nn.sync_batch_norm import merge_moments

    torch.manual_seed(1)
    parts = [torch.randn(n, 3, dtype=torch.float64) + 1e4 for n in (5, 0, 11, 1)]
    count = torch.tensor([float(len(p)) for p in parts], dtype=torch.float64)
    mean = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    m2 = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3, dtype=torch.float64)
                      for p in parts])
    n, mu, M2 = merge_moments(count, mean, m2)
    full = torch.cat(parts)
    assert int(n) == len(full)
    torch.testing.assert_close(mu, full.mean(0))
    torch.testing.assert_close(M2 / n, full.var(0, unbiased=False))


def test_convert_sync_batchnorm_copies_qconfig_as_torch_does():
    def model():
        bn = nn.BatchNorm2d(3)
        bn.qconfig = "the qconfig"  # any object: torch copies the attribute as it is
        plain = nn.BatchNorm2d(3)  # no qconfig: none added
        return nn.Sequential(nn.Sequential(nn.Conv2d(1, 3, 1), bn), plain, bn)  # bn shared: one new layer

    ours, theirs = nlnn.SyncBatchNorm.convert_sync_batchnorm(model()), nn.SyncBatchNorm.convert_sync_batchnorm(model())
    for m in (ours, theirs):
        assert m[0][1].qconfig == "the qconfig" and not hasattr(m[1], "qconfig")
    assert ours[2] is ours[0][1] and isinstance(ours[2], nlnn.SyncBatchNorm)
    root = nn.BatchNorm1d(2)
    root.qconfig = None  # present though None: still copied, as torch does
    out = nlnn.SyncBatchNorm.convert_sync_batchnorm(root)
    assert isinstance(out, nlnn.SyncBatchNorm) and hasattr(out, "qconfig") and out.qconfig is None


def test_convert_sync_batchnorm_shares_parameters_and_buffers_as_torch_does():
    """An optimizer built before the conversion must still train the converted layer (torch
    assigns the same Parameter and buffer objects; copies would leave the optimizer orphaned)."""
    # torch's converts only its own BatchNorm (normlab's layers are not its subclasses)
    for cls, converted in ((nlnn.SyncBatchNorm, (1, 2)), (nn.SyncBatchNorm, (1,))):
        model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nlnn.BatchNorm1d(4))
        old = [dict(model[i].named_parameters()) | dict(model[i].named_buffers()) for i in converted]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        model = cls.convert_sync_batchnorm(model)
        for i, tensors in zip(converted, old):
            assert isinstance(model[i], cls)
            for name, t in tensors.items():
                assert getattr(model[i], name) is t, (cls, i, name)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        for i in converted:
            assert torch.equal(model[i].weight, torch.zeros(4))


def test_convert_keeps_a_sync_batch_norms_process_group():
    """A SyncBatchNorm of a subgroup stays in it when converted again (torch's -> normlab's, new
    settings); an explicit process_group= replaces it. (The group is any object here: it is only
    stored until a forward in training.)"""
    from normlab.tools import convert

    group, other = object(), object()
    model, _ = convert(nn.Sequential(nn.SyncBatchNorm(3, process_group=group)), "sync_batch")
    assert isinstance(model[0], nlnn.SyncBatchNorm) and model[0].process_group is group
    model, changes = convert(model, "sync_batch", momentum=0.2)
    assert model[0].process_group is group and model[0].momentum == 0.2 and changes
    model, changes = convert(model, "sync_batch", process_group=other)  # same repr, other group: still converted
    assert model[0].process_group is other and changes


def test_convert_sync_batchnorm_moves_sync_batch_norms_into_the_group_given_as_torch_does():
    old, new = object(), object()  # any object: the group is only stored until a forward in training
    for cls in (nlnn.SyncBatchNorm, nn.SyncBatchNorm):
        model = nn.Sequential(nn.SyncBatchNorm(3, process_group=old), nlnn.SyncBatchNorm(3, process_group=old),
                              nn.BatchNorm1d(3))
        model = cls.convert_sync_batchnorm(model, process_group=new)
        converted = (0, 2) if cls is nn.SyncBatchNorm else (0, 1, 2)  # torch's skips normlab's layers
        assert all(model[i].process_group is new for i in converted)
