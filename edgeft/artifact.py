"""The artifact manifest: the one contract between the torch side and the runtime.

An artifact is a folder (or one packed ``.edgeft`` file holding that folder) with:

- the ONNX graph (``model.onnx``, with external data where large),
- the tokenizer (``tokenizer.json``, ``tokenizer_config.json``, chat template),
- ``config.json`` (the Hugging Face config, for optimum users),
- ``manifest.json``: what this module describes.

``edgeft.export`` writes manifests; ``edgeft.runtime`` reads them and nothing else about
the model's origin. This module knows file layout, hashing, packing and the checks made
before an artifact is used; it knows nothing of torch, transformers or onnxruntime
(standard library only, plus ``edgeft.signing``, which imports ``cryptography`` only when
a signature is made or checked), so the runtime can import it.

Integrity. ``manifest.json`` lists every other file with its sha256 and size (``files``)
and carries two more fields:

- ``digest``: ``sha256:<hex>`` over the manifest's canonical JSON (sorted keys, no
  spaces, ``digest`` and ``signature`` left out), so over every file's hash too: change a
  label, a setting or a file and the digest no longer matches. Checked at every load.
  It catches corruption, not an attacker, who can recompute it.
- ``signature``: ``{"algorithm": "ed25519", "key_id", "value"}``, an Ed25519 signature of
  the digest (``edgeft sign``, ``edgeft export --sign``; see ``edgeft.signing``). With
  trusted keys (``--trusted-key``, ``EDGEFT_TRUSTED_KEY``) an unsigned artifact, or one
  signed by any other key, is refused.

A packed ``.edgeft`` file is a zip of the same folder; the same two fields live in its
``manifest.json`` member. An artifact from before digests loads with a one-line warning.

``Check.full`` hashes every byte (``edgeft verify``, ``edgeft serve`` and the Python
API's default); ``Check.quick`` (the one-shot ``generate``, ``chat``, ``classify``)
skips the hashing when a stamp left by an earlier full check still matches the size,
mtime, ctime, inode and device of every file. The digest and signature are checked
either way.

Decoder graphs follow one convention for every architecture: inputs ``input_ids``,
``attention_mask``, ``position_ids`` (only where ``Decoder.uses_position_ids``) and
``past_key_values.{i}.key`` / ``.value``; outputs ``logits`` and ``present.{i}.key`` /
``.value``. Caches are laid out ``[batch, kv_heads, sequence, head_dim]``.
Classifier graphs take ``input_ids``, ``attention_mask`` and ``token_type_ids`` (where
``Classifier.uses_token_type_ids``) and return ``logits`` of shape ``[batch, labels]``.
Embedding graphs take the same inputs and return ``last_hidden_state`` ``[batch, sequence,
dim]``; the runtime pools it as ``Embedding`` says (mean or CLS, then unit length or not).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import stat
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft import __version__
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_dir, atomic_write_json, file_stamp, sha256_file
from edgeft.runtime.params import SamplingParams

FORMAT = "edgeft-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PACK_SUFFIX = ".edgeft"
DIGEST_PREFIX = "sha256:"
_DIGEST_CONTEXT = b"edgeft-manifest-v1\n"
MAX_MANIFEST_BYTES = 16 << 20  # a packed manifest larger than this is refused before it is read
_CHUNK = 1 << 20

log = logging.getLogger("edgeft.artifact")


class Check(str, enum.Enum):
    """How much ``open_artifact`` checks before an artifact is used."""

    full = "full"  # hash every byte
    quick = "quick"  # trust a stamp (size, mtime, ctime, inode of every file) left by an earlier full check


class Task(str, enum.Enum):
    """What a model (and so its artifact) does."""

    causal_lm = "causal-lm"
    classification = "classification"
    embedding = "embedding"


class Pooling(str, enum.Enum):
    """How an embedding graph's token vectors become one vector per text."""

    mean = "mean"  # the average over the attention mask (sentence-transformers' mean pooling)
    cls = "cls"  # the first token's vector


class Batching(str, enum.Enum):
    """How several sequences share one decode step of a decoder graph (``edgeft.runtime.engine``)."""

    slots = "slots"  # one cache buffer of [slots, heads, slot_len, dim]; each row at its own length (GQA)
    padded = "padded"  # presents are past + new: rows left-padded to the longest, padding masked out
    none = "none"  # this graph cannot batch: one sequence per decode step


@dataclass(frozen=True)
class Decoder:
    """How to drive a decoder graph with a KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    uses_position_ids: bool = True
    kv_dtype: str = "float32"
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"
    batching: str | None = None  # a Batching value; None (older artifacts): inferred from the graph
    # An optional int64 [1] input: the graph's logits cover the last K positions (0, its default:
    # all). None (older artifacts, or a head it could not be added to): every position, always.
    logits_to_keep: str | None = None


@dataclass(frozen=True)
class Classifier:
    """How to drive a classifier graph, and what its outputs mean."""

    labels: list[str]
    max_length: int
    uses_token_type_ids: bool = False


@dataclass(frozen=True)
class Embedding:
    """How to drive an encoder graph (``last_hidden_state`` out) and pool it into one vector per text."""

    dim: int
    max_length: int
    pooling: Pooling = Pooling.mean
    normalize: bool = True  # unit length after pooling
    uses_token_type_ids: bool = False
    truncation_dims: list[int] = field(default_factory=list)  # sizes the model was trained to be cut to (Matryoshka)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pooling", Pooling(getattr(self.pooling, "value", self.pooling)))


@dataclass(frozen=True)
class Tokenizer:
    """Tokenizer files and the special tokens the runtime needs."""

    file: str = "tokenizer.json"
    config_file: str | None = "tokenizer_config.json"
    chat_template: str | None = None  # a file name inside the artifact, e.g. chat_template.jinja
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    add_bos: bool = False  # prepend bos_token's id when the tokenizer's post-processor does not


@dataclass(frozen=True)
class Generation:
    """Default sampling settings for a decoder artifact (each overridable per request; unset: the runtime's)."""

    max_new_tokens: int = SamplingParams.max_new_tokens
    temperature: float = SamplingParams.temperature
    top_k: int = SamplingParams.top_k
    top_p: float = SamplingParams.top_p
    repetition_penalty: float = SamplingParams.repetition_penalty


@dataclass(frozen=True)
class Graph:
    """The ONNX file and its interface."""

    file: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    builder: str  # "onnxruntime-genai" or "torch.onnx"
    fused: bool = False
    genai_config: str | None = None  # genai_config.json where the onnxruntime-genai builder made it


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime may know about an artifact."""

    task: Task
    architecture: str  # the Hugging Face model_type: llama, gpt2, bert...
    graph: Graph
    tokenizer: Tokenizer
    quantization: dict[str, Any]  # {"scheme": "int8", "groups": {"blocks": "int8", ...}, ...}
    decoder: Decoder | None = None
    classifier: Classifier | None = None
    embedding: Embedding | None = None
    generation: Generation | None = None
    gate: dict[str, Any] = field(default_factory=dict)  # {"passed": bool, "degraded": bool, "metrics": {...}}
    source: dict[str, Any] = field(default_factory=dict)  # base name/sha256, run folder, data sha256
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"sha256", "size"}
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    edgeft_version: str = __version__
    digest: str | None = None  # manifest_digest: over the canonical manifest, files' hashes included
    signature: dict[str, str] | None = None  # Ed25519 over the digest (edgeft.signing); outside the digest

    def __post_init__(self) -> None:
        if self.task is Task.causal_lm and self.decoder is None:
            raise ValueError("a causal-lm manifest needs a decoder section")
        if self.task is Task.classification and self.classifier is None:
            raise ValueError("a classification manifest needs a classifier section")
        if self.task is Task.embedding and self.embedding is None:
            raise ValueError("an embedding manifest needs an embedding section")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["task"] = self.task.value
        if self.embedding is not None:
            d["embedding"]["pooling"] = self.embedding.pooling.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("format") != FORMAT:
            raise EdgeftError("not an edgeft artifact manifest")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise EdgeftError(
                f"artifact format {d['format_version']} is newer than this edgeft reads "
                f"({FORMAT_VERSION}): upgrade edgeft"
            )
        sections = {"graph": Graph, "tokenizer": Tokenizer, "decoder": Decoder,
                    "classifier": Classifier, "embedding": Embedding, "generation": Generation}
        kw = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        for name, klass in sections.items():
            if kw.get(name) is not None:
                known = {f.name for f in dataclasses.fields(klass)}
                kw[name] = klass(**{k: v for k, v in kw[name].items() if k in known})
        kw["task"] = Task(kw["task"])
        return cls(**kw)


def canonical_bytes(d: dict[str, Any]) -> bytes:
    """The manifest as the digest sees it: sorted keys, no spaces, without ``digest`` and ``signature``."""
    body = {k: v for k, v in d.items() if k not in ("digest", "signature")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_digest(d: dict[str, Any]) -> str:
    """``sha256:<hex>`` of a manifest dict as read from JSON (so over every file's sha256 too)."""
    return DIGEST_PREFIX + hashlib.sha256(_DIGEST_CONTEXT + canonical_bytes(d)).hexdigest()


def _safe_name(where: str, rel: Any) -> str:
    parts = str(rel).split("/")
    if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or rel == MANIFEST
            or any(p in ("", ".", "..") for p in parts)):
        raise EdgeftError(f"{where}: unsafe or invalid file name {str(rel)[:80]!r} in the manifest")
    return rel


def parse_manifest(where: str, raw: bytes) -> tuple[Manifest, dict[str, Any]]:
    """A manifest and its raw dict from ``manifest.json``'s bytes; one-line errors for anything malformed."""
    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EdgeftError(f"{where}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise EdgeftError(f"{where}: {MANIFEST} is not a JSON object")
    try:
        manifest = Manifest.from_dict(d)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise EdgeftError(f"{where}: {MANIFEST} is not a valid manifest: {exc}") from None
    if not isinstance(manifest.files, dict) or any(
            not isinstance(m, dict) or not isinstance(m.get("sha256"), str) or not isinstance(m.get("size"), int)
            for m in manifest.files.values()):
        raise EdgeftError(f"{where}: {MANIFEST} has a malformed files section")
    for rel in manifest.files:
        _safe_name(where, rel)
    if manifest.classifier is not None:
        labels = manifest.classifier.labels
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise EdgeftError(f"{where}: the manifest's classifier labels are not a list of strings")
        if len(set(labels)) != len(labels):
            raise EdgeftError(f"{where}: the manifest lists a classifier label twice")
    return manifest, d


def read_manifest(folder: Path) -> Manifest:
    """Read ``manifest.json`` from an artifact folder, with a clear error when it is not one.

    Only parses: ``verify`` and ``open_artifact`` check it against its digest and files."""
    return _read_folder_manifest(Path(folder))[0]


def _read_folder_manifest(folder: Path) -> tuple[Manifest, dict[str, Any], bytes]:
    path = folder / MANIFEST
    if not path.is_file():
        raise EdgeftError(f"{folder} is not an edgeft artifact (no {MANIFEST})")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EdgeftError(f"cannot read {path}: {exc.strerror or exc}") from None
    return (*parse_manifest(str(folder), raw), raw)


_warned: set[str] = set()


def check_manifest(where: str, d: dict[str, Any], manifest: Manifest, trusted_keys: Sequence = ()) -> None:
    """The manifest against its own digest, then (with trusted keys) its signature against them.

    ``trusted_keys`` are ``edgeft.signing.TrustedKey``; with none, a signature is not checked.
    A manifest with no digest (written before edgeft made one) passes with one warning line.
    """
    if manifest.digest is None:
        if trusted_keys:
            raise EdgeftError(f"{where} has no manifest digest, so no signature (made before edgeft signed "
                              "artifacts): re-export it, or sign it with edgeft sign")
        if where not in _warned:
            _warned.add(where)
            log.warning("warning: %s has no manifest digest (made before edgeft wrote one): its files are checked, "
                        "its manifest is not; re-export it or run edgeft sign to add one", where)
        return
    if manifest_digest(d) != manifest.digest:
        raise EdgeftError(f"{where}: {MANIFEST} does not match its digest (edited or corrupted)")
    if trusted_keys:
        from edgeft.signing import check_signature

        check_signature(where, manifest.signature, manifest.digest, trusted_keys)


def file_hashes_names(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest, as sorted relative POSIX paths."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``folder`` except the manifest itself."""
    folder = Path(folder)
    return {rel: {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
            for rel in file_hashes_names(folder)}


def sealed(d: dict[str, Any]) -> dict[str, Any]:
    """A manifest dict with its digest (re)computed; an old signature, which signed another digest, dropped."""
    d = json.loads(json.dumps(d))  # what a reader will see: tuples as lists, keys as strings
    d.pop("signature", None)
    d["digest"] = manifest_digest(d)
    return d


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Hash every file in ``folder`` and write the manifest, with its digest, last. Returns the stored manifest."""
    manifest = dataclasses.replace(manifest, files=file_hashes(folder), digest=None, signature=None)
    d = sealed(manifest.to_dict())
    atomic_write_json(Path(folder) / MANIFEST, d)
    return dataclasses.replace(manifest, digest=d["digest"])


def _check_files(folder: Path, manifest: Manifest) -> None:
    if not manifest.files:
        raise EdgeftError(f"{folder}: manifest lists no files")
    for rel, meta in manifest.files.items():
        p = folder / rel
        if p.is_symlink() or not p.is_file():
            raise EdgeftError(f"{folder}: {rel} is {'a link' if p.is_symlink() else 'missing'}")
        if p.stat().st_size != meta["size"]:
            raise EdgeftError(f"{folder}: {rel} has {p.stat().st_size} bytes, expected {meta['size']} (truncated?)")
        if sha256_file(p) != meta["sha256"]:
            raise EdgeftError(f"{folder}: {rel} does not match its checksum (modified or corrupted)")
    extra = set(file_hashes_names(folder)) - set(manifest.files)
    if extra:
        raise EdgeftError(f"{folder}: files not in the manifest: {', '.join(sorted(extra))}")


def verify(folder: Path, trusted_keys: Sequence = ()) -> Manifest:
    """Check the manifest's digest (and signature, given trusted keys) and hash every file it lists.

    Raise ``EdgeftError`` naming the first thing that differs; never trusts a stamp."""
    folder = Path(folder)
    manifest, d, _ = _read_folder_manifest(folder)
    check_manifest(str(folder), d, manifest, trusted_keys)
    _check_files(folder, manifest)
    return manifest


def pack(folder: Path, out: Path) -> Path:
    """Write the artifact folder as one uncompressed zip file (``.edgeft``), after verifying it."""
    folder, out = Path(folder), Path(out)
    verify(folder)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(folder / MANIFEST, MANIFEST)
            for rel in file_hashes_names(folder):
                zf.write(folder / rel, rel)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


_CACHE_ROOT: list[Path] = []  # set once per process by use_cache_root (the commands: from $EDGEFT_HOME)


def use_cache_root(path: Path | None) -> None:
    """Make ``path`` edgeft's cache folder for this process (None: back to the default).

    edgeft's commands call it once, with ``$EDGEFT_HOME`` or ``$XDG_CACHE_HOME/edgeft``
    (``edgeft.cli.app.cache_root_from_env``): the library itself reads no environment."""
    _CACHE_ROOT[:] = [Path(path).expanduser()] if path is not None else []


def cache_root() -> Path:
    """edgeft's cache folder: what ``use_cache_root`` set, else ``~/.cache/edgeft``."""
    return _CACHE_ROOT[0] if _CACHE_ROOT else Path.home() / ".cache" / "edgeft"


# ---- packed files: every member checked against the manifest before a byte of it is written

_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError,
               ValueError, KeyError, RuntimeError)


def _open_zip(packed: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(packed)
    except (*_ZIP_ERRORS, OSError) as exc:
        raise EdgeftError(f"{packed} is not a packed edgeft artifact ({type(exc).__name__}: {exc})") from None


def _kind(info: zipfile.ZipInfo) -> str | None:
    """What a member is when it is not a plain file ('a link', 'a folder', ...), else None."""
    if info.is_dir():
        return "a folder"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        return "not a plain file"
    return None


def _packed_manifest(zf: zipfile.ZipFile, packed: Path) -> tuple[Manifest, dict[str, Any], bytes]:
    infos = [i for i in zf.infolist() if i.filename == MANIFEST]
    if not infos:
        raise EdgeftError(f"{packed} is not a packed edgeft artifact (no {MANIFEST})")
    info = infos[0]
    if len(infos) > 1 or _kind(info):
        raise EdgeftError(f"{packed}: its {MANIFEST} member is {'duplicated' if len(infos) > 1 else _kind(info)}")
    if info.file_size > MAX_MANIFEST_BYTES:
        raise EdgeftError(f"{packed}: its {MANIFEST} is {info.file_size} bytes (at most {MAX_MANIFEST_BYTES})")
    with zf.open(info) as fh:
        raw = fh.read(MAX_MANIFEST_BYTES + 1)
    manifest, d = parse_manifest(str(packed), raw)
    return manifest, d, raw


def _checked_members(zf: zipfile.ZipFile, packed: Path, manifest: Manifest) -> list[tuple[zipfile.ZipInfo, dict]]:
    """Every member but the manifest, paired with its manifest entry; refuses links, unknown,
    duplicated, missing or wrongly sized members before anything is read or written."""
    if not manifest.files:
        raise EdgeftError(f"{packed}: manifest lists no files")
    members, seen = [], set()
    for info in zf.infolist():
        name = info.filename
        if name == MANIFEST:
            continue
        kind = _kind(info)
        if kind:
            raise EdgeftError(f"{packed}: member {name[:80]!r} is {kind}, not a file")
        if name not in manifest.files:
            raise EdgeftError(f"{packed}: member {name[:80]!r} is not in the manifest")
        if name in seen:
            raise EdgeftError(f"{packed}: member {name!r} appears twice")
        seen.add(name)
        meta = manifest.files[name]
        if info.file_size != meta["size"]:
            raise EdgeftError(f"{packed}: member {name!r} is {info.file_size} bytes, the manifest says {meta['size']}")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise EdgeftError(f"{packed}: member {name!r} uses an unsupported compression")
        members.append((info, meta))
    missing = sorted(set(manifest.files) - seen)
    if missing:
        raise EdgeftError(f"{packed}: {missing[0]} is missing ({len(missing)} file(s) in the manifest not packed)")
    return members


def _stream_member(zf: zipfile.ZipFile, packed: Path, info: zipfile.ZipInfo, meta: dict, sink=None) -> None:
    """Read one member in chunks (never more than its manifest size), hashing as it goes, into ``sink``."""
    h, n, limit = hashlib.sha256(), 0, meta["size"]
    with zf.open(info) as src:
        while block := src.read(min(_CHUNK, limit - n + 1)):
            n += len(block)
            if n > limit:
                raise EdgeftError(f"{packed}: member {info.filename!r} is longer than the manifest's {limit} bytes")
            h.update(block)
            if sink is not None:
                sink.write(block)
    if n != limit:
        raise EdgeftError(f"{packed}: member {info.filename!r} has {n} bytes, expected {limit} (truncated?)")
    if h.hexdigest() != meta["sha256"]:
        raise EdgeftError(f"{packed}: member {info.filename!r} does not match its checksum (modified or corrupted)")


def _zip_guard(packed: Path, fn, *args):
    """Run ``fn`` turning zip decoding errors (a corrupted file) into one line."""
    try:
        return fn(*args)
    except _ZIP_ERRORS as exc:
        raise EdgeftError(f"{packed} is corrupted ({type(exc).__name__}: {exc})") from None


def verify_packed(packed: Path, trusted_keys: Sequence = ()) -> Manifest:
    """``verify`` for a packed file: every member hashed as it is read, nothing written."""
    packed = Path(packed)

    def run() -> Manifest:
        with _open_zip(packed) as zf:
            manifest, d, _ = _packed_manifest(zf, packed)
            check_manifest(str(packed), d, manifest, trusted_keys)
            for info, meta in _checked_members(zf, packed, manifest):
                _stream_member(zf, packed, info, meta)
        return manifest

    return _zip_guard(packed, run)


def _unpack_into(zf: zipfile.ZipFile, packed: Path, members: list, raw: bytes, dest: Path) -> None:
    with atomic_dir(dest, overwrite=True) as tmp:
        for info, meta in members:
            target = tmp / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as fh:
                _stream_member(zf, packed, info, meta, fh)
        (tmp / MANIFEST).write_bytes(raw)


def _cached_copy_holds(zf: zipfile.ZipFile, packed: Path, members: list, manifest: Manifest, raw: bytes,
                       folder: Path) -> bool:
    """The full check of a copy unpacked before: every packed member hashed (a mismatch is an error),
    then every byte of the copy; True when the copy can be used as it is (nothing rewritten)."""
    if not folder.is_dir():
        return False
    for info, meta in members:
        _stream_member(zf, packed, info, meta)
    try:
        if (folder / MANIFEST).read_bytes() != raw:
            return False
        _check_files(folder, manifest)
    except (OSError, EdgeftError):
        return False  # a damaged copy: unpacked again
    return True


def unpack(packed: Path, dest: Path | None = None, check: Check = Check.full,
           trusted_keys: Sequence = ()) -> Path:
    """Unpack a ``.edgeft`` file (into the cache, keyed by its manifest's hash) after checking it.

    The manifest (digest, signature) and the list of members (names, kinds, sizes) are
    checked before anything is written; each member is then streamed to disk, bounded by its
    manifest size and hashed as it is written. A copy already in the cache is reused by
    ``Check.quick`` only while stamps show neither the packed file nor the copy changed since
    the check that made it, and by ``Check.full`` only after every member and every byte of
    the copy were hashed again; otherwise the file is unpacked again.
    """
    packed = Path(packed)

    def run() -> Path:
        with _open_zip(packed) as zf:
            manifest, d, raw = _packed_manifest(zf, packed)
            check_manifest(str(packed), d, manifest, trusted_keys)
            members = _checked_members(zf, packed, manifest)
            target = Path(dest) if dest is not None else (
                cache_root() / "unpacked" / hashlib.sha256(raw).hexdigest()[:24])
            if check is Check.quick and _packed_stamp_ok(packed, raw, target):
                return target
            if not (check is Check.full and _cached_copy_holds(zf, packed, members, manifest, raw, target)):
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    _unpack_into(zf, packed, members, raw, target)
                except OSError as exc:
                    raise EdgeftError(f"cannot unpack {packed} into {target}: {exc.strerror or exc}") from None
        _write_stamp(target, raw)
        _write_packed_stamp(packed, raw, target)
        return target

    return _zip_guard(packed, run)


def open_artifact(path: Path | str, check: Check = Check.full, trusted_keys: Sequence = ()) -> tuple[Path, Manifest]:
    """Resolve a folder or a packed file to a checked folder and its manifest.

    ``Check.full`` (the default) hashes every byte; ``Check.quick`` trusts a matching stamp
    of an earlier full check. ``trusted_keys`` (``edgeft.signing.load_trusted_keys``)
    demand a signature by one of them."""
    path = Path(path)
    if not path.exists():
        raise EdgeftError(f"{path} does not exist")
    if path.is_file():
        folder = unpack(path, check=check, trusted_keys=trusted_keys)
        return folder, read_manifest(folder)
    if check is Check.quick:
        return path, verify_cached(path, trusted_keys)
    manifest, d, raw = _read_folder_manifest(path)
    check_manifest(str(path), d, manifest, trusted_keys)
    _check_files(path, manifest)
    _write_stamp(path, raw)
    return path, manifest


def check_header(path: Path | str, trusted_keys: Sequence = ()) -> Manifest:
    """Only the manifest: its digest and (with trusted keys) its signature, without hashing any file.

    What ``edgeft serve`` checks before it listens, so a wrongly signed artifact fails at once;
    the full check follows when the model loads."""
    path = Path(path)
    if not path.exists():
        raise EdgeftError(f"{path} does not exist")
    if path.is_dir():
        manifest, d, _ = _read_folder_manifest(path)
    else:
        def read():
            with _open_zip(path) as zf:
                return _packed_manifest(zf, path)[:2]

        manifest, d = _zip_guard(path, read)
    check_manifest(str(path), d, manifest, trusted_keys)
    return manifest


def sign(path: Path | str, private_key) -> str:
    """Check every byte of an artifact folder or packed file, then sign its digest in place; return the key id.

    ``private_key`` comes from ``edgeft.signing.load_private_key``. An older artifact gets its
    digest here too. A packed file is rewritten (atomically) with the signed manifest first."""
    from edgeft.signing import sign_digest

    path = Path(path)
    if not path.exists():
        raise EdgeftError(f"{path} does not exist")
    if path.is_dir():
        manifest, d, _ = _read_folder_manifest(path)
        check_manifest(str(path), d, manifest)
        _check_files(path, manifest)
        d = sealed(d)
        d["signature"] = sign_digest(private_key, d["digest"])
        atomic_write_json(path / MANIFEST, d)
        return d["signature"]["key_id"]
    return _zip_guard(path, _sign_packed, path, private_key, sign_digest)


def _sign_packed(packed: Path, private_key, sign_digest) -> str:
    tmp = packed.with_name(f".{packed.name}.tmp-{os.getpid()}")
    try:
        with _open_zip(packed) as zin:
            manifest, d, _ = _packed_manifest(zin, packed)
            check_manifest(str(packed), d, manifest)
            members = _checked_members(zin, packed, manifest)
            d = sealed(d)
            d["signature"] = sign_digest(private_key, d["digest"])
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zout:
                zout.writestr(MANIFEST, json.dumps(d, indent=2) + "\n")
                for info, meta in members:
                    member = zipfile.ZipInfo(info.filename, info.date_time)
                    member.external_attr = (stat.S_IFREG | 0o644) << 16
                    with zout.open(member, "w", force_zip64=True) as sink:
                        _stream_member(zin, packed, info, meta, sink)
        os.replace(tmp, packed)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return d["signature"]["key_id"]


# ---- stamps: what a full check saw, so a quick one can tell that nothing changed since

def _stamp_path(target: Path, kind: str = "folder") -> Path:
    key = hashlib.sha256(f"{kind}:{Path(target).resolve()}".encode()).hexdigest()[:24]
    return cache_root() / "verified" / f"{key}.json"


def _file_stats(folder: Path) -> dict[str, list[int]]:
    return {rel: file_stamp(folder / rel) for rel in [MANIFEST, *file_hashes_names(folder)]}


def _save_stamp(path: Path, obj: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, obj)
    except OSError:
        pass  # a read-only cache only costs the next load a full check


def _load_stamp(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _write_stamp(folder: Path, raw_manifest: bytes) -> None:
    _save_stamp(_stamp_path(folder), {"manifest_sha256": hashlib.sha256(raw_manifest).hexdigest(),
                                      "files": _file_stats(Path(folder))})


def _stamp_ok(folder: Path, raw_manifest: bytes) -> bool:
    stamp = _load_stamp(_stamp_path(folder))
    try:
        return (stamp is not None and stamp.get("manifest_sha256") == hashlib.sha256(raw_manifest).hexdigest()
                and stamp.get("files") == _file_stats(folder))
    except OSError:
        return False


def _write_packed_stamp(packed: Path, raw_manifest: bytes, folder: Path) -> None:
    _save_stamp(_stamp_path(packed, "packed"), {"packed": file_stamp(packed), "folder": str(Path(folder).resolve()),
                                                "manifest_sha256": hashlib.sha256(raw_manifest).hexdigest()})


def _packed_stamp_ok(packed: Path, raw_manifest: bytes, folder: Path) -> bool:
    stamp = _load_stamp(_stamp_path(packed, "packed"))
    try:
        return (stamp is not None and stamp.get("packed") == file_stamp(packed)
                and stamp.get("folder") == str(Path(folder).resolve())
                and stamp.get("manifest_sha256") == hashlib.sha256(raw_manifest).hexdigest()
                and folder.is_dir() and _stamp_ok(folder, raw_manifest))
    except OSError:
        return False


def verify_cached(folder: Path, trusted_keys: Sequence = ()) -> Manifest:
    """The quick check: the manifest against its digest (and signature) every time; the files'
    hashes only when the stamp of the last full check no longer matches.

    The stamp records size, mtime, ctime, inode and device of every file, so a file
    rewritten in place with its mtime put back (its ctime moves) or replaced (new inode)
    is hashed again. ``edgeft verify`` and ``edgeft serve`` never use this.
    """
    folder = Path(folder)
    manifest, d, raw = _read_folder_manifest(folder)
    check_manifest(str(folder), d, manifest, trusted_keys)
    if _stamp_ok(folder, raw):
        return manifest
    _check_files(folder, manifest)
    _write_stamp(folder, raw)
    return manifest
