"""Sequence classifiers to ONNX: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``) -> ``logits``.

The names and dynamic axes are optimum's, so ``ORTModelForSequenceClassification`` can
open the artifact. BERT-family encoders are then fused by onnxruntime's transformer
optimizer (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization where
its patterns match). The graph is full precision; ``edgeft.export.quantize`` narrows it.

This module knows torch.onnx and the optimizer; it knows nothing of labels or the gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.export.graphs import interface, op_counts, optimize_graph, quiet_warnings

# model_type -> onnxruntime.transformers optimizer model type
FUSABLE = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "xlm-roberta": "bert", "electra": "bert"}
SUPPORTED = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta-v2", "modernbert")


@dataclass
class ClassifierGraph:
    path: Path
    inputs: list[str]
    outputs: list[str]
    uses_token_type_ids: bool
    fused: bool
    opset: int
    fusions: dict[str, int] = field(default_factory=dict)


def check_supported(hf_config: Any) -> None:
    if hf_config.model_type not in SUPPORTED:
        raise EdgeftError(f"cannot export a {hf_config.model_type} classifier; supported classifiers: "
                          f"{', '.join(SUPPORTED)}")


def export_classifier(model: Any, work: Path, max_length: int, output: str = "logits") -> ClassifierGraph:
    """Export ``model`` (a ``...ForSequenceClassification``) to ``work/classifier/model.onnx``.

    ``output="last_hidden_state"`` exports a bare encoder (``AutoModel``) for embeddings instead.
    The caller has checked the architecture (``check_supported``) before any slow step.
    """
    import inspect

    import torch

    if FUSABLE.get(model.config.model_type) and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # the pattern onnxruntime's Attention fusion knows; same numbers
    raw, out = work / "classifier" / "raw.onnx", work / "classifier" / "model.onnx"
    raw.parent.mkdir(parents=True, exist_ok=True)
    accepts = inspect.signature(model.forward).parameters
    # Segment ids only where there is more than one segment to tell apart: RoBERTa and XLM-R
    # have one token type (type_vocab_size 1), so 0 is the only valid id and the graph goes without.
    with_types = "token_type_ids" in accepts and (getattr(model.config, "type_vocab_size", 0) or 0) > 1
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
    seq = min(8, max_length)
    args = tuple(torch.ones(2, seq, dtype=torch.long) if n != "token_type_ids" else torch.zeros(2, seq, dtype=torch.long)
                 for n in names)
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    axes[output] = {0: "batch_size"} if output == "logits" else {0: "batch_size", 1: "sequence_length"}

    class Output(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, *tensors):
            return getattr(self.m(**dict(zip(names, tensors))), output)

    with torch.no_grad(), quiet_warnings():
        torch.onnx.export(Output().eval(), args, str(raw), input_names=names, output_names=[output],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    fused = optimize_graph(raw, out, model.config, FUSABLE)
    inputs, outputs, opset = interface(out)
    return ClassifierGraph(path=out, inputs=inputs, outputs=outputs, uses_token_type_ids=with_types,
                           fused=fused, opset=opset, fusions=op_counts(out))
