"""The export gate scores a run on the texts tune held out, never on what it trained on."""

from __future__ import annotations

from edgeft import data
from edgeft.artifact import Task
from edgeft.export.config import ExportConfig
from edgeft.export.gate import eval_set


def test_gate_uses_the_runs_held_out_split(tmp_path, test_data):
    rows = (test_data / "sst2_dev_400.tsv").read_text().splitlines()[:201]
    train_file = tmp_path / "train.tsv"
    train_file.write_text("\n".join(rows) + "\n")
    run_config = {"data": str(train_file), "eval_fraction": 0.2, "seed": 3}
    cfg = ExportConfig(source="unused", out=tmp_path / "art", gate_texts=10_000)

    got = eval_set(cfg, Task.classification, run_config, tokenizer=None, labels=["0", "1"])

    texts, labels = data.load_classification(train_file)
    train, held = data.held_out_split(list(zip(texts, labels)), 0.2, 3, "x")
    assert got.texts == [t for t, _ in held] and got.labels == [lab for _, lab in held]
    assert len(got.texts) == 40 and not set(got.texts) & {t for t, _ in train}


def test_explicit_eval_data_is_used_whole(tmp_path, test_data):
    path = test_data / "sst2_dev_400.tsv"
    cfg = ExportConfig(source="unused", out=tmp_path / "art", eval_data=path, gate_texts=10_000)
    got = eval_set(cfg, Task.classification, {"data": str(path)}, tokenizer=None, labels=["0", "1"])
    assert len(got.texts) == len(data.load_classification(path)[0])
