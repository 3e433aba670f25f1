"""Contracts of the tools that their own files leave open: what convert carries between kinds
and reports, fold's refusals (a parametrized bias, a global pre-hook, a Linear whose outputs
are not the norm's channels, a conv shared by two Sequentials), precise_bn's hooks, monitor's
histogram of a constant output. Each was found by mutating the code: the test fails on the
wrong version named in its docstring.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab.nn as NN
from helpers import randomize_bn_, randomize_norms_
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)


def test_convert_between_batch_statistics_kinds_carries_momentum_and_track_running_stats():
    """Between layers whose running statistics mean the same (batch -> sync batch, batch ->
    switchable), momentum and track_running_stats keep their meaning and carry over: the
    converted layer's next training step moves its statistics as the old layer's would, and an
    untracked layer stays untracked (batch statistics in evaluation).
    Wrong version: convert.py _carried: ``("momentum", "track_running_stats")`` -> ``("track_running_stats",)``
    and -> ``("momentum",)``."""
    from normlab.tools import convert

    src = randomize_norms_(nn.BatchNorm2d(4, momentum=0.01))
    out, _ = convert(nn.Sequential(copy.deepcopy(src)), "sync_batch")
    assert out[0].momentum == 0.01
    x = torch.randn(3, 4, 5, 5)
    src(x)
    out[0](x)  # no process group: plain batch norm
    torch.testing.assert_close(out[0].running_mean, src.running_mean)
    torch.testing.assert_close(out[0].running_var, src.running_var)
    out, _ = convert(nn.Sequential(nn.BatchNorm2d(4, momentum=None, track_running_stats=False)), "switchable")
    assert out[0].track_running_stats is False and out[0].running_mean is None and out[0].momentum is None


def test_convert_batch_to_instance_with_running_stats_does_not_copy_them_and_says_why():
    """Batch norm's running statistics average over the batch, instance norm's over each instance:
    they do not mean the same, so the new layer starts from mean 0 / var 1 / count 0 and the
    Change says so in not_copied.
    Wrong version: convert.py: the ``average different statistics`` report removed, and the copy condition
    widened from batch-statistics kinds to all channel-wise kinds."""
    from normlab.tools import convert

    src = randomize_norms_(nn.BatchNorm2d(4))
    out, changes = convert(nn.Sequential(src), "instance", track_running_stats=True)
    target = out[0]
    assert type(target) is NN.InstanceNorm2d and target.track_running_stats
    assert torch.equal(target.running_mean, torch.zeros(4)) and torch.equal(target.running_var, torch.ones(4))
    assert int(target.num_batches_tracked) == 0
    assert changes[0].copied == ("weight", "bias")
    assert any(s.startswith("running statistics:") and "average different statistics" in s
               for s in changes[0].not_copied), changes[0]


def test_convert_switchable_to_switchable_keeps_the_learned_mix():
    """A switchable norm rebuilt with other settings keeps its learned mixing logits (reported in
    ``copied``), so it computes the same mix.
    Wrong version: convert.py: the copy of other same-named tensors (``u.copy_(t)``) removed."""
    from normlab.tools import convert

    src = NN.SwitchableNorm2d(4)
    with torch.no_grad():
        src.mean_weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
        src.var_weight.copy_(torch.tensor([-0.5, 1.5, 0.0]))
    mix = src.mixture()
    out, changes = convert(nn.Sequential(src), "switchable", eps=1e-3)
    assert out[0].eps == 1e-3 and "mean_weight" in changes[0].copied and "var_weight" in changes[0].copied
    assert torch.equal(out[0].mean_weight, src.mean_weight) and torch.equal(out[0].var_weight, src.var_weight)
    assert out[0].mixture() == mix


def test_convert_keeps_a_frozen_affine_that_is_not_a_parameter_frozen():
    """A batch norm whose gamma/beta are frozen tensors (buffers, not Parameters) cannot hand
    over its tensor objects: its values are copied, and the new parameters must stay frozen
    (requires_grad=False) rather than start training.
    Wrong version: convert.py _copy: ``q.requires_grad_(p.requires_grad)`` removed."""
    from normlab.tools import convert

    class FrozenAffineBN(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            w, b = self.weight.detach().clone() * 2, self.bias.detach().clone() + 0.5
            del self.weight, self.bias
            self.register_buffer("weight", w)
            self.register_buffer("bias", b)

    src = FrozenAffineBN(4).eval()
    out, changes = convert(nn.Sequential(src), "group:2")
    assert changes[0].copied[:2] == ("weight", "bias")
    assert torch.equal(out[0].weight, src.weight) and torch.equal(out[0].bias, src.bias)
    assert not out[0].weight.requires_grad and not out[0].bias.requires_grad


def _randomized(model):
    return randomize_bn_(model).double().eval()


def _same_outputs(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "modules", "fx"])
def test_fold_leaves_a_layer_whose_bias_alone_is_parametrized(method):
    """A parametrization on the bias only (the weight is still a Parameter) also makes the layer's
    bias computed: folding would write into a computed tensor (lost) and the fold would change the
    model. It is left, with the reason.
    Wrong version: fold.py _pair_problem: ``parametrize.is_parametrized(layer) or`` dropped."""
    from torch.nn.utils import parametrize

    from normlab.tools import fold

    class Shift(nn.Module):
        def forward(self, b):
            return b + 1.0

    model = _randomized(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    parametrize.register_parametrization(model[0], "bias", Shift())
    folded, report = fold(model, method=method)
    assert not report.folded and "parametrization" in report.left[0][1], report
    _same_outputs(model, folded, torch.randn(2, 3, 4, 4, dtype=torch.float64))


def test_fold_a_global_forward_pre_hook_blocks_every_fold():
    """A global *pre*-forward hook (register_module_forward_pre_hook) sees the batch norm's input,
    which folding removes: like a global forward hook it blocks the fold.
    Wrong version: fold.py _hook_problem: the ``_global_forward_pre_hooks`` half of the check dropped."""
    from normlab.tools import fold

    model = _randomized(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    handle = nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: (args[0].clamp(max=0.3),) if isinstance(m, nn.BatchNorm2d) else None)
    try:
        folded, report = fold(model)
        assert not report.folded and "global module forward or pre-forward hook" in report.left[0][1], report
        _same_outputs(model, folded, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    finally:
        handle.remove()


@pytest.mark.parametrize("method", ["auto", "modules", "fx"])
def test_fold_leaves_a_linear_whose_outputs_are_not_the_batch_norms_channels(method):
    """Linear(4, 5) on an (N, 3, 4) input followed by BatchNorm1d(3): the norm's channels are dim 1,
    not the Linear's 5 output features, so there is nothing per output feature to fold. It is
    left with the reason (not a shape error from the fold arithmetic), the model unchanged.
    Wrong version: fold.py _pair_problem: the output-channel count check removed."""
    from normlab.tools import fold

    model = _randomized(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(3)))
    folded, report = fold(model, method=method)
    assert not report.folded and "output channels but the batch norm has 3" in report.left[0][1], report
    _same_outputs(model, folded, torch.randn(2, 3, 4, dtype=torch.float64))


def test_fold_modules_method_leaves_a_conv_shared_by_two_sequentials():
    """method="modules" has no traced graph to vet its pairs: a Conv object used in two Sequentials,
    each followed by its own batch norm, must be left (folding either batch norm into the shared
    conv changes the other path).
    Wrong version: fold.py _fold_sequential: the ``uses > 1`` (shared layer) check removed."""
    from normlab.tools import fold

    conv = nn.Conv2d(3, 3, 1)
    model = _randomized(nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(3)),
                                           nn.Sequential(conv, nn.BatchNorm2d(3))))
    folded, report = fold(model, method="modules")
    assert not report.folded and len(report.left) == 2, report
    assert all("shared" in why for _, why in report.left), report
    _same_outputs(model, folded, torch.randn(2, 3, 4, 4, dtype=torch.float64))


def test_precise_bn_removes_its_hooks():
    """precise_bn's forward pre-hooks exist only while it runs: afterwards every layer has the
    hooks it had before (a hook left behind would keep accumulating every later forward's inputs
    and refuse inputs on its own), also when a batch fails.
    Wrong version: precise_bn.py: ``h.remove()`` in the finally block skipped."""
    from normlab.tools import precise_bn

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), NN.BatchNorm2d(4))
    before = [len(m._forward_pre_hooks) for m in model.modules()]
    precise_bn(model, [torch.randn(2, 3, 4, 4) for _ in range(3)])
    assert [len(m._forward_pre_hooks) for m in model.modules()] == before
    with pytest.raises(Exception):
        precise_bn(model, [torch.randn(2, 5, 4, 4)])  # the conv refuses 5 channels
    assert [len(m._forward_pre_hooks) for m in model.modules()] == before


@pytest.mark.parametrize("exact_limit", [1 << 16, 0], ids=["numpy-copy", "device-sums"])
def test_monitor_constant_output_gets_a_unit_wide_histogram_centred_on_it(exact_limit):
    """A constant output (a dead ReLU layer: all 0) has no spread to bin: its histogram spans the
    documented unit-wide range [v - 0.5, v + 0.5] with every value in the middle bin, and all
    its percentiles are v.
    Wrong version: monitor.py _sorted_rows: the constant-sample range ``lo -/+ 0.5`` widened to ``-/+ 1.0``."""
    from normlab.tools import monitor

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # never fires
    with monitor(model, every=1, bins=5, exact_limit=exact_limit) as mon:
        model(torch.randn(8, 4)).sum().backward()
    rec = next(r for r in mon.records if r["layer"] == "1")
    assert (rec["min"], rec["max"], rec["std"]) == (0.0, 0.0, 0.0)
    assert (rec["hist"]["lo"], rec["hist"]["hi"]) == (-0.5, 0.5)
    counts = rec["hist"]["counts"]
    assert counts[2] == sum(counts) and sum(counts) > 0
    assert all(v == 0.0 for v in rec["percentiles"].values())
