"""``edgeft embed``: one vector per text with an embedding artifact.

Texts come from the command line or ``--input`` (the files ``edgeft classify`` reads);
vectors go to stdout or ``--output`` as JSONL (``{"text", "embedding"}`` per line) or, for
an ``--output`` ending in ``.npy``, one float32 array [texts, dim] in input order. Imports
the runtime inside the command only.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import typer

from edgeft.cli.app import app
from edgeft.cli.classify import TextsConfig, check_output
from edgeft.cli.options import from_config
from edgeft.flags import flag
from edgeft.fsutil import write_output


@dataclass(frozen=True)
class EmbedConfig(TextsConfig):
    """``edgeft embed``: ``TextsConfig`` (the flags ``edgeft classify`` shares), with its own help."""

    artifact: str = field(metadata=flag(argument=True))
    """Embedding artifact folder or packed .edgeft file."""
    texts: tuple[str, ...] = field(default=(), metadata=flag(argument=True))
    """Texts to embed (or use --input)."""
    output: Path | None = field(default=None, metadata=flag("--output", "-o"))
    """Write here instead of stdout: .npy (float32 array) or JSONL."""


def write_jsonl(out, texts: list[str], vectors) -> None:
    for t, v in zip(texts, vectors):
        out.write(json.dumps({"text": t, "embedding": [round(float(x), 7) for x in v]}, ensure_ascii=False) + "\n")


@app.command()
@from_config(EmbedConfig)
def embed(config: EmbedConfig) -> None:
    """Embed texts with an embedding artifact: one vector per text (unit length when the model normalizes)."""
    from edgeft.runtime import TextEmbedder

    items, output = config.items(), config.output
    if output is not None:
        check_output(output)  # before loading the model
    emb = TextEmbedder.open(config.artifact, threads=config.threads, spin=config.spin)
    vectors = emb.embed(items, batch_size=config.batch_size)
    if output is None:
        write_jsonl(sys.stdout, items, vectors)
        return
    if output.suffix.lower() == ".npy":
        import numpy as np

        array = io.BytesIO()
        np.save(array, vectors)
        write_output(output, array.getvalue())
    else:
        lines = io.StringIO()
        write_jsonl(lines, items, vectors)
        write_output(output, lines.getvalue().encode("utf-8"))
    typer.echo(f"{len(items)} texts embedded ({emb.dim} dimensions) -> {output}", err=True)
