"""Kernel tests run on the CPU under Triton's interpreter, or on a CUDA GPU (``-m gpu``).

Without CUDA, ``TRITON_INTERPRET=1`` is set here, before any test module imports Triton or
``normlab.kernels`` (Triton reads it when a kernel is defined). On a machine with CUDA the
interpreter is left off, so ``pytest -m gpu`` compiles real kernels; the CPU tests then skip
unless ``TRITON_INTERPRET=1`` was set by hand. Each test module starts with
``pytest.importorskip("triton")``, so without Triton the folder skips with that reason.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_SKIP = ""
_ln = sys.modules.get("normlab.kernels.layer_norm")
if _ln is not None and os.environ.get("TRITON_INTERPRET") == "1" and "Interpreted" not in type(_ln._fwd_kernel).__name__:
    _SKIP = "normlab.kernels was imported (by an earlier conftest) before TRITON_INTERPRET=1 was set; set it first"


def pytest_collection_modifyitems(config, items):
    if _SKIP:
        here = Path(__file__).parent
        for item in items:
            if here in Path(item.fspath).parents:
                item.add_marker(pytest.mark.skip(reason=_SKIP))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
