"""The typer application every command module registers on. Imports nothing heavy.

This is the one place an ``EdgeftError`` becomes what the user sees: ``Error: <message>``
as one line on stderr and its exit code (2), for every command, whether ``edgeft`` runs
from the console script or a test invokes ``app`` with typer's ``CliRunner``. It is also
where the process-wide setting no flag carries is read: the cache folder (``$EDGEFT_HOME``),
handed to ``edgeft.artifact.use_cache_root`` before any command runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from edgeft.errors import EdgeftError


def cache_root_from_env() -> Path:
    """edgeft's cache folder as the process environment names it: ``$EDGEFT_HOME``, else
    ``$XDG_CACHE_HOME/edgeft``, else ``~/.cache/edgeft`` (read here, at the command boundary)."""
    if os.environ.get("EDGEFT_HOME"):
        return Path(os.environ["EDGEFT_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeft"


class EdgeftGroup(TyperGroup):
    """The command group: runs the chosen command and maps ``EdgeftError`` to one line and its exit code."""

    def invoke(self, ctx: Any) -> Any:
        from edgeft.artifact import use_cache_root

        use_cache_root(cache_root_from_env())
        try:
            return super().invoke(ctx)
        except EdgeftError as exc:
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None


class EdgeftCommand(TyperCommand):
    """A command whose plain ``--help`` lists options under their help panels (``flag(panel=...)``).

    Options without a panel come first, under "Options"; then each panel in the order its
    first option appears.
    """

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args: list[tuple[str, str]] = []
        panels: dict[str, list[tuple[str, str]]] = {"Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append(record)
            else:
                panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        for title, records in [("Arguments", args), *panels.items()]:
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


class EdgeftTyper(typer.Typer):
    """``typer.Typer`` whose commands are ``EdgeftCommand``s (options under their panels in ``--help``)."""

    def command(self, *args: Any, cls: Any = EdgeftCommand, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls, **kwargs)


app = EdgeftTyper(
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
