"""Data and PyTorch references for the suite: evaluation files, and tuned models rebuilt in torch.

Reads the shared evaluation data (SST-2 dev, TREC test, the sonnets) and rebuilds a tuned
model from its run folder (base weights + ``trained.safetensors``) as a plain PyTorch
model, the "what users would run instead" reference. torch and transformers are imported
inside the functions that need them.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """The shared data folder: $EDGEFT_SHARED_DATA when set (and then only it), else ../shared/data
    beside the checkout. It may not exist: a case that needs a file from it says so (``Unavailable``)."""
    env = os.environ.get("EDGEFT_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def read_tsv_classification(path: str | Path, text_col: int = 0, label_col: int = 1,
                            limit: int | None = None) -> tuple[list[str], list[str]]:
    """Texts and labels (as strings) from a headed TSV such as sst2/dev.tsv or trec/test.tsv."""
    texts, labels = [], []
    with open(path, newline="") as fh:
        rows = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)
        for row in rows:
            if len(row) > max(text_col, label_col):
                texts.append(row[text_col])
                labels.append(row[label_col])
            if limit and len(texts) >= limit:
                break
    return texts, labels


def sonnets_split(text: str, held_out: float = 0.1) -> tuple[str, str]:
    """The sonnets split by position: the first 90% to tune on, the last 10% held out."""
    cut = int(len(text) * (1 - held_out))
    cut = text.rfind("\n\n", 0, cut) if text.rfind("\n\n", 0, cut) > 0 else cut
    return text[:cut], text[cut:]


def load_tuned_torch(path: str | Path, task: str):  # noqa: ANN201
    """A model folder or a run folder -> (torch model in eval mode, tokenizer, run info or None)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from edgeft.runs import TRAINED, is_run_folder, read_run

    path = Path(path)
    info = read_run(path) if is_run_folder(path) else None
    base = info.base_path if info else str(path)
    if task == "classification":
        n = len(info.labels) if info and info.labels else None
        kw = {"num_labels": n} if n else {}
        model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if info:
        from safetensors.torch import load_file

        trained = load_file(str(path / TRAINED))
        if info.untied_head and "lm_head.weight" in trained:
            model.config.tie_word_embeddings = False
            model.lm_head.weight = torch.nn.Parameter(trained["lm_head.weight"].clone())
        missing = set(trained) - set(model.state_dict())
        if missing:
            raise RuntimeError(f"{path}: trained parameters not in the base model: {sorted(missing)[:3]}")
        model.load_state_dict(trained, strict=False)
    tok = AutoTokenizer.from_pretrained(str(path) if info and (path / "tokenizer.json").is_file() else base)
    return model.eval(), tok, info


def load_torch_classifier(path: str | Path):  # noqa: ANN201
    """(model, tokenizer, label names) for a classifier run folder or HF folder."""
    model, tok, info = load_tuned_torch(path, "classification")
    if info and info.labels:
        labels = list(info.labels)
    else:
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model, tok, labels
