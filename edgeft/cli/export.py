"""``edgeft export``: ``ExportConfig``'s fields as flags -> ``edgeft.export.export`` (torch loads only when it runs)."""

from __future__ import annotations

import typer

from edgeft.cli.app import app
from edgeft.cli.options import from_config
from edgeft.export.architectures import help_text
from edgeft.export.config import ExportConfig


@app.command(epilog=help_text())
@from_config(ExportConfig)
def export(config: ExportConfig) -> None:
    """Export a tuned run or a base model to a quantized ONNX artifact, gated against PyTorch."""
    from edgeft.export import export as run_export

    path = run_export(config)
    typer.echo(str(path))
