"""Artifacts for the runtime tests, made once per session by ``edgeft.export`` from the tiny fixtures.

Three kinds of graph: the onnxruntime-genai builder's fused llama (GroupQueryAttention,
shared KV buffers), a torch.onnx GPT-2 (past/present convention) and a BERT classifier
with a seeded head (so PyTorch gives the reference probabilities). Unquantized (fp32),
so the runtime can be held to PyTorch's numbers. No tests live here.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABELS = ["negative", "positive"]
GATE = {"allow_degraded": True, "gate_texts": 8, "gate_prompts": 2, "gate_new_tokens": 8, "threads": 1}


@functools.lru_cache(maxsize=None)
def build(kind: str, src: str, root: str) -> Path:
    """The artifact folder for ``kind`` (llama, gpt2, bert, embedding) exported from HF folder ``src`` under ``root``."""
    from edgeft.export import ExportConfig, export

    root_p = Path(root)
    root_p.mkdir(parents=True, exist_ok=True)
    out = root_p / f"{kind}-art"
    if kind == "embedding":  # the bare BERT encoder: CLS pooling (no sentence-transformers files)
        cfg = ExportConfig(source=src, out=out, quantize="none", task="embedding", overwrite=True, gate_texts=8)
    elif kind == "bert":
        src = str(_seeded_classifier(Path(src), root_p / "bert-classifier"))
        cfg = ExportConfig(source=src, out=out, quantize="none", task="classification", labels=tuple(LABELS),
                           eval_data=REPO / "demo" / "sst2_2k.csv", overwrite=True, **GATE)
    else:
        cfg = ExportConfig(source=src, out=out, quantize="none", task="causal-lm", overwrite=True, **GATE)
    return Path(export(cfg, log=None))


def bert_classifier(src: Path, labels: list[str] = LABELS):
    """The tiny BERT with a seeded classification head: the PyTorch reference of the bert artifact."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    return AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}).eval()


def _seeded_classifier(src: Path, dest: Path) -> Path:
    from transformers import AutoTokenizer

    if dest.exists():
        shutil.rmtree(dest)
    bert_classifier(src).save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


def run(*args, input=None):
    """Run the edgeft CLI in-process (typer's CliRunner); every argument passed through str()."""
    from typer.testing import CliRunner

    from edgeft.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)
