"""Small helpers shared by the kernel files: accumulation dtype, device size, launch shapes."""
from __future__ import annotations

import functools
import os

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
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
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
