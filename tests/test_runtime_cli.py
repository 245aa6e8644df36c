"""``edgeft generate``, ``chat`` and ``classify`` through typer's CliRunner on tiny artifacts."""

from __future__ import annotations

import csv
import io
import json

from runtime_artifacts import LABELS, run

from edgeft.runtime import Generator, SamplingParams, TextClassifier

PROMPT = "shall i compare thee to a summer's day"


def test_generate_streams_the_same_text_as_the_api(llama_art):
    res = run("generate", llama_art, PROMPT, "--max-new-tokens", 12, "-t", 0.9, "--seed", 4, "--stats")
    assert res.exit_code == 0, res.output
    want = Generator.open(llama_art).generate(PROMPT, SamplingParams(max_new_tokens=12, temperature=0.9, seed=4))
    assert want.text in res.stdout
    assert "12 generated" in res.stderr and "tok/s" in res.stderr
    piped = run("generate", llama_art, "--max-new-tokens", 12, "-t", 0.9, "--seed", 4, input=PROMPT)
    assert piped.exit_code == 0 and want.text in piped.stdout


def test_generate_chat_and_errors(llama_art, bert_art, tmp_path):
    gen = Generator.open(llama_art)
    res = run("generate", llama_art, "hello", "--chat", "--max-new-tokens", 6)
    want = gen.generate(gen.render_chat([{"role": "user", "content": "hello"}]), SamplingParams(max_new_tokens=6))
    assert res.exit_code == 0 and want.text in res.stdout
    bad = run("generate", llama_art, "x " * 300, "--max-new-tokens", 20)
    assert bad.exit_code == 2 and "context" in bad.output and "Traceback" not in bad.output
    assert run("generate", bert_art, "x").exit_code == 2
    assert run("generate", tmp_path / "nothing", "x").exit_code == 2
    assert run("generate", llama_art, "x", "--top-p", 0).exit_code == 2


def test_chat_is_multi_turn_with_reset(llama_art):
    res = run("chat", llama_art, "--max-new-tokens", 5, "-t", 1, "--seed", 3, input="hello\nhow are you?\n/reset\nagain\n/exit\n")
    assert res.exit_code == 0, res.output
    assert res.stdout.count("assistant> ") == 3
    assert "[conversation reset]" in res.stderr
    gen = Generator.open(llama_art)
    p = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3)
    first = gen.generate(gen.render_chat([{"role": "user", "content": "hello"}]), p)
    second = gen.generate(gen.render_chat([{"role": "user", "content": "hello"},
                                           {"role": "assistant", "content": first.text},
                                           {"role": "user", "content": "how are you?"}]), p)
    after_reset = gen.generate(gen.render_chat([{"role": "user", "content": "again"}]), p)
    replies = [r.split("you> ")[0][:-1] for r in res.stdout.split("assistant> ")[1:]]
    assert replies == [first.text, second.text, after_reset.text]


def test_classify_texts_and_files(bert_art, tmp_path):
    texts = ["a gorgeous, witty movie", "bad", "thou art more lovely and more temperate"]
    want = TextClassifier.open(bert_art).classify(texts)
    res = run("classify", bert_art, *texts)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["text"] for r in rows] == texts and [r["label"] for r in rows] == [w["label"] for w in want]
    assert all(abs(r["scores"][k] - w["scores"][k]) < 1e-6 for r, w in zip(rows, want) for k in LABELS)

    (tmp_path / "in.csv").write_text("id,text\n1,\"a gorgeous, witty movie\"\n2,bad\n3,thou art more lovely and more temperate\n")
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n\n")
    for src in ("in.csv", "in.jsonl", "in.txt"):
        out = tmp_path / f"{src}.out.csv"
        res = run("classify", bert_art, "--input", tmp_path / src, "--output", out, "--batch-size", 2)
        assert res.exit_code == 0, res.output
        got = list(csv.DictReader(io.StringIO(out.read_text())))
        assert [g["text"] for g in got] == texts and [g["label"] for g in got] == [w["label"] for w in want]
        assert set(got[0]) == {"text", "label", *[f"p_{lab}" for lab in LABELS]}
    res = run("classify", bert_art, "--input", tmp_path / "in.csv", "--format", "jsonl")
    assert [json.loads(x)["label"] for x in res.stdout.splitlines()] == [w["label"] for w in want]


def test_classify_errors(bert_art, tmp_path):
    (tmp_path / "in.csv").write_text("id,body\n1,hi\n")
    res = run("classify", bert_art, "--input", tmp_path / "in.csv")
    assert res.exit_code == 2 and "--text-column" in res.output
    assert run("classify", bert_art, "--input", tmp_path / "in.csv", "--text-column", "body").exit_code == 0
    assert run("classify", bert_art).exit_code == 2  # neither texts nor --input
    (tmp_path / "x.parquet").write_text("")
    assert run("classify", bert_art, "--input", tmp_path / "x.parquet").exit_code == 2


def test_generate_a_file_of_prompts_as_one_batch(llama_art, tmp_path):
    rows = [PROMPT, {"id": "b", "prompt": "thou art more lovely"},
            {"messages": [{"role": "user", "content": "hi"}]}, "o"]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    res = run("generate", llama_art, "--input", src, "-o", out, "--max-new-tokens", 10, "-t", 0.7, "--seed", 2, "--parallel", 3)
    assert res.exit_code == 0, res.output
    assert "4 prompts" in res.stderr and "generating" in res.stderr
    got = [json.loads(ln) for ln in out.read_text().splitlines()]
    gen = Generator.open(llama_art)
    params = SamplingParams(max_new_tokens=10, temperature=0.7, seed=2)
    texts = [PROMPT, "thou art more lovely", gen.render_chat(rows[2]["messages"]), "o"]
    assert [g["index"] for g in got] == [0, 1, 2, 3] and got[1]["id"] == "b"
    for g, t in zip(got, texts):
        want = gen.generate(t, params)
        assert g["text"] == want.text and g["completion_tokens"] == want.completion_tokens
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    res = run("generate", llama_art, "--input", bad)
    assert res.exit_code == 2 and "bad.jsonl:1" in res.output and "Traceback" not in res.output
    assert run("generate", llama_art, "x", "--input", src).exit_code == 2


def test_generate_takes_typical_p(llama_art):
    outs = set()
    for seed in (1, 2, 3):
        res = run("generate", llama_art, PROMPT, "--max-new-tokens", 8, "-t", 1, "--seed", seed, "--typical-p", 1e-6)
        assert res.exit_code == 0, res.output
        outs.add(res.stdout)
    assert len(outs) == 1  # one candidate per step: the seed no longer matters
    assert run("generate", llama_art, PROMPT, "--typical-p", 0).exit_code == 2
