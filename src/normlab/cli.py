"""The ``normlab`` command line: ``normlab demo`` (and ``normlab lab ...`` once the lab is installed)."""
from __future__ import annotations

import typer

from normlab._help import reflowed

app = typer.Typer(
    help="normlab: normalization in deep learning, measured.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """normlab: normalization in deep learning, measured."""


@app.command()
@reflowed
def demo(
    seed: int = typer.Option(0, min=0, help="Random seed of the data and weights."),
    layers: int = typer.Option(5, min=1, help="Number of sigmoid layers."),
    width: int = typer.Option(64, min=2, help="Units per layer."),
) -> None:
    """Mean and variance of each layer of a deep sigmoid net, with and without batch norm.

    The seed article's experiment in NumPy (normlab.reference): X ~ U(0, 1) of shape 100x20,
    sigmoid layers with W ~ N(0, 1). Without batch norm the pre-activations spread out and
    the sigmoids saturate; with it every layer's input is standardized.

    Example: normlab demo --layers 5 --width 64
    """
    from rich.console import Console
    from rich.table import Table

    from normlab.demo import sigmoid_stack

    rows = sigmoid_stack(seed=seed, layers=layers, width=width)
    table = Table(title=f"{layers} sigmoid layers of {width} units, X ~ U(0,1) 100x20, W ~ N(0,1)")
    for col in ("layer", "mean (plain)", "var (plain)", "saturated (plain)", "mean (BN)", "var (BN)", "saturated (BN)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["layer"]), f"{r['plain_mean']:.3f}", f"{r['plain_var']:.4f}", f"{r['plain_saturated']:.0%}",
                      f"{r['bn_mean']:.3f}", f"{r['bn_var']:.4f}", f"{r['bn_saturated']:.0%}")
    Console().print(table)
    Console().print("saturated = share of sigmoid outputs below 0.05 or above 0.95, where the sigmoid's gradient "
                    "y(1 - y) is below 0.0475, about a fifth of its 0.25 peak")


def _add_optional_groups() -> None:
    try:
        from normlab.lab.cli import app as lab_app
    except ImportError:  # its commands import the [lab] extra lazily; the demo works regardless
        return
    app.add_typer(lab_app, name="lab")


_add_optional_groups()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
