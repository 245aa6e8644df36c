"""Bad input to the CLI: each case once a traceback (or a silent exit 0) is now one line and exit 2.

Commands run through typer's CliRunner on the tiny runtime artifacts; the non-UTF-8
argument runs the real CLI in a subprocess (only a real argv carries raw bytes). A
read-only folder is a chmod-ed one, or, for root (whom permissions do not stop), a
read-only mount; a full disk is a tiny tmpfs filled up (skipped where mounting is not allowed).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_artifacts import run


CLI = [sys.executable, "-c", "from edgeft.cli import main; main()"]


def one_line_error(res, *words: str) -> str:
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.output, repr(res.exception))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _cannot_write(folder: Path) -> bool:
    try:
        (folder / ".probe").write_bytes(b"x")
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


@pytest.fixture
def readonly_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        if _cannot_write(d):
            yield d
            return
        for cand in (Path("/sys"), Path("/proc/sys")):  # root ignores modes; a read-only mount stops it
            if cand.is_dir() and _cannot_write(cand):
                yield cand
                return
        pytest.skip("no read-only folder here (root, and no read-only mount)")
    finally:
        d.chmod(0o755)


@pytest.fixture
def full_dir(tmp_path):
    d = tmp_path / "full"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here to fill up")
    try:
        with contextlib.suppress(OSError), open(d / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        yield d
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)


# ---------------------------------------------------------------- tune

def test_tune_on_a_non_utf8_or_binary_csv_is_one_line(tiny_bert_dir, tmp_path):
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("text,label\ncaf\u00e9 cr\u00e8me,pos\nbad,neg\n".encode("latin-1"))
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"text,label\n" + bytes(range(256)) * 4)
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"text,label\nfine\x00,pos\nbad,neg\n")
    for path, words in ((latin, ("not UTF-8", "0xe9")), (binary, ("not UTF-8",)), (nul, ("NUL",))):
        res = run("tune", "-m", tiny_bert_dir, "-d", path, "-o", tmp_path / "run")
        one_line_error(res, str(path), *words)
        assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_tune_into_a_read_only_folder_fails_before_loading_the_model(readonly_dir, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\ngood,pos\nbad,neg\n" * 5)
    # the model does not exist: an error about the folder shows the check ran before the model was looked at
    res = run("tune", "-m", tmp_path / "no-such-model", "-d", data, "-o", readonly_dir / "run")
    one_line_error(res, "cannot write the run folder", str(readonly_dir))


def test_tune_onto_a_full_disk_fails_before_loading_the_model(full_dir, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\ngood,pos\nbad,neg\n" * 5)
    res = run("tune", "-m", tmp_path / "no-such-model", "-d", data, "-o", full_dir / "run")
    one_line_error(res, "cannot write the run folder", "No space left")


def test_check_writable_makes_missing_folders(tmp_path):
    from edgeft.fsutil import check_writable

    check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


# ---------------------------------------------------------------- classify

def test_classify_input_not_utf8_is_one_line(bert_art, tmp_path):
    for name in ("texts.csv", "texts.txt", "texts.jsonl"):
        f = tmp_path / name
        f.write_bytes(b"text\n\xff\xfe broken\n" if name.endswith("csv") else b"\xc3\x28 broken\n")
        one_line_error(run("classify", bert_art, "--input", f), "not UTF-8", str(f))


@pytest.mark.parametrize("name,content,says", [
    ("empty.csv", "", "is empty"), ("header.csv", "text\n", "has no rows"), ("header.tsv", "text\tid\n", "has no rows"),
    ("blank.txt", "\n  \n", "is empty"), ("empty.jsonl", "\n", "is empty"),
    ("emptycell.csv", "text\nfine\n\"\"\n", "row 2 has no value in column 'text'"),
    ("bad.jsonl", '"fine"\n{oops\n', "invalid JSON at line 2"), ("nocolumn.csv", "id,body\n1,hi\n", "--text-column")])
def test_classify_input_with_no_texts_is_one_line(bert_art, tmp_path, name, content, says):
    """The errors of ``edgeft.data``, the reader tune and export share (tests/test_data.py has them all)."""
    f = tmp_path / name
    f.write_text(content)
    one_line_error(run("classify", bert_art, "--input", f), says, str(f))
    one_line_error(run("embed", bert_art, "--input", f), says, str(f))


def test_classify_output_into_a_read_only_folder_is_one_line(bert_art, readonly_dir):
    out = readonly_dir / "labels.jsonl"
    res = run("classify", bert_art, "a fine film", "-o", out)
    one_line_error(res, "cannot write the results", str(readonly_dir))
    assert not out.exists()


def test_classify_a_huge_text_is_cut_before_tokenizing(bert_art, monkeypatch):
    from edgeft.data import CHARS_PER_TOKEN
    from edgeft.runtime import TextClassifier

    clf = TextClassifier.open(bert_art, threads=1)
    huge = "a gorgeous witty film " * 200_000  # 4.4 MB: tokenized whole it would be ~1M tokens
    bound = clf.max_length * CHARS_PER_TOKEN
    full = clf.tokenizer.encode(huge[: 4 * bound]).ids  # what truncation keeps, from a text well past the bound
    seen: list[int] = []
    real = clf.tokenizer

    class Spy:  # the real tokenizer, recording what it is asked to tokenize
        def encode_batch(self, texts):
            seen.extend(len(t) for t in texts)
            return real.encode_batch(texts)

    monkeypatch.setattr(clf, "tokenizer", Spy())
    got = clf.predict_proba([huge, "fine"])
    assert max(seen) <= bound < len(huge)
    monkeypatch.setattr(clf, "tokenizer", real)
    assert real.encode(huge[:bound]).ids == full  # the cut changes nothing the model sees
    assert got[0] == pytest.approx(clf.predict_proba([huge[: 4 * bound]])[0], abs=1e-6)


def test_tune_cuts_huge_rows_before_tokenizing(tiny_bert_dir):
    from transformers import AutoTokenizer

    from edgeft.data import CHARS_PER_TOKEN
    from edgeft.tune import dataset as DS

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    huge = "tender and funny " * 50_000
    (ids,), cut = DS._encode(tok, [huge], 32)
    (want,), _ = DS._encode(tok, [huge[: 8 * 32 * CHARS_PER_TOKEN]], 32)
    assert cut == 1 and len(ids) == 32 and ids == want


# ---------------------------------------------------------------- generate

def test_generate_with_a_negative_seed_is_one_line(llama_art):
    one_line_error(run("generate", llama_art, "Shall I", "--seed", -1, "-t", 1, "--max-new-tokens", 2), "seed")


def test_a_non_utf8_prompt_argument_is_one_line(llama_art, bert_art):
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    for cmd in (["generate", str(llama_art), b"caf\xe9 \xff", "--max-new-tokens", "2"], ["classify", str(bert_art), b"\xff\xfe"]):
        r = subprocess.run([*CLI, *cmd], capture_output=True, timeout=120, env=env)
        err = r.stderr.decode("utf-8", "replace")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert r.returncode == 2 and "Traceback" not in err, err
        assert len(lines) == 1 and "not valid UTF-8" in lines[0], err


def test_a_non_utf8_prompt_on_stdin_is_one_line(llama_art):
    res = run("generate", llama_art, "--max-new-tokens", 2, input=b"caf\xe9\n")
    one_line_error(res, "stdin", "not UTF-8")


def test_tune_cuts_huge_chat_rows_before_tokenizing(tiny_llama_dir, monkeypatch):
    from transformers import AutoTokenizer

    from edgeft.data import CHARS_PER_TOKEN
    from edgeft.tune import dataset as DS

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    long_q = [{"role": "user", "content": "summer " * 40_000}, {"role": "assistant", "content": "No."}]
    long_a = [{"role": "user", "content": "Sing."}, {"role": "assistant", "content": "thee " * 40_000}]
    want = {}
    for name, msgs in (("q", long_q), ("a", long_a)):  # the full tokenization, truncated afterwards
        prompt, answer = DS.D.render_chat(tok, msgs)
        p, a = tok(prompt, add_special_tokens=False)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
        want[name] = (p + a)[:32], ([DS.IGNORE] * len(p) + a)[:32]
    seen: list[int] = []
    real = tok.__class__.__call__

    def spy(self, text, *args, **kw):
        seen.append(len(text))
        return real(self, text, *args, **kw)

    monkeypatch.setattr(tok.__class__, "__call__", spy)
    examples, cut = DS._chat_examples(tok, [long_q, long_a], 32)
    assert max(seen) <= 32 * CHARS_PER_TOKEN and cut == 2
    assert examples == [want["a"]]  # the long question leaves no answer within 32 tokens: dropped, as before


# ---------------------------------------------------------------- what a path is, and outputs over inputs

def test_an_input_that_is_not_a_file_says_what_it_is(bert_art, llama_art, tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    for path, kind in ((Path("/dev/null"), "is a character device, not a file"), (tmp_path, "is a folder, not a file"),
                       (fifo, "is a named pipe (FIFO), not a file"), (tmp_path / "none.txt", "does not exist")):
        one_line_error(run("classify", bert_art, "--input", path), f"--input {path} {kind}")
        one_line_error(run("generate", llama_art, "--input", path), f"--input {path} {kind}")


def test_an_output_that_is_its_input_is_refused_before_it_is_touched(bert_art, llama_art, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a fine film\n")
    one_line_error(run("classify", bert_art, "--input", texts, "-o", texts), "--output", "is --input itself")
    one_line_error(run("embed", bert_art, "--input", texts, "-o", texts), "is --input itself")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"Once upon"\n')
    one_line_error(run("generate", llama_art, "--input", prompts, "-o", prompts, "--max-new-tokens", "2"), "is --input itself")
    assert texts.read_text() == "a fine film\n" and prompts.read_text() == '"Once upon"\n'


def test_an_output_that_is_a_folder_is_one_line(bert_art, llama_art, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"Once upon"\n')
    folder = tmp_path / "results"
    folder.mkdir()
    one_line_error(run("generate", llama_art, "--input", prompts, "-o", folder, "--max-new-tokens", "2"),
                   f"--output {folder} is a folder")
    one_line_error(run("classify", bert_art, "a fine film", "-o", folder), f"--output {folder} is a folder")


def test_a_json_schema_nested_thousands_deep_is_one_line(llama_art, tmp_path):
    schema = tmp_path / "deep.json"
    schema.write_text('{"type": "object", "properties": {"a": ' * 3000 + "{}" + "}}" * 3000)
    one_line_error(run("generate", llama_art, "hi", "--json-schema", schema, "--max-new-tokens", "2"), "nests too deeply")


def test_results_onto_a_full_disk_are_one_line_saying_what_was_needed(bert_art, full_dir):
    (full_dir / "filler").unlink()  # room for the write probe (4 KB), not for the results (about 30 KB)
    with contextlib.suppress(OSError), open(full_dir / "filler", "wb") as fh:
        fh.write(b"\0" * (64 * 1024 - 12 * 1024))
    texts = ["a text long enough that two hundred of them need more room than is left"] * 200
    one_line_error(run("classify", bert_art, *texts, "-o", full_dir / "labels.jsonl"),
                   "no space left to write", "MB needed", "free")
    assert sorted(p.name for p in full_dir.iterdir()) == ["filler"]


# ---------------------------------------------------------------- export and tune over their own inputs

def test_export_onto_its_own_source_is_refused_before_anything_is_deleted(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    for out, words in ((run_dir, "is the source itself"), (run_dir / "art", "lies inside the source"),
                       (tmp_path, "contains the source")):
        one_line_error(run("export", run_dir, "-o", out, "--overwrite"), f"--out {out}", words)
    assert (run_dir / "run.json").read_text() == "{}"
    data = tmp_path / "gate.csv"
    data.write_text("text,label\na,b\n")
    one_line_error(run("export", "x", "-o", tmp_path, "--eval-data", data, "--overwrite"), "contains --eval-data")
    assert data.exists()


def test_a_path_like_export_source_that_is_not_there_is_local(tmp_path, monkeypatch):
    from edgeft.export import pipeline

    def no_load(*a, **kw):
        raise AssertionError("the source was looked up (hub) though it is a local path")

    monkeypatch.setattr(pipeline, "_export", no_load)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for source in ("runs/missing", "./missing", "runs/a/b"):
        one_line_error(run("export", source, "-o", tmp_path / "art"), f"{source} does not exist")


def test_tune_into_a_folder_that_holds_its_data_is_refused(tiny_bert_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    data = out / "d.csv"
    data.write_text("text,label\ngood,pos\nbad,neg\n" * 5)
    one_line_error(run("tune", "-m", tiny_bert_dir, "-d", data, "-o", out, "--overwrite"),
                   "--out", "contains --data")
    one_line_error(run("tune", "-m", tiny_bert_dir, "-d", data, "-o", tmp_path / "x", "--eval-data",
                       tmp_path / "x.partial" / "e.csv", "--resume"), "the work folder", "contains --eval-data")
    assert data.exists()
