"""The typer application every command module registers on. Imports nothing heavy."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="edgeft",
    help=(
        "Tune a language model cheaply, export it to quantized ONNX, run it fast on CPUs.\n\n"
        "Pipeline: edgeft pull -> edgeft tune -> edgeft export -> edgeft generate / chat / classify / serve."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # errors print as one plain line: "Error: ..."
)
