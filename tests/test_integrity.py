"""An artifact that was changed is refused: checksums, the manifest's digest, packed members, signatures.

The artifact here is a real one made by hand in milliseconds: a three-label ONNX
classifier (mean of token embeddings) with a word-level tokenizer, so ``classify`` and the
runtime really load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeft import artifact
from edgeft.cli import app
from edgeft.errors import EdgeftError

LABELS = ["alpha", "beta", "gamma"]
WORDS = ["[PAD]", "[UNK]", "good", "bad", "fine", "odd", "sun", "rain"]


def _graph(n_out: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.normal(size=(len(WORDS), 256)).astype(np.float32), "emb")
    head = numpy_helper.from_array(rng.normal(size=(256, n_out)).astype(np.float32), "head")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["pooled", "head"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny-classifier",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])], [emb, head])
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def make_classifier(folder: Path, labels=LABELS, n_out: int = 3) -> Path:
    """A tiny, real classifier artifact folder (graph, tokenizer, manifest with digest)."""
    import onnx
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True)
    onnx.save(_graph(n_out), folder / "model.onnx")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    artifact.write_manifest(folder, artifact.Manifest(
        task=artifact.Task.classification, architecture="bert",
        graph=artifact.Graph(file="model.onnx", opset=17, inputs=["input_ids", "attention_mask"],
                             outputs=["logits"], builder="torch.onnx"),
        tokenizer=artifact.Tokenizer(config_file=None, pad_token_id=0), quantization=artifact.Quantization(scheme="none"),
        classifier=artifact.Classifier(labels=list(labels), max_length=16)))
    return folder


@pytest.fixture
def art(tmp_path) -> Path:
    return make_classifier(tmp_path / "art")


def run(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_line_refusal(res, *needles):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    message = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(message) == 1, res.stderr
    for n in needles:
        assert n in res.output, res.output


def flip_byte_keep_mtime(path: Path, offset: int | None = None) -> None:
    """Rewrite one byte in place, then put the mtime back (what a careful attacker does)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    with open(path, "r+b") as fh:  # same inode, same size
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def largest(folder: Path) -> Path:
    return max((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)


# ---------------------------------------------------------------- folders: bytes and stamps

def test_verify_hashes_every_byte_even_after_a_verified_stamp(art):
    assert run("verify", art).exit_code == 0
    assert run("classify", art, "good sun").exit_code == 0  # quick check: leaves a stamp
    flip_byte_keep_mtime(largest(art))
    one_line_refusal(run("verify", art), "does not match its checksum")
    one_line_refusal(run("classify", art, "good sun"), "does not match its checksum")  # ctime moved
    with pytest.raises(EdgeftError, match="checksum"):
        artifact.open_artifact(art, artifact.Check.full)


def test_quick_stamp_records_size_mtime_ctime_inode(art):
    artifact.open_artifact(art, artifact.Check.quick)
    stamp = json.loads(artifact._stamp_path(art).read_text())
    st = (art / "model.onnx").stat()
    assert stamp["files"]["model.onnx"] == [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    assert set(stamp["files"]) == {"manifest.json", "model.onnx", "tokenizer.json"}
    # replaced by an identical copy (new inode): hashed again, and still fine
    copy = art / "tok.tmp"
    copy.write_bytes((art / "tokenizer.json").read_bytes())
    os.replace(copy, art / "tokenizer.json")
    assert not artifact._stamp_ok(art, (art / "manifest.json").read_bytes())
    artifact.open_artifact(art, artifact.Check.quick)
    assert artifact._stamp_ok(art, (art / "manifest.json").read_bytes())


def test_serve_loads_with_a_full_check(art, monkeypatch):
    from edgeft.runtime import serve as server
    from edgeft.runtime.serve.metrics import Registry

    artifact.open_artifact(art, artifact.Check.quick)  # a stamp that a quick check would trust
    calls = []
    monkeypatch.setattr(artifact, "_stamp_ok", lambda *a: calls.append(a) or True)
    flip_byte_keep_mtime(largest(art))
    with pytest.raises(EdgeftError, match="checksum"):
        server.load_models(server.ServeConfig(artifacts=(art,)), Registry())
    assert calls == []  # never asked


# ---------------------------------------------------------------- the manifest is bound to its files

def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_bytes(artifact.manifest_file_bytes(d))  # as edgeft writes it: only the content differs


def test_reversed_labels_in_the_manifest_are_refused(art):
    before = run("classify", art, "good sun")
    assert before.exit_code == 0
    _edit_manifest(art, lambda d: d["classifier"]["labels"].reverse())
    for check in artifact.Check:
        with pytest.raises(EdgeftError, match="does not match its digest"):
            artifact.open_artifact(art, check)
    one_line_refusal(run("classify", art, "good sun"), "does not match its digest")
    one_line_refusal(run("verify", art), "does not match its digest")


def test_a_file_hash_edited_in_the_manifest_is_refused(art):
    _edit_manifest(art, lambda d: d["files"]["tokenizer.json"].update(sha256="0" * 64))
    with pytest.raises(EdgeftError, match="digest"):
        artifact.verify(art)


def test_label_count_that_does_not_match_the_graph_is_one_line(tmp_path):
    from edgeft.runtime import TextClassifier

    two = make_classifier(tmp_path / "two", labels=["yes", "no"], n_out=3)  # digest is valid
    with pytest.raises(EdgeftError, match="2 labels but the graph returns 3 scores"):
        TextClassifier.open(two)
    one_line_refusal(run("classify", two, "good"), "2 labels but the graph returns 3")
    three = make_classifier(tmp_path / "three")
    probs = TextClassifier.open(three).predict_proba(["good sun", "bad rain"])
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_an_artifact_without_a_digest_loads_with_one_warning(art, caplog):
    _edit_manifest(art, lambda d: d.pop("digest"))
    artifact._warned.clear()
    with caplog.at_level("WARNING", logger="edgeft.artifact"):
        m = artifact.verify(art)
        artifact.open_artifact(art, artifact.Check.quick)
    assert m.digest is None and m.classifier.labels == LABELS
    warnings = [r.getMessage() for r in caplog.records if r.name == "edgeft.artifact"]
    assert len(warnings) == 1 and "no manifest digest" in warnings[0] and "\n" not in warnings[0]


# ---------------------------------------------------------------- packed files

def _rezip(src: Path, dest: Path, change=None, extra=()) -> Path:
    """Copy a packed file member by member, with ``change(name, data) -> data`` and extra ZipInfo members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, change(info.filename, data) if change else data)
        for info, data in extra:
            zout.writestr(info, data)
    return dest


def _flip(name, data, target="model.onnx"):
    if name != target:
        return data
    b = bytearray(data)
    b[len(b) // 2] ^= 1
    return bytes(b)


@pytest.fixture
def packed(art, tmp_path) -> Path:
    return artifact.pack(art, tmp_path / "art.edgeft")


def _unpacked_dirs() -> list[Path]:
    root = artifact.cache_root() / "unpacked"
    return sorted(root.iterdir()) if root.is_dir() else []


def test_a_stale_unpacked_copy_is_not_reused_for_changed_members(packed, tmp_path):
    for check in artifact.Check:
        folder, _ = artifact.open_artifact(packed, check)  # unpacked once: the manifest's cache slot exists
    flipped = _rezip(packed, tmp_path / "flipped.edgeft", _flip)
    for check in artifact.Check:
        with pytest.raises(EdgeftError, match="model.onnx"):
            artifact.open_artifact(flipped, check)
    one_line_refusal(run("classify", flipped, "good"), "model.onnx")
    # the cached copy itself changed behind the stamp's back: a quick load unpacks again
    flip_byte_keep_mtime(folder / "model.onnx")
    again, _ = artifact.open_artifact(packed, artifact.Check.quick)
    assert artifact.verify(again).files


def test_a_full_check_reuses_a_sound_copy_and_replaces_a_damaged_one(packed):
    folder, _ = artifact.open_artifact(packed)
    inode = (folder / "model.onnx").stat().st_ino
    assert artifact.open_artifact(packed)[0] == folder and (folder / "model.onnx").stat().st_ino == inode
    flip_byte_keep_mtime(folder / "model.onnx")
    again, _ = artifact.open_artifact(packed)
    assert again == folder and (folder / "model.onnx").stat().st_ino != inode and artifact.verify(folder).files


def test_link_and_unknown_members_are_refused_before_anything_is_written(packed, tmp_path):
    link = zipfile.ZipInfo("evil")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with_link = _rezip(packed, tmp_path / "link.edgeft", extra=[(link, "/etc/passwd")])
    unknown = _rezip(packed, tmp_path / "unknown.edgeft", extra=[(zipfile.ZipInfo("extra.bin"), b"x")])
    assert _unpacked_dirs() == []
    with pytest.raises(EdgeftError, match="'evil' is a link"):
        artifact.open_artifact(with_link)
    with pytest.raises(EdgeftError, match="'extra.bin' is not in the manifest"):
        artifact.open_artifact(unknown)
    # a link in place of a listed file
    as_link = _rezip(packed, tmp_path / "aslink.edgeft",
                     change=lambda n, d: d)  # same members, then the listed one replaced below
    with zipfile.ZipFile(as_link) as z:
        infos = {i.filename: (i, z.read(i)) for i in z.infolist()}
    with zipfile.ZipFile(as_link, "w") as z:
        for name, (info, data) in infos.items():
            if name == "tokenizer.json":
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, data)
    with pytest.raises(EdgeftError, match="'tokenizer.json' is a link"):
        artifact.open_artifact(as_link)
    assert _unpacked_dirs() == []  # nothing was written for any of them
    assert not list((artifact.cache_root()).glob("unpacked/.*"))


def test_an_oversized_member_is_refused_before_it_is_read(packed, tmp_path, monkeypatch):
    big = _rezip(packed, tmp_path / "big.edgeft",
                 lambda n, d: d + b"\0" * (4 << 20) if n == "model.onnx" else d)
    reads = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open",
                        lambda self, name, *a, **k: reads.append(getattr(name, "filename", name)) or
                        real_open(self, name, *a, **k))
    with pytest.raises(EdgeftError, match=r"'model.onnx' is 42\d{5} bytes, the manifest says \d+"):
        artifact.open_artifact(big)
    assert reads == ["manifest.json"] and _unpacked_dirs() == []


def test_members_are_streamed_within_their_manifest_size(packed):
    """A header that understates a member's length cannot make unpacking write more than the manifest says."""
    class Sink:
        n = 0

        def write(self, b):
            self.n += len(b)

    with zipfile.ZipFile(packed) as zf:
        info = zf.getinfo("model.onnx")
        manifest = artifact.read_manifest(artifact.open_artifact(packed)[0])
        meta = dict(manifest.files["model.onnx"], size=100)  # the manifest allows less than the member holds
        sink = Sink()
        with pytest.raises(EdgeftError, match="longer than the manifest's 100 bytes"):
            artifact._stream_member(zf, packed, info, meta, sink)
        assert sink.n <= 100


def test_a_corrupted_packed_file_on_a_fresh_cache_is_one_line(packed, tmp_path):
    raw = bytearray(packed.read_bytes())
    with zipfile.ZipFile(packed) as zf:
        info = zf.getinfo("model.onnx")
    raw[info.header_offset + 30 + len(info.filename) + info.file_size // 2] ^= 0x10  # inside the member's data
    bad = tmp_path / "bad.edgeft"
    bad.write_bytes(bytes(raw))
    assert _unpacked_dirs() == []
    with pytest.raises(EdgeftError, match="model.onnx|corrupted"):
        artifact.open_artifact(bad)
    one_line_refusal(run("verify", bad))
    one_line_refusal(run("classify", bad, "good"))
    cut = tmp_path / "cut.edgeft"
    cut.write_bytes(bytes(raw[: len(raw) // 2]))
    one_line_refusal(run("verify", cut), "not a packed edgeft artifact")
    assert _unpacked_dirs() == []


def test_verify_on_a_packed_file_writes_nothing(packed):
    res = run("verify", packed)
    assert res.exit_code == 0 and "ok" in res.output
    assert _unpacked_dirs() == []


# ---------------------------------------------------------------- signatures

@pytest.fixture
def keys(tmp_path):
    pytest.importorskip("cryptography")
    out = {}
    for name in ("old", "new", "other"):
        res = run("keygen", tmp_path / f"{name}.pem")
        assert res.exit_code == 0, res.output
        out[name] = (tmp_path / f"{name}.pem", tmp_path / f"{name}.pem.pub")
    return out


def test_keygen_writes_standard_pem_with_a_private_mode(keys):
    from cryptography.hazmat.primitives import serialization

    private, public = keys["old"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    serialization.load_pem_private_key(private.read_bytes(), password=None)
    serialization.load_pem_public_key(public.read_bytes())
    one_line_refusal(run("keygen", private), "already exists")


def test_signed_folder_and_packed_file_against_trusted_keys(art, keys, tmp_path):
    old_priv, old_pub = keys["old"]
    one_line_refusal(run("verify", art, "--trusted-key", old_pub), "is not signed")
    assert run("sign", art, "--key", old_priv).exit_code == 0
    ok = run("verify", art, "--trusted-key", old_pub)
    assert ok.exit_code == 0 and "signed by trusted key" in ok.output
    one_line_refusal(run("verify", art, "--trusted-key", keys["other"][1]), "not a trusted key")
    assert run("verify", art).exit_code == 0  # no trusted key asked for: the digest still holds

    packed = artifact.pack(art, tmp_path / "signed.edgeft")
    assert run("verify", packed, "--trusted-key", old_pub).exit_code == 0
    unsigned = artifact.pack(make_classifier(tmp_path / "plain"), tmp_path / "plain.edgeft")
    one_line_refusal(run("verify", unsigned, "--trusted-key", old_pub), "is not signed")
    assert run("sign", unsigned, "--key", old_priv).exit_code == 0  # a packed file is signed in place
    assert run("verify", unsigned, "--trusted-key", old_pub).exit_code == 0


def test_rotation_several_trusted_keys_from_the_environment(tmp_path, keys):
    a = make_classifier(tmp_path / "a")
    b = make_classifier(tmp_path / "b")
    run("sign", a, "--key", keys["old"][0])
    run("sign", b, "--key", keys["new"][0])
    env = {"EDGEFT_TRUSTED_KEY": f"{keys['old'][1]}{os.pathsep}{keys['new'][1]}"}
    assert run("verify", a, env=env).exit_code == 0
    assert run("verify", b, env=env).exit_code == 0
    one_line_refusal(run("verify", b, env={"EDGEFT_TRUSTED_KEY": str(keys["old"][1])}), "not a trusted key")
    one_line_refusal(run("verify", a, "--trusted-key", keys["new"][1], env=env), "not a trusted key")


def test_a_recomputed_digest_does_not_pass_a_signature(art, keys):
    """An attacker can fix the digest after an edit, but cannot sign it."""
    from edgeft.signing import load_trusted_keys

    run("sign", art, "--key", keys["old"][0])
    trusted = load_trusted_keys([keys["old"][1]])
    _edit_manifest(art, lambda d: (d["classifier"]["labels"].reverse(), d.update(digest=artifact.manifest_digest(d))))
    assert artifact.verify(art).classifier.labels == LABELS[::-1]  # a digest alone is fooled
    with pytest.raises(EdgeftError, match="signature by key .* does not match"):
        artifact.verify(art, trusted)


def test_serve_refuses_unsigned_and_wrongly_signed_artifacts(tmp_path, keys, monkeypatch):
    from edgeft.runtime import serve as server
    from edgeft.runtime.serve.metrics import Registry

    good, plain, other = (make_classifier(tmp_path / n) for n in ("good", "plain", "other"))
    run("sign", good, "--key", keys["new"][0])
    run("sign", other, "--key", keys["other"][0])
    cfg = lambda a, **k: server.ServeConfig(artifacts=(a,), **k)  # noqa: E731
    trusted = (keys["old"][1], keys["new"][1])
    assert "good" in server.load_models(cfg(good, trusted_keys=trusted), Registry())
    with pytest.raises(EdgeftError, match="is not signed"):
        server.load_models(cfg(plain, trusted_keys=trusted), Registry())
    with pytest.raises(EdgeftError, match="not a trusted key"):
        server.load_models(cfg(other, trusted_keys=trusted), Registry())
    monkeypatch.setenv("EDGEFT_TRUSTED_KEY", str(keys["new"][1]))
    res = run("serve", plain, "--port", 0)
    assert res.exit_code != 0 and "is not signed" in res.output


def test_bad_key_files_are_one_line(art, tmp_path, keys):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    one_line_refusal(run("sign", art, "--key", junk), "not a PEM private key")
    one_line_refusal(run("sign", art, "--key", tmp_path / "missing.pem"), "does not exist")
    one_line_refusal(run("verify", art, "--trusted-key", junk), "not a PEM public key")
    one_line_refusal(run("sign", art, "--key", keys["old"][1]), "not a PEM private key")


def test_export_sign_writes_a_signed_artifact(tiny_bert_dir, tmp_path, keys):
    from runtime_artifacts import GATE, LABELS as BERT_LABELS, REPO, _seeded_classifier

    from edgeft.signing import load_trusted_keys

    src = _seeded_classifier(tiny_bert_dir, tmp_path / "bert")
    out = tmp_path / "signed-art"
    args = ["export", src, "-o", out, "-q", "none", "--task", "classification", "--labels", ",".join(BERT_LABELS),
            "--eval-data", REPO / "demo" / "sst2_2k.csv", "--gate-texts", GATE["gate_texts"], "--threads", 1,
            "--allow-degraded", "--no-progress"]
    one_line_refusal(run(*args, "--sign", keys["old"][1]), "not a PEM private key")  # before any work
    assert not out.exists()
    res = run(*args, "--sign", keys["old"][0])
    assert res.exit_code == 0, res.output
    m = artifact.verify(out, load_trusted_keys([keys["old"][1]]))
    assert m.signature["key_id"] == load_trusted_keys([keys["old"][1]])[0].id
    with pytest.raises(EdgeftError, match="not a trusted key"):
        artifact.verify(out, load_trusted_keys([keys["new"][1]]))


# ---------------------------------------------------------------- file names: nothing outside the artifact

def _signed_by_hand(folder: Path, private: Path, edit) -> None:
    """What a careless signer does: edit the manifest, reseal its digest and sign it, bypassing edgeft sign's checks."""
    from edgeft.signing import load_private_key, sign_digest

    path = folder / "manifest.json"
    d = json.loads(path.read_text())
    edit(d)
    d = artifact.sealed(d)
    d["signature"] = sign_digest(load_private_key(private), d["digest"])
    path.write_bytes(artifact.manifest_file_bytes(d))


def test_a_signed_manifest_cannot_point_the_graph_or_tokenizer_outside(tmp_path, keys):
    """The issue's attack: graph.file '../evil/model.onnx' (unhashed, changeable after signing), or /etc/passwd."""
    from edgeft.runtime import serve as server
    from edgeft.runtime.serve.metrics import Registry
    from edgeft.signing import load_trusted_keys

    evil = tmp_path / "evil"
    evil.mkdir()
    good = make_classifier(tmp_path / "good")
    (evil / "model.onnx").write_bytes((good / "model.onnx").read_bytes())
    cases = {"graph": ("graph", "file", "../evil/model.onnx"), "tok": ("tokenizer", "file", "/etc/passwd"),
             "tpl": ("tokenizer", "chat_template", "../evil/model.onnx"),
             "cfg": ("tokenizer", "config_file", "/etc/passwd")}
    trusted = load_trusted_keys([keys["old"][1]])
    for name, (section, attr, value) in cases.items():
        art = make_classifier(tmp_path / name)
        _signed_by_hand(art, keys["old"][0], lambda d, s=section, a=attr, v=value: d[s].update({a: v}))
        refusal = "is not a plain relative name" if value.startswith("/") else "'..'"
        one_line_refusal(run("verify", art, "--trusted-key", keys["old"][1]), f"{section}.{attr}", refusal)
        one_line_refusal(run("classify", art, "good"), refusal)
        for check in artifact.Check:
            with pytest.raises(EdgeftError, match=f"{section}.{attr}"):
                artifact.open_artifact(art, check, trusted)
        with pytest.raises(EdgeftError, match=refusal):
            artifact.check_header(art, trusted)  # what serve checks before it listens
        with pytest.raises(EdgeftError, match=refusal):
            server.load_models(server.ServeConfig(artifacts=(art,), trusted_keys=(keys["old"][1],)), Registry())
        one_line_refusal(run("sign", art, "--key", keys["old"][0]), refusal)  # edgeft sign will not sign it


def test_a_name_the_runtime_opens_must_be_a_listed_file(art):
    """tokenizer.json sits in the folder, listed; a second copy under another name is not listed: refused."""
    (art / "tok2.json").write_bytes((art / "tokenizer.json").read_bytes())
    _edit_manifest(art, lambda d: (d["tokenizer"].update(file="tok2.json"),
                                   d.update(digest=artifact.manifest_digest(d))))
    one_line_refusal(run("verify", art), "tokenizer.file 'tok2.json' is not one of its listed files")
    with pytest.raises(EdgeftError, match="not one of its listed files"):
        artifact.open_artifact(art, artifact.Check.quick)


def test_a_listed_file_under_a_linked_folder_is_refused(art, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_bytes((art / "model.onnx").read_bytes())
    (art / "model.onnx").unlink()
    (art / "sub").symlink_to(outside, target_is_directory=True)

    def move(d):
        d["files"]["sub/model.onnx"] = d["files"].pop("model.onnx")
        d["graph"]["file"] = "sub/model.onnx"
        d["digest"] = artifact.manifest_digest(d)

    _edit_manifest(art, move)
    one_line_refusal(run("verify", art), "sub/model.onnx is under sub, which is a link")
    with pytest.raises(EdgeftError, match="under sub, which is a link"):
        artifact.open_artifact(art, artifact.Check.quick)


def test_a_linked_manifest_is_refused(art, tmp_path):
    moved = tmp_path / "elsewhere.json"
    (art / "manifest.json").rename(moved)
    (art / "manifest.json").symlink_to(moved)
    one_line_refusal(run("verify", art), "manifest.json is a link")


# ---------------------------------------------------------------- verify: nothing unlisted in the folder

@pytest.mark.parametrize("thing", ["link to a folder outside", "dangling link", "FIFO", "empty folder",
                                   "link to a listed file", "folder of an unlisted file"])
def test_verify_refuses_unlisted_things_in_the_folder(art, tmp_path, thing):
    if thing == "link to a folder outside":
        (tmp_path / "outside").mkdir()
        (art / "data").symlink_to(tmp_path / "outside", target_is_directory=True)
        expected = "data (a link)"
    elif thing == "dangling link":
        (art / "gone").symlink_to(tmp_path / "nothing-here")
        expected = "gone (a link)"
    elif thing == "FIFO":
        os.mkfifo(art / "pipe")
        expected = "pipe (a FIFO)"
    elif thing == "empty folder":
        (art / "empty").mkdir()
        expected = "empty (a folder)"
    elif thing == "link to a listed file":
        (art / "again.json").symlink_to(art / "tokenizer.json")
        expected = "again.json (a link)"
    else:
        (art / "more").mkdir()
        (art / "more" / "x.bin").write_bytes(b"x")
        expected = "more (a folder), more/x.bin"
    one_line_refusal(run("verify", art), "not in the manifest", expected)
    for check in artifact.Check:
        with pytest.raises(EdgeftError, match="not in the manifest"):
            artifact.open_artifact(art, check)


def test_a_quick_stamp_sees_a_link_or_fifo_added_after_it(art):
    artifact.open_artifact(art, artifact.Check.quick)  # a stamp
    os.mkfifo(art / "pipe")
    with pytest.raises(EdgeftError, match=r"pipe \(a FIFO\)"):
        artifact.open_artifact(art, artifact.Check.quick)


# ---------------------------------------------------------------- a signed manifest: its bytes, not only its meaning

@pytest.fixture
def signed(art, keys):
    assert run("sign", art, "--key", keys["old"][0]).exit_code == 0
    return art


def _raw_edit(folder: Path, change) -> None:
    path = folder / "manifest.json"
    path.write_bytes(change(path.read_bytes()))


def test_edgeft_writes_and_signs_the_canonical_bytes(signed, tmp_path, keys):
    raw = (signed / "manifest.json").read_bytes()
    assert raw == artifact.manifest_file_bytes(json.loads(raw))
    packed = artifact.pack(signed, tmp_path / "s.edgeft")
    assert run("verify", packed, "--trusted-key", keys["old"][1]).exit_code == 0
    plain = artifact.pack(make_classifier(tmp_path / "plain"), tmp_path / "plain.edgeft")
    assert run("sign", plain, "--key", keys["old"][0]).exit_code == 0
    with zipfile.ZipFile(plain) as zf:
        raw = zf.read("manifest.json")
    assert raw == artifact.manifest_file_bytes(json.loads(raw))


def test_a_duplicate_key_before_the_real_one_is_refused(signed, keys):
    """'"task": "embedding", ..., "task": "classification"': Python keeps the last, other readers the first."""
    _raw_edit(signed, lambda raw: raw.replace(b"{", b'{\n  "task": "embedding",', 1))
    one_line_refusal(run("verify", signed, "--trusted-key", keys["old"][1]), "has the key 'task' twice")
    one_line_refusal(run("verify", signed), "has the key 'task' twice")  # no key asked for: refused all the same
    with pytest.raises(EdgeftError, match="twice"):
        artifact.open_artifact(signed, artifact.Check.quick)


def test_the_digest_covers_key_order_and_older_sorted_digests_still_verify(signed, keys):
    """Key order carries meaning (the gate's candidates in the order tried): reordering is a change."""
    path = signed / "manifest.json"
    d = json.loads(path.read_bytes())
    path.write_bytes(artifact.manifest_file_bytes(dict(reversed(list(d.items())))))
    one_line_refusal(run("verify", signed), "does not match its digest")
    one_line_refusal(run("verify", signed, "--trusted-key", keys["old"][1]), "does not match its digest")
    # an artifact sealed before key order counted (digest over sorted keys) verifies as before
    legacy = {k: v for k, v in d.items() if k not in ("digest", "signature")}
    body = json.dumps(legacy, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    legacy["digest"] = "sha256:" + hashlib.sha256(b"edgeft-manifest-v1\n" + body).hexdigest()
    path.write_bytes(artifact.manifest_file_bytes(legacy))
    assert artifact.verify(signed).digest == legacy["digest"]
    legacy["files"] = dict(reversed(list(legacy["files"].items())))  # its order is not covered: still fine
    path.write_bytes(artifact.manifest_file_bytes(legacy))
    assert artifact.verify(signed).digest == legacy["digest"]


@pytest.mark.parametrize("change", ["crlf", "spaces", "escape", "no final newline"])
def test_a_signed_manifest_in_other_bytes_is_refused(signed, keys, change):
    def respell(raw: bytes) -> bytes:
        if change == "crlf":
            return raw.replace(b"\n", b"\r\n")
        if change == "spaces":
            return raw.replace(b'": ', b'":  ', 1)
        if change == "escape":
            return raw.replace(b'"bert"', b'"\\u0062ert"', 1)
        return raw.rstrip(b"\n")

    _raw_edit(signed, respell)
    assert artifact.verify(signed).digest  # the same content: the digest alone does not see it
    one_line_refusal(run("verify", signed, "--trusted-key", keys["old"][1]), "not byte for byte as edgeft writes it")
    assert run("sign", signed, "--key", keys["old"][0]).exit_code == 0  # signing again writes the canonical bytes
    assert run("verify", signed, "--trusted-key", keys["old"][1]).exit_code == 0


@pytest.mark.parametrize("change", ["extra field", "base64 spare bits"])
def test_a_respelled_signature_record_is_refused(signed, keys, change):
    def respell(d):
        sig = d["signature"]
        if change == "extra field":
            sig["note"] = "x" * 1000
        else:  # 64 bytes in 88 characters: the last data character has 4 spare bits
            last = sig["value"][-3]
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
            sig["value"] = sig["value"][:-3] + alphabet[alphabet.index(last) ^ 1] + "=="
    path = signed / "manifest.json"
    d = json.loads(path.read_text())
    respell(d)
    path.write_bytes(artifact.manifest_file_bytes(d))
    assert artifact.verify(signed).digest  # the signature is outside the digest
    one_line_refusal(run("verify", signed, "--trusted-key", keys["old"][1]), "signature")


# ---------------------------------------------------------------- a packed file: nothing outside its members

@pytest.mark.parametrize("zip64", [False, True], ids=["zip", "zip64"])
@pytest.mark.parametrize("change", ["prefix", "comment", "trailing", "gap", "member comment", "extra field",
                                    "deflated"])
def test_a_packed_file_with_bytes_outside_its_members_is_refused(art, keys, tmp_path, change, zip64, monkeypatch):
    import random

    if zip64:  # the end records a packed file over 4 GB gets, made here with a 64-byte limit
        monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 64)
    assert run("sign", art, "--key", keys["old"][0]).exit_code == 0
    packed = artifact.pack(art, tmp_path / "art.edgeft")
    good = packed.read_bytes()
    assert (b"PK\x06\x06" in good[-200:]) == zip64
    bad = tmp_path / "bad.edgeft"
    if change == "prefix":  # a shell script and 100 KB of random bytes in front: zipfile still reads it
        bad.write_bytes(b"#!/bin/sh\necho hi\nexit 0\n" + random.Random(0).randbytes(100_000) + good)
    elif change == "comment":
        bad.write_bytes(good)
        with zipfile.ZipFile(bad, "a") as zf:
            zf.comment = b"c" * 18_000
    elif change == "trailing":
        bad.write_bytes(good + b"\0" * 64)
    else:
        with zipfile.ZipFile(packed) as zin, zipfile.ZipFile(bad, "w") as zout:
            for i, info in enumerate(zin.infolist()):
                data = zin.read(info)
                if change == "gap" and i == 1:
                    zout.fp.write(b"hidden" * 1000)  # bytes between two members, offsets kept right
                    zout.start_dir = zout.fp.tell()
                if change == "member comment" and i == 1:
                    info.comment = b"hidden"
                if change == "extra field" and i == 1:
                    info.extra = b"\x99\x99" + (6).to_bytes(2, "little") + b"hidden"
                if change == "deflated" and i == 1:
                    info.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(info, data)
    with zipfile.ZipFile(bad) as zf:  # still a zip Python reads
        assert {i.filename for i in zf.infolist()} == {i.filename for i in zipfile.ZipFile(packed).infolist()}
    one_line_refusal(run("verify", bad, "--trusted-key", keys["old"][1]), "not laid out as edgeft packs a file")
    for check in artifact.Check:
        with pytest.raises(EdgeftError, match="not laid out"):
            artifact.open_artifact(bad, check)
    with pytest.raises(EdgeftError, match="not laid out"):
        artifact.check_header(bad)
    assert _unpacked_dirs() == []
    assert run("verify", packed, "--trusted-key", keys["old"][1]).exit_code == 0  # the original holds


def test_pack_refuses_a_file_changed_after_it_was_verified(art, tmp_path, monkeypatch):
    """What is packed is what was hashed: a file rewritten between the check and the copy is refused."""
    real = artifact._check_files

    def check_then_change(folder, manifest):
        real(folder, manifest)
        flip_byte_keep_mtime(folder / "model.onnx")

    monkeypatch.setattr(artifact, "_check_files", check_then_change)
    one_line_refusal(run("pack", art, "-o", tmp_path / "x.edgeft"), "model.onnx changed while it was packed")
    assert not list(tmp_path.glob("*x.edgeft*"))


def test_an_unchecked_key_id_is_shown_on_one_short_line(art):
    """Without --trusted-key the signature is not checked, and its key id is whatever the file says."""
    _edit_manifest(art, lambda d: d.update(signature={"algorithm": "ed25519", "key_id": "abc\nx: ok, FORGED" + "z" * 200,
                                                      "value": ""}))
    res = run("verify", art)
    assert res.exit_code == 0 and len(res.output.strip().splitlines()) == 1, res.output
    assert "abc\\nx: ok, FORGED" in res.output and "z" * 100 not in res.output
