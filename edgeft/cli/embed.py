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
from pathlib import Path

import typer

from edgeft.cli.app import app
from edgeft.cli.classify import read_texts
from edgeft.errors import EdgeftError


def write_jsonl(out, texts: list[str], vectors) -> None:
    for t, v in zip(texts, vectors):
        out.write(json.dumps({"text": t, "embedding": [round(float(x), 7) for x in v]}, ensure_ascii=False) + "\n")


@app.command()
def embed(
    artifact: str = typer.Argument(..., help="Embedding artifact folder or packed .edgeft file."),
    texts: list[str] = typer.Argument(None, help="Texts to embed (or use --input)."),
    input: Path = typer.Option(None, "--input", "-i", help="A file of texts: .csv/.tsv (header), .jsonl or .txt."),
    text_column: str = typer.Option(None, "--text-column", help="The CSV column or JSONL key holding the text [default: text]."),
    output: Path = typer.Option(None, "--output", "-o", help="Write here instead of stdout: .npy (float32 array) or JSONL."),
    batch_size: int = typer.Option(32, "--batch-size", help="Texts per onnxruntime call."),
    threads: int = typer.Option(None, "--threads", help="onnxruntime threads [default: all usable cores]."),
) -> None:
    """Embed texts with an embedding artifact: one vector per text (unit length when the model normalizes)."""
    from edgeft.fsutil import atomic_write_bytes
    from edgeft.runtime import TextEmbedder

    if bool(texts) == bool(input):
        raise EdgeftError("give texts on the command line or --input FILE (one of the two)")
    items = read_texts(input, text_column) if input else list(texts)
    emb = TextEmbedder.open(artifact, threads=threads)
    vectors = emb.embed(items, batch_size=batch_size)
    if output is None:
        write_jsonl(sys.stdout, items, vectors)
        return
    if output.suffix.lower() == ".npy":
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, vectors)
        atomic_write_bytes(output, buf.getvalue())
    else:
        buf = io.StringIO()
        write_jsonl(buf, items, vectors)
        atomic_write_bytes(output, buf.getvalue().encode("utf-8"))
    typer.echo(f"{len(items)} texts embedded ({emb.dim} dimensions) -> {output}", err=True)
