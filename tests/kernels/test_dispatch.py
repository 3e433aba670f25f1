"""The functional tier's dispatch to the kernels: ``set_backend("triton")`` routes every layer
with a kernel through it (here under the interpreter) with the same numbers as the torch path;
``"auto"`` keeps CPU tensors on torch; unsupported calls fall back with a reason."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import normlab  # noqa: E402
import normlab.nn as N  # noqa: E402
from normlab import _backend, kernels  # noqa: E402
from kernels.ktest import cpu, gpu  # noqa: E402


def _run(module, x, *extra, steps=2):
    out = []
    for _ in range(steps):
        xr = x.clone().requires_grad_()
        y = module(xr, *extra)
        y.backward(torch.ones_like(y) + torch.arange(y.numel(), dtype=y.dtype).view_as(y) / y.numel())
        out.append((y.detach(), xr.grad))
    return out


CASES = [
    ("layer_norm", lambda: N.LayerNorm(37), (3, 5, 37)),
    ("rms_norm", lambda: N.RMSNorm(37), (3, 5, 37)),
    ("group_norm", lambda: N.GroupNorm(3, 6), (2, 6, 5, 3)),
    ("instance_norm", lambda: N.InstanceNorm2d(6, affine=True), (2, 6, 5, 3)),
    ("batch_norm", lambda: N.BatchNorm2d(6), (4, 6, 5, 3)),
]


@pytest.mark.parametrize("op, make, shape", CASES, ids=[c[0] for c in CASES])
def test_triton_backend_matches_torch_backend(op, make, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    a, b = make().double(), make().double()
    with normlab.backend("torch"):
        ref = _run(a, x)
        assert normlab.last_choice()[:2] == (op, "torch")
    with normlab.backend("triton"):
        got = _run(b, x)
        assert normlab.last_choice()[:2] == (op, "triton"), normlab.last_choice()
    for (y0, g0), (y1, g1) in zip(ref, got):
        torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-9)
    for p0, p1 in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-9, atol=1e-9)
    for b0, b1 in zip(a.buffers(), b.buffers()):
        torch.testing.assert_close(b1, b0, rtol=1e-9, atol=1e-9)


def test_masked_batch_norm_dispatches():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 4, 2])[:, None]
    a, b = N.MaskedBatchNorm1d(4).double(), N.MaskedBatchNorm1d(4).double()
    with normlab.backend("torch"):
        ref = _run(a, x, mask)
    with normlab.backend("triton"):
        got = _run(b, x, mask)
        assert normlab.last_choice()[:2] == ("masked_batch_norm", "triton")
    for (y0, g0), (y1, g1) in zip(ref, got):
        torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.running_var, a.running_var, rtol=1e-9, atol=1e-9)


def test_auto_keeps_cpu_tensors_on_torch():
    with normlab.backend("auto"):
        N.LayerNorm(8)(torch.randn(2, 8))
        assert normlab.last_choice() == ("layer_norm", "torch", "auto: input not on CUDA")


def test_unsupported_call_falls_back_with_a_reason():
    x = torch.randn(4, 6, 5)[:, ::2]  # neither NCHW-contiguous nor channels-last
    with normlab.backend("triton"):
        y = N.GroupNorm(3, 3)(x)
        op, choice, why = normlab.last_choice()
    assert (op, choice) == ("group_norm", "torch") and why
    torch.testing.assert_close(y, torch.nn.functional.group_norm(x, 3))


def test_environment_variable_and_bad_names(monkeypatch):
    monkeypatch.setenv("NORMLAB_BACKEND", "torch")
    assert normlab.get_backend() == "torch"
    monkeypatch.setenv("NORMLAB_BACKEND", "cuda")
    with pytest.raises(ValueError, match="NORMLAB_BACKEND must be one of"):
        normlab.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        normlab.set_backend("fast")


def test_layer_norm_takes_a_numpy_eps_on_the_kernel_path_too():
    import numpy as np

    import normlab.functional as NF

    x = torch.randn(3, 5)
    with normlab.backend("triton"):
        y = NF.layer_norm(x, (5,), eps=np.float32(1e-3))
        assert normlab.last_choice()[:2] == ("layer_norm", "triton")
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (5,), eps=1e-3))


def test_mixed_parameter_dtypes_take_the_torch_path_as_torch_decides():
    """A float64 weight with a float32 input: torch refuses it on the CPU, the kernel would have
    quietly run it; now the kernel declines, torch's own rule applies on every device. Half input
    with float32 parameters (the usual mixed precision) still runs on the kernel."""
    from normlab import kernels

    x = torch.randn(4, 6)
    ok, why = kernels.supports("layer_norm", x, (6,), torch.ones(6, dtype=torch.float64), None)
    assert not ok and "weight dtype torch.float64 with a torch.float32 input" in why
    ok, why = kernels.supports("batch_norm", x.double(), torch.zeros(6), torch.ones(6), None, None, True)
    assert not ok and "running_mean dtype torch.float32 with a torch.float64 input" in why
    assert kernels.supports("layer_norm", x.half(), (6,), torch.ones(6), torch.zeros(6))[0]
    with normlab.backend("triton"), pytest.raises(RuntimeError, match="mixed dtype"):
        N.BatchNorm1d(6)(x.double())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's forward AD scripts its decompositions
def test_torch_func_transforms_and_forward_ad_take_the_torch_path():
    """The kernels' autograd.Functions have no jvp or vmap rule: under vmap, torch.func.grad or a
    dual_level the dispatch picks torch, which supports them, and says why."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F
    from torch.func import grad, vmap

    import normlab.functional as NF

    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    with normlab.backend("triton"):
        torch.testing.assert_close(vmap(lambda r: NF.layer_norm(r, (8,), w))(x), F.layer_norm(x, (8,), w))
        assert normlab.last_choice()[1] == "torch" and "torch.func" in normlab.last_choice()[2]
        g = grad(lambda w: NF.rms_norm(x, (8,), w).square().sum())(w)
        torch.testing.assert_close(g, grad(lambda w: F.rms_norm(x, (8,), w).square().sum())(w))
        t = torch.randn_like(x)
        with fwAD.dual_level():
            out = NF.group_norm(fwAD.make_dual(x, t), 2)
            tangent = fwAD.unpack_dual(out).tangent
        assert normlab.last_choice()[1] == "torch" and "forward-mode" in normlab.last_choice()[2]
        with fwAD.dual_level():
            want = fwAD.unpack_dual(F.group_norm(fwAD.make_dual(x, t), 2)).tangent
        torch.testing.assert_close(tangent, want)
        NF.layer_norm(x, (8,), w)  # outside any transform: the kernel again
        assert normlab.last_choice()[1] == "triton"


def test_masked_batch_norm_without_a_running_update_takes_momentum_none_on_the_kernel_path():
    import normlab.functional as NF

    x = torch.randn(3, 4, 6, dtype=torch.float64)
    mask = torch.arange(6)[None, :] < torch.tensor([[6], [4], [2]])
    with normlab.backend("torch"):
        want = NF.masked_batch_norm(x, mask, None, None, training=True, momentum=None)
    with normlab.backend("triton"):
        got = NF.masked_batch_norm(x, mask, None, None, training=True, momentum=None)
        assert normlab.last_choice()[1] == "triton"
    torch.testing.assert_close(got, want)


def test_instance_norm_with_running_statistics_records_why_torch_runs_it():
    import normlab.functional as NF

    x = torch.randn(2, 3, 5, dtype=torch.float64)
    with normlab.backend("triton"):
        NF.layer_norm(x, (5,))
        NF.instance_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                         use_input_stats=False)
        assert normlab.last_choice()[:2] == ("instance_norm", "torch")
        assert "use_input_stats=False" in normlab.last_choice()[2]


def test_under_torch_compile_the_torch_path_runs_and_says_so():
    import torch.nn.functional as F

    import normlab.functional as NF

    x = torch.randn(8, 64)
    with normlab.backend("triton"):
        NF.layer_norm(x, (64,))
        assert normlab.last_choice()[1] == "triton"  # eager: the kernel
        got = torch.compile(lambda t: NF.layer_norm(t, (64,)), fullgraph=True, backend="eager")(x)
        assert normlab.last_choice()[1] == "torch" and "torch.compile" in normlab.last_choice()[2]
    torch.testing.assert_close(got, F.layer_norm(x, (64,)))


@cpu
def test_supports_refuses_parameters_on_another_device():
    """Wrong version (_supports.py: the parameter-device check removed) and (the mask
    device check removed): a weight, running statistic or mask on another device than x is
    refused (here 'meta' vs 'cpu': no GPU needed)."""
    x = torch.randn(2, 3, 5)
    assert not kernels.supports("layer_norm", x, (5,), torch.ones(5, device="meta"))[0]
    ok, why = kernels.supports("batch_norm", x, torch.zeros(3, device="meta"), torch.ones(3, device="meta"), training=True)
    assert not ok and "meta" in why
    mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    ok, why = kernels.supports("masked_batch_norm", x, mask, None, None, training=True)
    assert not ok and "meta" in why


@cpu
def test_supports_refuses_non_contiguous_parameters_and_torch_runs_them():
    """Wrong version (_supports.py: the contiguity check removed): the kernels index weight and
    bias as ``w_ptr + col``; a strided weight must be refused, and the dispatch then gives
    torch's numbers."""
    x = torch.randn(4, 8)
    w = torch.randn(16)[::2]
    assert not w.is_contiguous()
    ok, why = kernels.supports("layer_norm", x, (8,), w)
    assert not ok and "contiguous" in why
    assert not kernels.supports("group_norm", torch.randn(2, 8, 3), 2, w)[0]
    import normlab.functional as NF

    with normlab.backend("triton"):
        y = NF.layer_norm(x, (8,), w)
        assert normlab.last_choice()[1] == "torch"
    torch.testing.assert_close(y, F.layer_norm(x, (8,), w))


@cpu
@pytest.mark.parametrize("G", [0, -3])
def test_supports_refuses_non_positive_num_groups(G):
    """Wrong version (_supports.py: ``G < 1`` dropped): num_groups 0 must be refused with a
    reason (the wrong version raised ZeroDivisionError), and -3 (which "divides" 6) too."""
    ok, why = kernels.supports("group_norm", torch.randn(2, 6, 5), G)
    assert not ok and "num_groups" in why


@cpu
def test_supports_refuses_instance_norm_without_input_stats():
    """Wrong version (_supports.py: the use_input_stats=False refusal removed). The functional
    tier never asks supports() with it, so only a direct call pins the rule."""
    ok, why = kernels.supports("instance_norm", torch.randn(2, 3, 5), use_input_stats=False)
    assert not ok and "use_input_stats" in why


@pytest.fixture
def local_backend(monkeypatch):
    """set_backend / NORMLAB_BACKEND changes stay inside the test."""
    monkeypatch.setattr(_backend, "_state", dict(_backend._state, backend=None))
    monkeypatch.delenv("NORMLAB_BACKEND", raising=False)


def test_set_backend_beats_the_environment_variable(local_backend, monkeypatch):
    """Wrong version (_backend.py: env read before the set_backend value): precedence 1 > 2."""
    monkeypatch.setenv("NORMLAB_BACKEND", "torch")
    assert normlab.get_backend() == "torch"
    normlab.set_backend("triton")
    assert normlab.get_backend() == "triton"
    x = torch.randn(3, 8)
    assert _backend.use_triton("layer_norm", x, lambda: kernels.supports("layer_norm", x, (8,)))
    assert normlab.last_choice()[:2] == ("layer_norm", "triton")
    normlab.set_backend(None)
    assert normlab.get_backend() == "torch"


def test_environment_variable_is_case_and_space_insensitive(local_backend, monkeypatch):
    """Wrong version (_backend.py: ``.strip().lower()`` dropped)."""
    monkeypatch.setenv("NORMLAB_BACKEND", " Torch\n")
    assert normlab.get_backend() == "torch"
    monkeypatch.setenv("NORMLAB_BACKEND", "TRITON")
    assert normlab.get_backend() == "triton"


def test_backend_context_restores_the_outer_choice(local_backend):
    """Wrong version (_backend.py: restore to None instead of the value before): nested blocks,
    and a block inside a process-wide set_backend, give back what was in force."""
    normlab.set_backend("torch")
    with normlab.backend("triton"):
        with normlab.backend("auto"):
            assert normlab.get_backend() == "auto"
        assert normlab.get_backend() == "triton"
    assert normlab.get_backend() == "torch"
    with pytest.raises(RuntimeError), normlab.backend("triton"):
        raise RuntimeError("inside")
    assert normlab.get_backend() == "torch"


def test_set_backend_triton_without_triton_raises(local_backend, monkeypatch):
    """Wrong version (_backend.py: the check removed): set_backend("triton") raises when Triton
    cannot be imported; NORMLAB_BACKEND=triton then falls back to torch and says why."""
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="needs the package triton"):
        normlab.set_backend("triton")
    assert normlab.get_backend() == "auto"
    normlab.set_backend("torch")  # the others still work
    normlab.set_backend(None)
    monkeypatch.setenv("NORMLAB_BACKEND", "triton")
    x = torch.randn(3, 8)
    assert not _backend.use_triton("layer_norm", x, lambda: kernels.supports("layer_norm", x, (8,)))
    assert normlab.last_choice() == ("layer_norm", "torch", "triton cannot be imported")


@cpu
def test_a_kernel_called_directly_refuses_what_it_has_no_kernel_for():
    """normlab.kernels.<op> is public: called without asking supports first, a strided weight was read
    as a contiguous one (layer norm 3.4 off, batch norm 5.2 off, no error) and a refused layout
    failed with an AttributeError. Now a ValueError gives supports' reason; ``unchecked`` is the
    functional tier's entry, for calls supports accepted."""
    w = torch.randn(16)[::2]
    with pytest.raises(ValueError, match=r"layer_norm: no kernel for this call: weight is not contiguous"):
        kernels.layer_norm(torch.randn(4, 8), (8,), w)
    with pytest.raises(ValueError, match=r"batch_norm: no kernel.*weight is not contiguous"):
        kernels.batch_norm(torch.randn(4, 8, 3), None, None, w, None, True)
    with pytest.raises(ValueError, match="group_norm: no kernel"):
        kernels.group_norm(torch.randn(2, 6, 4, 4)[:, ::2], 3)
    x, wc = torch.randn(4, 8), torch.randn(8)
    torch.testing.assert_close(kernels.layer_norm(x, (8,), wc), F.layer_norm(x, (8,), wc))


@cpu
def test_zero_d_per_channel_tensors_take_the_torch_path():
    """A 0-D weight or running statistic for C = 1: supports accepted it, then the kernel's
    torch.cat failed in evaluation and training ran where torch's path fails. torch decides."""
    x = torch.randn(4, 1, 3)
    zero_d = torch.tensor(1.0)
    ok, why = kernels.supports("batch_norm", x, zero_d, torch.tensor(1.0), None, None, False)
    assert not ok and "expected (1,)" in why
    assert not kernels.supports("batch_norm", x, None, None, zero_d, None, True)[0]


@cpu
@pytest.mark.parametrize("make", [lambda: N.BatchNorm1d(4), lambda: N.GroupNorm(2, 4), lambda: N.InstanceNorm1d(4)],
                         ids=["batch", "group", "instance"])
def test_kernel_output_of_a_transposed_input_is_laid_out_as_torchs(make):
    """An (N, L, C) tensor transposed to (N, C, L): torch returns a contiguous output; the kernel path
    returned one with the input's strides, so ``y.view(N, -1)`` failed there only."""
    x = torch.randn(2, 6, 4).transpose(1, 2)
    with normlab.backend("torch"):
        want = make()(x)
    with normlab.backend("triton"):
        got = make()(x)
        assert normlab.last_choice()[1] == "triton"
    assert got.stride() == want.stride() == (24, 6, 1)
    torch.testing.assert_close(got.view(2, -1), want.view(2, -1))


@cpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_batch_norm_of_a_transposed_input_is_contiguous_as_batch_norms(backend):
    """With a mask, as without one (where it is BatchNorm1d): a transposed (N, L, C) input gives a
    contiguous output on both paths (the torch path kept the input's strides)."""
    x = torch.randn(2, 6, 4).transpose(1, 2)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3])[:, None]
    with normlab.backend(backend):
        y = N.MaskedBatchNorm1d(4)(x, mask)
    assert y.is_contiguous()
    torch.testing.assert_close(y, N.MaskedBatchNorm1d(4)(x.contiguous(), mask))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make,shape", [(lambda: N.LayerNorm(64), (8, 64)), (lambda: N.RMSNorm(64), (8, 64)),
                                        (lambda: N.GroupNorm(4, 16), (2, 16, 5, 5)), (lambda: N.BatchNorm2d(16), (2, 16, 5, 5))],
                         ids=["layer", "rms", "group", "batch"])
def test_under_cuda_autocast_the_kernel_path_gives_torchs_dtype(make, shape, dtype):
    """torch's CUDA autocast runs layer_norm, group_norm and rms_norm in float32 (a half input gives
    a float32 output) and leaves batch_norm in the input's dtype; the kernel path, which torch's
    autocast never sees, must do the same (it returned the half dtype for all)."""
    torch.manual_seed(0)
    m = make().cuda()
    x = torch.randn(shape, device="cuda").to(dtype)
    with normlab.backend("torch"), torch.autocast("cuda", dtype=dtype):
        want = m(x)
    with normlab.backend("triton"), torch.autocast("cuda", dtype=dtype):
        got = m(x)
        assert normlab.last_choice()[1] == "triton"
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@cpu
def test_autocast_float32_leaves_cpu_tensors_alone():
    """CPU autocast does not touch layer_norm or group_norm: their kernel inputs stay as they are."""
    from normlab.functional._core import autocast_float32

    x, w = torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = autocast_float32(x, w, None)
    assert got[0] is x and got[1] is w and got[2] is None


@cpu
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: the legacy vmap of is_grads_batched is a prototype
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm",
                                "masked_batch_norm"])
def test_a_vmapped_backward_of_a_kernel_forward_matches_torchs(op):
    """Wrong version (_core.twice_differentiable without the vmapped-gradient route): the forward
    runs outside any transform, so it takes the kernel; ``is_grads_batched=True`` (and
    ``jacobian(vectorize=True)``, a torch.func.vmap over a vjp) then calls its backward with a
    batched gradient, which the closed form launched on: "Cannot access data pointer of Tensor
    that doesn't have storage". Now the backward differentiates the recomputed forward, as torch."""
    import normlab.functional as NF

    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 5, dtype=torch.float64)
    w0 = torch.randn(4 if op not in ("layer_norm", "rms_norm") else 5, dtype=torch.float64)
    mask = torch.arange(5)[None, :] < torch.tensor([[5], [3], [2]])
    f = {
        "layer_norm": lambda x, w: NF.layer_norm(x, (5,), w),
        "rms_norm": lambda x, w: NF.rms_norm(x, (5,), w),
        "group_norm": lambda x, w: NF.group_norm(x, 2, w),
        "instance_norm": lambda x, w: NF.instance_norm(x, weight=w),
        "batch_norm": lambda x, w: NF.batch_norm(x, None, None, w, None, True),
        "masked_batch_norm": lambda x, w: NF.masked_batch_norm(x, mask, None, None, w, None, True),
    }[op]
    v = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out = {}
    for backend in ("torch", "triton"):
        with normlab.backend(backend):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            y = f(x, w)
            assert normlab.last_choice()[:2] == (op, backend)
            looped = [torch.autograd.grad(y, (x, w), vi, retain_graph=True) for vi in v]
            if backend == "triton" or op != "masked_batch_norm":  # (its torch path has no batching rule)
                batched = torch.autograd.grad(y, (x, w), v, is_grads_batched=True)
                for b, loop in zip(batched, zip(*looped)):
                    torch.testing.assert_close(b, torch.stack(loop))
            out[backend] = looped
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(a, b)


@cpu
def test_numpy_scalars_take_the_kernel_and_refusals_say_the_true_reason():
    """Wrong version (_supports.py: ``isinstance(G, int)``, ``isinstance(eps | momentum, (int, float))``):
    a NumPy integer num_groups, which the functional tier accepts, was refused with a false reason
    ("num_groups np.int64(2) does not divide C=4") and ran on torch; a NumPy float32 momentum too
    ("momentum is not a number"), and a kernel called directly refused a NumPy float32 eps, which
    the functional tier's kernel path takes. The kernels convert all three with int() or float()."""
    import numpy as np

    import normlab.functional as NF

    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    with normlab.backend("triton"):
        got = NF.group_norm(x, np.int64(2))
        assert normlab.last_choice()[:2] == ("group_norm", "triton"), normlab.last_choice()
        rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        NF.batch_norm(x, rm, rv, training=True, momentum=np.float32(0.5))
        assert normlab.last_choice()[:2] == ("batch_norm", "triton"), normlab.last_choice()
    torch.testing.assert_close(got, F.group_norm(x, 2))
    rm2, rv2 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    F.batch_norm(x, rm2, rv2, training=True, momentum=0.5)
    torch.testing.assert_close((rm, rv), (rm2, rv2))
    torch.testing.assert_close(kernels.layer_norm(x, (3,), eps=np.float32(1e-3)), F.layer_norm(x, (3,), eps=1e-3))
    for G in (2.0, True):
        ok, why = kernels.supports("group_norm", x, G)
        assert not ok and why == f"num_groups {G!r} is not an integer"


@cpu
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("op", ["group_norm", "instance_norm"])
def test_a_vmapped_backward_of_a_channels_last_kernel_forward(op):
    """The recompute behind a vmapped backward runs torch's group_norm, whose backward asks a
    channels-last input for its layout, which vmap does not answer ("NYI: querying is_contiguous
    inside of vmap"); torch's own instance_norm path works there, so the kernel path must too."""
    import normlab.functional as NF

    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with normlab.backend("triton"):
        y = NF.group_norm(x, 2, w) if op == "group_norm" else NF.instance_norm(x, weight=w)
        assert normlab.last_choice()[:2] == (op, "triton")
    v = torch.randn(2, *y.shape, dtype=torch.float64)
    batched = torch.autograd.grad(y, (x, w), v, is_grads_batched=True, retain_graph=True)
    looped = [torch.autograd.grad(y, (x, w), vi, retain_graph=True) for vi in v]
    for b, loop in zip(batched, zip(*looped)):
        torch.testing.assert_close(b, torch.stack(loop))


@cpu
@cpu
def test_normalized_shape_may_be_a_numpy_int_and_a_float_is_a_reason_not_a_type_error():
    """supports() and the LN/RMS kernels read normalized_shape with ``isinstance(shape, int)``: a
    NumPy integer (as normlab.functional.layer_norm takes) raised "'numpy.int64' object is not
    iterable" from supports itself, and a float did too instead of a refusal reason."""
    import numpy as np

    x = torch.randn(2, 3, dtype=torch.float64)
    for op, ref in (("layer_norm", F.layer_norm(x, (3,))), ("rms_norm", F.rms_norm(x, (3,)))):
        assert kernels.supports(op, x, np.int64(3))[0]
        torch.testing.assert_close(getattr(kernels, op)(x, np.int64(3)), ref)
        ok, why = kernels.supports(op, x, 3.0)
        assert not ok and why == "normalized_shape 3.0 is not an int or a sequence of ints"


def test_supports_refuses_malformed_calls_with_the_true_reason():
    """Wrong versions (_supports.py): without ``isinstance(momentum, numbers.Real)`` a string
    momentum was taken (the kernel ran ``float("0.1")`` where torch raises TypeError); without
    the hand binder's two checks, a call missing normalized_shape raised KeyError from
    ``supports`` itself and an argument given both positionally and by keyword was bound
    silently; without the rank check a 1-D input was refused for its "layout"."""
    x = torch.randn(4, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    ok, why = kernels.supports("batch_norm", x, rm, rv, None, None, True, "0.1")
    assert not ok and why == "momentum is not a number"
    with pytest.raises(ValueError, match="momentum is not a number"):
        kernels.batch_norm(x, rm, rv, None, None, True, "0.1")
    for args, kwargs in (((), {}), (((3,),), {"normalized_shape": (3,)})):
        ok, why = kernels.supports("layer_norm", x, *args, **kwargs)
        assert not ok and why.startswith("arguments do not fit layer_norm"), why
    ok, why = kernels.supports("group_norm", torch.randn(6), 2)
    assert not ok and why == "input of rank 1, need (N, C, *)"
