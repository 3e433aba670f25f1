"""``supports(op, x, *args, **kwargs) -> (ok, reason)``: may a Triton kernel run this call?

The dispatcher in the functional tier asks before every kernel call (``_backend.use_triton``)
and falls back to torch on ``ok=False``; ``reason`` says why in one line, and is logged.
Arguments after ``x`` are those of the kernel function of the same name, positionally or by
keyword. Shapes are assumed valid (the functional tier checks them); this module refuses
what the kernels do not handle. Nothing here imports Triton unless it is available.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import os

import torch

from normlab import _backend, _checks

OPS = ("layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm", "masked_batch_norm")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.cache
def _signature(op):
    import normlab.kernels as k

    return inspect.signature(getattr(k, op))


@functools.cache
def _params(op):
    """``(names, name set, defaults)`` of the kernel function ``op``, read once per op; ``None``
    unless every parameter is a plain positional-or-keyword one (then ``bind`` does it all)."""
    sig = _signature(op)
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in sig.parameters.values()):
        return None  # pragma: no cover - our signatures are plain
    names = tuple(sig.parameters)
    defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    return names, frozenset(names), defaults


def _bind(op, x, args, kwargs):
    """The call's arguments by name, defaults applied (what ``Signature.bind`` and
    ``apply_defaults`` give), or the TypeError ``bind`` raises. A well-formed call is bound
    by hand; ``inspect`` runs only for one that is not, to say what is wrong with it."""
    spec = _params(op)
    if spec is not None:
        names, known, defaults = spec
        n = len(args) + 1  # parameters filled positionally, x included
        if n <= len(names) and kwargs.keys() <= known and not kwargs.keys() & names[:n]:
            a = dict(defaults)
            a.update(zip(names, (x, *args)))
            a.update(kwargs)
            if len(a) == len(names):  # every parameter without a default was given
                return a
    b = _signature(op).bind(x, *args, **kwargs)
    b.apply_defaults()
    return dict(b.arguments)


def _param(t, name, x, numel, vector=False, shape=None):
    """Refusal reason for a per-feature tensor argument (weight, bias, running stats), or '';
    ``vector``: a per-channel one, a vector of ``numel`` (not 0-D even when ``numel`` is 1: torch's
    kernels fail on that, in evaluation or backward, and so its path decides); ``shape``: the
    shape it must have (layer and RMS norm: ``normalized_shape``, as torch requires; the kernel
    reads it flat, so a transposed weight of the same size would scale the wrong features)."""
    if t is None:
        return ""
    if not isinstance(t, torch.Tensor):
        return f"{name} is not a tensor"
    if t.dtype not in _DTYPES:
        return f"{name} dtype {t.dtype} not supported"
    if t.dtype != x.dtype and not (t.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        # torch decides (and mostly refuses) other mixes; the kernel would quietly accept them
        return f"{name} dtype {t.dtype} with a {x.dtype} input (only the input's dtype, or float32 for half input)"
    if t.device != x.device:
        return f"{name} on {t.device}, input on {x.device}"
    if t.numel() != numel:
        return f"{name} has {t.numel()} elements, expected {numel}"
    if vector and t.dim() != 1:
        return f"{name} has shape {tuple(t.shape)}, expected ({numel},)"
    if shape is not None and tuple(t.shape) != shape:
        return f"{name} has shape {tuple(t.shape)}, expected normalized_shape {shape}"
    if not t.is_contiguous():
        return f"{name} is not contiguous"
    return ""


# Triton decides interpreter or compiled when the kernels are defined, i.e. when
# normlab.kernels is imported, which imports this module first: read the variable once. CPU
# inputs (the interpreter's, tests and CI) need it set then, and still set now.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _transforms_active() -> str:
    """Why torch.func (vmap, grad, jvp, ...) or forward-mode AD rules the kernels out, or ''.
    Their autograd.Functions have a closed-form backward only (no jvp, no vmap rule), so
    such calls take torch's path, which supports them."""
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is not None and functorch.peek_interpreter_stack() is not None:
        return "inside a torch.func transform (vmap, grad, jvp ...): the kernels have no rule for it (torch path)"
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        return "forward-mode AD (a dual_level is active): the kernels have no jvp (torch path)"
    return ""


def _common(x):
    if _backend._compiling():  # (dynamo's tracing also looks like a torch.func transform below)
        return ("under torch.compile: torch's ops, which the compiler fuses itself (the kernels' launchers are "
                "not traced; untested under it)")
    if not _backend.triton_available():
        return "triton cannot be imported"
    if not isinstance(x, torch.Tensor):
        return "input is not a tensor"
    if why := _transforms_active():
        return why
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} not supported (float16, bfloat16, float32, float64 are)"
    if x.is_cuda:
        if _INTERPRET_AT_IMPORT:
            return "TRITON_INTERPRET=1 with a CUDA input: the interpreter runs CPU tensors"
    elif os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"input on {x.device}: the kernels need CUDA (or TRITON_INTERPRET=1 for the interpreter)"
    elif not _INTERPRET_AT_IMPORT:
        return (f"input on {x.device}: TRITON_INTERPRET=1 was set after normlab.kernels was imported, so its kernels "
                f"are compiled for CUDA; set it before importing normlab.kernels")
    n = x.numel()
    if n == 0:
        return "empty input"
    if n >= 2**31:
        return "input has 2**31 elements or more"
    return ""


_modules = {}


def _module(name):
    """``normlab.kernels.<name>``, imported on first use (it imports Triton)."""
    m = _modules.get(name)
    if m is None:
        m = _modules[name] = importlib.import_module(f"normlab.kernels.{name}")
    return m


def _rows_op(a, op):
    ln = _module("layer_norm")
    x, shape = a["x"], a["normalized_shape"]
    try:  # an int (NumPy's too) or a sequence of them; anything else is a reason, not an error from here
        shape = _checks.as_normalized_shape(shape, op, allow_empty=True)
    except ValueError:
        return f"normalized_shape {shape!r} is not an int or a sequence of ints"
    N = math.prod(shape)
    xs = x.shape
    if len(shape) > len(xs) or tuple(xs[len(xs) - len(shape):]) != shape:
        return f"normalized_shape {shape} does not end the input shape {tuple(xs)}"
    if N > ln.max_n(x.dtype):
        return f"normalized size {N} > {ln.max_n(x.dtype)}: one row must fit one program's registers"
    if ln.row_stride(xs, x.stride(), N) is None:
        return "the trailing dims cannot be viewed as rows with unit stride (non-contiguous input)"
    eps = a["eps"]
    if eps is not None and not isinstance(eps, numbers.Real):  # (NumPy scalars too: the kernels take float(eps))
        return "eps is not a number"
    for name in ("weight", "bias"):
        if name in a and (why := _param(a[name], name, x, N, shape=shape)):
            return why
    return ""


def _channel_op(a, op):
    core = _module("_channel_norm")
    x = a["x"]
    if x.dim() < 2:
        return f"input of rank {x.dim()}, need (N, C, *)"
    batch = op in ("batch_norm", "masked_batch_norm")
    if core.geometry(x, fold_batch=batch) is None:
        return "layout not NCHW-contiguous nor channels-last (strides " + str(tuple(x.stride())) + ")"
    C = x.shape[1]
    if op == "group_norm":
        G = a["num_groups"]
        if not isinstance(G, numbers.Integral) or isinstance(G, bool):  # (NumPy integers too: the kernel takes int(G))
            return f"num_groups {G!r} is not an integer"
        if G < 1 or C % G:
            return f"num_groups {G!r} does not divide C={C}"
    if op == "instance_norm":
        if a.get("running_mean") is not None or a.get("running_var") is not None:
            return "instance norm with running statistics: the kernel has none (torch path)"
        if a.get("use_input_stats") is False:
            return "instance norm with use_input_stats=False: torch path"
    if op == "masked_batch_norm":
        if x.dim() != 3:
            return f"masked batch norm takes (N, C, L), got rank {x.dim()}"
        mask = a["mask"]
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                return "mask is not a bool tensor"
            if tuple(mask.shape) != (x.shape[0], x.shape[2]) or mask.device != x.device:
                return f"mask of shape {tuple(mask.shape)} on {mask.device}, need {(x.shape[0], x.shape[2])} on {x.device}"
    if batch:
        if not a.get("training", False) and (a.get("running_mean") is None or a.get("running_var") is None):
            return "eval mode without running statistics"
        if (a.get("running_mean") is None) != (a.get("running_var") is None):
            return "only one of running_mean, running_var given"
        momentum = a.get("momentum", 0.1)
        if momentum is None and a.get("training", False) and a.get("running_mean") is not None:
            return "momentum=None with running statistics to update: pass the cumulative factor"
        if momentum is not None and not isinstance(momentum, numbers.Real):
            return "momentum is not a number"
        if a.get("training", False) and x.numel() == C:  # as torch refuses it (and the functional tier)
            return f"one value per channel in training (input of shape {tuple(x.shape)}): no variance to use"
    for name in ("weight", "bias", "running_mean", "running_var"):
        if name in a and (why := _param(a[name], name, x, C, vector=True)):
            return why
    return ""


def supports(op: str, x, *args, **kwargs):
    """``(True, reason)`` if ``normlab.kernels.<op>(x, *args, **kwargs)`` runs on a kernel, else ``(False, reason)``.

    ``op`` is one of ``layer_norm, rms_norm, group_norm, instance_norm, batch_norm,
    masked_batch_norm``; ``args``/``kwargs`` follow that function's signature (for
    ``instance_norm`` also ``running_mean``, ``running_var``, ``use_input_stats`` as keywords,
    so a torch-style call can be refused).
    """
    if op not in OPS:
        return False, f"no kernel for {op!r}"
    why = _common(x)
    if why:
        return False, why
    extra = None
    if op == "instance_norm":
        extra = {k: kwargs.pop(k) for k in ("running_mean", "running_var", "use_input_stats") if k in kwargs}
    try:
        a = _bind(op, x, args, kwargs)
    except TypeError as e:
        return False, f"arguments do not fit {op}: {e}"
    if extra:
        a.update(extra)
    why = _rows_op(a, op) if op in ("layer_norm", "rms_norm") else _channel_op(a, op)
    if why:
        return False, why
    return True, _ok(op, x.dtype, x.shape)


@functools.lru_cache(maxsize=1024)
def _ok(op, dtype, shape):
    return f"triton kernel for {op} ({dtype}, {tuple(shape)})"
