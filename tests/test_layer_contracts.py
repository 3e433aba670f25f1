"""Contracts of the torch tier that the per-technique files leave open: the CPU half paths'
running statistics and buffers, batch renorm's own refusals, switchable norm's NaN isolation,
(N, C, 1) inputs and reset, the functional forms' evaluation without running statistics and a
bias without a weight, checkpoint and buffer semantics shared with torch. Each was found by
mutating the code: the test fails on the wrong version named in its docstring.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
import normlab.nn as NN
from helpers import assert_close, randn, t
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)


HALVES = [torch.float16, torch.bfloat16]


def test_switchable_nan_in_one_value_spoils_only_its_sample_and_channel():
    """y[n, c] mixes IN(n, c), LN(n) and BN(c): a NaN at x[2, 0] must spoil sample 2 (LN) and
    channel 0 (BN) and nothing else, in training, and in evaluation with the NaN running mean it
    left in channel 0 only channel 0. A non-finite pivot taken as is (not as 0) made the layer
    branch's shift NaN in every channel: every output NaN.
    Wrong version: _core.py finite_or_zero -> ``return p``."""
    x = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(1))
    x[2, 0, 1] = float("nan")
    m = NN.SwitchableNorm1d(3)
    y = m(x)
    others = [i for i in range(6) if i != 2]
    assert torch.isnan(y[2]).all() and torch.isnan(y[:, 0]).all()
    assert torch.isfinite(y[others][:, 1:]).all()
    m.eval()
    y = m(torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2)))
    assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1:]).all()


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_instance_norm_half_running_stats_with_samples_at_different_means(dtype):
    """The half path normalizes x less a pivot per (sample, channel) and moves the running mean
    back by the mean of the pivots over the samples. Samples at means 0, 100, ..., 500 make
    every pivot different, so a shift taken from one sample moves the running mean by tens.
    Compared with torch in float64 on the same rounded input; the buffers are float32, so the
    tolerance is float32's (a few ulps of values up to ~500).
    Wrong version: batch_norm.py _upcast ``pivot.mean(dim=0)`` -> ``pivot[0]``."""
    shift = torch.arange(6, dtype=torch.float64).view(6, 1, 1) * 100
    x = (t(randn((6, 3, 8), 0)) + shift).to(dtype)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm64, rv64 = rm.double(), rv.double()
    NF.instance_norm(x, rm, rv, use_input_stats=True, momentum=0.5)
    F.instance_norm(x.double(), rm64, rv64, use_input_stats=True, momentum=0.5)
    assert_close(rm, rm64, rtol=1e-5, atol=1e-5, what="running_mean")
    assert_close(rv, rv64, rtol=1e-5, atol=1e-5, what="running_var")


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("make", [lambda dt: NN.BatchNorm2d(3, dtype=dt),
                                  lambda dt: NN.InstanceNorm2d(3, track_running_stats=True, dtype=dt)],
                         ids=["batch", "instance"])
def test_half_evaluation_leaves_the_running_buffers_alone(make, dtype):
    """In evaluation the half path passes the running mean as 0 (it is the pivot): it must not
    write that 0 (or anything) back into the buffers.
    Wrong version: batch_norm.py _upcast ``if use_input_stats:`` (write-back) -> ``if True:``."""
    m = make(dtype).eval()
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([3.0, -2.0, 0.5]))
        m.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(4, 3, 5, 5).to(dtype))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batch_renorm_refuses_one_value_per_channel_under_its_own_name():
    """r and d need the batch's statistics: one value per channel is refused, naming
    batch_renorm, with nothing moved. (An empty batch has nothing to normalize and passes as an
    empty output, as batch norm lets it: see test_compat.py.)
    Wrong version: batch_renorm.py: the check_enough_values call removed."""
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"^batch_renorm in training needs more than 1 value per channel"):
        NF.batch_renorm(torch.randn(1, 3), rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    for shape in ((0, 3), (0, 3, 4)):
        assert NF.batch_renorm(torch.randn(shape), rm, rv, training=True).shape == shape
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["mean", "var"])
def test_batch_renorm_needs_both_running_buffers(which, training):
    """Only one of the two running buffers is refused with the explanation, in training and
    evaluation (not an AttributeError from deep inside).
    Wrong version: batch_renorm.py ``running_mean is None or running_var is None`` -> ``and``."""
    rm, rv = (None, torch.ones(3)) if which == "mean" else (torch.zeros(3), None)
    with pytest.raises(ValueError, match=r"batch_renorm needs running_mean and running_var"):
        NF.batch_renorm(torch.randn(4, 3), rm, rv, training=training)


@pytest.mark.parametrize("warmup_steps", [0, 10])
def test_batch_renorm_layer_with_buffers_set_to_none_says_what_it_needs(warmup_steps):
    """torch lets a batch norm's buffers be set to None after construction; batch renorm cannot
    train without them, with or without a warm-up (the warm-up reads the step count), and says so
    instead of a TypeError from ``int(None)``."""
    layer = NN.BatchRenorm1d(3, warmup_steps=warmup_steps)
    layer.running_mean = layer.running_var = layer.num_batches_tracked = None
    with pytest.raises(ValueError, match=r"needs running_mean and running_var|num_batches_tracked.*got None"):
        layer(torch.randn(4, 3))


def test_batch_renorm_repr_says_bias_false_only_for_an_affine_layer_without_beta():
    """``bias=False`` is a setting of the affine parameters: without them (affine=False) the
    repr does not claim it (the layer was not built with bias=False), and the repr rebuilds
    the layer.
    Wrong version: nn/batch_renorm.py extra_repr ``self.affine and self.bias is None`` -> ``self.bias is None``."""
    m = NN.BatchRenorm1d(4, affine=False)
    assert repr(m) == "BatchRenorm1d(4, eps=1e-05, momentum=0.1, affine=False, rmax=3.0, dmax=5.0, warmup_steps=0)"
    assert "bias=False" in repr(NN.BatchRenorm1d(4, bias=False))


@pytest.mark.parametrize("cls,shape", [(NN.SwitchableNorm1d, (5, 3, 1)), (NN.SwitchableNorm2d, (5, 3, 1, 1))],
                         ids=["NC1", "NC11"])
def test_switchable_single_position_input_keeps_the_instance_branch(cls, shape):
    """Only a 2-D (N, C) input drops the IN branch; (N, C, 1) has spatial dims (one position:
    IN mean = x, IN variance 0) and mixes all three, as the reference does. With IN-leaning
    logits the two differ by far more than float64 rounding.
    Wrong version: switchable_norm.py has_spatial ``s > 1 or x.dim() > 2`` -> ``s > 1``."""
    from normlab import reference as R

    m = cls(3, dtype=torch.float64)
    mw, vw = np.array([1.5, 0.2, -0.4]), np.array([0.7, -0.3, 0.1])
    with torch.no_grad():
        m.mean_weight.copy_(t(mw))
        m.var_weight.copy_(t(vw))
    x = randn(shape, 3, 2.0, 0.5)
    y_ref = R.switchable_norm_forward(x, np.ones(3), np.zeros(3), mw, vw, R.RunningStats(np.zeros(3), np.ones(3)),
                                      eps=1e-5)[0]
    assert_close(m(t(x)), y_ref)


def test_switchable_reset_parameters_restores_the_uniform_mix():
    """reset_parameters() puts every parameter back to its initial value, the mixing logits too
    (equal logits: the uniform mix of the paper), as it does for gamma, beta and the buffers.
    Wrong version: nn/switchable_norm.py reset_parameters: ``nn.init.ones_(self.mean_weight)`` removed."""
    m = NN.SwitchableNorm2d(3)
    fresh = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(4, 3, 2, 2))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.rand(p.shape) + 0.5)
    m.reset_parameters()
    for k, v in m.state_dict().items():
        assert torch.equal(v, fresh[k]), k
    mix = m.mixture()
    for key in ("mean", "var"):
        assert all(abs(w - 1 / 3) < 1e-7 for w in mix[key].values()), mix


def test_functional_masked_batch_norm_in_evaluation_without_running_stats_uses_the_batch():
    """Without running statistics there is nothing else to normalize with: evaluation uses the
    batch's statistics over the valid positions (as the module with track_running_stats=False
    and F.batch_norm's callers do), the same as training, and refuses a single valid position
    with the message for that case.
    Wrong version: masked_batch_norm.py ``batch_stats = training or running_mean is None`` -> ``training``."""
    from normlab import reference as R

    x = randn((3, 2, 5), 0, 2.0, 0.5)
    mask = np.arange(5)[None, :] < np.array([5, 2, 3])[:, None]
    w, b = randn(2, 1) + 1, randn(2, 2)
    y = NF.masked_batch_norm(t(x), torch.from_numpy(mask), None, None, t(w), t(b), training=False)
    y_ref = R.masked_batch_norm_forward(x, mask, w, b, None, training=False)[0]
    assert_close(y, y_ref)
    assert torch.equal(y, NF.masked_batch_norm(t(x), torch.from_numpy(mask), None, None, t(w), t(b), training=True))
    one = torch.tensor([[True, False, False, False, False]])
    with pytest.raises(ValueError, match=r"without running statistics.*more than 1 valid position"):
        NF.masked_batch_norm(torch.randn(1, 2, 5), one, None, None, training=False)


@pytest.mark.parametrize("ours,theirs", [(NN.BatchNorm2d, torch.nn.BatchNorm2d)], ids=["BatchNorm2d"])
def test_old_checkpoint_loads_into_a_meta_layer_with_a_real_counter_as_torch(ours, theirs):
    """A layer built on the meta device (deferred initialization) that loads a version-1 checkpoint
    (no num_batches_tracked) with assign=True must end up with a real counter at 0, as torch's:
    keeping its own meta tensor left a buffer that holds no value.
    Wrong version: nn/batch_norm.py ``keep = current is not None and current.device.type != "meta"`` ->
    ``keep = current is not None``."""
    from collections import OrderedDict

    src = theirs(3)
    sd = OrderedDict((k, v.clone()) for k, v in src.state_dict().items() if k != "num_batches_tracked")
    sd._metadata = OrderedDict({"": {"version": 1}})
    got = []
    for cls in (ours, theirs):
        m = cls(3, device="meta")
        m.load_state_dict(sd, assign=True)
        got.append(m.num_batches_tracked)
    assert got[0].device == got[1].device == torch.device("cpu")
    assert torch.equal(got[0], got[1])


@pytest.mark.parametrize("cls_name", ["BatchNorm1d", "BatchNorm2d"])
def test_reset_running_stats_zeroes_the_step_count_as_torch(cls_name):
    """reset_running_stats() restarts the estimates: mean 0, var 1 and num_batches_tracked 0 (for
    momentum=None the count is the cumulative average's denominator, so a stale count would
    weigh the next batch as 1/(k+1) instead of 1), as torch's.
    Wrong version: nn/batch_norm.py reset_running_stats: ``num_batches_tracked.zero_()`` removed."""
    from helpers import assert_state_equal, run_twins

    shape = (4, 3) if cls_name == "BatchNorm1d" else (2, 3, 2, 2)
    ours = getattr(NN, cls_name)(3, momentum=None, dtype=torch.float64)
    theirs = getattr(torch.nn, cls_name)(3, momentum=None, dtype=torch.float64)
    for m in (ours, theirs):
        m(t(randn(shape, 0)))
        m(t(randn(shape, 1)))
        m.reset_running_stats()
    assert int(ours.num_batches_tracked) == 0
    assert_state_equal(ours, theirs, 0, 0, "after reset")
    run_twins(ours, theirs, lambda s: t(randn(shape, 10 + s, 2.0, 1.0)), steps=2)


@pytest.mark.parametrize("cls_name,shape", [("BatchNorm1d", (6, 3)), ("BatchNorm2d", (2, 3, 2, 2))], ids=str)
def test_track_running_stats_switched_off_later_freezes_the_buffers_as_torch(cls_name, shape):
    """Setting ``track_running_stats = False`` on a layer that has running buffers (a common way
    to freeze them): torch then trains with batch statistics without touching the buffers or
    the count, and evaluates with the buffers. A drop-in must do the same.
    Wrong version: nn/batch_norm.py _running ``not self.training or self.track_running_stats`` -> ``True``."""
    from helpers import run_twins

    ours = getattr(NN, cls_name)(3, dtype=torch.float64)
    theirs = getattr(torch.nn, cls_name)(3, dtype=torch.float64)
    ours(t(randn(shape, 0, 2.0, 1.0)))  # buffers away from their initial values
    theirs.load_state_dict(ours.state_dict())
    frozen = {k: v.clone() for k, v in ours.named_buffers()}
    for m in (ours, theirs):
        m.track_running_stats = False
    run_twins(ours, theirs, lambda s: t(randn(shape, 10 + s, 1.5, 0.3)), steps=2, copy_state=False)
    for k, v in ours.named_buffers():
        assert torch.equal(v, frozen[k]), k


def test_legacy_instance_norm_checkpoint_error_is_torchs_without_unexpected_keys():
    """The versionless running statistics are explained once, as torch does (it removes those keys
    after the explanation): the error must not also list them as bare unexpected keys.
    Wrong version: nn/instance_norm.py _load_from_state_dict: the ``state_dict.pop(k)`` loop removed."""
    legacy = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    msgs = []
    for cls in (torch.nn.InstanceNorm2d, NN.InstanceNorm2d):
        with pytest.raises(RuntimeError) as err:
            cls(3).load_state_dict(dict(legacy))
        msgs.append(str(err.value))
    assert "Unexpected key(s)" not in msgs[0]  # torch's
    assert "Unexpected key(s)" not in msgs[1]
    assert msgs[1].count("running_mean") == msgs[0].count("running_mean")


def test_functional_switchable_norm_bias_without_weight_gets_its_gradient():
    """NF.switchable_norm(x, ..., weight=None, bias=b): the forward adds b, the backward must give
    dL/db = sum of dy over N and positions (the reference's dbeta; batch_renorm and
    masked_batch_norm do this for a bias without a weight). It returned None: b.grad stays None,
    silently, and an optimizer never moves b."""
    from normlab import reference as R

    x, dy, b = randn((4, 3, 5), 0), randn((4, 3, 5), 1), randn(3, 2)
    bt = t(b, requires_grad=True)
    y = NF.switchable_norm(t(x), None, None, None, bt, torch.ones(3, dtype=torch.float64),
                           torch.ones(3, dtype=torch.float64), training=True)
    y.backward(t(dy))
    y_ref, cache, _ = R.switchable_norm_forward(x, None, b, np.ones(3), np.ones(3), None)
    assert_close(y, y_ref)
    assert bt.grad is not None, "bias got no gradient"
    assert_close(bt.grad, R.switchable_norm_backward(dy, cache)[2])


@pytest.mark.parametrize("track", [False, True])
def test_masked_batch_norm_without_a_mask_is_batch_norm1d_in_training_and_evaluation(track):
    """``mask=None`` is exactly BatchNorm1d, also untracked in evaluation (batch statistics: there
    are no running ones), where passing ``training`` instead of "use batch statistics" sent
    F.batch_norm an evaluation call without running statistics (RuntimeError).
    Wrong version: nn/masked_batch_norm.py ``self._use_batch_stats()`` -> ``self.training``."""
    from helpers import run_twins

    ours = NN.MaskedBatchNorm1d(3, track_running_stats=track, dtype=torch.float64)
    theirs = torch.nn.BatchNorm1d(3, track_running_stats=track, dtype=torch.float64)
    run_twins(ours, theirs, lambda s: t(randn((4, 3, 5), s, 1.5, 0.3)), steps=2, eval_steps=2)


@pytest.mark.parametrize("make,shape", [(lambda: NN.SwitchableNorm2d(4, device="meta"), (2, 4, 3, 3)),
                                        (lambda: NN.SwitchableNorm1d(4, device="meta"), (2, 4, 5)),
                                        (lambda: NN.MaskedBatchNorm1d(4, device="meta"), (2, 4, 5)),
                                        (lambda: NN.BatchNorm2d(4, device="meta"), (2, 4, 3, 3))],
                         ids=["switchable2d", "switchable1d", "masked-no-mask", "batch2d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layers_run_on_the_meta_device_as_torchs(make, shape, training):
    """A forward on meta tensors (deferred initialization, shape inference) gives the output's shape,
    as torch's layers do. Wrong version: functional/_core.py autocast_enabled without
    ``except RuntimeError`` (torch.is_autocast_enabled("meta") raises): SwitchableNorm's Function failed
    with "unknown device type for autocast"."""
    m = make().train(training)
    y = m(torch.empty(shape, device="meta"))
    assert y.shape == shape and y.device.type == "meta"
