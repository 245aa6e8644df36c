"""``edgeft classify``: label texts with a classification artifact.

Texts come from the command line or ``--input`` (CSV, TSV, JSONL or TXT: one text per
line); results go to stdout or ``--output`` as JSONL (text, label, scores) or CSV (text,
label, one probability column per label). Imports the runtime inside the command only.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import sys
from pathlib import Path

import typer

from edgeft.cli.app import app
from edgeft.errors import EdgeftError


class OutputFormat(str, enum.Enum):
    """How results are written."""

    jsonl = "jsonl"
    csv = "csv"


TEXT_KEYS = ("text", "sentence", "input", "content")


def _text_key(keys: list[str], wanted: str | None, source: Path) -> str:
    if wanted:
        if wanted not in keys:
            raise EdgeftError(f"{source}: no column {wanted!r} (columns: {', '.join(keys)})")
        return wanted
    for k in TEXT_KEYS:
        if k in keys:
            return k
    raise EdgeftError(f"{source}: no text column among {', '.join(keys)}: name it with --text-column")


def read_texts(path: Path, text_column: str | None = None) -> list[str]:
    """Texts from a CSV/TSV (header row), JSONL (objects or strings) or TXT file; none is an error."""
    texts = _read_texts(path, text_column)
    if not texts:
        raise EdgeftError(f"{path} holds no texts to classify")
    return texts


def _read_texts(path: Path, text_column: str | None) -> list[str]:
    from edgeft.data import read_text

    if not path.is_file():
        raise EdgeftError(f"{path} does not exist")
    suffix = path.suffix.lower()
    raw = read_text(path)
    if suffix in (".csv", ".tsv"):
        try:
            rows = list(csv.DictReader(io.StringIO(raw), delimiter="\t" if suffix == ".tsv" else ","))
        except csv.Error as exc:
            raise EdgeftError(f"{path}: not a readable {suffix[1:].upper()} file ({exc})") from None
        if not rows:
            return []
        key = _text_key(list(rows[0].keys()), text_column, path)
        return [r[key] or "" for r in rows]
    if suffix in (".jsonl", ".json"):
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise EdgeftError(f"{path}:{n} is not a JSON line") from None
            if isinstance(obj, str):
                texts.append(obj)
            elif isinstance(obj, dict):
                texts.append(str(obj[_text_key(list(obj), text_column, path)]))
            else:
                raise EdgeftError(f"{path}:{n}: expected an object or a string")
        return texts
    if suffix in (".txt", ""):
        return [ln for ln in raw.splitlines() if ln.strip()]
    raise EdgeftError(f"{path}: unknown input format {suffix!r} (use .csv, .tsv, .jsonl or .txt)")


def write_results(out, texts: list[str], results: list[dict], labels: list[str], fmt: OutputFormat) -> None:
    if fmt is OutputFormat.jsonl:
        for t, r in zip(texts, results):
            out.write(json.dumps({"text": t, "label": r["label"], "scores": r["scores"]}, ensure_ascii=False) + "\n")
        return
    w = csv.writer(out)
    w.writerow(["text", "label", *[f"p_{lab}" for lab in labels]])
    for t, r in zip(texts, results):
        w.writerow([t, r["label"], *[f"{r['scores'][lab]:.6f}" for lab in labels]])


@app.command()
def classify(
    artifact: str = typer.Argument(..., help="Classification artifact folder or packed .edgeft file."),
    texts: list[str] = typer.Argument(None, help="Texts to classify (or use --input)."),
    input: Path = typer.Option(None, "--input", "-i", help="A file of texts: .csv/.tsv (header), .jsonl or .txt."),
    text_column: str = typer.Option(None, "--text-column", help="The CSV column or JSONL key holding the text [default: text]."),
    output: Path = typer.Option(None, "--output", "-o", help="Write results here instead of stdout."),
    format: OutputFormat = typer.Option(None, "--format", "-f", help="Output format [default: from --output's suffix, else jsonl]."),
    batch_size: int = typer.Option(32, "--batch-size", help="Texts per onnxruntime call."),
    threads: int = typer.Option(None, "--threads", help="onnxruntime threads [default: all usable cores]."),
) -> None:
    """Label texts with a classification artifact: each gets its label and every label's probability."""
    from edgeft.artifact import Check
    from edgeft.runtime import TextClassifier

    if bool(texts) == bool(input):
        raise EdgeftError("give texts on the command line or --input FILE (one of the two)")
    items = read_texts(input, text_column) if input else list(texts)
    fmt = format or (OutputFormat.csv if output and output.suffix.lower() == ".csv" else OutputFormat.jsonl)
    if output:
        from edgeft.fsutil import check_writable

        check_writable(output.parent, "the results")  # before loading the model
    clf = TextClassifier.open(artifact, threads=threads, check=Check.quick)
    results = clf.classify(items, batch_size=batch_size)
    if output:
        from edgeft.fsutil import atomic_write_bytes

        buf = io.StringIO()
        write_results(buf, items, results, clf.labels, fmt)
        try:
            atomic_write_bytes(output, buf.getvalue().encode("utf-8"))
        except OSError as exc:
            raise EdgeftError(f"cannot write {output}: {exc.strerror or exc}") from None
        typer.echo(f"{len(items)} texts classified -> {output}", err=True)
    else:
        write_results(sys.stdout, items, results, clf.labels, fmt)
