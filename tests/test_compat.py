"""Drop-in behaviour beyond the numbers of one layer: what torch accepts, normlab accepts too
(empty batches, NumPy integers, more spatial dims, bias=False through conversions,
torch.compile), and the errors torch's twins would not give say what is wrong."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import randomize_norms_


@pytest.mark.parametrize("make,shape", [
    (lambda m: m.BatchNorm1d(3), (0, 3)),
    (lambda m: m.BatchNorm2d(3), (0, 3, 4, 4)),
    (lambda m: m.BatchNorm1d(3), (2, 3, 0)),
    (lambda m: m.BatchNorm1d(3, track_running_stats=False).eval(), (0, 3)),
    (lambda m: m.SyncBatchNorm(3), (0, 3, 5)),  # no process group: a local batch norm
], ids=["bn1d-N0", "bn2d-N0", "bn1d-L0", "bn1d-untracked-eval", "syncbn-N0"])
def test_an_empty_batch_passes_as_in_torch(make, shape):
    ours, theirs = make(NN), make(torch.nn)
    x = torch.randn(shape)
    y, want = ours(x), theirs(x)
    assert y.shape == want.shape == x.shape
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make,twin,shape,mask", [
    (lambda: NN.BatchRenorm1d(3, rmax=1.0, dmax=0.0), torch.nn.BatchNorm1d, (0, 3, 5), False),
    (lambda: NN.BatchRenorm1d(3), torch.nn.BatchNorm1d, (2, 3, 0), False),
    (lambda: NN.SwitchableNorm2d(3), torch.nn.BatchNorm2d, (0, 3, 4, 4), False),
    (lambda: NN.SwitchableNorm1d(3), torch.nn.BatchNorm1d, (0, 3), False),
    (lambda: NN.SwitchableNorm1d(3), torch.nn.BatchNorm1d, (2, 3, 0), False),
    (lambda: NN.SwitchableNorm2d(3), torch.nn.BatchNorm2d, (2, 3, 0, 4), False),
    (lambda: NN.MaskedBatchNorm1d(3), torch.nn.BatchNorm1d, (0, 3, 5), True),
], ids=["renorm-N0", "renorm-L0", "switchable2d-N0", "switchable1d-N0-2d", "switchable1d-L0", "switchable2d-H0",
        "masked-N0"])
def test_our_own_layers_pass_an_empty_batch_as_torchs_batch_norm_does(make, twin, shape, mask, training):
    """An input with no values: torch's batch norm returns an empty output with zero parameter
    gradients, leaves the running statistics and counts a training step. Ours refused it in
    training (renorm, switchable, masked with a mask) or crashed (switchable in evaluation: a
    reshape of 0 elements; its backward divided by 0 positions)."""
    ours, theirs = make().train(training), twin(3).train(training)
    x = torch.randn(shape, requires_grad=True)
    args = (torch.ones(shape[0], shape[2], dtype=torch.bool),) if mask else ()
    y, want = ours(x, *args), theirs(x)
    assert y.shape == want.shape == x.shape and y.dtype == want.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(ours.weight.grad, torch.zeros(3))
    torch.testing.assert_close(ours.bias.grad, torch.zeros(3))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def test_sync_batch_norm_without_channels_says_so_as_torchs_does():
    with pytest.raises(ValueError, match=r"SyncBatchNorm needs at least one channel, got input of shape \(2, 0, 3\)"):
        NN.SyncBatchNorm(0)(torch.randn(2, 0, 3))


def test_one_value_per_channel_without_running_statistics_says_why_eval_does_not_help():
    bn = NN.BatchNorm1d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match=r"without running statistics.*got input of shape \(1, 3\).*use a larger batch"):
        bn(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"in training needs more than 1 value.*use eval mode"):
        NN.BatchNorm1d(3)(torch.randn(1, 3))


@pytest.mark.parametrize("call", [
    lambda x: R.batch_norm_forward(x, training=False),
    lambda x: R.switchable_norm_forward(x, None, None, np.ones(3), np.ones(3), training=False),
    lambda x: R.masked_batch_norm_forward(x[..., None], None, training=False),
    lambda x: NF.switchable_norm(torch.from_numpy(x), None, None, None, None, torch.ones(3), torch.ones(3)),
], ids=["reference batch", "reference switchable", "reference masked", "functional switchable"])
def test_one_value_per_channel_in_eval_without_running_statistics_does_not_advise_eval_mode(call):
    """In evaluation without running statistics the batch's own are used: "in training ... use
    eval mode" described the other case."""
    with pytest.raises(ValueError, match=r"without running statistics.*more than 1") as err:
        call(np.ones((1, 3)))
    assert "eval mode" not in str(err.value)


@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
def test_normalized_shape_may_be_any_integer(cls):
    ours, theirs = getattr(NN, cls)(np.int64(8)), getattr(torch.nn, cls)(np.int64(8))
    assert ours.normalized_shape == theirs.normalized_shape == (8,)
    x = torch.randn(2, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_instance_norm_takes_any_number_of_spatial_dims():
    x, w, b = torch.randn(2, 3, 2, 2, 2, 3), torch.rand(3) + 0.5, torch.randn(3)
    torch.testing.assert_close(NF.instance_norm(x, weight=w, bias=b), F.instance_norm(x, weight=w, bias=b))


def test_bias_false_survives_sync_conversion_and_loads_into_torchs():
    ours = NN.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4, bias=False)))
    theirs = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4, bias=False)))
    assert ours[0].bias is None and ours[0].extra_repr() == theirs[0].extra_repr()
    theirs.load_state_dict(ours.state_dict())  # strict: the same keys
    assert NN.SyncBatchNorm(4, bias=False).bias is None


def test_group_norm_channel_error_names_its_own_argument():
    with pytest.raises(ValueError, match=r"built for 4 channels \(num_channels=4\).*has 6 along dim 1"):
        NN.GroupNorm(2, 4)(torch.randn(2, 6))


COMPILED = {
    "BatchNorm1d": (lambda: NN.BatchNorm1d(3), (4, 3, 5)),
    "BatchNorm2d": (lambda: NN.BatchNorm2d(3), (4, 3, 5, 5)),  # momentum=None reads a count: torch too breaks
    "LayerNorm": (lambda: NN.LayerNorm(5), (4, 3, 5)),
    "RMSNorm": (lambda: NN.RMSNorm(5), (4, 3, 5)),
    "GroupNorm": (lambda: NN.GroupNorm(1, 3), (4, 3, 5)),
    "InstanceNorm2d": (lambda: NN.InstanceNorm2d(3, affine=True, track_running_stats=True), (4, 3, 5, 5)),
    "LocalResponseNorm": (lambda: NN.LocalResponseNorm(2), (4, 3, 5)),
    "BatchRenorm2d": (lambda: NN.BatchRenorm2d(3), (4, 3, 5, 5)),
    "SyncBatchNorm": (lambda: NN.SyncBatchNorm(3), (4, 3, 5)),
    "weight_norm": (lambda: NN.weight_norm(torch.nn.Linear(3, 3)), (4, 3)),
    "spectral_norm": (lambda: NN.spectral_norm(torch.nn.Linear(3, 3)), (4, 3)),
}


@pytest.mark.parametrize("name", list(COMPILED))
def test_torch_compile_fullgraph_gives_the_eager_results(name):
    # dynamo's tracing is what fullgraph tests; the eager backend spares the C++ compile
    make, shape = COMPILED[name]
    torch.manual_seed(0)
    eager = make()
    compiled_module = make()
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True, backend="eager")
    for step in range(2):
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(compiled_module.state_dict(), eager.state_dict())


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "RMSNorm", "GroupNorm",
                                  "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LocalResponseNorm", "SELU",
                                  "AlphaDropout", "SyncBatchNorm"])
def test_constructor_and_forward_signatures_are_torchs(name):
    """Keyword calls written for torch work unchanged (RMSNorm's forward takes x, not input)."""
    ours, theirs = getattr(NN, name), getattr(torch.nn, name)
    assert inspect.signature(ours.forward).parameters.keys() == inspect.signature(theirs.forward).parameters.keys()
    assert list(inspect.signature(ours.__init__).parameters) == list(inspect.signature(theirs.__init__).parameters)


@pytest.mark.parametrize("name", ["BatchNorm2d", "LayerNorm", "SwitchableNorm2d", "BatchRenorm2d eval"])
def test_torch_export_gives_the_eager_results(name):
    """What the README says torch.export handles (it refuses MaskedBatchNorm1d: a data-dependent
    check)."""
    x = torch.randn(4, 3, 2, 2) if name != "LayerNorm" else torch.randn(4, 3)
    m = {"BatchNorm2d": lambda: NN.BatchNorm2d(3), "LayerNorm": lambda: NN.LayerNorm(3),
         "SwitchableNorm2d": lambda: NN.SwitchableNorm2d(3), "BatchRenorm2d eval": lambda: NN.BatchRenorm2d(3).eval()}[name]()
    if m.training:  # exported in eval: training mode would move the running statistics twice
        m.eval()
    exported = torch.export.export(m, (x,))
    assert torch.allclose(exported.module()(x), m(x), atol=1e-6)


def test_torch_export_of_batch_renorm_in_training_without_a_warm_up():
    """Without a warm-up the step counter is not read; the training graph exports, running-statistics
    update included."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    exported, eager = NN.BatchRenorm2d(3), NN.BatchRenorm2d(3)
    module = torch.export.export(exported, (x,)).module()
    torch.testing.assert_close(module(x), eager(x))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("how", ["compile", "export", "trace"])
def test_batch_renorm_warm_up_compiled_exported_or_traced_follows_the_step_counter(how):
    """The ramp read the step counter as a Python number: torch.compile broke its graph there and,
    with any compiler past "eager", recompiled at every step of the warm-up (8 times, then ran the
    rest eagerly); torch.export refused it; jit.trace froze the limits of the traced step. Computed
    from the counter as tensors, every step gives eager's numbers, bit for bit, in one graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager, other = NN.BatchRenorm1d(3, warmup_steps=3), NN.BatchRenorm1d(3, warmup_steps=3)
    x0 = torch.randn(8, 3)
    if how == "compile":
        torch._dynamo.reset()
        counters.clear()
        module = torch.compile(other, backend="aot_eager")
    elif how == "export":
        module = torch.export.export(other, (x0,)).module()
        other = module  # the exported module holds its own copy of the buffers
    else:
        module = torch.jit.trace(other, (x0,), check_trace=False)
        other.load_state_dict(eager.state_dict())  # undo the tracing call's step
    for step in range(5):  # through the ramp and past it, with r and d clipped
        x = torch.randn(8, 3) * (4 + step) + 3 * step
        assert torch.equal(module(x), eager(x)), step
    for k, v in eager.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    if how == "compile":
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("layer", ["switchable", "masked"])
def test_a_jit_trace_in_training_moves_the_running_statistics_as_eager(layer):
    """A traced model replays our autograd.Function, whose forward updates the running
    statistics; the tracer had also recorded that in-place update beside it, so each traced call
    moved them twice. MaskedBatchNorm1d's count of valid positions was a constant of the traced
    mask: a replay with another mask divided by it (outputs ~0.8 off)."""
    torch.manual_seed(0)
    make = (lambda: NN.SwitchableNorm1d(3)) if layer == "switchable" else (lambda: NN.MaskedBatchNorm1d(3))
    eager, traced = make(), make()
    full = (torch.ones(4, 6, dtype=torch.bool),) if layer == "masked" else ()
    padded = (torch.arange(6)[None, :] < torch.tensor([[6], [2], [3], [1]]),) if layer == "masked" else ()
    module = torch.jit.trace(traced, (torch.randn(4, 3, 6), *full), check_trace=False)
    traced.load_state_dict(eager.state_dict())  # undo the tracing call's step
    for step in range(2):
        x = torch.randn(4, 3, 6) * 2 + 1
        torch.testing.assert_close(module(x, *padded), eager(x, *padded))
        torch.testing.assert_close(traced.state_dict(), eager.state_dict())


def test_momentum_none_compiles_fullgraph_without_a_recompile_per_step():
    """The cumulative average's factor 1 / num_batches_tracked stays a tensor: one graph, no
    recompile at every step (torch's own BatchNorm breaks its graph there)."""
    from torch._dynamo.utils import counters

    for make in (lambda: NN.BatchNorm1d(4, momentum=None), lambda: NN.BatchRenorm1d(4, momentum=None)):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        eager = torch.nn.Sequential(torch.nn.Linear(4, 4), make())
        compiled_model = torch.nn.Sequential(torch.nn.Linear(4, 4), make())
        compiled_model.load_state_dict(eager.state_dict())
        compiled = torch.compile(compiled_model, fullgraph=True, backend="eager")
        for _ in range(4):
            x = torch.randn(8, 4) * 2 + 1
            torch.testing.assert_close(compiled(x), eager(x))
        torch.testing.assert_close(compiled_model.state_dict(), eager.state_dict())
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("make,args", [
    (lambda m: m.BatchNorm1d(4, momentum=None), ()),
    (lambda m: m.BatchNorm1d(4), ()),
    (lambda m: m.BatchRenorm1d(4, momentum=None), ()),
    (lambda m: m.MaskedBatchNorm1d(4, momentum=None), (torch.ones(16, 3, dtype=torch.bool),)),
], ids=["bn-cumulative", "bn", "renorm-cumulative", "masked-cumulative"])
def test_non_reentrant_checkpoint_counts_steps_as_torch_does(make, args):
    """torch counts a step before it computes; a non-reentrant checkpoint whose recompute stops
    right after the norm (the last op of the region) then moves the statistics and the count
    twice. The count and, with momentum=None, the running statistics must follow torch's."""
    from torch.utils.checkpoint import checkpoint

    def train(bn, *args):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 4)
        for _ in range(3):
            x = torch.randn(16, 4, 3) * 2 + 1
            y = checkpoint(lambda x: bn(lin(x.transpose(1, 2)).transpose(1, 2), *args), x, use_reentrant=False)
            y.square().sum().backward()
        return bn

    ours = train(make(NN), *args)
    theirs = train(torch.nn.BatchNorm1d(4, momentum=make(NN).momentum))  # the all-true mask: batch norm
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 6
    if ours.momentum is None and not isinstance(ours, NN.BatchRenorm1d):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("reentrant", [True, False])
def test_switchable_norm_under_checkpoint_moves_its_statistics_once_per_forward_pass(reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    sn, lin = NN.SwitchableNorm1d(4), torch.nn.Linear(5, 5)
    x = (torch.randn(8, 4, 5) * 2 + 1).requires_grad_()
    checkpoint(lambda x: lin(sn(x)), x, use_reentrant=reentrant).sum().backward()
    plain = NN.SwitchableNorm1d(4)
    plain(x)
    plain(x)  # the forward and checkpoint's one recompute
    assert int(sn.num_batches_tracked) == 2
    torch.testing.assert_close(sn.running_mean, plain.running_mean)
    torch.testing.assert_close(sn.running_var, plain.running_var)


@pytest.mark.parametrize("layer", ["masked", "switchable"])
def test_layers_with_their_own_backward_ignore_autocast_as_torchs_batch_norm_does(layer):
    """Under CPU bfloat16 autocast, torch ops such as bmm and vecdot drop to bfloat16 even for
    float32 input; the statistics of a large-mean input then lost ~0.1 in the output."""
    torch.manual_seed(0)
    x = (torch.randn(8, 6, 10) + 50.0).requires_grad_()
    dy = torch.randn(8, 6, 10)
    mask = torch.arange(10)[None, :] < torch.randint(3, 11, (8, 1))

    def run(autocast):
        m = NN.MaskedBatchNorm1d(6) if layer == "masked" else NN.SwitchableNorm1d(6)
        args = (mask,) if layer == "masked" else ()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(x, *args)
            y.backward(dy)
        return y, x.grad.clone(), m.running_mean.clone(), m.running_var.clone()

    for got, want in zip(run(True), run(False)):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want)


def test_momentum_none_in_eager_mode_is_torchs_running_average_bit_for_bit():
    torch.manual_seed(0)
    ours, theirs = NN.BatchNorm1d(8, momentum=None), torch.nn.BatchNorm1d(8, momentum=None)
    for _ in range(60):
        x = torch.randn(32, 8) * 2 + 3
        ours(x)
        theirs(x)
    assert torch.equal(ours.running_mean, theirs.running_mean) and torch.equal(ours.running_var, theirs.running_var)


def test_a_per_channel_parameter_may_be_0_d_for_one_channel_as_in_torch():
    x = torch.randn(4, 1, 5)
    w, b = torch.tensor(2.0), torch.tensor(0.5)
    torch.testing.assert_close(NF.batch_norm(x, None, None, w, b, True), F.batch_norm(x, None, None, w, b, True))
    torch.testing.assert_close(NF.instance_norm(x, weight=w, bias=b), F.instance_norm(x, weight=w, bias=b))


def test_the_reference_takes_per_channel_parameters_of_any_shape_with_one_value_per_channel():
    import normlab.reference as R

    x = np.random.default_rng(0).standard_normal((4, 3, 5))
    gamma, beta = np.array([1.5, 2.0, 0.5]), np.array([0.1, -0.2, 0.3])
    flat = R.batch_norm_forward(x, gamma, beta)[0]
    np.testing.assert_array_equal(R.batch_norm_forward(x, gamma.reshape(1, 3, 1), beta.reshape(3, 1))[0], flat)


FUNC_TWINS = {
    "BatchNorm2d": (lambda m: m.BatchNorm2d(3), (3, 5, 5)),
    "InstanceNorm1d": (lambda m: m.InstanceNorm1d(3, affine=True, track_running_stats=True), (3, 6)),
    "LayerNorm": (lambda m: m.LayerNorm(5), (3, 5)),
    "RMSNorm": (lambda m: m.RMSNorm(5), (3, 5)),
    "GroupNorm": (lambda m: m.GroupNorm(3, 3), (3, 4)),
    "LocalResponseNorm": (lambda m: m.LocalResponseNorm(2), (3, 4)),
    "SyncBatchNorm": (lambda m: m.SyncBatchNorm(3), (3, 4)),
}


@pytest.mark.parametrize("name", list(FUNC_TWINS))
def test_torch_func_transforms_in_eval_give_torchs_results(name):
    """What the README says of torch.func: vmap over samples, grad and jvp of a layer in eval
    (and functional_call with other parameters) give what they give with torch's twin."""
    make, sample = FUNC_TWINS[name]
    torch.manual_seed(0)
    theirs = randomize_norms_(make(torch.nn).double())  # the same non-trivial state on both
    ours = make(NN).double()
    theirs.eval()
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn((6, 1) + sample, generator=g, dtype=torch.float64)
    v = torch.randn((1,) + sample, generator=g, dtype=torch.float64)
    params = {k: p.detach() * 2 for k, p in theirs.named_parameters()}
    results = []
    for m in (ours, theirs):
        results.append((torch.func.vmap(m)(xs),
                        torch.func.grad(lambda z: m(z).sin().sum())(xs[0]),
                        torch.func.jvp(m, (xs[0],), (v,))[1],
                        torch.func.functional_call(m, params, (xs[0],))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["BatchNorm2d", "SyncBatchNorm"])
def test_vmap_in_training_after_what_replace_all_batch_norm_modules_does(name):
    """The README's recipe: torch.func.replace_all_batch_norm_modules_ passes our layers by (not
    subclasses), and doing by hand what it does to torch's lets vmap and grad train with batch
    statistics, giving torch's results."""
    make, sample = FUNC_TWINS[name]
    ours, theirs = make(NN).double(), make(torch.nn).double()
    torch.func.replace_all_batch_norm_modules_(theirs)
    assert ours.running_mean is not None  # passed by
    ours.track_running_stats = False
    ours.running_mean = ours.running_var = ours.num_batches_tracked = None
    xs = torch.randn((3, 2) + sample, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for transform in (torch.func.vmap, lambda m: torch.func.vmap(torch.func.grad(lambda x: m(x).sin().sum()))):
        torch.testing.assert_close(transform(ours)(xs), transform(theirs)(xs))


CL = {  # our layer, the layer whose output layout it must match (torch's twin, or BatchNorm for our own)
    "BatchNorm2d": (lambda: NN.BatchNorm2d(4), lambda: torch.nn.BatchNorm2d(4)),
    "GroupNorm": (lambda: NN.GroupNorm(2, 4), lambda: torch.nn.GroupNorm(2, 4)),
    "InstanceNorm2d": (lambda: NN.InstanceNorm2d(4, affine=True), lambda: torch.nn.InstanceNorm2d(4, affine=True)),
    "LocalResponseNorm": (lambda: NN.LocalResponseNorm(3), lambda: torch.nn.LocalResponseNorm(3)),
    "BatchRenorm2d": (lambda: NN.BatchRenorm2d(4), lambda: torch.nn.BatchNorm2d(4)),
    "SwitchableNorm2d": (lambda: NN.SwitchableNorm2d(4), lambda: torch.nn.BatchNorm2d(4)),
    "BatchNorm3d": (lambda: NN.BatchNorm3d(4), lambda: torch.nn.BatchNorm3d(4)),
}


@pytest.mark.parametrize("name", list(CL))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_channels_last_input_gives_the_layout_torch_gives(name, training):
    """A channels_last model keeps its layout through our layers where torch's twin (or, for a
    layer of our own, torch's batch norm) keeps it, with the values of a contiguous input. (The
    switchable norm's output came back contiguous: a copy for the next channels_last layer.)"""
    make, make_twin = CL[name]
    fmt = torch.channels_last_3d if name.endswith("3d") else torch.channels_last
    shape = (3, 4, 2, 5, 5) if name.endswith("3d") else (3, 4, 5, 5)
    ours, twin = make().train(training), make_twin().train(training)
    x = torch.randn(shape, dtype=torch.float64).to(memory_format=fmt)
    ours.double(), twin.double()
    y, want = ours(x.requires_grad_()), twin(x.detach())
    assert y.is_contiguous(memory_format=fmt) == want.is_contiguous(memory_format=fmt), name
    assert y.stride() == want.stride()
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    x2 = x.detach().contiguous().requires_grad_()
    y2 = make().train(training).double()(x2)
    (dx2,) = torch.autograd.grad(y2, x2, dy.contiguous())
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(dx, dx2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("call", ["layer", "functional"])
def test_an_empty_batch_leaves_instance_norms_running_statistics_alone(call, dtype):
    """InstanceNorm with track_running_stats=True on an empty batch (N = 0) in training: torch's
    update averages the per-instance statistics over 0 samples and writes NaN into both running
    buffers, so every later evaluation output is NaN. Batch norm leaves them on an empty batch;
    so does normlab's instance norm now."""
    x = torch.randn(0, 3, 5, dtype=dtype)
    if call == "layer":
        m = NN.InstanceNorm1d(3, track_running_stats=True)
        y = m(x)
        rm, rv = m.running_mean, m.running_var
        assert torch.isfinite(m.eval()(torch.randn(2, 3, 5, dtype=dtype))).all()
    else:
        rm, rv = torch.zeros(3), torch.ones(3)
        y = NF.instance_norm(x, rm, rv, use_input_stats=True)
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(rm, torch.zeros(3))
    torch.testing.assert_close(rv, torch.ones(3))
