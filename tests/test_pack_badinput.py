"""``pack``, ``sign``, ``keygen`` and ``verify`` on bad paths and full disks: one line, nothing lost or half-written.

An output inside the folder it packs (it would pack itself as it grows), an output that is a
folder, a manifest naming a file longer than a file system allows, and a full disk (a small
tmpfs filled up; skipped where mounting is not allowed) during pack, keygen and sign.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest
from test_integrity import make_classifier, one_line_refusal, run

from edgeft import artifact
from edgeft.errors import EdgeftError


@pytest.fixture
def art(tmp_path) -> Path:
    return make_classifier(tmp_path / "art")


# ---------------------------------------------------------------- outputs that overlap their source

@pytest.mark.parametrize("where", ["inside", "deeper", "through a link", "the folder itself"])
def test_pack_refuses_an_output_inside_its_source(art, tmp_path, where):
    if where == "inside":
        out = art / "x.edgeft"
    elif where == "deeper":
        (art / "sub").mkdir()
        out = art / "sub" / "x.edgeft"
    elif where == "through a link":
        (tmp_path / "link").symlink_to(art, target_is_directory=True)
        out = tmp_path / "link" / "x.edgeft"
    else:
        (tmp_path / "same.edgeft").symlink_to(art, target_is_directory=True)
        out = tmp_path / "same.edgeft"
    before = sorted(p.name for p in art.rglob("*"))
    one_line_refusal(run("pack", art, "-o", out, "--overwrite"), "choose a")
    assert sorted(p.name for p in art.rglob("*")) == before  # nothing written into the source
    if where == "deeper":
        (art / "sub").rmdir()  # empty still: else verify would refuse it as unlisted
    assert artifact.verify(art).files


def test_check_apart_refuses_the_source_inside_and_around():
    from edgeft.fsutil import check_apart

    src = Path("/data/runs/a")
    for dest, word in ((src, "itself"), (src / "out", "inside"), (Path("/data/runs"), "holds")):
        with pytest.raises(EdgeftError, match=word):
            check_apart(src, dest)
    check_apart(src, Path("/data/runs/b"))
    check_apart(src, Path("/data/runs/a-out"))  # a sibling whose name starts the same is apart


def test_pack_over_an_existing_folder_is_one_line(art, tmp_path):
    out = tmp_path / "existing.edgeft"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_refusal(run("pack", art, "-o", out, "--overwrite"), "is a folder")
    assert (out / "keep.txt").read_text() == "mine"


def test_a_packed_file_is_the_same_bytes_every_time(art, tmp_path):
    """Members get a fixed date, so packing the same folder twice gives the same file (and the layout check holds)."""
    a = artifact.pack(art, tmp_path / "a.edgeft")
    os.utime(art / "model.onnx", (1_000_000_000, 1_000_000_000))  # 2001: another date in a zip header
    b = artifact.pack(art, tmp_path / "b.edgeft")
    assert a.read_bytes() == b.read_bytes()


# ---------------------------------------------------------------- names a file system cannot hold

def test_verify_of_a_manifest_naming_a_300_character_file_is_one_line(art):
    import json

    d = json.loads((art / "manifest.json").read_text())
    d["files"]["a" * 300] = dict(d["files"]["tokenizer.json"])
    d["digest"] = artifact.manifest_digest(d)
    (art / "manifest.json").write_bytes(artifact.manifest_file_bytes(d))
    one_line_refusal(run("verify", art), "longer than 255 bytes")
    d["files"].pop("a" * 300)
    d["graph"]["file"] = "b" * 300
    d["digest"] = artifact.manifest_digest(d)
    (art / "manifest.json").write_bytes(artifact.manifest_file_bytes(d))
    one_line_refusal(run("verify", art), "graph.file", "longer than 255 bytes")


# ---------------------------------------------------------------- full disks

def test_one_line_os_error_says_what_was_needed_and_what_is_free(tmp_path):
    from edgeft.fsutil import one_line_os_error

    exc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    err = one_line_os_error(exc, "cannot write x", tmp_path, needed=3_500_000)
    assert str(err).startswith("cannot write x: no space left on the device (3.5 MB needed, ")
    assert f"free in {tmp_path}" in str(err) and "\n" not in str(err)
    err = one_line_os_error(OSError(errno.EACCES, "Permission denied"), "cannot write x")
    assert str(err) == "cannot write x: Permission denied"


def test_pack_on_a_full_disk_is_one_line_even_without_a_mount(art, tmp_path, monkeypatch):
    import zipfile

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile._ZipWriteFile, "write", full)  # a member's data hits the full disk
    out = tmp_path / "out.edgeft"
    one_line_refusal(run("pack", art, "-o", out), "no space left on the device", "needed")
    assert list(tmp_path.glob("*.edgeft")) == [] and list(tmp_path.glob(".out.edgeft*")) == []


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here to fill up")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder: Path) -> None:
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as fh:
        while True:
            fh.write(b"\0" * 1024)
            fh.flush()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "filler"}


def test_pack_keygen_sign_on_a_full_disk_are_one_line_and_change_nothing(tmp_path):
    pytest.importorskip("cryptography")
    with _tmpfs(tmp_path / "disk", "512k") as disk:
        art = make_classifier(disk / "art")
        assert run("keygen", disk / "k.pem").exit_code == 0
        packed = artifact.pack(art, disk / "art.edgeft")
        _fill(disk)
        keys_before, art_before, packed_before = _snapshot(disk), _snapshot(art), packed.read_bytes()

        one_line_refusal(run("pack", art, "-o", disk / "again.edgeft"), "no space left on the device", "needed")
        one_line_refusal(run("keygen", disk / "new.pem"), "no space left on the device", "needed")
        one_line_refusal(run("keygen", disk / "k.pem", "--overwrite"), "no space left")
        one_line_refusal(run("sign", packed, "--key", disk / "k.pem"), "no space left on the device", "needed")
        one_line_refusal(run("sign", art, "--key", disk / "k.pem"), "no space left on the device", "needed")
        assert _snapshot(art) == art_before

        assert _snapshot(disk) == keys_before  # the old key pair whole, no half-new pair, no temporary files
        assert packed.read_bytes() == packed_before
        assert sorted(p.name for p in disk.iterdir()) == ["art", "art.edgeft", "filler", "k.pem", "k.pem.pub"]
        assert sorted(p.name for p in art.iterdir()) == ["manifest.json", "model.onnx", "tokenizer.json"]


def test_pack_of_the_current_folder_writes_beside_it(art, monkeypatch):
    monkeypatch.chdir(art)
    res = run("pack", ".")
    assert res.exit_code == 0, res.output
    assert artifact.verify_packed(art.parent / "art.edgeft").files


def test_sign_and_the_serve_header_check_of_a_fifo_are_one_line(tmp_path, keys_pair):
    """A FIFO is neither a folder nor a packed file: opening it to read would wait for a writer forever."""
    fifo = tmp_path / "pipe.edgeft"
    os.mkfifo(fifo)
    one_line_refusal(run("sign", fifo, "--key", keys_pair), "neither an artifact folder nor a packed file")
    with pytest.raises(EdgeftError, match="neither an artifact folder nor a packed file"):
        artifact.check_header(fifo)


@pytest.fixture
def keys_pair(tmp_path) -> Path:
    pytest.importorskip("cryptography")
    assert run("keygen", tmp_path / "k.pem").exit_code == 0
    return tmp_path / "k.pem"


def test_keygen_and_sign_on_a_full_disk_are_one_line_even_without_a_mount(art, tmp_path, keys_pair, monkeypatch):
    """A full disk shows at the sync of what was written: no half-new key pair, the manifest as it was."""
    before = (art / "manifest.json").read_bytes()
    old_pair = keys_pair.read_bytes(), keys_pair.with_name("k.pem.pub").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    one_line_refusal(run("keygen", tmp_path / "new.pem"), "no space left on the device", "needed")
    one_line_refusal(run("keygen", keys_pair, "--overwrite"), "no space left on the device")
    one_line_refusal(run("sign", art, "--key", keys_pair), "no space left on the device", "needed")
    assert (keys_pair.read_bytes(), keys_pair.with_name("k.pem.pub").read_bytes()) == old_pair
    assert (art / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "k.pem", "k.pem.pub"]
