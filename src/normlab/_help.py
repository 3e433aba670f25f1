"""Command help from docstrings, for typer."""
from __future__ import annotations

import inspect


def reflowed(fn):
    """Decorator (below ``@app.command()``): ``fn``'s docstring with each prose paragraph on one
    line. typer keeps a docstring's line breaks after its first paragraph and wraps each line
    again to the terminal, which left ragged help; paragraphs with indented lines (examples)
    keep their breaks."""
    doc = inspect.cleandoc(fn.__doc__ or "")
    paragraphs = [p if any(line[:1].isspace() for line in p.splitlines()) else " ".join(p.split())
                  for p in doc.split("\n\n")]
    fn.__doc__ = "\n\n".join(paragraphs)
    return fn
