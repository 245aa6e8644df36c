"""edgeft's torch-free runtime: generation, classification and embeddings from an artifact.

Imports only onnxruntime, tokenizers, numpy, jinja2 (chat templates) and edgeft's
torch-free modules. ``load`` opens any artifact by its manifest's task.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgeft.artifact import Check, Task, open_artifact
from edgeft.runtime.classify import TextClassifier
from edgeft.runtime.constrain import Constraint, compile_for
from edgeft.runtime.embed import TextEmbedder
from edgeft.runtime.generate import Chunk, Completion, Generator
from edgeft.runtime.sampling import SamplingParams

__all__ = ["Generator", "TextClassifier", "TextEmbedder", "Constraint", "compile_for", "SamplingParams", "Completion", "Chunk", "load"]


def load(path: str | Path, threads: int | None = None, check: Check = Check.full,
         trusted_keys: Sequence = (), spin=None, reserve: float = 0.0) -> Generator | TextClassifier | TextEmbedder:
    """Open an artifact folder or packed file as a ``Generator``, ``TextClassifier`` or ``TextEmbedder``.

    Every byte is hashed unless ``check`` is ``Check.quick``; ``trusted_keys``
    (``edgeft.signing.load_trusted_keys``) demand a signature by one of them. ``spin`` and
    ``reserve``: a generator's thread policy (``edgeft.runtime.session.resolve_spin``)."""
    folder, manifest = open_artifact(path, check, trusted_keys)
    if manifest.task is Task.causal_lm:
        return Generator(folder, manifest, threads, spin=spin, reserve=reserve)
    if manifest.task is Task.embedding:
        return TextEmbedder(folder, manifest, threads)
    return TextClassifier(folder, manifest, threads)
