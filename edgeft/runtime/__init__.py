"""edgeft's torch-free runtime: generation, classification and embeddings from an artifact.

Imports only onnxruntime, tokenizers, numpy, jinja2 (chat templates) and edgeft's
torch-free modules. ``load`` opens any artifact by its manifest's task.

The names below are resolved on first use (a module ``__getattr__``), so importing a pure
type (``edgeft.runtime.params``) does not import onnxruntime or numpy.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeft.artifact import Check
    from edgeft.runtime.classify import TextClassifier
    from edgeft.runtime.constrain import Constraint, compile_for
    from edgeft.runtime.embed import TextEmbedder
    from edgeft.runtime.generate import Chunk, Completion, Generator
    from edgeft.runtime.params import SamplingParams

__all__ = ["Generator", "TextClassifier", "TextEmbedder", "Constraint", "compile_for", "SamplingParams", "Completion",
           "Chunk", "load"]

_HOMES = {"Generator": "generate", "Completion": "generate", "Chunk": "generate", "TextClassifier": "classify",
          "TextEmbedder": "embed", "Constraint": "constrain", "compile_for": "constrain", "SamplingParams": "params"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def load(path: str | Path, threads: int | None = None, check: Check | None = None,
         trusted_keys: Sequence = (), spin=None, reserve: float = 0.0) -> Generator | TextClassifier | TextEmbedder:
    """Open an artifact folder or packed file as a ``Generator``, ``TextClassifier`` or ``TextEmbedder``.

    Every byte is hashed unless ``check`` is ``Check.quick``; ``trusted_keys``
    (``edgeft.signing.load_trusted_keys``) demand a signature by one of them. ``spin`` (every
    model's) and ``reserve`` (a generator's): the thread policy (``edgeft.runtime.session.resolve_spin``)."""
    from edgeft.artifact import Check, Task, open_artifact
    from edgeft.runtime.classify import TextClassifier
    from edgeft.runtime.embed import TextEmbedder
    from edgeft.runtime.generate import Generator

    folder, manifest = open_artifact(path, Check.full if check is None else check, trusted_keys)
    if manifest.task is Task.causal_lm:
        return Generator(folder, manifest, threads, spin=spin, reserve=reserve)
    if manifest.task is Task.embedding:
        return TextEmbedder(folder, manifest, threads, spin=spin)
    return TextClassifier(folder, manifest, threads, spin=spin)
