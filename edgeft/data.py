"""The one reader of data files (CSV, TSV, JSONL, JSON lists, TXT) that ``tune --data/--eval-data``, export's
gate (``--eval-data``) and ``classify/embed --input`` share, so a file means the same to each. Three shapes:

- classification: ``load_classification(path) -> (texts, labels)``, labels as strings; a
  text is a string, or a ``(text, text_pair)`` pair where the table has two text columns
  (``PAIR_COLUMNS`` by name, or ``--text-column A --pair-column B``): NLI, duplicates, relevance;
- texts: ``load_texts(path) -> list[str]`` (``load_inputs``: pairs where ``--pair-column`` names a
  second column or one is named ``text_pair``). A .txt file holds texts separated by blank lines
  (empty or only spaces), so a poem stays whole; without a blank line, one text per line, kept as it
  is. A table (.csv/.tsv with a header row, .jsonl an object per line, .json a list of objects) gives
  ``--text-column``, else the first of ``TEXT_COLUMNS`` it has (case ignored), each cell stripped, an
  empty one an error; a .jsonl/.json row that is a string is a text (its column ``text``);
- instruction or chat rows: ``load_chat(path) -> list[list[message]]`` where a row is
  ``{"messages": [{"role", "content"}, ...]}``, alpaca's ``instruction``/``input``/``output``
  or ``prompt``/``completion`` (``response``); ``render_chat`` turns one into a
  ``(prompt, answer)`` pair of strings through a chat template.

Every problem a user can cause (missing or empty file, no such column, bad JSON, unknown format) is one
line (``EdgeftError``). Knows nothing of models or torch; rendering only calls the tokenizer it is given.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "question", "query", "input", "prompt")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "sentiment", "coarse_label", "intent")
# A column of a two-column table whose name says nothing is taken as its labels by its values when
# they are short and repeat (``text,topic``): at most LABEL_MAX_CHARS characters each, at least two
# distinct ones, at most LABEL_MAX_CLASSES and at most half the rows.
LABEL_MAX_CHARS = 40
LABEL_MAX_CLASSES = 100
# Two text columns a pair classifier reads (NLI, duplicate detection, relevance), found by name.
PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "answer"),
                ("query", "passage"), ("text", "text_pair"))
# How a decoder classifier (no pair encoding of its own) reads a pair: the text, a separator line, the pair.
PAIR_TEMPLATE = "{text}\n---\n{text_pair}"
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
SUFFIXES = (*TABLE_SUFFIXES, ".txt")

Message = dict[str, str]
Pair = tuple[str, str]
Input = str | Pair  # what a classifier reads: one text, or a (text, text_pair) pair

# No token of a real tokenizer spans more characters than this (WordPiece's longest word is
# 100 characters; longer ones become one [UNK]), so the first ``n * CHARS_PER_TOKEN`` characters
# of a text hold at least its first ``n`` tokens.
CHARS_PER_TOKEN = 100


def clip_for_tokens(text: str, max_tokens: int) -> str:
    """The start of ``text`` that still holds its first ``max_tokens`` tokens, cut by characters.

    A text is cut before it is tokenized, so a 50 MB row costs what its first tokens cost
    (tokenizing it whole took minutes and gigabytes, only to be truncated afterwards).
    """
    limit = max_tokens * CHARS_PER_TOKEN
    return text if len(text) <= limit else text[:limit]


def check_text(text: str, what: str) -> str:
    """``text`` itself if UTF-8 can encode it; else one clear error.

    A command-line argument that is not UTF-8 reaches Python as lone surrogates
    (``surrogateescape``), which tokenizers refuse with a traceback.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EdgeftError(f"{what} is not valid UTF-8 text (a stray byte or lone surrogate at character "
                          f"{exc.start})") from None
    return text


def check_file(path: Path) -> Path:
    """The path itself if it is a non-empty file of a known kind; else one clear error."""
    path = Path(path)
    if not path.is_file():
        raise EdgeftError(f"data file {path} does not exist")
    if path.suffix.lower() not in SUFFIXES:
        raise EdgeftError(f"{path}: unknown data format {path.suffix!r} (use {', '.join(SUFFIXES)})")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    if not head.strip() and size <= len(head):
        raise EdgeftError(f"data file {path} is empty")
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a table file (CSV, TSV, JSONL, a JSON list; a string row is ``{"text": row}``); read-only."""
    path = check_file(path)
    st = path.stat()
    return _read_rows(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_rows(path: Path, mtime_ns: int, size: int) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        raise EdgeftError(f"{path} is plain text, not a table with columns")
    text = read_text(path)
    if suffix in (".csv", ".tsv"):
        csv.field_size_limit(sys.maxsize)
        dialect = "excel-tab" if suffix == ".tsv" else "excel"
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline=""), dialect=dialect))
        except csv.Error as exc:
            raise EdgeftError(f"{path}: not a readable {suffix[1:].upper()} file ({exc})") from None
        extra = next((i for i, r in enumerate(rows) if any(str(v).strip() for v in r.pop(None, ()))), None)
        if extra is not None:  # empty fields past the header (trailing separators) are dropped
            raise EdgeftError(f"{path}: row {extra + 1} has more fields than the header (quote texts with separators)")
    elif suffix == ".jsonl":
        rows = [_json(line, path, i + 1) for i, line in enumerate(text.splitlines()) if line.strip()]
    else:
        rows = _json(text, path, None, hint=" (a .json file holds one list; one object per line is .jsonl)")
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise EdgeftError(f"{path}: a .json data file must hold a list of objects")
    if not rows:
        raise EdgeftError(f"data file {path} has no rows")
    rows = [{"text": r} if isinstance(r, str) else r for r in rows]
    if not all(isinstance(r, dict) for r in rows):
        raise EdgeftError(f"{path}: every row must be an object with named fields (or a string: a text)")
    return rows


def read_text(path: Path) -> str:
    """A file's text as UTF-8 (a BOM is dropped); a binary or otherwise encoded file is one clear error."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EdgeftError(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): "
                          "save it as UTF-8") from None
    if "\x00" in text:
        raise EdgeftError(f"{path} holds NUL bytes: a binary file, not text data")
    return text


def _json(text: str, path: Path, line: int | None, hint: str = "") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {line}" if line else f"line {e.lineno}"
        raise EdgeftError(f"{path}: invalid JSON at {where}: {e.msg}{hint * (e.msg == 'Extra data')}") from None


def _pick(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, path: Path,
          exclude: str | None = None) -> str:
    if given is not None:
        if given not in columns:
            raise EdgeftError(f"{path}: no column {given!r} (columns: {', '.join(columns)})")
        return given
    lower = {c.lower(): c for c in columns if c != exclude}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    flag = "--text-column" if what == "text" else "--label-column"
    raise EdgeftError(f"{path}: cannot tell the {what} column among {', '.join(columns)}; name it with {flag}")


def detect_columns(path: Path, text_column: str | None = None, label_column: str | None = None,
                   need_label: bool = True) -> tuple[str, str | None]:
    """The (text, label) column names of a table file: from flags, by name, else by their values
    (``guess_label_column``)."""
    rows = read_rows(path)
    columns = list(rows[0].keys())
    label = None
    if need_label:
        named = label_column is not None or any(c.lower() in LABEL_COLUMNS for c in columns)
        label = (None if named else guess_label_column(path, text_column)) or \
            _pick(columns, label_column, LABEL_COLUMNS, "label", Path(path))
    if text_column is None and label is not None and len(columns) == 2:
        text_column = next(c for c in columns if c != label)  # the one column left
    text = _pick(columns, text_column, TEXT_COLUMNS, "text", Path(path), exclude=label)
    return text, label


def has_label_column(path: Path, label_column: str | None = None, text_column: str | None = None) -> bool:
    """Whether a table file has a label column (named, detected by name, or by its values)."""
    if Path(path).suffix.lower() == ".txt":
        return False
    columns = list(read_rows(path)[0].keys())
    if label_column is not None:
        return label_column in columns
    return any(c.lower() in LABEL_COLUMNS for c in columns) or guess_label_column(path, text_column) is not None


def guess_label_column(path: Path, text_column: str | None = None) -> str | None:
    """The label column of a two-column table by its values: the one column of short values that
    repeat (a topic, a class) beside one that does not (the text). None when that is not clear."""
    if Path(path).suffix.lower() == ".txt":
        return None
    rows = read_rows(path)
    columns = list(rows[0].keys())
    if len(columns) != 2 or is_chat_file(path):
        return None
    categorical = [c for c in columns if c != text_column and _categorical([r.get(c) for r in rows])]
    return categorical[0] if len(categorical) == 1 else None


def _categorical(values: list[Any]) -> bool:
    if any(v is None or isinstance(v, (dict, list)) for v in values):
        return False
    cells = [str(v).strip() for v in values]
    distinct = set(cells)
    return (all(0 < len(c) <= LABEL_MAX_CHARS for c in cells)
            and 2 <= len(distinct) <= min(LABEL_MAX_CLASSES, len(cells) // 2))


def _cell(row: dict[str, Any], col: str, path: Path, i: int) -> str:
    value = row.get(col)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise EdgeftError(f"{path}: row {i + 1} has no value in column {col!r}")
    return str(value).strip()


def load_classification(path: Path, text_column: str | None = None, label_column: str | None = None,
                        pair_column: str | None = None) -> tuple[list[Input], list[str]]:
    """Texts (or ``(text, text_pair)`` pairs, see ``detect_pair_columns``) and their labels
    (as strings) from a table file."""
    path = Path(path)
    pair = detect_pair_columns(path, text_column, pair_column)
    rows = read_rows(path)
    texts: list[Input]
    if pair is not None:
        _, label = detect_columns(path, pair[0], label_column, need_label=True)
        if label in pair:
            raise EdgeftError(f"{path}: the label column {label!r} is also a text column; name it with --label-column")
        texts = [(_cell(r, pair[0], path, i), _cell(r, pair[1], path, i)) for i, r in enumerate(rows)]
    else:
        text, label = detect_columns(path, text_column, label_column, need_label=True)
        texts = [_cell(r, text, path, i) for i, r in enumerate(rows)]
    labels = [_cell(r, label, path, i) for i, r in enumerate(rows)]
    return texts, labels


def detect_pair_columns(path: Path, text_column: str | None = None, pair_column: str | None = None
                        ) -> tuple[str, str] | None:
    """The (text, pair) column names of a pair table, or None when it is not one.

    ``pair_column`` names the second text column (``text_column`` the first, else it is found
    by name); without it a pair is two columns named as in ``PAIR_COLUMNS``."""
    rows = read_rows(path)
    columns = list(rows[0].keys())
    if pair_column is not None:
        if pair_column not in columns:
            raise EdgeftError(f"{path}: no column {pair_column!r} (columns: {', '.join(columns)})")
        first = _pick(columns, text_column, TEXT_COLUMNS, "text", Path(path), exclude=pair_column)
        if first == pair_column:
            raise EdgeftError(f"{path}: the text and pair columns are both {pair_column!r}")
        return first, pair_column
    lower = {c.lower(): c for c in columns}
    for a, b in PAIR_COLUMNS:
        if a in lower and b in lower and text_column in (None, lower[a]):
            return lower[a], lower[b]
    return None


def uses_pair_template(tokenizer: Any) -> bool:
    """Whether pairs reach this model as one text (``PAIR_TEMPLATE``): a tokenizer without a
    separator token (a decoder's) has no pair encoding of its own."""
    return getattr(tokenizer, "sep_token_id", None) is None


# Label names that say "relevant" (or "the same", "follows") in pair data, most specific first.
RELEVANT_LABELS = ("relevant", "duplicate", "entailment", "positive", "match", "similar", "yes", "true", "1")


def relevant_label(labels: list[str]) -> str | None:
    """The label of a pair classifier whose probability is a pair's relevance, by its name; None
    for a single-logit head or when no name says it."""
    lower = {str(n).lower(): n for n in labels}
    if len(labels) < 2:
        return None
    return next((lower[n] for n in RELEVANT_LABELS if n in lower), None)


def pair_text(item: Input, template: str = PAIR_TEMPLATE) -> str:
    """One string for a model without a pair encoding: a pair through ``template``, a text as it is."""
    return item if isinstance(item, str) else template.format(text=item[0], text_pair=item[1])


def split_paragraphs(text: str) -> list[str]:
    """Texts between blank lines (empty or only spaces: a whole poem); lines, kept as they are, if none."""
    paras = ["\n".join(g) for blank, g in itertools.groupby(text.splitlines(), lambda ln: not ln.strip()) if not blank]
    return paras[0].split("\n") if len(paras) == 1 else paras


def load_texts(path: Path, text_column: str | None = None) -> list[str]:
    """Texts: a .txt file's paragraphs (or lines), or a table's text column."""
    path = check_file(path)
    if path.suffix.lower() == ".txt":
        texts = split_paragraphs(read_text(path))
    else:
        text, _ = detect_columns(path, text_column, None, need_label=False)
        texts = [_cell(r, text, path, i) for i, r in enumerate(read_rows(path))]
    if not texts:
        raise EdgeftError(f"data file {path} holds no texts")
    return texts


def load_inputs(path: Path, text_column: str | None = None, pair_column: str | None = None) -> list[Input]:
    """A classifier's input: (text, text_pair) pairs by ``pair_column`` or a ``text_pair`` column, else texts."""
    if pair_column is None and Path(path).suffix.lower() != ".txt":
        pair_column = next((c for c in read_rows(path)[0] if c.lower() == "text_pair"), None)
    if pair_column is None:
        return list(load_texts(path, text_column))
    pair = detect_pair_columns(path, text_column, pair_column)  # a .txt file: "not a table", one line
    assert pair is not None  # a named pair column always gives one
    return [(_cell(r, pair[0], path, i), _cell(r, pair[1], path, i)) for i, r in enumerate(read_rows(path))]


# ---- instruction and chat rows -------------------------------------------------------------

def row_messages(row: dict[str, Any]) -> list[Message] | None:
    """One row as chat messages ending with the assistant's answer; None if it is not a chat row."""
    if isinstance(row.get("messages"), list):
        msgs = [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))}
                for m in row["messages"] if isinstance(m, dict)]
        return msgs or None
    if "instruction" in row and "output" in row:
        extra = str(row.get("input") or "").strip()
        user = str(row["instruction"]).strip() + (f"\n\n{extra}" if extra else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": str(row["output"])}]
    answer_key = next((k for k in ("completion", "response", "answer") if k in row), None)
    if "prompt" in row and answer_key:
        return [{"role": "user", "content": str(row["prompt"])}, {"role": "assistant", "content": str(row[answer_key])}]
    return None


def is_chat_file(path: Path) -> bool:
    """Whether a table file holds instruction or chat rows (checked on its first row)."""
    if Path(path).suffix.lower() not in (".jsonl", ".json", ".csv", ".tsv"):
        return False
    return row_messages(read_rows(path)[0]) is not None


def load_chat(path: Path) -> list[list[Message]]:
    """Every row of an instruction or chat file as messages ending with an assistant answer."""
    path = Path(path)
    out = []
    for i, row in enumerate(read_rows(path)):
        msgs = row_messages(row)
        if msgs is None:
            raise EdgeftError(f"{path}: row {i + 1} is not an instruction/chat row "
                              "(messages, instruction+output or prompt+completion)")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise EdgeftError(f"{path}: row {i + 1} does not end with an assistant answer")
        out.append(msgs)
    return out


FALLBACK_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"


def render_chat(tokenizer: Any, messages: list[Message]) -> tuple[str, str]:
    """(prompt, answer) strings for one conversation: the loss goes on the answer only.

    The prompt is every message but the last, rendered with the tokenizer's chat
    template and its generation prompt; the answer is what the template adds for the
    last (assistant) message. A tokenizer without a template gets a plain
    ``### Instruction / ### Response`` layout and its end-of-text token.
    """
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        return prompt, messages[-1]["content"] + (tokenizer.eos_token or "")
    user = "\n\n".join(m["content"] for m in messages[:-1])
    return FALLBACK_PROMPT.format(user=user), messages[-1]["content"] + (tokenizer.eos_token or "")


def held_out_split(items: list[Any], fraction: float, seed: int, what: str) -> tuple[list[Any], list[Any]]:
    """Split ``items`` into (train, held out): a seeded ``fraction`` held out, order kept.

    ``edgeft tune`` evaluates on the held-out part when there is no ``--eval-data``, and
    ``edgeft export``'s gate rebuilds the same part from the run's seed, so the gate never
    scores the texts the model was trained on.
    """
    if len(items) < 2:
        raise EdgeftError(f"{what} has too few examples to hold some out for evaluation: give --eval-data")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(items) - 1, max(1, round(len(items) * fraction)))
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
