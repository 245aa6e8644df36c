"""The manifest fuzz test: every bad file name in every place a manifest names a file, through every loader.

Each case is a manifest with a valid digest (what anyone can recompute) that names a file
outside the artifact, not listed, or not a plain name; each must be one line from ``verify``
and an ``EdgeftError`` (never a traceback, never a load) from every entry point: the folder
checks (full and quick), the header check ``serve`` makes, a packed copy, and ``sign``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from test_integrity import make_classifier, one_line_refusal, run

from edgeft import artifact
from edgeft.errors import EdgeftError

BAD_NAMES = ["../evil/model.onnx", "/etc/passwd", "a/../../model.onnx", "./model.onnx", "..", ".", "", "a//b",
             "sub/", "\\\\server\\share\\x", "..\\model.onnx", "C:/Windows/x", "x\x00y", "line\nbreak", "tab\tx",
             "del\x7f", "a" * 300, "d/" + "b" * 256, "manifest.json", "model.onnx/inner", "not-listed.json",
             "\ud800.json", 5, ["model.onnx"], {"file": "model.onnx"}]
FIELDS = [("graph", "file"), ("graph", "genai_config"), ("tokenizer", "file"), ("tokenizer", "config_file"),
          ("tokenizer", "chat_template")]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("fuzz") / "art")


def _write(folder: Path, d: dict) -> None:
    d = json.loads(json.dumps(d))
    d["digest"] = artifact.manifest_digest(d) if _encodable(d) else "sha256:" + "0" * 64
    (folder / "manifest.json").write_bytes(artifact.manifest_file_bytes(d))


def _encodable(d: dict) -> bool:
    try:
        artifact.canonical_bytes(d)
    except EdgeftError:
        return False
    return True


def _every_loader_refuses(folder: Path, tmp_path: Path, case: str) -> None:
    res = run("verify", folder)
    one_line_refusal(res)
    assert "Traceback" not in res.output, case
    for check in artifact.Check:
        with pytest.raises(EdgeftError):
            artifact.open_artifact(folder, check)
    with pytest.raises(EdgeftError):
        artifact.check_header(folder)
    packed = tmp_path / "p.edgeft"
    with zipfile.ZipFile(packed, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, p.name)
    one_line_refusal(run("verify", packed))
    with pytest.raises(EdgeftError):
        artifact.open_artifact(packed)
    assert not (artifact.cache_root() / "unpacked").exists() or not any((artifact.cache_root() / "unpacked").iterdir())


@pytest.mark.parametrize("section,attr", FIELDS, ids=[f"{s}.{a}" for s, a in FIELDS])
def test_fuzz_names_the_runtime_opens(template, tmp_path, section, attr):
    base = json.loads((template / "manifest.json").read_text())
    tried = 0
    for i, name in enumerate(BAD_NAMES):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        for p in template.iterdir():
            if p.name != "manifest.json":
                (folder / p.name).write_bytes(p.read_bytes())
        d = json.loads(json.dumps(base))
        d[section][attr] = name
        _write(folder, d)
        _every_loader_refuses(folder, tmp_path, f"{section}.{attr}={name!r}")
        tried += 1
    assert tried == len(BAD_NAMES)


def test_fuzz_names_in_the_files_list(template, tmp_path):
    """A bad name as a listed file (its hash and size right): refused before any file is opened."""
    base = json.loads((template / "manifest.json").read_text())
    for i, name in enumerate(n for n in BAD_NAMES if isinstance(n, str) and n != "not-listed.json"):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        for p in template.iterdir():
            if p.name != "manifest.json":
                (folder / p.name).write_bytes(p.read_bytes())
        d = json.loads(json.dumps(base))
        d["files"][name] = dict(d["files"]["tokenizer.json"])
        _write(folder, d)
        _every_loader_refuses(folder, tmp_path, f"files[{name!r}]")


def test_a_listed_file_that_is_also_a_folder_is_refused(template, tmp_path):
    folder = tmp_path / "clash"
    folder.mkdir()
    d = json.loads((template / "manifest.json").read_text())
    d["files"]["model.onnx/x"] = dict(d["files"]["model.onnx"])
    _write(folder, d)
    with pytest.raises(EdgeftError, match="both as a file and as a folder"):
        artifact.read_manifest(folder)
