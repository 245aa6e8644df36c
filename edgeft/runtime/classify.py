"""Text classification on onnxruntime: batched, dynamically padded, sorted by length.

Texts are tokenized in one call, ordered by length so each batch pads only to its own
longest text (little wasted compute on padding), run through the graph, and put back in
the caller's order. Returns every label's probability. A text is cut by characters before
tokenizing (``edgeft.data.clip_for_tokens``), so a huge one costs what its first tokens cost.

A caller's batch is further cut so that no graph call holds more than ``batch_tokens``
padded tokens: on CPU the activations of a big batch fall out of the cache. The calls of
one batch then run side by side on as many Python threads as the session has cores
(onnxruntime releases the GIL): small calls use cores better side by side than split
inside onnxruntime. A single call keeps every core to itself. (The measurements behind
both choices: ``benchmarks/results/design-measurements.md``.)

A split artifact (``edgeft.artifact.Trunk``) runs as its trunk, loaded once per process
and shared by every model that carries the same one (``edgeft.runtime.trunks``), then its
own top. ``classify_many`` runs several classifiers over the same texts: the models that
share a trunk (and a tokenizer) share each batch's trunk pass, and each runs its top on the
result; any other model runs alone.

A pair classifier (``Classifier.pairs`` in its manifest: NLI, duplicates, relevance) reads
``(text, text_pair)`` pairs: through the tokenizer's pair encoding (token type ids where the
graph takes them), or as one text through the manifest's template (a decoder). ``relevance``
is what ``/v1/rerank`` sorts by: the probability of the relevant label, or the sigmoid of a
single-logit head (whose one "probability" is that sigmoid everywhere here).

This module knows the classifier graph convention of ``edgeft.artifact`` and nothing of
the model's origin.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edgeft.artifact import Check, Manifest, Task, open_artifact
from edgeft.data import Input, check_text, clip_for_tokens, pair_text
from edgeft.errors import EdgeftError
from edgeft.runtime import trunks
from edgeft.runtime.params import Spin
from edgeft.runtime.session import default_threads, input_dtypes, open_session, resolve_spin


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def scores(z: np.ndarray) -> np.ndarray:
    """Logits to probabilities: softmax over labels, or the sigmoid of a single-logit head."""
    if z.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-z))
    return softmax(z)


def encode_inputs(tokenizer: Tokenizer, items: list[Input], max_length: int, template: str | None = None) -> list:
    """Encodings of texts and ``(text, text_pair)`` pairs as a classifier reads them: each part cut
    by characters first (``clip_for_tokens``), a pair through the tokenizer's pair encoding, or as
    one text through ``template`` (a decoder). ``tokenizer`` truncates to ``max_length``."""
    if template is not None:
        return tokenizer.encode_batch([clip_for_tokens(pair_text(t, template), max_length) for t in items])
    return tokenizer.encode_batch([clip_for_tokens(t, max_length) if isinstance(t, str)
                                   else (clip_for_tokens(t[0], max_length), clip_for_tokens(t[1], max_length))
                                   for t in items])


def pad_batch(encodings: list, pad_id: int, dtypes: dict[str, type], with_types: bool) -> dict[str, np.ndarray]:
    """Feeds for one batch of encodings (``.ids``, ``.type_ids``) padded to its longest member."""
    width = max(len(e.ids) for e in encodings)
    ids = np.full((len(encodings), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(encodings), width), dtype=np.int64)
    types = np.zeros((len(encodings), width), dtype=np.int64)
    for row, e in enumerate(encodings):
        n = len(e.ids)
        ids[row, :n], mask[row, :n], types[row, :n] = e.ids, 1, e.type_ids
    feeds = {"input_ids": ids, "attention_mask": mask}
    if with_types:
        feeds["token_type_ids"] = types
    return {k: v.astype(dtypes.get(k, np.int64), copy=False) for k, v in feeds.items() if k in dtypes}


def length_chunks(order: list[int], lengths: list[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Cut length-sorted rows into graph calls of at most ``batch_size`` rows and
    ``batch_tokens`` padded tokens (a single long text still gets a call of its own)."""
    chunks: list[list[int]] = []
    for i in order:
        last = chunks[-1] if chunks else None
        # sorted ascending, so the newcomer is the widest: it sets the padded width
        if last and len(last) < batch_size and (len(last) + 1) * lengths[i] <= batch_tokens:
            last.append(i)
        else:
            chunks.append([i])
    return chunks


class TextClassifier:
    """A classification artifact: texts in, label probabilities out."""

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None,
                 batch_tokens: int = 128, spin: Spin | bool | None = None) -> None:
        if manifest.task is not Task.classification:
            raise EdgeftError(f"{folder} is a {manifest.task.value} artifact, not a classifier")
        self.folder, self.manifest = Path(folder), manifest
        self.labels: list[str] = list(manifest.classifier.labels)
        self.max_length = manifest.classifier.max_length
        if batch_tokens < 1:
            raise EdgeftError(f"batch_tokens must be at least 1, got {batch_tokens}")
        self.batch_tokens = batch_tokens
        # a split artifact: the shared trunk, then this model's top (``session``)
        if manifest.trunk is not None:  # its trunk and top take turns: auto means sleep (resolve_spin)
            spin = resolve_spin(spin, threads or default_threads(), split=True)[0]
        self.trunk = (trunks.load(self.folder, manifest.trunk, threads, spin) if manifest.trunk is not None
                      else None)
        self.session = open_session(self.folder / manifest.graph.file, threads, spin=spin)
        self.threads = self.session.get_session_options().intra_op_num_threads
        self._pool: ThreadPoolExecutor | None = None
        self.dtypes = self._feed_dtypes()
        self._check_label_count(self._graph_scores())
        self.uses_token_type_ids = "token_type_ids" in self.dtypes
        if manifest.classifier.uses_token_type_ids and not self.uses_token_type_ids:
            raise EdgeftError("the manifest says the graph takes token_type_ids but it does not")
        self.tokenizer = Tokenizer.from_file(str(self.folder / manifest.tokenizer.file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = manifest.tokenizer.pad_token_id or 0
        self.pairs = manifest.classifier.pairs  # None: texts only

    @property
    def name(self) -> str:
        return self.folder.name

    def relevance_index(self) -> int:
        """The column of ``predict_proba`` that is a pair's relevance; one clear error where there is none."""
        if self.pairs is None:
            raise EdgeftError(f"model {self.name!r} is not a pair classifier: it cannot rank documents")
        if len(self.labels) == 1:
            return 0
        if self.pairs.relevant_label not in self.labels:
            raise EdgeftError(f"model {self.name!r} has no label that means relevant (labels: "
                              f"{', '.join(self.labels)})")
        return self.labels.index(self.pairs.relevant_label)

    def relevance(self, pairs: list[tuple[str, str]], batch_size: int = 32) -> np.ndarray:
        """Each (query, document) pair's relevance score (``relevance_index``), in order."""
        column = self.relevance_index()
        return self.predict_proba(list(pairs), batch_size)[:, column]

    def count_tokens(self, items: Sequence[Input]) -> int:
        """How many tokens the model reads for ``items`` (a request's usage)."""
        return sum(len(e.ids) for e in self._encode(list(items)))

    def _encode(self, items: list[Input]) -> list:
        if self.pairs is None and any(not isinstance(t, str) for t in items):
            raise EdgeftError(f"model {self.name!r} is not a pair classifier: give it texts, not pairs")
        return encode_inputs(self.tokenizer, items, self.max_length, self.pairs.template if self.pairs else None)

    @classmethod
    def open(cls, path: str | Path, threads: int | None = None, batch_tokens: int = 128,
             check: Check = Check.full, trusted_keys: Sequence = (), spin: Spin | bool | None = None) -> "TextClassifier":
        """Open an artifact folder or packed ``.edgeft`` file, checked (``edgeft.artifact.open_artifact``).

        ``spin``: the thread policy (``edgeft.runtime.session.resolve_spin``)."""
        folder, manifest = open_artifact(path, check, trusted_keys)
        return cls(folder, manifest, threads, batch_tokens, spin=spin)

    def _feed_dtypes(self) -> dict[str, type]:
        """What the tokenized batch feeds: the graph's inputs, or the trunk's and those the top reads itself."""
        top = input_dtypes(self.session)
        if self.trunk is None:
            return top
        spec = self.manifest.trunk
        if set(top) != set(spec.top_inputs):
            raise EdgeftError(f"{self.folder}: the top graph's inputs are not the ones its manifest names")
        return {**self.trunk.dtypes, **{k: v for k, v in top.items() if k not in spec.outputs}}

    def _graph_scores(self) -> int | None:
        """How many scores the graph's ``logits`` output gives per text, where its shape says."""
        out = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if out is None:
            raise EdgeftError(f"{self.folder}: the classifier graph has no 'logits' output")
        shape = out.shape or []
        return shape[-1] if len(shape) == 2 and isinstance(shape[-1], int) else None

    def _check_label_count(self, scores: int | None) -> None:
        if scores is not None and scores != len(self.labels):
            raise EdgeftError(f"{self.folder}: the manifest lists {len(self.labels)} labels but the graph returns "
                              f"{scores} scores per text")

    def _batch(self, encodings: list) -> dict[str, np.ndarray]:
        return pad_batch(encodings, self.pad_id, self.dtypes, self.uses_token_type_ids)

    def _logits(self, feeds: dict[str, np.ndarray], below: dict[str, np.ndarray] | None) -> np.ndarray:
        """One batch's logits; ``below``: the trunk's outputs for these feeds, where a split model has them."""
        if self.trunk is not None:
            below = below if below is not None else self.trunk.run(feeds)
            feeds = {n: below[n] if n in below else feeds[n] for n in self.manifest.trunk.top_inputs}
        (logits,) = self.session.run(["logits"], feeds)
        self._check_label_count(logits.shape[-1])  # a graph whose shape did not say
        return logits

    def share_key(self) -> tuple:
        """Models with equal keys can share one trunk pass: the same trunk, tokenizer and padding."""
        if self.trunk is None:
            return ("alone", id(self))
        tok = self.manifest.files.get(self.manifest.tokenizer.file, {}).get("sha256")
        pairs = None if self.pairs is None else ("pairs", self.pairs.template)
        return (self.trunk.sha256, tok, self.max_length, self.pad_id, tuple(sorted(self.dtypes.items())), pairs)

    def _run(self, texts: list[Input], batch_size: int, tops: Sequence[TextClassifier]) -> list[np.ndarray]:
        """Probabilities of each of ``tops`` (this model among them, or models sharing its key) over
        ``texts``, tokenized and batched once by this model, the trunk run once per batch."""
        out = [np.zeros((len(texts), len(m.labels)), dtype=np.float32) for m in tops]
        if not texts:
            return out
        encodings = self._encode(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        chunks = self._chunks(order, [len(e.ids) for e in encodings], batch_size)

        def run(rows: list[int]) -> tuple[list[int], list[np.ndarray]]:
            feeds = self._batch([encodings[i] for i in rows])
            below = self.trunk.run(feeds) if self.trunk is not None else None
            return rows, [m._logits(feeds, below) for m in tops]

        if len(chunks) > 1 and self.threads > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="edgeft-classify")
            results = list(self._pool.map(run, chunks))
        else:
            results = [run(rows) for rows in chunks]
        for rows, logits in results:
            for probs, z in zip(out, logits):
                probs[rows] = scores(z.astype(np.float32))
        return out

    def predict_proba(self, texts: Sequence[Input], batch_size: int = 32) -> np.ndarray:
        """Probabilities [len(texts), labels] (float32), in the order of ``texts`` (texts, or
        ``(text, text_pair)`` pairs for a pair classifier)."""
        return self._run(checked_texts(texts, batch_size), batch_size, [self])[0]

    def _chunks(self, order: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
        return length_chunks(order, lengths, batch_size, self.batch_tokens)

    def classify(self, texts: Sequence[Input], batch_size: int = 32) -> list[dict]:
        """For each text: ``{"label": best, "scores": {label: probability}}``."""
        return self.results(self.predict_proba(texts, batch_size))

    def results(self, probs: np.ndarray) -> list[dict]:
        """``classify``'s answer from ``predict_proba``'s probabilities."""
        return [{"label": self.labels[int(p.argmax())], "scores": dict(zip(self.labels, map(float, p)))}
                for p in probs]


def checked_texts(texts: Sequence[Input] | str, batch_size: int) -> list[Input]:
    """The texts (or pairs of two texts) to classify as a list, each checked (one-line errors for a
    bad input or batch size)."""
    if isinstance(texts, str):
        texts = [texts]
    if batch_size < 1:
        raise EdgeftError(f"batch_size must be at least 1, got {batch_size}")
    out: list[Input] = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            out.append(check_text(t, f"input {i}"))
        elif isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t):
            out.append((check_text(t[0], f"input {i}"), check_text(t[1], f"input {i}'s pair")))
        else:
            raise EdgeftError("every input to classify must be a string or a pair of two strings")
    return out


def predict_proba_many(models: Sequence[TextClassifier], texts: Sequence[Input], batch_size: int = 32) -> list[np.ndarray]:
    """Each model's ``predict_proba`` over the same ``texts``, in the order of ``models``.

    Models that share a trunk and a tokenizer (``TextClassifier.share_key``) run that trunk
    once per batch and each its own top on the result; every other model runs alone."""
    texts = checked_texts(texts, batch_size)
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(models):
        groups.setdefault(m.share_key(), []).append(i)
    out: list[np.ndarray] = [np.zeros(0)] * len(models)
    for members in groups.values():
        lead = models[members[0]]
        for i, probs in zip(members, lead._run(texts, batch_size, [models[i] for i in members])):
            out[i] = probs
    return out


def classify_many(models: Sequence[TextClassifier], texts: Sequence[Input], batch_size: int = 32) -> list[list[dict]]:
    """Each model's ``classify`` answer over the same ``texts`` (a list per model, in order),
    the trunk shared models carry run once per batch (``predict_proba_many``)."""
    return [m.results(p) for m, p in zip(models, predict_proba_many(models, texts, batch_size))]
