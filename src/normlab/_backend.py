"""Which implementation runs a normalization: torch's native kernels or normlab's Triton kernels.

The choice, in order of precedence:

1. ``normlab.set_backend("auto" | "torch" | "triton")`` (process-wide, also usable as a
   context manager through :func:`backend`);
2. the environment variable ``NORMLAB_BACKEND`` with the same values;
3. ``"auto"``.

``"auto"`` uses a Triton kernel when the input lives on a CUDA device, Triton imports and
the kernel supports the shape and dtype; otherwise torch. ``"torch"`` never uses Triton.
``"triton"`` uses a kernel whenever one supports the call, whatever the device (on the CPU
this only works under ``TRITON_INTERPRET=1``, which is how CI tests the kernels).
``set_backend("triton")`` raises if Triton cannot be imported; ``NORMLAB_BACKEND=triton``
then falls back to torch, with the reason in :func:`last_choice`.

Every decision is logged at DEBUG level on the ``normlab.backend`` logger, and
:func:`last_choice` returns the most recent one, so the path taken is never a guess.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

BACKENDS = ("auto", "torch", "triton")
_log = logging.getLogger("normlab.backend")
_state = {"backend": None, "last": None}


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force: the one set with :func:`set_backend`, else ``$NORMLAB_BACKEND``, else ``"auto"``."""
    if _state["backend"] is not None:
        return _state["backend"]
    env = os.environ.get("NORMLAB_BACKEND")
    if env:
        try:
            return _check(env.strip().lower())
        except ValueError:
            raise ValueError(f"NORMLAB_BACKEND must be one of {BACKENDS}, got {env!r}") from None
    return "auto"


def set_backend(name: str | None) -> None:
    """Set the backend for the whole process; ``None`` returns to ``$NORMLAB_BACKEND`` / ``"auto"``."""
    if name is not None:
        _check(name)
        if name == "triton" and not triton_available():
            raise ValueError("backend 'triton' needs the package triton, which cannot be imported here")
    _state["backend"] = name


@contextlib.contextmanager
def backend(name: str):
    """``with normlab.backend("torch"): ...`` sets the backend for a block and restores it."""
    before = _state["backend"]
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = before


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def use_triton(op: str, x: torch.Tensor, supported) -> bool:
    """Decide whether ``op`` on ``x`` runs on a Triton kernel.

    ``supported`` is a zero-argument callable returning ``(ok, reason)`` from the kernel module;
    it is only called when the backend would pick Triton, so the torch path pays nothing.
    """
    name = get_backend()
    if name == "torch":
        choice, why = "torch", "backend=torch"
    elif name == "auto" and not (x.is_cuda and triton_available()):
        choice, why = "torch", "auto: input not on CUDA" if not x.is_cuda else "auto: triton missing"
    else:
        ok, reason = supported()
        choice, why = ("triton", reason) if ok else ("torch", reason)
    _state["last"] = (op, choice, why)
    if not _compiling() and _log.isEnabledFor(logging.DEBUG):  # torch.compile cannot trace a logger call
        _log.debug("%s on %s %s %s: %s (%s)", op, x.device, x.dtype, tuple(x.shape), choice, why)
    return choice == "triton"


def _compiling() -> bool:
    """True while torch.compile (dynamo) traces the call."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


def last_choice():
    """``(op, "torch" | "triton", reason)`` of the most recent dispatch decision, or ``None``."""
    return _state["last"]
