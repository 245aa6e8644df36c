"""The typer application every command module registers on. Imports nothing heavy.

This is the one place an ``EdgeftError`` becomes what the user sees: ``Error: <message>``
as one line on stderr and its exit code (2), for every command, whether ``edgeft`` runs
from the console script or a test invokes ``app`` with typer's ``CliRunner``.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from edgeft.errors import EdgeftError


class EdgeftGroup(TyperGroup):
    """The command group: runs the chosen command and maps ``EdgeftError`` to one line and its exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeftError as exc:
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    name="edgeft",
    cls=EdgeftGroup,
    help=(
        "Tune a language model cheaply, export it to quantized ONNX, run it fast on CPUs.\n\n"
        "Pipeline: edgeft pull -> edgeft tune -> edgeft export -> edgeft generate / chat / classify / serve."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # errors print as one plain line: "Error: ..."
)
