"""Small helpers shared by the kernel files: accumulation dtype, device size, launch shapes, and
:class:`Launch`, a kernel launch whose Triton dispatch is done once per specialization."""
from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

# Every kernel accumulates in float32 for 16- and 32-bit inputs and in float64 for float64.
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype for an input dtype (a ``tl.constexpr`` argument)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_torch(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of saved statistics and partial buffers (``mean``, ``rstd``, ...)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpreting() -> bool:
    """``TRITON_INTERPRET=1`` now (an environment read: keep it off the per-call path)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small fixed number in the interpreter.

    It sets the size of persistent grids and of the partial-sum buffers. It depends only on
    the device, so results stay bitwise reproducible from run to run on one machine.
    """
    if device.type == "cuda" and not interpreting():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


# ``tl.sum`` is itself a jitted function; under TRITON_INTERPRET=1 every call of a jitted
# function from a kernel re-patches triton.language (milliseconds each), which made the
# interpreter tests minutes long. ``tl.reduce`` with triton's own sum combiner is the same
# reduction when compiled (it is what ``tl.sum`` calls) and runs as one numpy sum when
# interpreted. The combiner is private; if a Triton release drops it, fall back to ours.
_ADD = getattr(getattr(tl, "standard", None), "_sum_combine", None)
if _ADD is None:  # pragma: no cover - depends on the Triton version

    @triton.jit
    def _ADD(a, b):
        return a + b


# Host-side integer helpers in plain Python: triton.cdiv / triton.next_power_of_2 are
# constexpr functions in recent Triton, tens of microseconds per call from the host, which
# made the launchers' host time exceed the kernels' GPU time on small and medium shapes.
def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# ----------------------------------------------------------------------------------------
# Launching without Triton's per-call dispatch
# ----------------------------------------------------------------------------------------
# ``kernel[grid](*args, **kw)`` goes through ``JITFunction.run``, which on every call binds the
# arguments, derives their specialization (dtypes, 16-byte alignment, ints equal to 1 or
# divisible by 16), builds a cache key, parses options and reads Triton's settings: ~15 µs of
# host time per launch with Triton 3.6, before the C launcher runs. Our launchers already
# cache everything that decides the specialization (shapes, strides, dtypes, alignment,
# device), so a ``Launch`` cached with them goes through ``run`` once, keeps the compiled
# kernel it returns, and afterwards calls that kernel's own launcher (``CompiledKernel[grid]``,
# what ``run`` ends in) with the same arguments: every parameter, constexprs included, which
# is what ``run`` passes since Triton 3.3 (before, only the others: no fast path there).
# NORMLAB_FAST_LAUNCH=0 turns this off.
def _triton_at_least(major: int, minor: int) -> bool:
    try:
        v = tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover - an unusual version string
        return False
    return v >= (major, minor)


FAST_LAUNCH = os.environ.get("NORMLAB_FAST_LAUNCH", "1") != "0" and _triton_at_least(3, 3)


def _trailing_constexprs(kernel, names) -> bool:
    """True if ``kernel``'s constexpr parameters are exactly ``names``, last and in this order
    (the compiled launcher takes every parameter positionally, constexprs included)."""
    params = getattr(kernel, "params", None)
    if not params:
        return False
    k = len(names)
    tail = params[len(params) - k:] if k else []
    return (
        all(getattr(p, "is_constexpr", False) for p in tail)
        and not any(getattr(p, "is_constexpr", False) for p in params[: len(params) - k])
        and [p.name for p in tail] == list(names)
    )


def spec(t):
    """What Triton specializes a pointer argument on, for cache keys: None-ness, dtype and
    16-byte alignment (ints are keyed by value through the shapes and strides)."""
    return None if t is None else (t.dtype, t.data_ptr() % 16 == 0)


class Launch:
    """``kernel[grid](*args, **constexprs, num_warps=num_warps)`` for one fixed specialization.

    Build one per cache entry whose key fixes everything Triton specializes on (the dtype,
    16-byte alignment and None-ness of every pointer, the value of every int); calls then
    pass only the runtime arguments, positionally, in the kernel's order. The first call
    compiles (or finds) the kernel through Triton's JIT; later calls go straight to the
    compiled kernel's launcher. Under the interpreter, with ``NORMLAB_FAST_LAUNCH=0``, or
    if this Triton's compiled-kernel launcher does not take the arguments this way (a
    TypeError, IndexError or AttributeError from it, raised before anything is launched),
    every call goes through ``kernel[grid]``; the last case warns once and turns the direct
    path off for the process.
    """

    __slots__ = ("consts", "grid", "kernel", "kw", "runner")
    fast = FAST_LAUNCH  # class-wide switch; set to False after a launcher mismatch

    def __init__(self, kernel, grid, num_warps: int, **constexprs):
        self.kernel = kernel
        grid = tuple(int(g) for g in grid)
        self.grid = grid + (1,) * (3 - len(grid))  # the compiled launcher indexes three dims
        self.consts = tuple(constexprs.values())
        self.kw = dict(constexprs, num_warps=int(num_warps))
        self.runner = None

    def __call__(self, *args):
        runner = self.runner
        if runner is not None:
            try:
                return runner(*args, *self.consts)
            except (TypeError, IndexError, AttributeError) as e:  # this Triton's launcher differs
                if Launch.fast:
                    warnings.warn(f"normlab: direct Triton launches turned off ({type(e).__name__}: {e})", stacklevel=2)
                Launch.fast = False
                self.runner = None
        compiled = self.kernel[self.grid](*args, **self.kw)
        if Launch.fast and compiled is not None and hasattr(compiled, "__getitem__"):
            names = [k for k in self.kw if k != "num_warps"]
            if _trailing_constexprs(self.kernel, names):
                self.runner = compiled[self.grid]
