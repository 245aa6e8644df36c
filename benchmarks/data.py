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

from edgeft.artifact import Task

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


def load_tuned_torch(path: str | Path, task: Task):
    """A model folder or a run folder -> (torch model in eval mode, tokenizer, run info or None).

    A run folder is rebuilt by ``edgeft.tune.hf.load_run``, the loader export uses (hash and
    shape checks included); a model folder is loaded as it is, in fp32.
    """
    import torch

    from edgeft.runs import is_run_folder
    from edgeft.tune.hf import load_run, load_tokenizer, model_class

    path = Path(path)
    if is_run_folder(path):
        loaded = load_run(path, fill_pad=False)
        return loaded.model, loaded.tokenizer, loaded.info
    model = model_class(task).from_pretrained(str(path), dtype=torch.float32)
    return model.eval(), load_tokenizer(path, fill_pad=False), None


def load_torch_classifier(path: str | Path):
    """(model, tokenizer, label names) for a classifier run folder or HF folder."""
    model, tok, info = load_tuned_torch(path, Task.classification)
    if info and info.labels:
        labels = list(info.labels)
    else:
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model, tok, labels
