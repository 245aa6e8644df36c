"""One onnxruntime session per distinct trunk in this process, keyed by the trunk's sha256.

A split classifier (``edgeft.artifact.Trunk``) carries its trunk, the embeddings and frozen
blocks of its base, as a file named and hashed by its content. Models tuned from one base
with the same boundary and quantization carry byte-identical trunks: ``load`` opens the
first one it is asked for and hands the same ``SharedTrunk`` to every later model with that
digest, for as long as any of them holds it (a weak registry: the session goes when the last
model does).

This module trusts its caller for the bytes: ``edgeft.artifact.open_artifact`` has checked
each artifact's files against its manifest (the trunk's sha256 among them) before a model
asks for its trunk, so a changed trunk is refused for every model that carries it, whether
or not a session for its digest is already loaded. It knows nothing of tokens or labels.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.artifact import Trunk
from edgeft.errors import EdgeftError
from edgeft.runtime.session import input_dtypes, open_session


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


_LOADED: weakref.WeakValueDictionary[str, SharedTrunk] = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def load(folder: Path, spec: Trunk, threads: int | None = None, spin: Any = None) -> SharedTrunk:
    """The process's session for the trunk ``spec`` names, opened from ``folder`` if none is loaded.

    ``folder`` is an artifact already checked against its manifest. A session loaded for an
    earlier model keeps that model's thread count and spin policy."""
    with _LOCK:
        trunk = _LOADED.get(spec.sha256)
        if trunk is None:
            trunk = SharedTrunk(Path(folder) / spec.file, spec, threads, spin)
            _LOADED[spec.sha256] = trunk
        elif trunk.outputs != list(spec.outputs):
            raise EdgeftError(f"{folder}: its manifest names other outputs for trunk {spec.sha256[:16]} than the "
                              "one loaded")
        return trunk


def loaded() -> dict[str, SharedTrunk]:
    """The trunks this process holds now, by sha256."""
    with _LOCK:
        return dict(_LOADED.items())
