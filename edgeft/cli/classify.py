"""``edgeft classify``: label texts with a classification artifact.

Texts come from the command line or ``--input``, read by ``edgeft.data`` as ``edgeft tune`` reads
them (its docstring has the one rule: a .txt file's texts are separated by blank lines, else one per
line; a table's text column is ``--text-column`` or found by name); a pair classifier reads pairs
(a ``text_pair`` column, or ``--text-column A --pair-column B``); results go to stdout or ``--output``
as JSONL (text, label, scores) or CSV (text, label, one probability column per label). Several
artifacts (``edgeft classify A B C "text"...``: the leading arguments that are artifacts) answer
together, each model's label and scores per text, the trunk that split models share run once per
batch. Flags: ``ClassifyConfig``'s fields, most of them ``TextsConfig``'s, which ``edgeft embed``
shares. Imports the runtime inside the command only.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from edgeft.cli.app import app
from edgeft.cli.options import from_config
from edgeft.data import load_inputs, load_texts
from edgeft.errors import EdgeftError
from edgeft.flags import check_fields, flag
from edgeft.fsutil import check_writable, refuse_overlap, require_file, write_output
from edgeft.runtime.params import Spin


class OutputFormat(str, enum.Enum):
    """How results are written."""

    jsonl = "jsonl"
    csv = "csv"


@dataclass(frozen=True)
class TextsConfig:
    """Texts in, one result per text out: the flags ``edgeft classify`` and ``edgeft embed`` share."""

    artifact: str = field(metadata=flag(argument=True))
    """Artifact folder or packed .edgeft file."""
    texts: tuple[str, ...] = field(default=(), metadata=flag(argument=True))
    """Texts (or use --input)."""
    input: Path | None = field(default=None, metadata=flag("--input", "-i"))
    """A file of texts, read as tune reads --data: .csv/.tsv (header row), .jsonl, .json (a list) or .txt
    (texts separated by blank lines; without a blank line, one text per line)."""
    text_column: str | None = None
    """The column (JSON key) holding the text [default: the first found of text, sentence, content,
    review, document, question, query, input, prompt]."""
    output: Path | None = field(default=None, metadata=flag("--output", "-o"))
    """Write results here instead of stdout."""
    batch_size: int = field(default=32, metadata=flag(min=1))
    """Texts per onnxruntime call."""
    threads: int | None = field(default=None, metadata=flag(env="EDGEFT_THREADS", min=1))
    """onnxruntime threads [default: all usable cores]."""
    spin: Spin = field(default=Spin.auto, metadata=flag(env="EDGEFT_SPIN"))
    """Idle onnxruntime threads spin (on) or sleep (off); auto: spin only when the cores the threads take
    are idle at load. Env: EDGEFT_SPIN (1, 0 or auto)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        if bool(self.texts) == bool(self.input):
            raise EdgeftError("give texts on the command line or --input FILE (one of the two)")
        check_fields(self)
        if self.input is not None and self.output is not None:
            refuse_overlap(self.output, self.input, "--output", "--input")

    def items(self) -> list[str]:
        """The texts to work on: from the command line or read from --input."""
        return read_inputs(self.input, self.text_column) if self.input else list(self.texts)


@dataclass(frozen=True)
class ClassifyConfig(TextsConfig):
    """``edgeft classify``."""

    artifact: str = field(metadata=flag(argument=True))
    """Classification artifact folder or packed .edgeft file."""
    texts: tuple[str, ...] = field(default=(), metadata=flag(argument=True))
    """Texts to classify (or use --input); artifacts first are more models, answered together."""
    format: OutputFormat | None = field(default=None, metadata=flag("--format", "-f"))
    """Output format [default: from --output's suffix, else jsonl]."""
    pair_column: str | None = None
    """The column (JSON key) holding each text's pair, for a pair classifier [default: a text_pair column]."""
    artifacts: tuple[str, ...] = field(default=(), metadata=flag(cli=False))
    """Every model asked for: the first argument, then the arguments after it that are artifacts."""

    def __post_init__(self) -> None:
        texts = tuple(self.texts)
        n = next((i for i, t in enumerate(texts) if not is_artifact(t)), len(texts))
        models = (self.artifact, *texts[:n])
        if len(set(models)) != len(models):
            raise EdgeftError("an artifact is named twice")
        object.__setattr__(self, "artifacts", models)
        object.__setattr__(self, "texts", texts[n:])
        super().__post_init__()

    def items(self) -> list:
        """The texts, or (text, text_pair) pairs, to classify."""
        if self.input is None:
            if self.pair_column:
                raise EdgeftError("--pair-column reads pairs from --input")
            return list(self.texts)
        return read_inputs(self.input, self.text_column, self.pair_column, pairs=True)

    @property
    def output_format(self) -> OutputFormat:
        """--format, else csv for an --output ending in .csv, else jsonl."""
        if self.format is not None:
            return self.format
        csv_out = self.output is not None and self.output.suffix.lower() == ".csv"
        return OutputFormat.csv if csv_out else OutputFormat.jsonl


def is_artifact(arg: str) -> bool:
    """An argument naming an artifact folder or packed file (so a model, not a text to classify)."""
    path = Path(arg)
    try:
        return (path.is_dir() and (path / "manifest.json").is_file()) or (arg.endswith(".edgeft") and path.is_file())
    except (OSError, ValueError):  # a text too long, or with a NUL, for a path
        return False


def read_inputs(path: Path, text_column: str | None, pair_column: str | None = None, pairs: bool = False) -> list:
    """The texts of --input (``edgeft.data.load_texts``: the reader ``edgeft tune`` uses), or with
    ``pairs`` a pair classifier's texts or pairs (``edgeft.data.load_inputs``)."""
    require_file(path, "--input")
    return load_inputs(path, text_column, pair_column) if pairs else load_texts(path, text_column)


PAIR_KEY = "text_pair"


def _row(t: Any) -> dict[str, str]:
    """A result row's input columns: ``text``, and ``text_pair`` for a pair."""
    return {"text": t} if isinstance(t, str) else {"text": t[0], PAIR_KEY: t[1]}


def check_output(output: Path) -> None:
    """Refuse, before any work, an --output that is a folder or lies where nothing can be written."""
    if output.is_dir():
        raise EdgeftError(f"--output {output} is a folder: name a file to write")
    check_writable(output.parent, "the results")


def write_results(out, texts: list, results: list[dict], labels: list[str], fmt: OutputFormat) -> None:
    if fmt is OutputFormat.jsonl:
        for t, r in zip(texts, results):
            out.write(json.dumps({**_row(t), "label": r["label"], "scores": r["scores"]}, ensure_ascii=False) + "\n")
        return
    w = csv.writer(out)
    heads = list(_row(texts[0])) if texts else ["text"]
    w.writerow([*heads, "label", *[f"p_{lab}" for lab in labels]])
    for t, r in zip(texts, results):
        w.writerow([*_row(t).values(), r["label"], *[f"{r['scores'][lab]:.6f}" for lab in labels]])


def write_many(out, texts: list, names: tuple[str, ...], labels: list[list[str]], answers: list[list[dict]],
               fmt: OutputFormat) -> None:
    """Several models' results: JSONL ``{"text", "models": {artifact: {"label", "scores"}}}``, or CSV
    columns ``<artifact>:label`` and ``<artifact>:p_<label>`` per model."""
    rows = list(zip(*answers))
    if fmt is OutputFormat.jsonl:
        for t, row in zip(texts, rows):
            out.write(json.dumps({**_row(t), "models": dict(zip(names, row))}, ensure_ascii=False) + "\n")
        return
    w = csv.writer(out)
    heads = list(_row(texts[0])) if texts else ["text"]
    w.writerow([*heads, *[c for n, labs in zip(names, labels) for c in (f"{n}:label", *[f"{n}:p_{x}" for x in labs])]])
    for t, row in zip(texts, rows):
        w.writerow([*_row(t).values(), *[c for r, labs in zip(row, labels)
                         for c in (r["label"], *[f"{r['scores'][x]:.6f}" for x in labs])]])


@app.command()
@from_config(ClassifyConfig)
def classify(config: ClassifyConfig) -> None:
    """Label texts with one or more classification artifacts: each gets its label and every label's probability."""
    from edgeft.artifact import Check
    from edgeft.runtime import TextClassifier

    items, output, fmt = config.items(), config.output, config.output_format
    if output:
        check_output(output)  # before loading the model
    models = [TextClassifier.open(a, threads=config.threads, check=Check.quick, spin=config.spin) for a in config.artifacts]
    if len(models) == 1:
        results = models[0].classify(items, batch_size=config.batch_size)

        def write(out) -> None:
            write_results(out, items, results, models[0].labels, fmt)
    else:
        from edgeft.runtime.classify import classify_many

        answers = classify_many(models, items, batch_size=config.batch_size)

        def write(out) -> None:
            write_many(out, items, config.artifacts, [m.labels for m in models], answers, fmt)
    if output:
        buf = io.StringIO()
        write(buf)
        write_output(output, buf.getvalue().encode("utf-8"))
        typer.echo(f"{len(items)} texts classified -> {output}", err=True)
    else:
        write(sys.stdout)
