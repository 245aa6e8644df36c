"""The spine: tiny fixtures load, the manifest round-trips, checksums catch tampering,
pull resolves names, and bad input is one line with exit code 2."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from edgeft import artifact, models
from edgeft.cli import app
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_dir


def _manifest() -> artifact.Manifest:
    return artifact.Manifest(
        task=artifact.Task.classification, architecture="bert",
        graph=artifact.Graph(file="model.onnx", opset=17, inputs=["input_ids", "attention_mask"],
                             outputs=["logits"], builder="torch.onnx"),
        tokenizer=artifact.Tokenizer(config_file=None), quantization=artifact.Quantization(scheme="int8"),
        classifier=artifact.Classifier(labels=["neg", "pos"], max_length=128),
    )


def test_tiny_models_load(tiny_llama_dir, tiny_gpt2_dir, tiny_bert_dir):
    from transformers import AutoModel, AutoTokenizer

    for d in (tiny_llama_dir, tiny_gpt2_dir, tiny_bert_dir):
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModel.from_pretrained(d)
        ids = tok("shall i compare thee to a summer's day", return_tensors="pt")
        assert model(**ids).last_hidden_state.shape[1] == ids["input_ids"].shape[1]


def test_manifest_round_trip_and_tamper(tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "tokenizer.json").write_text("{}")
    written = artifact.write_manifest(folder, _manifest())
    assert set(written.files) == {"model.onnx", "tokenizer.json"}
    again = artifact.verify(folder)
    assert again == written and again.classifier.labels == ["neg", "pos"]

    packed = artifact.pack(folder, tmp_path / "a.edgeft")
    unpacked, m = artifact.open_artifact(packed)
    assert m == written and (unpacked / "model.onnx").read_bytes() == b"graph"

    (folder / "model.onnx").write_bytes(b"grapH")
    with pytest.raises(EdgeftError, match="checksum"):
        artifact.verify(folder)
    (folder / "model.onnx").write_bytes(b"gra")
    with pytest.raises(EdgeftError, match="truncated"):
        artifact.verify(folder)


def test_newer_format_is_refused(tmp_path):
    d = _manifest().to_dict()
    d["format_version"] = artifact.FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(EdgeftError, match="newer"):
        artifact.read_manifest(tmp_path)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(dest) as tmp:
        (tmp / "whole").write_text("x")
    assert (dest / "whole").is_file()
    with pytest.raises(EdgeftError, match="already exists"):
        with atomic_dir(dest):
            pass


def test_resolve_model(tiny_bert_dir, tmp_path):
    assert models.resolve_model(str(tiny_bert_dir)) == tiny_bert_dir
    assert models.resolve_model("org/name") == "org/name"
    with pytest.raises(EdgeftError, match="not pulled"):
        models.resolve_model("minilm-l6")
    with pytest.raises(EdgeftError, match="not a Hugging Face model folder"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(EdgeftError, match="unknown model"):
        models.resolve_model("no-such-model")


def test_cli_bad_input_is_one_line_exit_2():
    res = CliRunner().invoke(app, ["pull", "no-such-model"])
    assert res.exit_code == 2
    assert "unknown model 'no-such-model'" in res.output
    assert "Traceback" not in res.output


def test_cli_models_lists_pullable():
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0
    assert "smollm2-135m-instruct" in res.output and "minilm-l6" in res.output


def test_open_artifact_rechecks_after_a_change(tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "tokenizer.json").write_text("{}")
    artifact.write_manifest(folder, _manifest())
    assert artifact.open_artifact(folder)[1].task is artifact.Task.classification
    assert artifact.open_artifact(folder)[1].files  # second open: from the stamp
    time.sleep(0.05)  # past the file system's timestamp granularity
    (folder / "model.onnx").write_bytes(b"grapH")  # same size, new content and mtime
    with pytest.raises(EdgeftError, match="checksum"):
        artifact.open_artifact(folder)
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(EdgeftError):
        artifact.open_artifact(folder)


def test_finished_folders_are_readable_by_others(tmp_path):
    import os
    import stat

    with atomic_dir(tmp_path / "out") as tmp:
        fd = os.open(tmp / "private", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    for p in (tmp_path / "out", tmp_path / "out" / "private"):
        assert p.stat().st_mode & stat.S_IROTH
