"""``edgeft tune`` through typer's test runner: a full run, and every bad input as one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgeft.cli import app

FAST = ["--max-length", "32", "-b", "8", "--max-steps", "3", "--threads", "1", "--no-progress"]
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.txt", "merges.txt", "vocab.json"}


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    return path


def test_cli_tunes_instruction_rows_on_gpt2_with_an_untied_head(tiny_gpt2_dir, tmp_path):
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(1, i + 2)))}
            for i in range(30)]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["tune", "-m", str(tiny_gpt2_dir), "-d", str(data), "-o", str(out),
                                   "-n", "1", "--untie-head", "--eval-every", "2", *FAST[2:], "--max-length", "96"])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.stdout and str(out) in res.stdout
    files = {p.name for p in out.iterdir()}
    required = {"trained.safetensors", "run.json", "config.json", "metrics.json", "log.jsonl", "loss.png"}
    assert required <= files and files - required <= TOKENIZER_FILES, files
    info = json.loads((out / "run.json").read_text())
    assert info["untied_head"] and "lm_head.weight" in info["trained_parameters"]
    assert info["task"] == "causal-lm" and info["trainable_layers"] == 1
    assert json.loads((out / "config.json").read_text())["data_kind"] == "chat"
    assert _tree(tmp_path) == sorted(["alpaca.json", "run", *(f"run/{f}" for f in files)])


def test_cli_detects_classification_from_the_label_column(tiny_bert_dir, tmp_path):
    data = _csv(tmp_path / "dataset.csv", [("good fun", "pos"), ("bad dull", "neg")] * 10)
    res = CliRunner().invoke(app, ["tune", "-m", str(tiny_bert_dir), "-d", str(data), "-o", str(tmp_path / "r"), *FAST])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.stdout
    assert json.loads((tmp_path / "r" / "labels.json").read_text())["labels"] == ["neg", "pos"]


def _bad_cases(tmp_path, model_dir):
    good = _csv(tmp_path / "good.csv", [("good fun", "pos"), ("bad dull", "neg")] * 5)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    odd_eval = _csv(tmp_path / "eval.csv", [("so so", "meh")])
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    base = ["-m", str(model_dir), "-d", str(good), "-o", str(tmp_path / "out")]
    return {
        "missing file": (["-m", str(model_dir), "-d", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "out")],
                         "does not exist"),
        "empty file": (["-m", str(model_dir), "-d", str(empty), "-o", str(tmp_path / "out")], "is empty"),
        "missing column": ([*base, "--label-column", "sentiment"], "no column 'sentiment'"),
        "unknown label": ([*base, "--eval-data", str(odd_eval)], "unknown label 'meh'"),
        "unknown model": (["-m", "no-such-model", "-d", str(good), "-o", str(tmp_path / "out")], "unknown model"),
        "model folder without config": (["-m", str(tmp_path), "-d", str(good), "-o", str(tmp_path / "out")],
                                        "not a Hugging Face model folder"),
        "existing output": (["-m", str(model_dir), "-d", str(good), "-o", str(existing)], "already exists"),
        "too many layers": ([*base, "-n", "9"], "the model has 4 blocks"),
        "bad setting": ([*base, "--eval-fraction", "1.5"], "--eval-fraction must be above 0 and below 1, got 1.5"),
    }


@pytest.mark.parametrize("case", ["missing file", "empty file", "missing column", "unknown label", "unknown model",
                                  "model folder without config", "existing output", "too many layers", "bad setting"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_bert_dir, tmp_path, case):
    args, message = _bad_cases(tmp_path, tiny_bert_dir)[case]
    before = _tree(tmp_path)
    res = CliRunner().invoke(app, ["tune", *args, *FAST])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], res.stderr
    assert _tree(tmp_path) == before
    assert (tmp_path / "existing" / "keep.txt").read_text() == "mine"


def test_help_explains_freezing_and_choices():
    res = CliRunner().invoke(app, ["tune", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    for needle in ("--trainable-layers", "int8|bf16|fp16|fp32", "adamw|adamw8bit", "--resume", "--untie-head",
                   "tied", "bitsandbytes LLM.int8", "OUT.partial"):
        assert needle in text, needle


def test_an_encoder_tunes_a_text_topic_file_as_a_classifier(tiny_bert_dir, tmp_path):
    """`topic` is no label name edgeft knows: its short repeating values make it the label column."""
    data = tmp_path / "news.csv"
    data.write_text("text,topic\n" + "".join(f"good fun film {i},arts\nmarkets fell {i} points,business\n"
                                             for i in range(10)))
    res = CliRunner().invoke(app, ["tune", "-m", str(tiny_bert_dir), "-d", str(data), "-o", str(tmp_path / "r"), *FAST])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "run.json").read_text())["task"] == "classification"
    assert json.loads((tmp_path / "r" / "labels.json").read_text())["labels"] == ["arts", "business"]


@pytest.mark.parametrize("content, task, message", [
    ("some prose\n\nmore prose\n", [], "is an encoder (bert): it tunes as a classifier, and "),
    ("some prose\n\nmore prose\n", ["--task", "causal-lm"], "is an encoder (bert): it does not tune as a causal LM"),
])
def test_an_encoder_never_tunes_as_a_causal_lm(tiny_bert_dir, tmp_path, content, task, message):
    data = tmp_path / "notes.txt"
    data.write_text(content)
    before = _tree(tmp_path)
    res = CliRunner().invoke(app, ["tune", "-m", str(tiny_bert_dir), "-d", str(data), "-o", str(tmp_path / "r"),
                                   *task, *FAST])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert _tree(tmp_path) == before
