"""The artifact manifest: the one contract between the torch side and the runtime.

An artifact is a folder (or one packed ``.edgeft`` file holding that folder) with:

- the ONNX graph (``model.onnx``, with external data where large),
- the tokenizer (``tokenizer.json``, ``tokenizer_config.json``, chat template),
- ``config.json`` (the Hugging Face config, for optimum users),
- ``manifest.json``: what this module describes.

``edgeft.export`` writes manifests; ``edgeft.runtime`` reads them and nothing else about
the model's origin. This module knows file layout, hashing and packing; it knows nothing
of torch, transformers or onnxruntime (standard library only), so the runtime can
import it.

Decoder graphs follow one convention for every architecture: inputs ``input_ids``,
``attention_mask``, ``position_ids`` (only where ``Decoder.uses_position_ids``) and
``past_key_values.{i}.key`` / ``.value``; outputs ``logits`` and ``present.{i}.key`` /
``.value``. Caches are laid out ``[batch, kv_heads, sequence, head_dim]``.
Classifier graphs take ``input_ids``, ``attention_mask`` and ``token_type_ids`` (where
``Classifier.uses_token_type_ids``) and return ``logits`` of shape ``[batch, labels]``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft import __version__
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_write_bytes, atomic_write_json, sha256_file

FORMAT = "edgeft-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PACK_SUFFIX = ".edgeft"


class Task(str, enum.Enum):
    """What a model (and so its artifact) does."""

    causal_lm = "causal-lm"
    classification = "classification"


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


@dataclass(frozen=True)
class Classifier:
    """How to drive a classifier graph, and what its outputs mean."""

    labels: list[str]
    max_length: int
    uses_token_type_ids: bool = False


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
    """Default sampling settings for a decoder artifact (each overridable per request)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


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
    generation: Generation | None = None
    gate: dict[str, Any] = field(default_factory=dict)  # {"passed": bool, "degraded": bool, "metrics": {...}}
    source: dict[str, Any] = field(default_factory=dict)  # base name/sha256, run folder, data sha256
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"sha256", "size"}
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    edgeft_version: str = __version__

    def __post_init__(self) -> None:
        if self.task is Task.causal_lm and self.decoder is None:
            raise ValueError("a causal-lm manifest needs a decoder section")
        if self.task is Task.classification and self.classifier is None:
            raise ValueError("a classification manifest needs a classifier section")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["task"] = self.task.value
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
                    "classifier": Classifier, "generation": Generation}
        kw = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        for name, klass in sections.items():
            if kw.get(name) is not None:
                known = {f.name for f in dataclasses.fields(klass)}
                kw[name] = klass(**{k: v for k, v in kw[name].items() if k in known})
        kw["task"] = Task(kw["task"])
        return cls(**kw)


def read_manifest(folder: Path) -> Manifest:
    """Read ``manifest.json`` from an artifact folder, with a clear error when it is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EdgeftError(f"{folder} is not an edgeft artifact (no {MANIFEST})")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise EdgeftError(f"{path} is not a valid manifest: {exc}") from None


def file_hashes_names(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest, as sorted relative POSIX paths."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``folder`` except the manifest itself."""
    folder = Path(folder)
    return {rel: {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
            for rel in file_hashes_names(folder)}


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Hash every file in ``folder`` and write the manifest last. Returns the stored manifest."""
    manifest = dataclasses.replace(manifest, files=file_hashes(folder))
    atomic_write_json(Path(folder) / MANIFEST, manifest.to_dict())
    return manifest


def verify(folder: Path) -> Manifest:
    """Recompute every checksum; raise ``EdgeftError`` naming the first file that differs."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest.files:
        raise EdgeftError(f"{folder}: manifest lists no files")
    for rel, meta in manifest.files.items():
        p = folder / rel
        if not p.is_file():
            raise EdgeftError(f"{folder}: {rel} is missing")
        if p.stat().st_size != meta["size"]:
            raise EdgeftError(f"{folder}: {rel} has {p.stat().st_size} bytes, expected {meta['size']} (truncated?)")
        if sha256_file(p) != meta["sha256"]:
            raise EdgeftError(f"{folder}: {rel} does not match its checksum (modified or corrupted)")
    extra = set(file_hashes_names(folder)) - set(manifest.files)
    if extra:
        raise EdgeftError(f"{folder}: files not in the manifest: {', '.join(sorted(extra))}")
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


def cache_root() -> Path:
    """edgeft's cache folder: ``$EDGEFT_HOME``, else ``$XDG_CACHE_HOME/edgeft``, else ``~/.cache/edgeft``."""
    if os.environ.get("EDGEFT_HOME"):
        return Path(os.environ["EDGEFT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgeft"


def unpack(packed: Path, dest: Path | None = None) -> Path:
    """Unpack a ``.edgeft`` file (into the cache, keyed by its manifest's hash) and verify it.

    Unpacking is idempotent: a verified folder already in the cache is reused.
    """
    packed = Path(packed)
    try:
        zf = zipfile.ZipFile(packed)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EdgeftError(f"{packed} is not a packed edgeft artifact: {exc}") from None
    with zf:
        names = zf.namelist()
        if MANIFEST not in names:
            raise EdgeftError(f"{packed} is not a packed edgeft artifact (no {MANIFEST})")
        for n in names:
            if n.startswith("/") or ".." in Path(n).parts:
                raise EdgeftError(f"{packed}: unsafe path {n!r} inside")
        raw = zf.read(MANIFEST)
        if dest is None:
            import hashlib

            dest = cache_root() / "unpacked" / hashlib.sha256(raw).hexdigest()[:24]
        dest = Path(dest)
        if dest.is_dir():
            try:
                verify(dest)
                return dest
            except EdgeftError:
                pass
        dest.parent.mkdir(parents=True, exist_ok=True)
        from edgeft.fsutil import atomic_dir

        with atomic_dir(dest, overwrite=True) as tmp:
            zf.extractall(tmp)
            verify(tmp)
    return dest


def open_artifact(path: Path | str) -> tuple[Path, Manifest]:
    """Resolve a folder or a packed file to a verified folder and its manifest."""
    path = Path(path)
    if not path.exists():
        raise EdgeftError(f"{path} does not exist")
    if path.is_file():
        folder = unpack(path)
        return folder, read_manifest(folder)
    return path, verify_cached(path)


def _stamp_path(folder: Path) -> Path:
    import hashlib

    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:24]
    return cache_root() / "verified" / f"{key}.json"


def _file_stats(folder: Path) -> dict[str, list[int]]:
    stats = {}
    for rel in [MANIFEST, *file_hashes_names(folder)]:
        st = (folder / rel).stat()
        stats[rel] = [st.st_size, st.st_mtime_ns]
    return stats


def verify_cached(folder: Path) -> Manifest:
    """``verify``, skipped when nothing changed (same files, sizes, mtimes) since the last full check.

    Loading a verified artifact again then costs a few ``stat`` calls instead of hashing
    hundreds of MB. ``edgeft verify`` always recomputes every checksum.
    """
    folder = Path(folder)
    stamp = _stamp_path(folder)
    try:
        if json.loads(stamp.read_text()) == _file_stats(folder):
            return read_manifest(folder)
    except (OSError, ValueError):
        pass
    manifest = verify(folder)
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stamp, _file_stats(folder))
    except OSError:
        pass  # a read-only cache only costs the next load a full check
    return manifest


def write_bytes(folder: Path, name: str, data: bytes) -> None:
    """Write one file into an artifact folder being built (atomic)."""
    atomic_write_bytes(Path(folder) / name, data)
