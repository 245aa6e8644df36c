"""What an export works with once its graph exists: the candidates (artifact folders built on demand), the
plan that holds them, and what the gate chose.

Shared by ``pipeline`` (the order of an export, classifiers and embeddings) and ``decoder_plan``
(decoders). This module knows the manifest and the gate's result types; it builds nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeft.artifact import MANIFEST, Manifest
from edgeft.export import gate
from edgeft.export.config import ExportConfig

if TYPE_CHECKING:
    from edgeft.artifact import Embedding
    from edgeft.export.classifier import ClassifierGraph
    from edgeft.export.decoder import DecoderGraph
    from edgeft.export.merge import Source

Log = Callable[[str], None]


@dataclass
class Candidate:
    """One complete artifact folder in the work folder, built on demand, then gated."""

    name: str  # "int8", "int4", "mixed", "none", "int8-dynamic", "int8-weight-only"
    build: Callable[[], tuple[Path, Manifest]]
    folder: Path | None = None
    manifest: Manifest | None = None
    result: gate.GateResult | None = None
    why: str = ""  # why it was chosen, once it is (recorded in the manifest's gate section)
    note: str = ""  # what the candidate is, said beside ``why`` (searched: the sensitivity pass's choice)
    retry: Callable[[gate.GateResult], Candidate | None] | None = None  # a narrower try after a failed gate
    chosen4: list[str] = field(default_factory=list)  # searched: the groups it put at 4 bits

    def ensure_built(self) -> Candidate:
        if self.folder is None:
            self.folder, self.manifest = self.build()
        return self


@dataclass
class Plan:
    """What one export is working with once its graph exists: the source, the fp32 graph, the
    tokenizer, and the candidates built from them, smallest first. Made by ``decoder_plan.plan``,
    ``_classifier_plan`` or ``_embedding_plan``; the gate changes only the candidates' results."""

    config: ExportConfig
    source: Source
    graph: DecoderGraph | ClassifierGraph
    tokenizer: Any  # the Hugging Face tokenizer (its files ship in every candidate)
    candidates: list[Candidate]
    max_length: int | None = None  # encoders: tokens per text
    embedding: Embedding | None = None  # embedding models: what the manifest says of the vectors
    evals: gate.EvalSet | None = None  # decoders: the gate's texts and the PyTorch reference, measured
    reference: gate.Reference | None = None  # before the graph existed (``decoder_plan``)


@dataclass(frozen=True)
class Gated:
    """What the gate measured: the candidate it chose (None: none passed), the eval texts, the reference."""

    chosen: Candidate | None
    evals: gate.EvalSet
    reference: gate.Reference


def unseal(c: Candidate) -> None:
    """A gated candidate keeps no manifest: only the published artifact (its manifest written with the
    gate's record) verifies; the candidate's manifest stays in memory (``c.manifest``)."""
    if c.folder is not None:
        (c.folder / MANIFEST).unlink(missing_ok=True)


def say(c: Candidate, log: Log) -> None:
    m = c.result.metrics
    if "mean_cosine" in m:
        figures = (f"mean cosine {m['mean_cosine']:.4f} (min {m['min_cosine']:.4f}), "
                   f"{m['ms_per_text']:.2f} ms/text")
    elif "perplexity" in m:
        figures = (f"perplexity {m['perplexity']:.3f} ({m['perplexity_increase_pct']:+.2f}%), "
                   f"token agreement {m['token_agreement']:.3f}, repetition {m['repetition']:.2f}")
    else:
        ci = m.get("accuracy_drop_ci95")
        interval = f", 95% interval {ci[0]:.2f} to {ci[1]:.2f}" if ci else ""
        figures = (f"accuracy {m['accuracy']:.4f} (drop {m['accuracy_drop_points']:.2f} pt{interval}), "
                   f"agreement {m['label_agreement']:.4f}, {m['ms_per_text']:.2f} ms/text")
    log(f"gate {c.name}: {'passed' if c.result.passed else 'FAILED'}: {figures}")
