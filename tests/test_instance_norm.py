"""Instance norm: NumPy reference vs torch in float64 (incl. running stats), nn twins."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import assert_close, assert_state_dict_roundtrip, randn, run_twins, t, torch_grads
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

SHAPES = [(2, 3, 7), (1, 2, 5, 3), (2, 1, 3, 2, 2), (3, 13, 2), (1, 1, 1, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("tracked", [True, False])
def test_reference_matches_torch_over_steps_then_eval(shape, affine, tracked):
    c = shape[1]
    gamma, beta = (randn(c, 1) + 1, randn(c, 2)) if affine else (None, None)
    running = R.RunningStats(np.zeros(c), np.ones(c)) if tracked else None
    rm, rv = (torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)) if tracked else (None, None)
    for step in range(3):
        use_input_stats = step < 2 or not tracked
        x, dy = randn(shape, 10 + step, 2.0, 0.5), randn(shape, 20 + step)
        y, cache, running = R.instance_norm_forward(x, gamma, beta, running, use_input_stats=use_input_stats,
                                                   momentum=0.3, eps=1e-3)
        dx, dg, db = R.instance_norm_backward(dy, cache)
        ty, (tdx, tdg, tdb) = torch_grads(
            lambda x_, g_, b_, u=use_input_stats: F.instance_norm(x_, rm, rv, g_, b_, u, 0.3, 1e-3),
            (x, gamma, beta), dy)
        what = f"step {step}"
        assert_close(y, ty, what=f"{what} y")
        assert_close(dx, tdx, what=f"{what} dx")
        assert_close(dg, tdg, what=f"{what} dgamma")
        assert_close(db, tdb, what=f"{what} dbeta")
        if tracked:
            assert_close(running.mean, rm, what=f"{what} running_mean")
            assert_close(running.var, rv, what=f"{what} running_var")


CLASSES = [("InstanceNorm1d", (2, 3, 7)), ("InstanceNorm2d", (3, 2, 1, 5)), ("InstanceNorm3d", (1, 2, 3, 1, 2))]


@pytest.mark.parametrize("cls_name,shape", CLASSES, ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(affine=True), dict(track_running_stats=True),
                                dict(affine=True, track_running_stats=True, momentum=0.4),
                                dict(track_running_stats=True, momentum=None), dict(affine=True, bias=False)], ids=str)
def test_module_matches_torch_twin(cls_name, shape, kw):
    ours = getattr(NN, cls_name)(shape[1], dtype=torch.float64, **kw)
    theirs = getattr(torch.nn, cls_name)(shape[1], dtype=torch.float64, **kw)
    assert repr(ours) == repr(theirs)
    run_twins(ours, theirs, lambda s: t(randn(shape, s, 1.5, s)), steps=3)
    assert_state_dict_roundtrip(ours, theirs)
    if kw.get("track_running_stats") and kw.get("momentum", 0.1) is not None:
        assert not torch.equal(ours.running_var, torch.ones_like(ours.running_var))  # the stats did move


@pytest.mark.parametrize("cls_name,shape", CLASSES, ids=str)
def test_unbatched_input_matches_torch(cls_name, shape):
    ours = getattr(NN, cls_name)(shape[1], affine=True, track_running_stats=True, dtype=torch.float64)
    theirs = getattr(torch.nn, cls_name)(shape[1], affine=True, track_running_stats=True, dtype=torch.float64)
    run_twins(ours, theirs, lambda s: t(randn(shape[1:], s, 2.0, 1.0)), steps=2)


def test_functional_matches_torch():
    x = randn((2, 3, 5), 0)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    assert_close(NF.instance_norm(t(x), rm, rv, momentum=0.5), F.instance_norm(t(x), rm2, rv2, momentum=0.5))
    assert_close(rm, rm2)
    assert_close(rv, rv2)
    assert_close(NF.instance_norm(t(x), rm, rv, use_input_stats=False),
                 F.instance_norm(t(x), rm2, rv2, use_input_stats=False))


def test_legacy_checkpoint_with_running_stats_is_refused_as_torch_does():
    """A versionless state dict holding running stats for an untracked layer (torch < 0.4.0):
    both raise, naming the buffers and track_running_stats; a versioned one loads with strict=False."""
    legacy = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    for cls in (torch.nn.InstanceNorm2d, NN.InstanceNorm2d):
        with pytest.raises(RuntimeError, match=r"running stats buffer\(s\).*track_running_stats=False") as err:
            cls(3).load_state_dict(dict(legacy))
        assert "Unexpected key(s)" not in str(err.value)  # the keys explained are taken out, not listed again
    tracked = NN.InstanceNorm2d(3, track_running_stats=True).state_dict()  # carries version metadata
    result = NN.InstanceNorm2d(3).load_state_dict(tracked, strict=False)
    assert set(result.unexpected_keys) == {"running_mean", "running_var", "num_batches_tracked"}
    theirs = torch.nn.InstanceNorm2d(3).load_state_dict(torch.nn.InstanceNorm2d(3, track_running_stats=True).state_dict(),
                                                        strict=False)
    assert set(theirs.unexpected_keys) == set(result.unexpected_keys)


@pytest.mark.parametrize("tracked", [False, True])
def test_no_spatial_positions_gives_an_empty_output_as_torch(tracked):
    x = torch.randn(2, 4, 0)
    ours, theirs = NN.InstanceNorm1d(4, track_running_stats=tracked), torch.nn.InstanceNorm1d(4, track_running_stats=tracked)
    assert ours(x).shape == theirs(x).shape == (2, 4, 0)
    if tracked:
        assert torch.equal(ours.running_mean, theirs.running_mean) and torch.equal(ours.running_var, theirs.running_var)


def test_eval_without_running_stats_says_batch_statistics_are_used():
    """Untracked InstanceNorm normalizes with the input's statistics in eval too: the message must not say 'in training'."""
    with pytest.raises(ValueError, match=r"without running statistics.*\(1 value per instance"):
        NN.InstanceNorm1d(4).eval()(torch.randn(2, 4, 1))


def test_running_statistics_record_why_torch_runs_it():
    import normlab

    NN.InstanceNorm2d(3, track_running_stats=True)(torch.randn(2, 3, 4, 4))
    assert normlab.last_choice()[0] == "instance_norm" and normlab.last_choice()[1] == "torch"


def test_half_running_mean_on_the_cpu_averages_every_instance():
    """float16 on the CPU runs in float32 on x less a per-instance pivot, and the running mean gets
    the pivots' mean over the batch back: instances at different means (0, 100, -50) must all count
    (only the first instance's pivot gave a running mean of -0.06 here, not 8.3)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 2, 16, generator=g) + torch.tensor([0.0, 100.0, -50.0]).view(3, 1, 1)).half()
    rm, rv = torch.zeros(2, dtype=torch.float16), torch.ones(2, dtype=torch.float16)
    rm64, rv64 = rm.double(), rv.double()
    NF.instance_norm(x, rm, rv, use_input_stats=True, momentum=0.5)
    F.instance_norm(x.double(), rm64, rv64, use_input_stats=True, momentum=0.5)
    torch.testing.assert_close(rm.double(), rm64, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(rv.double(), rv64, rtol=2e-3, atol=1e-3)
