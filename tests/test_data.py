"""edgeft.data: tables, column detection, plain text, instruction/chat rows and their rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeft import data as D
from edgeft.errors import EdgeftError


def _write(path, text):
    path.write_text(text)
    return path


def test_csv_with_text_label_columns_works_as_is(tmp_path):
    p = _write(tmp_path / "dataset.csv", 'text,label\n"good, really good",pos\nawful,neg\n')
    texts, labels = D.load_classification(p)
    assert texts == ["good, really good", "awful"]
    assert labels == ["pos", "neg"]


def test_sst2_tsv_columns_are_detected(test_data):
    texts, labels = D.load_classification(test_data / "sst2_dev_400.tsv")
    assert len(texts) == len(labels) == 400
    assert set(labels) == {"0", "1"}


def test_trec_needs_no_flag_for_coarse_label_but_takes_one_for_fine(test_data):
    path = test_data / "trec_test_300.tsv"
    _, coarse = D.load_classification(path)
    _, fine = D.load_classification(path, label_column="fine_label")
    assert "DESC" in coarse and any(":" in f for f in fine)


def test_jsonl_and_json_tables(tmp_path):
    rows = [{"sentence": "a b", "category": "x"}, {"sentence": "c", "category": "y"}]
    jl = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    js = _write(tmp_path / "d.json", json.dumps(rows))
    assert D.load_classification(jl) == (["a b", "c"], ["x", "y"])
    assert D.load_classification(js) == (["a b", "c"], ["x", "y"])


def test_explicit_columns_and_missing_column(tmp_path):
    p = _write(tmp_path / "d.csv", "body,tag\nhello,a\nbye,b\n")
    assert D.load_classification(p, text_column="body", label_column="tag") == (["hello", "bye"], ["a", "b"])
    with pytest.raises(EdgeftError, match="cannot tell the label column"):
        D.load_classification(p)
    with pytest.raises(EdgeftError, match="no column 'nope'"):
        D.load_classification(p, text_column="body", label_column="nope")


@pytest.mark.parametrize("name, content, message", [
    ("missing.csv", None, "does not exist"),
    ("empty.csv", "", "is empty"),
    ("blank.txt", "\n\n  \n", "is empty"),
    ("header_only.csv", "text,label\n", "no rows"),
    ("data.parquet", "x", "unknown data format"),
    ("bad.jsonl", '{"text": "a"}\n{oops\n', "invalid JSON at line 2"),
])
def test_bad_files_are_one_line_errors(tmp_path, name, content, message):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(EdgeftError, match=message) as e:
        D.load_classification(p)
    assert "\n" not in str(e.value)


def test_empty_cell_is_reported_with_its_row(tmp_path):
    p = _write(tmp_path / "d.csv", "text,label\nfine,a\n,b\n")
    with pytest.raises(EdgeftError, match="row 2 has no value in column 'text'"):
        D.load_classification(p)


def test_plain_text_splits_on_blank_lines(tmp_path):
    p = _write(tmp_path / "poems.txt", "one\ntwo\n\nthree\n\n\nfour\n")
    assert D.load_texts(p) == ["one\ntwo", "three", "four"]
    q = _write(tmp_path / "lines.txt", "a\nb\nc\n")
    assert D.load_texts(q) == ["a", "b", "c"]


def test_sonnets_are_whole_paragraphs():
    sonnets = D.load_texts(Path(__file__).resolve().parents[1] / "demo" / "sonnets.txt")
    assert len(sonnets) > 100
    assert all(len(s.splitlines()) >= 2 for s in sonnets[5:50])
    # one sonnet apiece: the line of one space between sonnets 39 and 40 is a blank line too
    assert max(len(s.splitlines()) for s in sonnets) <= 15
    assert [s for s in sonnets if s.startswith("Take all my loves")] and not [s for s in sonnets if "\nTake all my loves" in s]


def test_a_line_of_spaces_is_a_blank_line(tmp_path):
    p = _write(tmp_path / "t.txt", "a\nb\n \t \nc\r\nd\r\n\r\n")
    assert D.load_texts(p) == ["a\nb", "c\nd"]


def test_alpaca_rows_become_messages(test_data):
    path = test_data / "alpaca_200.json"
    assert D.is_chat_file(path)
    convs = D.load_chat(path)
    assert len(convs) == 200
    first = convs[0]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert "Facebook post" in first[0]["content"] and "meanest" in first[0]["content"]
    assert first[1]["content"] == "no"


def test_messages_and_prompt_completion_rows(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]},
            {"prompt": "2+2?", "completion": "4"}]
    p = _write(tmp_path / "chat.jsonl", "\n".join(json.dumps(r) for r in rows))
    convs = D.load_chat(p)
    assert convs[0][-1] == {"role": "assistant", "content": "hello"}
    assert convs[1] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert not D.is_chat_file(_write(tmp_path / "cls.csv", "text,label\na,b\n"))


def test_chat_row_without_answer_is_refused(tmp_path):
    p = _write(tmp_path / "chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(EdgeftError, match="does not end with an assistant answer"):
        D.load_chat(p)


def test_render_chat_uses_the_template_and_splits_at_the_answer(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]
    prompt, answer = D.render_chat(tok, msgs)
    assert prompt == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert answer.startswith("Red.<|im_end|>")
    assert prompt + answer == tok.apply_chat_template(msgs, tokenize=False)


def test_render_chat_without_template_falls_back(tiny_gpt2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    prompt, answer = D.render_chat(tok, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
    assert prompt == "### Instruction:\nQ\n\n### Response:\n"
    assert answer == "A" + tok.eos_token


def test_a_two_column_table_with_short_repeating_values_is_labelled_by_them(tmp_path):
    topics = ["sport", "world", "business", "tech"]
    rows = "".join(f"headline number {i} about {topics[i % 4]} things,{topics[i % 4]}\n" for i in range(20))
    p = _write(tmp_path / "news.csv", "text,topic\n" + rows)
    assert D.has_label_column(p) and D.guess_label_column(p) == "topic"
    texts, labels = D.load_classification(p)
    assert labels[:4] == topics and texts[0] == "headline number 0 about sport things"
    # nothing says which is the text either: the other column
    q = _write(tmp_path / "unnamed.csv", "body,topic\n" + rows)
    assert D.load_classification(q) == (texts, labels)
    # values that do not repeat (an id, an answer) are no labels
    ids = _write(tmp_path / "ids.csv", "text,ref\n" + "".join(f"some text {i},r{i}\n" for i in range(20)))
    qa = _write(tmp_path / "qa.csv", "question,answer\n" + "".join(f"q {i}?,the answer is {i}\n" for i in range(20)))
    assert not D.has_label_column(ids) and not D.has_label_column(qa)


# ---- one reader: tune --data, export --eval-data and classify/embed --input read a file alike ----

def _classify_reads(path: Path, **flags) -> list:
    from edgeft.cli.classify import ClassifyConfig

    return ClassifyConfig(artifact="unused", input=path, **flags).items()


def _embed_reads(path: Path, **flags) -> list:
    from edgeft.cli.embed import EmbedConfig

    return EmbedConfig(artifact="unused", input=path, **flags).items()


@pytest.mark.parametrize("name, content, want", [
    ("paragraphs.txt", "one\ntwo\n\nthree\n", ["one\ntwo", "three"]),
    ("lines.txt", "a\n  b, indented\nc\n", ["a", "  b, indented", "c"]),
    ("reviews.csv", 'id,review\n1," padded "\n2,"a, b"\n', ["padded", "a, b"]),
    ("upper.tsv", "Text\tid\nhello\t1\nbye\t2\n", ["hello", "bye"]),
    ("strings.jsonl", '"first"\n\n"second"\n', ["first", "second"]),
    ("objects.jsonl", '{"sentence": "x"}\n{"sentence": "y"}\n', ["x", "y"]),
    ("list.json", '[{"content": "p"},\n {"content": "q"}]\n', ["p", "q"]),
])
def test_tune_export_classify_and_embed_read_a_file_alike(tmp_path, name, content, want):
    p = _write(tmp_path / name, content)
    assert D.load_texts(p) == want  # tune --data (causal LM), export --eval-data
    assert _classify_reads(p) == want
    assert _embed_reads(p) == want


@pytest.mark.parametrize("column", D.TEXT_COLUMNS)
def test_every_text_column_name_works_for_tune_and_classify(tmp_path, column):
    p = _write(tmp_path / "t.csv", f"id,{column}\n1,hello\n2,bye\n")
    assert D.load_texts(p) == _classify_reads(p) == ["hello", "bye"]


def test_the_text_column_names_are_listed_alike_in_help_and_docs():
    from edgeft.cli.classify import ClassifyConfig
    from edgeft.flags import field_docs

    names = ", ".join(D.TEXT_COLUMNS)
    assert names in " ".join(field_docs(ClassifyConfig)["text_column"].split())
    docs = (Path(__file__).resolve().parents[1] / "docs" / "tune.md").read_text()
    assert names in " ".join(docs.split())


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "does not exist"),
    ("empty.jsonl", "\n", "is empty"),
    ("header.csv", "text\n", "has no rows"),
    ("nocolumn.csv", "id,body\n1,hi\n", "name it with --text-column"),
    ("emptycell.csv", 'text\nfine\n""\n', "row 2 has no value in column 'text'"),
    ("bad.jsonl", '{"text": "a"}\n{oops\n', "invalid JSON at line 2"),
    ("lines.json", '{"text": "a"}\n{"text": "b"}\n', "one object per line is .jsonl"),
    ("numbers.jsonl", "1\n2\n", "every row must be an object"),
    ("texts.parquet", "x", "unknown data format"),
])
def test_bad_text_files_are_the_same_one_line_error_everywhere(tmp_path, name, content, message):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    for read in (D.load_texts, _classify_reads, _embed_reads):
        with pytest.raises(EdgeftError, match=message) as e:
            read(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_classify_reads_pairs_from_a_text_pair_column_of_any_table(tmp_path):
    want = [("q1", "d1"), ("q2", "d2")]
    table = _write(tmp_path / "p.csv", "text,text_pair\nq1,d1\nq2,d2\n")
    lines = _write(tmp_path / "p.jsonl", "".join(json.dumps({"text": a, "text_pair": b}) + "\n" for a, b in want))
    named = _write(tmp_path / "n.tsv", "q\tdoc\nq1\td1\nq2\td2\n")
    assert _classify_reads(table) == _classify_reads(lines) == D.load_inputs(table) == want
    assert _classify_reads(named, text_column="q", pair_column="doc") == want
    assert _embed_reads(table) == ["q1", "q2"]  # embed reads texts
    qa = _write(tmp_path / "qa.csv", "question,answer\nq1,d1\nq2,d2\n")
    assert _classify_reads(qa) == ["q1", "q2"]  # pairs by name are tune's: classify needs --pair-column
    assert _classify_reads(qa, pair_column="answer") == want
    with pytest.raises(EdgeftError, match="plain text") as e:
        _classify_reads(_write(tmp_path / "t.txt", "a\n"), pair_column="b")
    assert "\n" not in str(e.value)


def test_csv_rows_are_read_as_csv_not_as_lines(tmp_path):
    p = tmp_path / "u.csv"
    p.write_text('text,label\n"one\u2028two",a\nplain\x0cfeed,b\n', encoding="utf-8")  # line separators in cells
    assert D.load_classification(p) == (["one\u2028two", "plain\x0cfeed"], ["a", "b"])
    assert _classify_reads(p) == D.load_texts(p) == ["one\u2028two", "plain\x0cfeed"]
    trailing = _write(tmp_path / "trailing.csv", "text,label\nhi,a,\nbye,b,\n")  # empty fields past the header
    assert D.load_classification(trailing) == (["hi", "bye"], ["a", "b"])
    for first in (True, False):  # an unquoted comma shifted the label ("world"), or was a traceback
        rows = ["hello, world,pos", "ok,neg"]
        p = _write(tmp_path / f"comma{first}.csv", "text,label\n" + "\n".join(rows if first else rows[::-1]) + "\n")
        for read in (D.load_classification, D.load_texts, _classify_reads):
            with pytest.raises(EdgeftError, match=f"row {1 if first else 2} has more fields than the header") as e:
                read(p)
            assert "\n" not in str(e.value)
