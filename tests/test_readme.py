"""The README's Python examples run as written (a README that lies is a bug)."""
import re
from pathlib import Path

import pytest
import torch

import normlab

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _train(model):  # stands in for the reader's training loop in the tools example
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 16, 16)).sum().backward()


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples may write files (acts.jsonl, acts.png)
    monkeypatch.setattr(normlab._backend, "_state", dict(normlab._backend._state))  # set_backend stays local
    scope = {"__name__": "readme", "train": _train, "train_loader": [torch.randn(8, 3, 16, 16) for _ in range(4)]}
    exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), scope)
