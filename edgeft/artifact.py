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

Sections. Every part of a manifest is a frozen dataclass declared here (``Graph``, ``Tokenizer``,
``Quantization``, ``Decoder``, ``Classifier``, ``Embedding``, ``Generation``, ``Trunk``, ``Head``,
``Gate`` and ``Provenance``, the ``source`` section): these classes are the contract, the one place a
field's name, type and default are written. The export builds them, and the runtime, the
commands and the benchmarks read their attributes, never the JSON's keys. ``Manifest.from_dict``
drops keys a section does not know (what a newer edgeft added) and ``to_dict`` writes fields in
the order declared, so a manifest the export wrote reads back to the same dict. ``Gate`` and
``Provenance`` are None when absent, written ``{}`` as before they were typed. ``Generation``
holds the sampling defaults the runtime's ``SamplingParams`` takes; ``Int4Grid`` is the 4-bit
grid's one spelling, from ``--int4-mode`` to ``quantization.int4_grid``.

Integrity. ``manifest.json`` lists every other file with its sha256 and size (``files``)
and carries two more fields:

- ``digest``: ``sha256:<hex>`` over the manifest's compact JSON (keys in the file's
  order, no spaces, ``digest`` and ``signature`` left out), so over every file's hash too:
  change a label, a setting, the order of keys or a file and the digest no longer matches.
  Checked at every load. It catches corruption, not an attacker, who can recompute it.
  (Digests made before key order counted were over sorted keys; they still verify.)
- ``signature``: ``{"algorithm": "ed25519", "key_id", "value"}``, an Ed25519 signature of
  the digest (``edgeft sign``, ``edgeft export --sign``; see ``edgeft.signing``). With
  trusted keys (``--trusted-key``, ``EDGEFT_TRUSTED_KEY``) an unsigned artifact, or one
  signed by any other key, is refused.

A packed ``.edgeft`` file is a zip of the same folder; the same two fields live in its
``manifest.json`` member. An artifact from before digests loads with a one-line warning.

What a signature covers. Every byte of ``manifest.json`` when a trusted key checks it: the
digest binds its content, key order included, and every listed file's sha256 and size; the
file must be exactly ``manifest_file_bytes`` of that content (no duplicate key, other
spacing, line end or escape); and the signature record is three fields in one spelling. Every
file the runtime opens through the manifest is one of those listed files, named plainly
inside the artifact (``check_names``), never a link, and nothing else may be in the folder.
A packed file's members lie back to back from its first byte to its zip directory and end
record, stored, with no comment or extra field but zip64's (``_layout_problem``); the zip
headers' own fields (dates, permission bits, versions) are not signed.

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
A split classifier or decoder (``Trunk``, format 2) holds the same graph as two files, the
shared trunk and its own top; the runtime chains them. A split decoder's trunk holds the
caches of blocks 0..``Trunk.blocks``-1 (their past/present names), its top those above. A split
decoder whose head is the base's (``Head``, format 3) holds it as a third file, shared like the
trunk: the top then ends at the head's input, and the head makes ``logits``.
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
import struct
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft import __version__
from edgeft.errors import EdgeftError
from edgeft.fsutil import (atomic_dir, atomic_write_bytes, atomic_write_json, check_apart, file_stamp,
                           os_errors_as_one_line, sha256_file)

FORMAT = "edgeft-artifact"
FORMAT_VERSION = 3  # the newest this edgeft reads; 2: a split model (``Trunk``); 3: a shared head (``Head``)
MANIFEST = "manifest.json"
PACK_SUFFIX = ".edgeft"
DIGEST_PREFIX = "sha256:"
_DIGEST_CONTEXT = b"edgeft-manifest-v2\n"  # over keys in the file's order
_DIGEST_CONTEXT_SORTED = b"edgeft-manifest-v1\n"  # over sorted keys: digests made before order counted
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
class PairInput:
    """A classifier of text pairs (NLI, duplicates, relevance): how a pair reaches the graph.

    ``template`` None: the tokenizer's pair encoding (``[CLS] a [SEP] b [SEP]``, token type ids);
    else one text, ``{text}`` and ``{text_pair}`` filled in (a decoder classifier).
    ``relevant_label``: the label whose probability is a pair's relevance (``/v1/rerank``);
    None with a single-logit head (relevance: its sigmoid) or when no label says it."""

    template: str | None = None
    relevant_label: str | None = None

    def __post_init__(self) -> None:
        for name in ("template", "relevant_label"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise ValueError(f"classifier.pairs.{name} must be a string or null")


@dataclass(frozen=True)
class Classifier:
    """How to drive a classifier graph, and what its outputs mean."""

    labels: list[str]
    max_length: int
    uses_token_type_ids: bool = False
    pairs: PairInput | None = None  # a pair classifier: it reads (text, text_pair)

    def __post_init__(self) -> None:
        if isinstance(self.pairs, dict):
            known = {f.name for f in dataclasses.fields(PairInput)}
            object.__setattr__(self, "pairs", PairInput(**{k: v for k, v in self.pairs.items() if k in known}))
        elif not isinstance(self.pairs, (PairInput, type(None))):
            raise ValueError("classifier.pairs must be an object or null")


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
class Trunk:
    """A split classifier's or decoder's lower part, stored beside its top (``graph.file``) and shared at load.

    The trunk (embeddings and the first ``blocks`` blocks, with their KV caches for a decoder) takes the graph's inputs and
    returns ``outputs`` (the hidden state entering block ``blocks`` first); the top takes
    ``top_inputs`` (some of those outputs, then graph inputs) and returns the graph's outputs.
    The file is named by its content, so models tuned from one base with the same boundary and
    quantization carry byte-identical trunks; runtimes load one session per ``sha256``.
    """

    file: str  # "trunk-<first 16 hex of sha256>.onnx", listed in ``files`` like any other
    sha256: str  # hex digest of the file's bytes: what a runtime shares a session by
    blocks: int
    outputs: list[str]
    top_inputs: list[str]


@dataclass(frozen=True)
class Head:
    """A split decoder's LM head when it is the base's (tied to the trunk's frozen embedding), stored as its own
    file and shared at load like the trunk.

    The head takes ``input`` (the top's last hidden state: the final norm's output, after the
    ``logits_to_keep`` slice) to ``logits``; it has no KV cache. Named by its content, so models
    tuned from one base carry byte-identical heads; runtimes load one session per ``sha256``.
    """

    file: str  # "head-<first 16 hex of sha256>.onnx", listed in ``files`` like any other
    sha256: str
    input: str


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
    """Default sampling settings for a decoder artifact, each overridable per request.

    These defaults are the runtime's own: ``edgeft.runtime.params.SamplingParams`` reads its
    defaults for these fields from here, so an artifact without the section samples as one
    whose section holds them."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # greedy
    top_k: int = 0  # off
    top_p: float = 1.0  # off
    repetition_penalty: float = 1.0  # off


class Int4Grid(str, enum.Enum):
    """How a decoder's 4-bit blocks are stored: ``--int4-mode`` and ``quantization.int4_grid``, one spelling."""

    zero_point = "zero-point"  # w = scale * (q - z), an integer zero point per block (MatMulNBits alone)
    float_offset = "float-offset"  # w = offset + scale * q, a float offset per block (llama.cpp's Q4_1 grid)
    symmetric = "symmetric"  # w = scale * q, q in -8..7, no zero point (llama.cpp's Q4_0 grid)

    @classmethod
    def _missing_(cls, value: object) -> "Int4Grid | None":
        """The flag's spelling before it took the manifest's: a one-line error naming the new one."""
        if value == "offset":
            raise EdgeftError("--int4-mode offset is now spelled float-offset (as the manifest's int4_grid is)")
        return None


@dataclass(frozen=True)
class Quantization:
    """What the export stored at which width (``edgeft.export.quantize`` and ``smooth`` fill it).

    Every field has a default, as this section was a free dict before it was typed: a manifest
    missing a key still loads. The last three are written only when set."""

    scheme: str | None = None  # the scheme kept: none, int8, int4, mixed, searched (None: not recorded)
    method: str = "weight-only"  # weight-only, dynamic, dynamic-smoothed, or none
    block_size: int | None = None
    groups: dict[str, str] = field(default_factory=dict)  # tensor group -> width: {"blocks.0": "int8", ...}
    tied_embeddings_shared: bool = False  # the token embedding reads the head's quantized matrix
    activations: str = "fp32"  # what the quantized matmuls compute on: int8, int8-per-row or fp32
    int4_grid: Int4Grid | None = None  # with 4-bit blocks: their grid
    calibration: dict[str, Any] | None = None  # dynamic int8 decoders: {"tokens", "texts", "alpha"}
    search: dict[str, Any] | None = None  # searched: the sensitivity pass's record (edgeft.export.pipeline)

    def __post_init__(self) -> None:
        if self.int4_grid is not None:
            object.__setattr__(self, "int4_grid", Int4Grid(getattr(self.int4_grid, "value", self.int4_grid)))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("int4_grid", "calibration", "search"):
            if d[name] is None:
                del d[name]
        if self.int4_grid is not None:
            d["int4_grid"] = self.int4_grid.value
        return d


@dataclass(frozen=True)
class Gate:
    """What the export's gate measured against PyTorch and why it kept this candidate.

    ``Manifest.gate`` is None (written ``{}``) before the gate has run. Every field has a default,
    as this section was a free dict before it was typed. The figures are records for people:
    their keys depend on the task (``edgeft.export.gate``)."""

    passed: bool = False
    degraded: bool = False  # written though it failed (--allow-degraded)
    chosen: str | None = None  # the candidate kept: int8, int4, int8-dynamic, ...
    chosen_because: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # the kept candidate's figures
    reference: dict[str, Any] = field(default_factory=dict)  # PyTorch's figures on the same texts
    failures: list[str] = field(default_factory=list)
    thresholds: dict[str, Any] = field(default_factory=dict)
    eval_data: str | None = None  # where the held-out texts came from
    eval_sha256: str | None = None
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> passed, metrics, failures, bytes
    runtime: str = "edgeft.runtime"  # what ran the candidates
    export_seconds: float | None = None


@dataclass(frozen=True)
class Provenance:
    """Where the model came from: the manifest's ``source`` section (None, written ``{}``: not recorded)."""

    base_model: str | None = None  # the base's name as given to tune or export
    base_sha256: str | None = None
    run_folder: str | None = None  # the tune run merged in, if any
    data_sha256: dict[str, str] = field(default_factory=dict)  # the run's data files' hashes
    trainable_layers: int = 0


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
    quantization: Quantization
    decoder: Decoder | None = None
    classifier: Classifier | None = None
    embedding: Embedding | None = None
    generation: Generation | None = None
    trunk: Trunk | None = None  # a split classifier or decoder: graph.file is its top
    head: Head | None = None  # a split decoder's shared head: the top ends at its input
    gate: Gate | None = None  # None before the gate ran (written {})
    source: Provenance | None = None  # None: not recorded (written {})
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"sha256", "size"}
    format: str = FORMAT
    format_version: int = 1  # 2 with a trunk section (older edgefts then say "upgrade" instead of failing)
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
        if self.trunk is not None and (self.task is Task.embedding or self.format_version < 2):
            raise ValueError("a trunk section belongs to a classification or causal-lm manifest of format 2")
        if self.head is not None and (self.trunk is None or self.task is not Task.causal_lm or self.format_version < 3):
            raise ValueError("a head section belongs to a split causal-lm manifest of format 3")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["task"] = self.task.value
        if self.embedding is not None:
            d["embedding"]["pooling"] = self.embedding.pooling.value
        if self.classifier is not None and self.classifier.pairs is None:
            del d["classifier"]["pairs"]  # a text classifier's section stays as it was
        d["quantization"] = self.quantization.to_dict()
        d["gate"] = dataclasses.asdict(self.gate) if self.gate is not None else {}
        d["source"] = dataclasses.asdict(self.source) if self.source is not None else {}
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
        sections = {"graph": Graph, "tokenizer": Tokenizer, "quantization": Quantization, "decoder": Decoder,
                    "classifier": Classifier, "embedding": Embedding, "generation": Generation,
                    "trunk": Trunk, "head": Head, "gate": Gate, "source": Provenance}
        kw = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        for name, klass in sections.items():
            if name in ("gate", "source") and kw.get(name) == {}:
                kw[name] = None  # not gated, or not recorded: what ``to_dict`` writes as {}
            elif kw.get(name) is not None:
                known = {f.name for f in dataclasses.fields(klass)}
                kw[name] = klass(**{k: v for k, v in kw[name].items() if k in known})
        kw["task"] = Task(kw["task"])
        return cls(**kw)


def canonical_bytes(d: dict[str, Any], sort_keys: bool = False) -> bytes:
    """The manifest as the digest sees it: keys in order (sorted for digests made before order counted),
    no spaces, without ``digest`` and ``signature``."""
    body = {k: v for k, v in d.items() if k not in ("digest", "signature")}
    try:
        return json.dumps(body, sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise EdgeftError(f"{MANIFEST} holds a string that is not valid Unicode (a lone surrogate)") from None


def manifest_file_bytes(d: dict[str, Any]) -> bytes:
    """``manifest.json`` as edgeft writes it: keys in order, two-space indent, ASCII escapes, LF, a final newline.

    The only bytes a signed manifest may have: ``check_manifest`` refuses any other spelling of
    the same content when it checks a signature. (What every edgeft version wrote.)"""
    return (json.dumps(d, indent=2) + "\n").encode()


def manifest_digest(d: dict[str, Any]) -> str:
    """``sha256:<hex>`` of a manifest dict as read from JSON, key order included (so over every file's sha256 too)."""
    return DIGEST_PREFIX + hashlib.sha256(_DIGEST_CONTEXT + canonical_bytes(d)).hexdigest()


def _digest_holds(d: dict[str, Any], digest: str) -> bool:
    """``digest`` is this manifest's: over its keys in order, or (made before order counted) over sorted keys.

    Accepting both is safe under a signature: the two hash different prefixes, so a signed
    order-covering digest never matches a sorted-keys one of reordered content."""
    if digest == manifest_digest(d):
        return True
    return digest == DIGEST_PREFIX + hashlib.sha256(_DIGEST_CONTEXT_SORTED + canonical_bytes(d, True)).hexdigest()


NAME_MAX = 255  # bytes in one part of a file name (most file systems' limit)
_NAME_FIELDS = ("graph.file", "graph.genai_config", "tokenizer.file", "tokenizer.config_file",
                "tokenizer.chat_template")  # every file the runtime opens through the manifest
_REQUIRED_NAMES = ("graph.file", "tokenizer.file")


def _name_problem(rel: Any) -> str | None:
    """Why ``rel`` is not a plain relative file name inside an artifact, or None when it is one."""
    if not isinstance(rel, str) or not rel:
        return "not a file name"
    if rel.startswith("/") or "\\" in rel or ":" in rel:
        return "not a plain relative name (absolute, or with a drive or a backslash)"
    if any(ord(c) < 0x20 or c == "\x7f" for c in rel):
        return "a name with a control character"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "a name with an empty, '.' or '..' part"
    if any(len(p.encode("utf-8", "surrogatepass")) > NAME_MAX for p in parts):
        return f"a name with a part longer than {NAME_MAX} bytes"
    if rel == MANIFEST:
        return f"the manifest's own name ({MANIFEST})"
    return None


def _safe_name(where: str, rel: Any, what: str = "file name") -> str:
    problem = _name_problem(rel)
    if problem:
        raise EdgeftError(f"{where}: the manifest's {what} {str(rel)[:80]!r} is {problem}")
    return rel


def check_names(where: str, manifest: Manifest) -> None:
    """The one check of every file name a manifest holds; ``parse_manifest`` makes it, so every loader does.

    Each name in ``files`` is a plain relative name (no absolute path, drive, backslash, ``.``,
    ``..`` or empty part, control character or over-long part) and no listed name is a folder of
    another; each file the runtime opens (``graph.file``, ``graph.genai_config``, ``tokenizer.file``,
    ``tokenizer.config_file``, ``tokenizer.chat_template``) is one of the names in ``files``, so it
    is hashed and signed with the rest. That no listed file is a link, or under one, is checked on
    disk (``_check_files``) and in a packed file's members (``_checked_members``)."""
    for rel in manifest.files:
        _safe_name(where, rel)
    folders = {rel.rsplit("/", 1)[0] for rel in manifest.files if "/" in rel}
    folders = {"/".join(f.split("/")[:i]) for f in folders for i in range(1, f.count("/") + 2)}
    clash = sorted(folders & set(manifest.files))
    if clash:
        raise EdgeftError(f"{where}: the manifest lists {clash[0][:80]!r} both as a file and as a folder")
    for what in _NAME_FIELDS:
        section, attr = what.split(".")
        rel = getattr(getattr(manifest, section), attr)
        if rel is None and what not in _REQUIRED_NAMES:
            continue
        _safe_name(where, rel, what)
        if rel not in manifest.files:
            raise EdgeftError(f"{where}: the manifest's {what} {rel[:80]!r} is not one of its listed files")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


def parse_manifest(where: str, raw: bytes) -> tuple[Manifest, dict[str, Any]]:
    """A manifest and its raw dict from ``manifest.json``'s bytes; one-line errors for anything malformed.

    A key given twice in one object is refused: JSON readers differ on which value wins."""
    try:
        d = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise EdgeftError(f"{where}: {MANIFEST} has the key {str(exc)[:80]!r} twice in one object "
                          "(JSON readers disagree on which value counts)") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EdgeftError(f"{where}: {MANIFEST} is not valid JSON ({str(exc)[:200]})") from None
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
    check_names(where, manifest)
    for what, part in (("trunk", manifest.trunk), ("head", manifest.head)):
        if part is not None and manifest.files.get(part.file, {}).get("sha256") != part.sha256:
            raise EdgeftError(f"{where}: the manifest's {what} {str(part.file)[:80]!r} is not among its files with "
                              "that digest")
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
    if path.is_symlink():
        raise EdgeftError(f"{folder}: its {MANIFEST} is a link (an artifact holds no links)")
    if not path.is_file():
        raise EdgeftError(f"{folder} is not an edgeft artifact (no {MANIFEST})")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EdgeftError(f"cannot read {path}: {exc.strerror or exc}") from None
    return (*parse_manifest(str(folder), raw), raw)


_warned: set[str] = set()


def check_manifest(where: str, d: dict[str, Any], manifest: Manifest, raw: bytes, trusted_keys: Sequence = ()) -> None:
    """The manifest against its own digest, then (with trusted keys) its bytes and signature against them.

    ``trusted_keys`` are ``edgeft.signing.TrustedKey``; with none, a signature is not checked.
    With them, ``raw`` (the file's bytes) must be exactly ``manifest_file_bytes`` of its content,
    so no byte of a signed manifest can change: the digest covers the content and its key order,
    this check a space, a line end or an escape, ``check_signature`` the signature's own spelling.
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
    if not _digest_holds(d, manifest.digest):
        raise EdgeftError(f"{where}: {MANIFEST} does not match its digest (edited or corrupted)")
    if trusted_keys:
        from edgeft.signing import check_signature

        if raw != manifest_file_bytes(d):
            raise EdgeftError(f"{where}: {MANIFEST} is not byte for byte as edgeft writes it (spaces, line ends "
                              "or escapes differ), so its signature cannot vouch for it; sign it again with edgeft sign")
        check_signature(where, manifest.signature, manifest.digest, trusted_keys)


def _what(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISLNK(mode):
        return "link"
    return "FIFO" if stat.S_ISFIFO(mode) else "special file"


def _raise(exc: OSError) -> None:
    raise exc


def folder_entries(folder: Path) -> dict[str, str]:
    """Everything under ``folder``, links not followed: relative POSIX name -> 'file', 'folder', 'link',
    'FIFO' or 'special file'. A link to a folder is listed, never entered."""
    folder = Path(folder)
    out = {}
    for root, dirs, names in os.walk(folder, onerror=_raise):
        for name in (*dirs, *names):
            p = Path(root, name)
            out[p.relative_to(folder).as_posix()] = _what(os.lstat(p).st_mode)
    return out


def file_hashes_names(folder: Path) -> list[str]:
    """Every regular file under ``folder`` but the manifest (links not followed), as sorted relative POSIX paths."""
    return sorted(rel for rel, kind in folder_entries(folder).items() if kind == "file" and rel != MANIFEST)


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
    """Hash every file in ``folder`` and write the manifest, with its digest, last. Returns the stored manifest.

    The folder must hold only files and their folders (a link, a FIFO or an empty folder would
    make the artifact fail ``verify``), and the manifest's file names must pass ``check_names``."""
    folder = Path(folder)
    manifest = dataclasses.replace(manifest, files=file_hashes(folder), digest=None, signature=None)
    check_names(str(folder), manifest)
    _refuse_unlisted(folder, folder_entries(folder), manifest)
    d = sealed(manifest.to_dict())
    atomic_write_bytes(folder / MANIFEST, manifest_file_bytes(d))
    return dataclasses.replace(manifest, digest=d["digest"])


def _check_listed(folder: Path, rel: str, meta: dict, entries: dict[str, str]) -> None:
    """One listed file: a regular file, not a link nor under one, of its size and sha256."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        above = "/".join(parts[:i])
        if entries.get(above) not in (None, "folder"):
            raise EdgeftError(f"{folder}: {rel} is under {above}, which is a {entries[above]}, not a folder")
    kind = entries.get(rel)
    if kind != "file":
        raise EdgeftError(f"{folder}: {rel} is {'missing' if kind is None else f'a {kind}, not a file'}")
    p = folder / rel
    if p.stat().st_size != meta["size"]:
        raise EdgeftError(f"{folder}: {rel} has {p.stat().st_size} bytes, expected {meta['size']} (truncated?)")
    if sha256_file(p) != meta["sha256"]:
        raise EdgeftError(f"{folder}: {rel} does not match its checksum (modified or corrupted)")


def _refuse_unlisted(folder: Path, entries: dict[str, str], manifest: Manifest) -> None:
    """Anything in the folder that is neither a listed file, a folder above one, nor the manifest is refused:
    an unlisted file, a link (dangling or not), a FIFO, a device, an empty or unused folder."""
    wanted = {MANIFEST: "file", **{rel: "file" for rel in manifest.files}}
    for rel in manifest.files:
        parts = rel.split("/")
        wanted.update({"/".join(parts[:i]): "folder" for i in range(1, len(parts))})
    extra = sorted(rel for rel, kind in entries.items() if wanted.get(rel) != kind)
    if extra:
        shown = [rel if entries[rel] == "file" else f"{rel} (a {entries[rel]})" for rel in extra[:5]]
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise EdgeftError(f"{folder}: not in the manifest: {', '.join(shown)}{more}")


def _check_files(folder: Path, manifest: Manifest) -> None:
    """Every listed file present and intact, nothing else in the folder; an unreadable folder is one line."""
    if not manifest.files:
        raise EdgeftError(f"{folder}: manifest lists no files")
    with os_errors_as_one_line(f"cannot check {folder}"):
        entries = folder_entries(folder)
        for rel, meta in manifest.files.items():
            _check_listed(folder, rel, meta, entries)
        _refuse_unlisted(folder, entries, manifest)


def verify(folder: Path, trusted_keys: Sequence = ()) -> Manifest:
    """Check the manifest's digest (and signature, given trusted keys) and hash every file it lists.

    Raise ``EdgeftError`` naming the first thing that differs; never trusts a stamp."""
    return _verified(Path(folder), trusted_keys)[0]


def _verified(folder: Path, trusted_keys: Sequence = ()) -> tuple[Manifest, bytes]:
    manifest, d, raw = _read_folder_manifest(folder)
    check_manifest(str(folder), d, manifest, raw, trusted_keys)
    _check_files(folder, manifest)
    return manifest, raw


def _packed_size(manifest: Manifest, raw: bytes) -> int:
    """About how many bytes ``pack`` writes: every file, the manifest and zip headers (zip64 ones)."""
    names = [MANIFEST, *manifest.files]
    return (sum(m["size"] for m in manifest.files.values()) + len(raw)
            + sum(2 * len(n.encode()) + 30 + 46 + 2 * 32 for n in names) + 22 + 76)


def pack(folder: Path, out: Path) -> Path:
    """Write the artifact folder as one uncompressed zip file (``.edgeft``), after verifying it.

    Refuses an output inside the folder (it would pack itself) or that is a folder; a full disk
    is one line that says how much was needed."""
    folder, out = Path(folder), Path(out)
    check_apart(folder, out, "the packed file")
    if out.is_dir():
        raise EdgeftError(f"{out} is a folder: pack writes one file (choose another name)")
    manifest, raw = _verified(folder)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with os_errors_as_one_line(f"cannot write {out}", out.parent, _packed_size(manifest, raw)):
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.writestr(_member(MANIFEST), raw)
                for rel in sorted(manifest.files):
                    with zf.open(_member(rel), "w", force_zip64=True) as sink:
                        _copy_checked(folder, rel, manifest.files[rel], sink)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out


def _copy_checked(folder: Path, rel: str, meta: dict, sink) -> None:
    """Copy one listed file into ``sink``, hashing what is copied: a file changed since it was verified is refused."""
    h, n = hashlib.sha256(), 0
    with open(folder / rel, "rb") as src:
        while block := src.read(_CHUNK):
            h.update(block)
            n += len(block)
            sink.write(block)
    if n != meta["size"] or h.hexdigest() != meta["sha256"]:
        raise EdgeftError(f"{folder}: {rel} changed while it was packed")


def _member(name: str) -> zipfile.ZipInfo:
    """A plain file member as edgeft writes it: stored, mode 0644, a fixed date (no clock in the bytes)."""
    info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.compress_type = zipfile.ZIP_STORED
    return info

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
    """The packed file opened as a zip, once its layout holds (``_layout_problem``); one line otherwise."""
    try:
        zf = zipfile.ZipFile(packed)
    except (*_ZIP_ERRORS, OSError) as exc:
        raise EdgeftError(f"{packed} is not a packed edgeft artifact ({type(exc).__name__}: {exc})") from None
    try:
        problem = _layout_problem(zf)
    except (*_ZIP_ERRORS, OSError, struct.error) as exc:
        problem = f"its zip records do not read ({type(exc).__name__})"
    if problem:
        zf.close()
        raise EdgeftError(f"{packed} is not laid out as edgeft packs a file: {problem}; pack the folder again")
    return zf


_EOCD, _EOCD64, _LOCATOR = struct.Struct("<4s4H2LH"), struct.Struct("<4sQ2H2L4Q"), struct.Struct("<4sLQL")
_LOCAL = struct.Struct("<4s5H3L2H")
_ZIP64_EXTRA = 0x0001


def _only_zip64_extra(extra: bytes) -> bool:
    """Whether an extra field holds nothing but zip64 size records (all edgeft writes)."""
    i = 0
    while i < len(extra):
        if i + 4 > len(extra):
            return False
        tag, size = struct.unpack_from("<2H", extra, i)
        if tag != _ZIP64_EXTRA:
            return False
        i += 4 + size
    return i == len(extra)


def _layout_problem(zf: zipfile.ZipFile) -> str | None:
    """Why the file holds bytes outside its members, or None: members back to back from byte 0, then the
    central directory, the (zip64) end records and nothing else: no prefix, gap, comment, trailing
    data, extra field but zip64's, member comment, compression or data descriptor."""
    fh = zf.fp
    assert fh is not None
    size = fh.seek(0, os.SEEK_END)
    fh.seek(size - _EOCD.size)
    sig, _, _, _, count, cd_size, cd_offset, comment = _EOCD.unpack(fh.read(_EOCD.size))
    if sig != b"PK\x05\x06" or comment:
        return "it ends in a comment or in data after its last record"
    records_at = size - _EOCD.size
    fh.seek(max(records_at - _LOCATOR.size, 0))
    locator = fh.read(_LOCATOR.size)
    if locator[:4] == b"PK\x06\x07" and len(locator) == _LOCATOR.size:  # zip64 end records (as zipfile reads them)
        _, _, records_at, _ = _LOCATOR.unpack(locator)
        fh.seek(records_at)
        head = fh.read(_EOCD64.size)
        if len(head) != _EOCD64.size or records_at + _EOCD64.size + _LOCATOR.size != size - _EOCD.size:
            return "its zip64 end records are not where they belong"
        sig64, rest, _, _, _, _, _, count, cd_size, cd_offset = _EOCD64.unpack(head)
        if sig64 != b"PK\x06\x06" or rest != _EOCD64.size - 12:
            return "its zip64 end record is malformed or extended"
    if cd_offset + cd_size != records_at:
        return "it has data before its first member or between its directory and its end"
    infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    if count != len(infos):
        return f"its end record counts {count} members, its directory holds {len(infos)}"
    at = 0
    for info in infos:
        if info.header_offset != at:
            return f"{at - info.header_offset if at > info.header_offset else info.header_offset - at} bytes " \
                   f"{'overlap' if at > info.header_offset else 'lie'} before member {info.filename[:80]!r}"
        if info.comment or not _only_zip64_extra(info.extra) or info.flag_bits & 0x08:
            return f"member {info.filename[:80]!r} carries a comment, an extra field or a data descriptor"
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            return f"member {info.filename[:80]!r} is compressed (edgeft packs files stored as they are)"
        fh.seek(info.header_offset)
        local = _LOCAL.unpack(fh.read(_LOCAL.size))
        name_len, extra_len = local[-2:]
        fh.seek(info.header_offset + _LOCAL.size + name_len)
        if local[0] != b"PK\x03\x04" or not _only_zip64_extra(fh.read(extra_len)):
            return f"member {info.filename[:80]!r} has a malformed or extended local header"
        at = info.header_offset + _LOCAL.size + name_len + extra_len + info.compress_size
    if at != cd_offset:
        return f"{cd_offset - at} bytes lie between its last member and its directory"
    return None


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
            manifest, d, raw = _packed_manifest(zf, packed)
            check_manifest(str(packed), d, manifest, raw, trusted_keys)
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
            check_manifest(str(packed), d, manifest, raw, trusted_keys)
            members = _checked_members(zf, packed, manifest)
            target = Path(dest) if dest is not None else (
                cache_root() / "unpacked" / hashlib.sha256(raw).hexdigest()[:24])
            if check is Check.quick and _packed_stamp_ok(packed, raw, target):
                return target
            if not (check is Check.full and _cached_copy_holds(zf, packed, members, manifest, raw, target)):
                target.parent.mkdir(parents=True, exist_ok=True)
                needed = len(raw) + sum(meta["size"] for _, meta in members)
                with os_errors_as_one_line(f"cannot unpack {packed} into {target}", target.parent, needed):
                    _unpack_into(zf, packed, members, raw, target)
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
    check_manifest(str(path), d, manifest, raw, trusted_keys)
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
        manifest, d, raw = _read_folder_manifest(path)
    elif not path.is_file():
        raise EdgeftError(f"{path} is neither an artifact folder nor a packed file")
    else:
        def read():
            with _open_zip(path) as zf:
                return _packed_manifest(zf, path)

        manifest, d, raw = _zip_guard(path, read)
    check_manifest(str(path), d, manifest, raw, trusted_keys)
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
        manifest, d, raw = _read_folder_manifest(path)
        check_manifest(str(path), d, manifest, raw)
        _check_files(path, manifest)
        d = sealed(d)
        d["signature"] = sign_digest(private_key, d["digest"])
        data = manifest_file_bytes(d)
        with os_errors_as_one_line(f"cannot write {path / MANIFEST}", path, len(data)):
            atomic_write_bytes(path / MANIFEST, data)
        return d["signature"]["key_id"]
    if not path.is_file():
        raise EdgeftError(f"{path} is neither an artifact folder nor a packed file")
    with os_errors_as_one_line(f"cannot sign {path}", path.parent, path.stat().st_size + 1024):
        return _zip_guard(path, _sign_packed, path, private_key, sign_digest)


def _sign_packed(packed: Path, private_key, sign_digest) -> str:
    """Rewrite the packed file with the signed manifest, every member streamed and checked again."""
    tmp = packed.with_name(f".{packed.name}.tmp-{os.getpid()}")
    try:
        with _open_zip(packed) as zin:
            manifest, d, raw = _packed_manifest(zin, packed)
            check_manifest(str(packed), d, manifest, raw)
            members = _checked_members(zin, packed, manifest)
            d = sealed(d)
            d["signature"] = sign_digest(private_key, d["digest"])
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zout:
                zout.writestr(_member(MANIFEST), manifest_file_bytes(d))
                for info, meta in members:
                    with zout.open(_member(info.filename), "w", force_zip64=True) as sink:
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


def _file_stats(folder: Path) -> dict[str, list]:
    """A stamp of every entry: size, times, inode and device of each file; what any other entry is."""
    return {rel: file_stamp(folder / rel) if kind == "file" else [kind]
            for rel, kind in folder_entries(folder).items()}


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
    check_manifest(str(folder), d, manifest, raw, trusted_keys)
    if _stamp_ok(folder, raw):
        return manifest
    _check_files(folder, manifest)
    _write_stamp(folder, raw)
    return manifest
