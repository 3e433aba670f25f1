"""What the PyTorch tier shares: accumulation dtypes, running-statistics updates, parameter
checks and the kernel dispatch hook."""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from normlab import _backend, _checks

HALF = (torch.float16, torch.bfloat16)


def cpu_half(input: torch.Tensor) -> bool:
    """float16/bfloat16 off CUDA (the CPU; MPS and XPU too): the torch tier computes it in float32
    (see :func:`pivoted`), as it did for batch and instance norm before."""
    return input.dtype in HALF and not input.is_cuda


def as_float32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()


def finite_or_zero(p: torch.Tensor) -> torch.Tensor:
    """``p`` where finite, else 0: a pivot that a NaN or inf must not spread to other groups."""
    return torch.where(torch.isfinite(p), p, torch.zeros((), dtype=p.dtype, device=p.device))


@torch.no_grad()
def pivot_of(x: torch.Tensor, dims) -> Optional[torch.Tensor]:
    """``x``'s mean over ``dims`` (kept), where finite (else 0), as a constant; ``None`` for an empty ``x``."""
    if x.numel() == 0:
        return None
    return finite_or_zero(x.mean(dim=dims, keepdim=True))


def pivoted(x: torch.Tensor, pivot: Optional[torch.Tensor]) -> torch.Tensor:
    """``x - pivot`` (``pivot`` a constant, no gradient), or ``x`` itself when ``pivot`` is None.

    torch's CPU kernels fold the normalization into ``y = x * a + (b - mean * a)`` with
    ``a = weight * rstd``, which cancels when ``|mean| * a`` is large: a near-constant group at
    a large mean (float16 rounds ``10000 + randn`` to a few values) came out 0.07 off. Every
    mean-subtracting norm gives the same output and gradients for ``x`` less a per-group
    constant, so the half paths normalize ``x - pivot`` with the group's float32 mean as the
    pivot (in evaluation, the running mean), where no digit is lost."""
    return x if pivot is None else x - pivot


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``channels_last`` (4-D) or ``channels_last_3d`` (5-D) for an input laid out so, else
    ``contiguous_format``: the layout batch norm gives its output, for an output computed
    contiguous (``y.to(dtype, memory_format=memory_format_of(x))``: one copy at most)."""
    if not x.is_contiguous():
        for fmt, dim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
            if x.dim() == dim and x.is_contiguous(memory_format=fmt):
                return fmt
    return torch.contiguous_format


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16/float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def update_running_(running_mean, running_var, mean, var, count, momentum: float) -> None:
    """In place, PyTorch's rule: ``r = (1 - momentum) r + momentum * new`` with the unbiased
    variance ``var * n / (n - 1)``."""
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.reshape(running_mean.shape).to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        n = float(count)
        unbiased = var.reshape(running_var.shape) * (n / max(n - 1.0, 1.0))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know ("meta"): it cannot be on there
        return False


def outside_autocast(fn):
    """Decorator for the ``forward``/``backward`` of an ``autograd.Function`` written with torch
    ops that accumulates in float32 itself: run it with autocast off on the device of its first
    tensor argument. Under autocast, ops such as ``bmm`` and ``linalg.vecdot`` would drop to
    bfloat16/float16 even for float32 input and lose the statistics' accuracy (torch's own
    batch norm is not autocast either); the output keeps the input's dtype, as torch's does."""
    @functools.wraps(fn)
    def run(ctx, x, *args):
        if not autocast_enabled(x.device.type):
            return fn(ctx, x, *args)
        with torch.autocast(x.device.type, enabled=False):
            return fn(ctx, x, *args)

    return run


@contextlib.contextmanager
def untraced():
    """``torch.jit.trace``'s tracer paused, for the in-place update of running statistics inside
    an ``autograd.Function``'s forward. The tracer records the Function as one op, whose replay
    runs that forward, update included; the ops inside are recorded too, and the in-place
    update among them survives the trace's dead-code elimination: every call of a traced model
    moved the running statistics twice."""
    state = torch._C._get_tracing_state()  # what torch's own Module.__call__ asks
    if state is None:
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def _vmapped(t) -> bool:
    """``t`` is batched by a vmap (torch.func's, or the legacy one behind ``is_grads_batched``):
    a tensor without storage of its own, which a kernel launch cannot take."""
    functorch = getattr(torch._C, "_functorch", None)
    if t is None or functorch is None:
        return False
    legacy = getattr(functorch, "is_legacy_batchedtensor", None)
    return bool(functorch.is_functorch_wrapped_tensor(t) or (legacy is not None and legacy(t)))


def twice_differentiable(recompute):
    """Decorator for the backward of an ``autograd.Function`` with a closed-form backward.

    A backward runs with grad mode off unless the caller asked for ``create_graph=True``
    (a gradient penalty, a Hessian-vector product). The closed form is not differentiable
    (it runs under ``once_differentiable``, whose gradients silently carry no graph when the
    incoming gradient does not require one), so then the gradients come from autograd through
    ``recompute(ctx) -> (y, inputs)``: the same forward in differentiable torch ops on the
    saved inputs, ``inputs`` aligned with the forward's arguments (``None`` where not
    differentiable). Second derivatives are then exact, as with torch's own layers.

    The same route serves a backward whose incoming gradient is batched by vmap
    (``torch.autograd.grad(..., is_grads_batched=True)``, ``jacobian(..., vectorize=True)``, a
    ``torch.func.vmap`` over a vector-Jacobian product): the forward ran outside any transform,
    so it took the kernel, but a closed form on raw pointers cannot read a batched tensor.
    """
    def wrap(fn):
        fast = torch.autograd.function.once_differentiable(fn)

        @functools.wraps(fn)
        def backward(ctx, *grads):
            create_graph = torch.is_grad_enabled()
            if not create_graph and not any(_vmapped(g) for g in grads):
                return fn(ctx, *grads)  # the usual backward: grad mode is already off
            with torch.enable_grad():
                y, inputs = recompute(ctx)
            need = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
            if not need or not y.requires_grad:
                return fast(ctx, *grads)
            got = torch.autograd.grad(y, [inputs[i] for i in need], grads[0], create_graph=create_graph,
                                      allow_unused=True)
            out = [None] * len(ctx.needs_input_grad)
            for i, g in zip(need, got):
                out[i] = torch.zeros_like(inputs[i]) if g is None else g
            return tuple(out)

        return backward

    return wrap


def first_order_only(what: str, why: str = "its backward keeps the centred input, not the input"):
    """Decorator for the backward of an ``autograd.Function`` whose closed-form backward keeps
    less than a double backward needs (by default: the centred input, not the input, which saves
    a pass and keeps one full-size tensor). With ``create_graph=True`` it raises, naming the
    layer and ``why``, where ``once_differentiable`` would return gradients without a graph when
    the incoming gradient needs none: second derivatives silently zero."""
    def wrap(fn):
        @functools.wraps(fn)
        def backward(ctx, *grads):
            if torch.is_grad_enabled():  # only under create_graph=True
                raise RuntimeError(
                    f"{what} has no double backward (create_graph=True, e.g. a gradient penalty or a Hessian-vector "
                    f"product): {why}. A model that needs second derivatives through it has to compose the norm "
                    "from torch ops")
            return fn(ctx, *grads)

        return backward

    return wrap


def upcast_for_recompute(x: torch.Tensor, *params):
    """``x`` and the parameters in the accumulation dtype, for a double backward's recompute:
    the kernels take float16/bfloat16 input with float32 parameters, a mix some of torch's
    own ops refuse on CUDA, and the kernels compute in float32 anyway."""
    acc = acc_dtype(x.dtype)
    return (x.to(acc),) + tuple(None if p is None else p.to(acc) for p in params)


def per_channel(p: Optional[torch.Tensor], ndim: int) -> Optional[torch.Tensor]:
    """A (C,) vector viewed as (1, C, 1, ...) for an ``ndim``-D input."""
    return None if p is None else p.view((1, -1) + (1,) * (ndim - 2))


def check_channel_input(input: torch.Tensor, op: str, ranks=None, layout: str = "(N, C, *)", *, min_dim: int = 2,
                        **per_channel) -> int:
    """The checks every per-channel norm makes: a floating input of an allowed rank (``ranks``,
    or at least ``min_dim``-D), and each named per-channel tensor (weight, bias, running stats)
    holding one value per channel. Returns C."""
    _checks.check_floating(input, op, "tensor")
    if ranks is not None:
        _checks.check_rank(input.shape, ranks, op, layout)
    elif input.dim() < min_dim:
        raise ValueError(f"{op} expects an input of shape {layout} (at least {min_dim}-D), got a {input.dim()}-D "
                         f"input of shape {_checks.shape_str(input.shape)}")
    c = input.shape[1]
    _checks.check_per_channel(c, op, **per_channel)
    return c


def kernels():
    """The Triton kernel module (imported on first use, so torch-only users never import Triton)."""
    from normlab import kernels as k

    return k


def autocast_float32(*tensors):
    """The kernel path's share of torch's CUDA autocast for the ops on its float32 list (layer_norm,
    group_norm, rms_norm: autocast registers them on CUDA, and runs norms in float32): under
    autocast on CUDA, float16/bfloat16 tensors become float32, so the output is float32 as torch's
    is. torch's own op is never called on that path, so its autocast never sees the call. Off
    autocast, or off CUDA (CPU autocast leaves these ops alone), the tensors are returned as they are."""
    x = tensors[0]
    if x.device.type != "cuda" or not autocast_enabled("cuda"):
        return tensors
    return tuple(t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)


def use_kernel(op: str, x: torch.Tensor, *args) -> bool:
    """True when ``op`` on ``x`` should run on a Triton kernel (see :mod:`normlab._backend`)."""
    return _backend.use_triton(op, x, lambda: kernels().supports(op, x, *args))
