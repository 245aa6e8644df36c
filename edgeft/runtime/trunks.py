"""One copy per distinct shared part in this process: trunk and head sessions, and tokenizers, keyed by sha256.

A split classifier or decoder (``edgeft.artifact.Trunk``) carries its trunk, the embeddings and
frozen blocks of its base, as a file named and hashed by its content; a split decoder whose head
is the base's (``edgeft.artifact.Head``) carries that head the same way. Models tuned from one
base with the same boundary and quantization carry byte-identical trunks and heads: ``load``
(``load_head``) opens the first one it is asked for and hands the same ``SharedTrunk``
(``SharedHead``) to every later model with that digest, for as long as any of them holds it (a
weak registry: the session goes when the last model does).

This module trusts its caller for the bytes: ``edgeft.artifact.open_artifact`` has checked
each artifact's files against its manifest (the trunk's and head's sha256 among them) before a
model asks for them, so a changed file is refused for every model that carries it, whether
or not a session for its digest is already loaded. It knows nothing of tokens or labels.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgeft.artifact import Head, Trunk
from edgeft.errors import EdgeftError
from edgeft.runtime.session import input_dtypes, open_session, output_dtypes


class SharedTrunk:
    """A loaded trunk: graph inputs in, the boundary tensors (``outputs``) out."""

    def __init__(self, path: Path, spec: Trunk, threads: int | None, spin: Any = None) -> None:
        self.sha256, self.blocks, self.outputs = spec.sha256, spec.blocks, list(spec.outputs)
        self.session = open_session(path, threads, spin=spin)
        self.dtypes = input_dtypes(self.session)
        missing = set(self.outputs) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise EdgeftError(f"{path.name}: the trunk graph lacks the output {sorted(missing)[0]!r} that its "
                              "manifest names")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The boundary tensors for one batch (``feeds``: the classifier's padded inputs)."""
        values = self.session.run(self.outputs, {k: v for k, v in feeds.items() if k in self.dtypes})
        return dict(zip(self.outputs, values))


class SharedHead:
    """A loaded head: the top's last hidden state (``input``, ``[rows, positions, hidden]``) in, ``logits`` out.

    It has no KV cache, so any rows of any models that carry it can go through one call."""

    def __init__(self, path: Path, spec: Head, threads: int | None, spin: Any = None) -> None:
        self.sha256, self.input = spec.sha256, spec.input
        self.session = open_session(path, threads, spin=spin)
        if [i.name for i in self.session.get_inputs()] != [self.input] or "logits" not in output_dtypes(self.session):
            raise EdgeftError(f"{path.name}: the head graph does not take {self.input!r} to logits as its manifest says")
        self.logits_dtype = output_dtypes(self.session)["logits"]

    def run(self, hidden: np.ndarray | ort.OrtValue, out: np.ndarray | None = None) -> np.ndarray:
        """The logits ``[rows, positions, vocab]`` of ``hidden`` (stacked rows, any models'), written into ``out``
        when given (C-contiguous, of that shape and ``logits_dtype``), else into a new array."""
        io = self.session.io_binding()
        if isinstance(hidden, ort.OrtValue):
            io.bind_ortvalue_input(self.input, hidden)
        else:
            hidden = np.ascontiguousarray(hidden)  # bound by address: alive until the run is over
            io.bind_input(self.input, "cpu", 0, hidden.dtype, list(hidden.shape), hidden.ctypes.data)
        if out is None:
            io.bind_output("logits", "cpu")
        else:
            io.bind_output("logits", "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        self.session.run_with_iobinding(io)
        return out if out is not None else io.get_outputs()[0].numpy()


_LOADED: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()  # SharedTrunk or SharedHead
_LOCK = threading.Lock()


def _shared(sha256: str, make: Callable[[], Any], same: Callable[[Any], bool], refusal: str) -> Any:
    """The part loaded for ``sha256``, made now if none is; ``refusal`` when the one loaded is not ``same``."""
    with _LOCK:
        part = _LOADED.get(sha256)
        if part is None:
            part = _LOADED[sha256] = make()
        elif not same(part):
            raise EdgeftError(refusal)
        return part


def load(folder: Path, spec: Trunk, threads: int | None = None, spin: Any = None) -> SharedTrunk:
    """The process's session for the trunk ``spec`` names, opened from ``folder`` if none is loaded.

    ``folder`` is an artifact already checked against its manifest. A session loaded for an
    earlier model keeps that model's thread count and spin policy."""
    return _shared(spec.sha256, lambda: SharedTrunk(Path(folder) / spec.file, spec, threads, spin),
                   lambda t: isinstance(t, SharedTrunk) and t.outputs == list(spec.outputs),
                   f"{folder}: its manifest names other outputs for trunk {spec.sha256[:16]} than the one loaded")


def load_head(folder: Path, spec: Head, threads: int | None = None, spin: Any = None) -> SharedHead:
    """The process's session for the head ``spec`` names, opened from ``folder`` if none is loaded (as ``load``)."""
    return _shared(spec.sha256, lambda: SharedHead(Path(folder) / spec.file, spec, threads, spin),
                   lambda h: isinstance(h, SharedHead) and h.input == spec.input,
                   f"{folder}: its manifest names another input for head {spec.sha256[:16]} than the one loaded")


def load_tokenizer(path: Path, sha256: str) -> Any:
    """The process's ``tokenizers.Tokenizer`` for the file with this sha256, read from ``path`` if none is loaded
    (models tuned from one base carry the same file; a generator only reads it)."""
    from tokenizers import Tokenizer

    return _shared(sha256, lambda: Tokenizer.from_file(str(path)), lambda t: isinstance(t, Tokenizer),
                   f"{path}: sha256 {sha256[:16]} is loaded as another kind of part")


def loaded() -> dict[str, SharedTrunk]:
    """The trunks this process holds now, by sha256."""
    with _LOCK:
        return {k: v for k, v in _LOADED.items() if isinstance(v, SharedTrunk)}


def loaded_heads() -> dict[str, SharedHead]:
    """The heads this process holds now, by sha256."""
    with _LOCK:
        return {k: v for k, v in _LOADED.items() if isinstance(v, SharedHead)}
