"""A causal LM's gate scores at least MIN_GATE_TOKENS tokens, and says where they came from."""

from __future__ import annotations

from edgeft import data
from edgeft.artifact import Task
from edgeft.export.config import ExportConfig
from edgeft.export.gate import MAX_TEXT_TOKENS, MIN_GATE_TOKENS, eval_set


def _tokens(tok, texts):
    return sum(min(MAX_TEXT_TOKENS, len(tok(t, add_special_tokens=False)["input_ids"])) for t in texts)


def test_a_short_held_out_split_is_topped_up_with_training_texts_and_says_so(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = "\n\n".join(f"Paragraph {i}: the river runs past the mill and the wheel turns slowly in the rain."
                       for i in range(40))
    path = tmp_path / "train.txt"
    path.write_text(text + "\n")
    run_config = {"data": str(path), "eval_fraction": 0.02, "seed": 0}  # one paragraph held out
    got = eval_set(ExportConfig(source="unused", out=tmp_path / "art"), Task.causal_lm, run_config, tok, None)

    train, held = data.held_out_split(data.load_texts(path), 0.02, 0, str(path))
    assert len(held) == 1 and got.texts[0] == held[0]
    assert set(got.texts[1:]) <= set(train) and len(got.texts) > 1
    assert _tokens(tok, got.texts) >= MIN_GATE_TOKENS > _tokens(tok, got.texts[:-1])
    assert f"1 held-out text, {_tokens(tok, held)} tokens, under the gate's minimum of {MIN_GATE_TOKENS}" in got.origin
    assert f"{len(got.texts) - 1} training texts added" in got.origin


def test_enough_held_out_tokens_are_scored_as_they_are(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join(f"Text {i}: " + "the mill wheel turns " * 40 for i in range(12)) + "\n")
    cfg = ExportConfig(source="unused", out=tmp_path / "art", eval_data=path)
    got = eval_set(cfg, Task.causal_lm, {}, tok, None)
    assert got.texts == data.load_texts(path) and got.origin == str(path)
