"""Atomic writes: nothing half-written ever looks complete.

A stage writes its folder under a temporary sibling name and renames it into place
when everything is there; single files are written beside their target and replaced
with ``os.replace``. Also the checks made before writing (``check_destination``,
``check_writable``, ``check_apart``: an output that is, holds or lies inside its source)
and ``one_line_os_error`` / ``os_errors_as_one_line``, which turn an ``OSError`` met while
writing, a full disk above all, into one line that says how much was needed.
Standard library only: the runtime uses this module too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError


def check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse an existing destination unless ``overwrite``; call before any work."""
    if dest.exists() and not overwrite:
        raise EdgeftError(f"{dest} already exists (use --overwrite to replace it)")
    if not dest.parent.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)


def check_writable(folder: Path, what: str = "the output") -> None:
    """Make ``folder`` if needed and prove a file can be written there; else one clear error.

    Called before any slow work (loading a model, training), so a read-only or full disk is
    refused in a second, not after minutes. The probe is a small file, written, synced, removed.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".edgeft-probe-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(b"\0" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            os.unlink(probe)
    except OSError as exc:
        raise EdgeftError(f"cannot write {what} in {folder}: {exc.strerror or exc}") from None


def check_apart(source: Path, dest: Path, what: str = "the output") -> None:
    """Refuse a ``dest`` that is ``source``, lies inside it or holds it (links resolved); call before any work.

    Writing a folder's output into that folder packs or copies the output into itself, and
    replacing a folder that holds the source destroys the source."""
    src, out = Path(source).resolve(), Path(dest).resolve()
    if out == src:
        raise EdgeftError(f"{what} {dest} is {source} itself: choose another path")
    if src in out.parents:
        raise EdgeftError(f"{what} {dest} is inside {source}: choose a path outside it")
    if out in src.parents:
        raise EdgeftError(f"{what} {dest} holds {source}: choose a path that does not contain it")


def human_size(n: int) -> str:
    """``n`` bytes for a person: 812 bytes, 35 KB, 1.2 MB, 3.4 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} bytes"


def _free_bytes(path: Path) -> int | None:
    for p in (Path(path), *Path(path).parents):
        with contextlib.suppress(OSError):
            if p.is_dir():
                return shutil.disk_usage(p).free
    return None


def one_line_os_error(exc: OSError, action: str, where: Path | None = None, needed: int | None = None) -> EdgeftError:
    """An ``OSError`` met while doing ``action`` ("cannot write x") as the one line a user reads.

    A full disk (``ENOSPC``, ``EDQUOT``) says how much was needed (when the caller knows) and how
    much is free where it was written (``where``, else the error's file name)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        place = where if where is not None else (Path(exc.filename).parent if exc.filename else None)
        free = _free_bytes(place) if place is not None else None
        parts = [f"{human_size(needed)} needed" if needed is not None else "",
                 f"{human_size(free)} free in {place}" if free is not None else ""]
        detail = ", ".join(p for p in parts if p)
        return EdgeftError(f"{action}: no space left on the device{f' ({detail})' if detail else ''}")
    return EdgeftError(f"{action}: {exc.strerror or exc}")


@contextlib.contextmanager
def os_errors_as_one_line(action: str, where: Path | None = None, needed: int | None = None) -> Iterator[None]:
    """Turn any ``OSError`` in the block into ``one_line_os_error``'s ``EdgeftError``."""
    try:
        yield
    except OSError as exc:
        raise one_line_os_error(exc, action, where, needed) from None


def replace_dir(src: Path, dest: Path) -> None:
    """Move a finished folder ``src`` to ``dest``, replacing what is there atomically enough.

    A rename over a non-empty folder is impossible, so an old ``dest`` is first renamed
    aside and removed only after the new one is in place.
    """
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success rename it to ``dest``.

    On any exception (Ctrl-C included) the temporary folder is removed and ``dest``
    is left as it was.
    """
    dest = Path(dest)
    check_destination(dest, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _readable(tmp)
    replace_dir(tmp, dest)


def _readable(folder: Path) -> None:
    """Make a finished folder readable like any other (mkdtemp/mkstemp create 0700/0600).

    A service account that only reads an artifact (systemd DynamicUser, a container's
    non-root user) must be able to open every file in it.
    """
    os.chmod(folder, 0o755)
    for p in folder.rglob("*"):
        mode = p.stat().st_mode
        os.chmod(p, mode | (0o055 if p.is_dir() else 0o044))


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``, ending with ``mode``.

    The temporary file is created 0600 (mkstemp), so a secret (``mode=0o600``) is never readable
    by others, not even while it is written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_files(files: dict[Path, tuple[bytes, int]]) -> None:
    """Write several files (``path -> (data, mode)``) so that either all are replaced or none is.

    Every temporary file is written and synced before the first ``os.replace``, so a full disk
    or an error while writing leaves every target as it was (a key pair never ends half new)."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, (data, mode) in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", dir=Path(path).parent)
            temps.append((tmp, Path(path)))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def file_stamp(path: Path) -> list[int]:
    """Size, mtime, ctime, inode and device of a file: what a quick "unchanged?" check compares.

    Putting a file's mtime back after rewriting it in place still moves its ctime (the
    kernel sets ctime on every write and on ``utime``); replacing it changes the inode.
    """
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- room on the disk, and outputs that would swallow their inputs ------------------------------

SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(folder: Path) -> int:
    """Bytes a write under ``folder`` (or its nearest existing parent) may still take."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def mb(n: int) -> str:
    """A byte count as a person reads it: "3 MB", "1.2 GB"."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_space(folder: Path, needed: int, what: str) -> None:
    """Refuse early, in one line, when ``folder``'s disk cannot hold ``needed`` bytes (an estimate)."""
    free = free_bytes(folder)
    if free < needed:
        raise EdgeftError(f"not enough space for {what} in {folder}: it needs about {mb(needed)}, "
                          f"{mb(free)} is free")


def out_of_space(exc: BaseException, folder: Path, what: str, needed: int | None = None) -> EdgeftError | None:
    """``exc`` as one line when it is a full disk (or quota), saying how much was needed; else None.

    Libraries report a full disk as ``OSError`` 28, or as their own error whose text holds
    the errno's words (safetensors) or not even that (torch's zip writer: "file write
    failed"): such an error counts when the disk now has less than ``needed`` free.
    """
    full = (isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS) or any(
        os.strerror(code) in str(exc) for code in SPACE_ERRNOS) or (
        not isinstance(exc, OSError) and needed is not None and free_bytes(folder) < needed)
    if not full:
        return None
    need = f"about {mb(needed)} needed, " if needed else ""
    return EdgeftError(f"no space left to write {what} in {folder} ({need}{mb(free_bytes(folder))} free)")


def refuse_overlap(output: Path, source: Path, what: str = "the output", source_what: str = "the source",
                   inside_ok: bool = False) -> None:
    """Refuse an output that is the source, lies inside it, or contains it: writing it would destroy the source.

    ``inside_ok``: an output inside the source folder is fine (it only adds to it). Call before
    anything is deleted or written. Paths are compared resolved (links followed).
    """
    out, src = Path(output).expanduser().resolve(), Path(source).expanduser().resolve()
    if out == src:
        raise EdgeftError(f"{what} {output} is {source_what} itself: writing it would destroy it; choose another path")
    if src in out.parents and not inside_ok:
        raise EdgeftError(f"{what} {output} lies inside {source_what} {source}: choose a path outside it")
    if out in src.parents:
        raise EdgeftError(f"{what} {output} contains {source_what} {source}: replacing it would destroy it; "
                          "choose another path")


def kind_of(path: Path) -> str:
    """What is at ``path``, in words: "a file", "a folder", "a named pipe (FIFO)", "a device", ...; or "nothing"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "nothing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    for test, words in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def require_file(path: Path, what: str = "") -> None:
    """Refuse, in one line that says what is there instead, a ``path`` that is not a regular file."""
    kind = kind_of(path)
    if kind == "a file":
        return
    label = f"{what} {path}" if what else str(path)
    raise EdgeftError(f"{label} does not exist" if kind == "nothing" else f"{label} is {kind}, not a file")


def write_output(path: Path, data: bytes, what: str = "--output") -> None:
    """Write a command's results file atomically; a folder, a full disk or a refused write is one line."""
    path = Path(path)
    if path.is_dir():
        raise EdgeftError(f"{what} {path} is a folder: name a file to write")
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        full = out_of_space(exc, path.parent, str(path), len(data))
        if full is not None:
            raise full from None
        raise EdgeftError(f"cannot write {path}: {exc.strerror or exc}") from None
