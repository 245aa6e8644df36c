"""Text-pair classifiers end to end: tune on (query, passage) pairs, export, classify pairs, rerank.

A tiny BERT is tuned a few steps on pairs written here from the Alpaca rows in tests/data
(an instruction with its own answer: relevant, "1"; with another row's answer: "0"), exported
unquantized, and held to PyTorch's pair probabilities; ``/v1/rerank`` is held to ``/v1/classify``
on the same pairs.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from runtime_artifacts import run

REPO = Path(__file__).resolve().parents[1]


def _pair_rows(n: int = 120, seed: int = 0) -> list[tuple[str, str, str]]:
    rows = json.loads((REPO / "tests" / "data" / "alpaca_200.json").read_text())[:n]
    rng = random.Random(seed)
    out = []
    for i, r in enumerate(rows):
        out.append((r["instruction"], r["output"], "1"))
        other = rows[(i + 1 + rng.randrange(len(rows) - 1)) % len(rows)]
        out.append((r["instruction"], other["output"], "0"))
    return out


def _write_pairs(path: Path, columns: tuple[str, str, str] = ("query", "passage", "label")) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        w.writerows(_pair_rows())
    return path


@pytest.fixture(scope="module")
def pair_run(tiny_bert_dir, tmp_path_factory) -> Path:
    from edgeft.tune import TuneConfig, tune

    root = tmp_path_factory.mktemp("pairs")
    return Path(tune(TuneConfig(model=str(tiny_bert_dir), data=_write_pairs(root / "pairs.csv"), out=root / "run",
                                max_length=48, batch_size=8, max_steps=4, lr=3e-3, warmup=0, progress=False,
                                threads=1, trainable_layers=2)))


@pytest.fixture(scope="module")
def pair_art(pair_run, tmp_path_factory) -> Path:
    from edgeft.export import ExportConfig, export

    out = tmp_path_factory.mktemp("pair-art") / "art"
    return Path(export(ExportConfig(source=str(pair_run), out=out, quantize="none", allow_degraded=True,
                                    gate_texts=16, threads=1), log=None))


def _torch_pair_probs(run_dir: Path, pairs: list[tuple[str, str]], max_length: int = 48) -> np.ndarray:
    """PyTorch's probabilities of the tuned model on pairs, through transformers' own pair encoding."""
    import torch

    from edgeft.export import ExportConfig
    from edgeft.export.merge import load_source

    source = load_source(ExportConfig(source=str(run_dir), out=run_dir.parent / "unused"))
    model, tok = source.model.eval(), source.tokenizer
    enc = tok([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", max_length=max_length,
              padding=True, return_token_type_ids=True, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**enc).logits.float(), -1).numpy()


# ---- data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("columns", [("sentence1", "sentence2", "label"), ("premise", "hypothesis", "label"),
                                     ("question", "answer", "label"), ("query", "passage", "label"),
                                     ("text", "text_pair", "label")])
def test_pair_columns_are_found_by_name(tmp_path, columns):
    from edgeft import data

    path = _write_pairs(tmp_path / "p.csv", columns)
    texts, labels = data.load_classification(path)
    assert texts[0] == tuple(_pair_rows()[0][:2]) and labels[:2] == ["1", "0"]


def test_pair_column_flag_and_bad_names(tmp_path):
    from edgeft import data
    from edgeft.errors import EdgeftError

    path = _write_pairs(tmp_path / "p.csv", ("a", "b", "label"))
    texts, _ = data.load_classification(path, text_column="a", pair_column="b")
    assert texts[1] == tuple(_pair_rows()[1][:2])
    assert data.load_classification(path, text_column="a")[0][0] == _pair_rows()[0][0]  # one text column
    with pytest.raises(EdgeftError, match="no column 'c'"):
        data.load_classification(path, text_column="a", pair_column="c")


def test_encoder_pairs_get_the_tokenizer_pair_encoding(tiny_bert_dir):
    from transformers import AutoTokenizer

    from edgeft.tune.dataset import collate, encode_inputs

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    ids, cut = encode_inputs(tok, [("the cat sat", "on the mat")], 32)
    want = tok("the cat sat", "on the mat", return_token_type_ids=True)
    assert cut == 0 and list(ids[0]) == want["input_ids"] and ids[0].type_ids == want["token_type_ids"]
    assert 1 in ids[0].type_ids
    batch = collate([(ids[0], 1)], tok.pad_token_id, __import__("edgeft.artifact").artifact.Task.classification)
    assert batch["token_type_ids"][0].tolist() == want["token_type_ids"]


def test_decoder_pairs_get_the_template(tiny_gpt2_dir):
    from transformers import AutoTokenizer

    from edgeft import data
    from edgeft.tune.dataset import encode_inputs

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    ids, _ = encode_inputs(tok, [("the cat sat", "on the mat")], 64)
    assert list(ids[0]) == tok("the cat sat\n---\non the mat")["input_ids"]
    assert data.pair_text(("a", "b")) == "a\n---\nb"


# ---- export and runtime -------------------------------------------------------------------------

def test_manifest_says_the_classifier_reads_pairs(pair_art):
    man = json.loads((pair_art / "manifest.json").read_text())
    assert man["classifier"]["pairs"] == {"template": None, "relevant_label": "1"}
    assert man["classifier"]["uses_token_type_ids"] is True
    assert man["gate"]["metrics"]["texts"] == 16


def test_runtime_pair_probabilities_equal_pytorch(pair_run, pair_art):
    from edgeft.runtime import TextClassifier

    pairs = [(a, b) for a, b, _ in _pair_rows()[:10]] + [("a short query", "a long passage " * 40)]
    clf = TextClassifier.open(pair_art, threads=1)
    got = clf.predict_proba(pairs)
    want = _torch_pair_probs(pair_run, pairs)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the pair matters: the same texts swapped, or as one text, give other scores
    assert not np.allclose(clf.predict_proba([(b, a) for a, b in pairs[:3]]), got[:3], atol=1e-4)
    np.testing.assert_allclose(clf.relevance(pairs), got[:, 1])


def test_a_decoder_classifier_reads_pairs_through_the_template(tiny_llama_dir, tmp_path):
    """A llama classifier has no pair encoding: tune, the manifest, the gate and the runtime all join a
    pair as ``text \\n---\\n text_pair``, and the runtime equals PyTorch on that text."""
    import torch

    from edgeft import data
    from edgeft.export import ExportConfig, export
    from edgeft.export.merge import load_source
    from edgeft.runtime import TextClassifier
    from edgeft.tune import TuneConfig, tune

    run_dir = tune(TuneConfig(model=str(tiny_llama_dir), data=_write_pairs(tmp_path / "p.csv", ("premise", "hypothesis",
                                                                                                  "label")),
                              out=tmp_path / "run", max_length=48, batch_size=8, max_steps=2, lr=3e-3, warmup=0,
                              progress=False, threads=1, trainable_layers=1))
    art = export(ExportConfig(source=str(run_dir), out=tmp_path / "art", quantize="none", allow_degraded=True,
                              gate_texts=8, threads=1), log=None)
    man = json.loads((Path(art) / "manifest.json").read_text())
    assert man["classifier"]["pairs"] == {"template": data.PAIR_TEMPLATE, "relevant_label": "1"}
    pairs = [(a, b) for a, b, _ in _pair_rows()[:4]]
    got = TextClassifier.open(art, threads=1).predict_proba(pairs)
    source = load_source(ExportConfig(source=str(run_dir), out=tmp_path / "unused"))
    with torch.no_grad():
        want = [torch.softmax(source.model(**source.tokenizer(data.pair_text(p), return_tensors="pt",
                                                               truncation=True, max_length=48)).logits, -1)[0].numpy()
                for p in pairs]
    np.testing.assert_allclose(got, np.stack(want), atol=1e-5)


def test_a_text_classifier_refuses_pairs(bert_art):
    from edgeft.errors import EdgeftError
    from edgeft.runtime import TextClassifier

    clf = TextClassifier.open(bert_art, threads=1)
    with pytest.raises(EdgeftError, match="not a pair classifier"):
        clf.predict_proba([("a", "b")])
    with pytest.raises(EdgeftError, match="not a pair classifier"):
        clf.relevance([("a", "b")])


def test_relevant_label_by_name():
    from edgeft import data

    assert data.relevant_label(["0", "1"]) == "1"
    assert data.relevant_label(["contradiction", "entailment", "neutral"]) == "entailment"
    assert data.relevant_label(["not_duplicate", "duplicate"]) == "duplicate"
    assert data.relevant_label(["cat", "dog"]) is None
    assert data.relevant_label(["score"]) is None


def test_classify_cli_reads_pairs(pair_art, tmp_path):
    from edgeft.runtime import TextClassifier

    pairs = [(a, b) for a, b, _ in _pair_rows()[:4]]
    want = TextClassifier.open(pair_art, threads=1).predict_proba(pairs)
    jl = tmp_path / "in.jsonl"
    jl.write_text("".join(json.dumps({"text": a, "text_pair": b}) + "\n" for a, b in pairs))
    res = run("classify", pair_art, "--input", jl, "--threads", 1)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.output.splitlines() if x.strip()]
    assert [r["text_pair"] for r in rows] == [b for _, b in pairs]
    np.testing.assert_allclose([r["scores"]["1"] for r in rows], want[:, 1], atol=1e-6)
    table = tmp_path / "in.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([("q", "doc"), *pairs])
    res = run("classify", pair_art, "--input", table, "--text-column", "q", "--pair-column", "doc", "--threads", 1)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.output.splitlines() if x.strip()]
    np.testing.assert_allclose([r["scores"]["1"] for r in rows], want[:, 1], atol=1e-6)


# ---- serving: /v1/classify pairs and /v1/rerank ------------------------------------------------

@pytest.fixture(scope="module")
def http(pair_art, bert_art):
    import httpx

    from test_server import KEY, start_cli_server, stop

    proc, url = start_cli_server([pair_art, bert_art], {"EDGEFT_API_KEY": KEY, "EDGEFT_MAX_INPUTS": "8",
                                                        "EDGEFT_BATCH_WAIT_MS": "5"},
                                 ["--name", "rel", "--name", "sentiment"])
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c
    rc, err = stop(proc)
    assert rc == 0, err[-2000:]


def test_classify_route_takes_pairs(http, pair_art):
    from edgeft.runtime import TextClassifier

    pairs = [(a, b) for a, b, _ in _pair_rows()[:5]]
    want = TextClassifier.open(pair_art, threads=1).predict_proba(pairs)
    got = http.post("/v1/classify", json={"model": "rel", "input": [list(p) for p in pairs]})
    assert got.status_code == 200, got.text
    np.testing.assert_allclose([d["scores"]["1"] for d in got.json()["data"]], want[:, 1], atol=1e-6)
    refused = http.post("/v1/classify", json={"model": "sentiment", "input": [["a", "b"]]})
    assert refused.status_code == 400 and "not a pair classifier" in refused.json()["error"]["message"]


def test_rerank_is_sorted_and_agrees_with_classify(http):
    query = _pair_rows()[0][0]
    docs = [b for _, b, _ in _pair_rows()[:7]]
    got = http.post("/v1/rerank", json={"model": "rel", "query": query, "documents": docs})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["model"] == "rel" and body["usage"]["total_tokens"] > 0
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and sorted(r["index"] for r in body["results"]) == list(range(7))
    assert all("document" not in r for r in body["results"])
    cls = http.post("/v1/classify", json={"model": "rel", "input": [[query, d] for d in docs]}).json()["data"]
    np.testing.assert_allclose(scores, [cls[r["index"]]["scores"]["1"] for r in body["results"]], atol=1e-6)
    top = http.post("/v1/rerank", json={"query": query, "documents": [{"text": d} for d in docs], "top_n": 2,
                                        "return_documents": True, "model": "rel"}).json()["results"]
    assert [r["index"] for r in top] == [r["index"] for r in body["results"][:2]]
    assert top[0]["document"] == {"text": docs[top[0]["index"]]}


@pytest.mark.parametrize("body,param", [
    ({"model": "rel", "documents": ["a"]}, "query"),
    ({"model": "rel", "query": "q"}, "documents"),
    ({"model": "rel", "query": "q", "documents": []}, "documents"),
    ({"model": "rel", "query": "q", "documents": [1]}, "documents"),
    ({"model": "rel", "query": "q", "documents": ["d"] * 9}, "documents"),  # over EDGEFT_MAX_INPUTS
    ({"model": "rel", "query": "q", "documents": ["d"], "top_n": 0}, "top_n"),
    ({"model": "rel", "query": "q", "documents": ["d"], "return_documents": "yes"}, "return_documents"),
    ({"model": "sentiment", "query": "q", "documents": ["d"]}, "model"),  # not a pair classifier
])
def test_bad_rerank_requests_are_400(http, body, param):
    got = http.post("/v1/rerank", json=body)
    assert got.status_code == 400, got.text
    assert got.json()["error"]["param"] == param
    if body["model"] == "sentiment":
        assert "'sentiment' is not a pair classifier" in got.json()["error"]["message"]


def test_rerank_needs_the_key(http):
    import httpx

    got = httpx.post(str(http.base_url) + "/v1/rerank", json={"model": "rel", "query": "q", "documents": ["d"]})
    assert got.status_code == 401
