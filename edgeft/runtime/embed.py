"""Sentence embeddings on onnxruntime: batched like classification, pooled as the manifest says.

Texts (or token-id lists) are tokenized in one call, sorted by length and cut into graph
calls of at most ``batch_size`` rows and ``batch_tokens`` padded tokens (as
``edgeft.runtime.classify`` does, sharing its helpers); each call's ``last_hidden_state``
is pooled over the attention mask (mean, or the first token for CLS) and made unit length
when the manifest's ``embedding.normalize`` says so. Texts longer than the manifest's
``max_length`` are truncated (as sentence-transformers does); token-id inputs that long
are refused. Vectors come back in the caller's order as float32.

This module knows the embedding graph convention of ``edgeft.artifact`` and nothing of
the model's origin; it imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edgeft.artifact import Check, Manifest, Pooling, Task, open_artifact
from edgeft.errors import EdgeftError
from edgeft.runtime.classify import length_chunks, pad_batch
from edgeft.runtime.params import Spin
from edgeft.runtime.session import input_dtypes, open_session


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: Pooling, normalize: bool) -> np.ndarray:
    """[batch, seq, dim] token vectors and their [batch, seq] mask -> [batch, dim] (float32)."""
    if pooling is Pooling.cls:
        out = hidden[:, 0].astype(np.float32)
    else:
        m = mask[..., None].astype(np.float32)
        out = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out.astype(np.float32)


@dataclass(frozen=True)
class _Ids:
    """A token-id input in the shape of a ``tokenizers.Encoding`` (what ``pad_batch`` reads)."""

    ids: list[int]
    type_ids: list[int]


class TextEmbedder:
    """An embedding artifact: texts (or token ids) in, one vector per input out."""

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None,
                 batch_tokens: int = 128, spin: Spin | bool | None = None) -> None:
        if manifest.task is not Task.embedding:
            raise EdgeftError(f"{folder} is a {manifest.task.value} artifact, not an embedding model")
        if batch_tokens < 1:
            raise EdgeftError(f"batch_tokens must be at least 1, got {batch_tokens}")
        self.folder, self.manifest, self.spec = Path(folder), manifest, manifest.embedding
        self.dim, self.max_length, self.batch_tokens = self.spec.dim, self.spec.max_length, batch_tokens
        self.session = open_session(self.folder / manifest.graph.file, threads, spin=spin)
        self.threads = self.session.get_session_options().intra_op_num_threads
        self._pool: ThreadPoolExecutor | None = None
        self.dtypes = input_dtypes(self.session)
        self.uses_token_type_ids = "token_type_ids" in self.dtypes
        self.tokenizer = Tokenizer.from_file(str(self.folder / manifest.tokenizer.file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = manifest.tokenizer.pad_token_id or 0
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def open(cls, path: str | Path, threads: int | None = None, batch_tokens: int = 128,
             check: Check = Check.full, trusted_keys: Sequence = (), spin: Spin | bool | None = None) -> "TextEmbedder":
        """Open an artifact folder or packed ``.edgeft`` file, checked (``edgeft.artifact.open_artifact``).

        ``spin``: the thread policy (``edgeft.runtime.session.resolve_spin``)."""
        folder, manifest = open_artifact(path, check, trusted_keys)
        return cls(folder, manifest, threads, batch_tokens, spin=spin)

    def check_ids(self, items: list) -> None:
        """Raise ``EdgeftError`` for an input that is neither a string nor a usable token-id list."""
        for i, t in enumerate(items):
            if isinstance(t, str):
                continue
            ids = list(t) if isinstance(t, (list, tuple)) else None
            if not ids or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= x < self.vocab_size
                              for x in ids):
                raise EdgeftError(f"input {i}: give a string or a non-empty list of token ids below {self.vocab_size}")
            if len(ids) > self.max_length:
                raise EdgeftError(f"input {i} has {len(ids)} tokens; this model takes at most {self.max_length}")

    def _encode(self, items: list) -> list:
        self.check_ids(items)
        texts = [(i, t) for i, t in enumerate(items) if isinstance(t, str)]
        out: list = [None] * len(items)
        for (i, _), e in zip(texts, self.tokenizer.encode_batch([t for _, t in texts])):
            out[i] = e
        for i, t in enumerate(items):
            if not isinstance(t, str):
                out[i] = _Ids([int(x) for x in t], [0] * len(t))
        return out

    def embed_counted(self, items: list, batch_size: int = 32) -> tuple[np.ndarray, list[int]]:
        """Vectors [len(items), dim] (float32) and each input's token count, in the order of ``items``."""
        if isinstance(items, str):
            items = [items]
        if batch_size < 1:
            raise EdgeftError(f"batch_size must be at least 1, got {batch_size}")
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        if not items:
            return out, []
        encodings = self._encode(list(items))
        lengths = [len(e.ids) for e in encodings]
        order = sorted(range(len(items)), key=lambda i: lengths[i])
        chunks = length_chunks(order, lengths, batch_size, self.batch_tokens)

        def run(rows: list[int]) -> tuple[list[int], np.ndarray]:
            feeds = pad_batch([encodings[i] for i in rows], self.pad_id, self.dtypes, self.uses_token_type_ids)
            (hidden,) = self.session.run(["last_hidden_state"], feeds)
            return rows, pool(hidden, feeds["attention_mask"], self.spec.pooling, self.spec.normalize)

        if len(chunks) > 1 and self.threads > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="edgeft-embed")
            results = list(self._pool.map(run, chunks))
        else:
            results = [run(rows) for rows in chunks]
        for rows, vectors in results:
            out[rows] = vectors
        return out, lengths

    def embed(self, items: list, batch_size: int = 32) -> np.ndarray:
        """Vectors [len(items), dim] (float32) for strings or token-id lists, in the order of ``items``."""
        return self.embed_counted(items, batch_size)[0]

    def embed_rows(self, items: list, batch_size: int = 32) -> list[dict]:
        """For each input: ``{"embedding": vector, "tokens": count}`` (what the server's batcher hands out)."""
        vectors, counts = self.embed_counted(items, batch_size)
        return [{"embedding": v, "tokens": n} for v, n in zip(vectors, counts)]

    def truncate(self, vectors: np.ndarray, dims: int) -> np.ndarray:
        """The first ``dims`` components, made unit length again when the model normalizes.

        Only sizes the manifest says the model was trained for (``truncation_dims``) are allowed."""
        if dims not in self.spec.truncation_dims:
            allowed = ", ".join(map(str, self.spec.truncation_dims))
            raise EdgeftError(f"this model was not trained to be truncated to {dims} dimensions"
                              + (f" (it was for: {allowed})" if allowed else f" (it returns {self.dim})"))
        cut = vectors[..., :dims]
        if self.spec.normalize:
            cut = cut / np.maximum(np.linalg.norm(cut, axis=-1, keepdims=True), 1e-12)
        return cut.astype(np.float32)
