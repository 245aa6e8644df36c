"""Sequence classifiers to ONNX: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``) -> ``logits``.

The names and dynamic axes are optimum's, so ``ORTModelForSequenceClassification`` can
open the artifact. BERT-family encoders are then fused by onnxruntime's transformer
optimizer (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization where
its patterns match). Decoders with a classification head (Llama, Qwen...) score the last
real token of each row, found from the attention mask. The graph is full precision;
``edgeft.export.quantize`` narrows it.

This module knows torch.onnx and the optimizer; it knows nothing of labels or the gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.export.architectures import names, of_task
from edgeft.export.graphs import interface, op_counts, optimize_graph, quiet_warnings

# model_type -> onnxruntime.transformers optimizer model type
FUSABLE = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "xlm-roberta": "bert", "electra": "bert"}
SUPPORTED = tuple(a.name for a in of_task("classification"))
# Decoders with a classification head (``...ForSequenceClassification``: a ``score`` layer on the
# last token's hidden state), exported through ``_LastToken``.
DECODER_CLASSIFIERS = {a.hf_class for a in of_task("classification") if a.name in {d.name for d in of_task("causal-lm")}}


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
                          f"{names('classification')}")


def is_decoder_classifier(model: Any) -> bool:
    return type(model).__name__ in DECODER_CLASSIFIERS


def _last_token(model: Any) -> Any:
    """``model`` (a decoder ``...ForSequenceClassification``) as ``input_ids, attention_mask -> logits``:
    the score head on the hidden state of each row's last real token.

    transformers finds that token by comparing ids with ``pad_token_id``, which fails where the pad
    token is also the end-of-text token a text ends with, or where there is none; here the mask
    says it: the rightmost position whose mask is 1, with positions counted over the mask, so
    right and left padding give the unpadded row's scores.
    """
    import torch

    class LastToken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask):
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            hidden = self.m.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=positions).last_hidden_state
            index = torch.ones_like(attention_mask).cumsum(-1) - 1  # 0, 1, ... along each row
            last = (index * attention_mask).argmax(-1)
            picked = torch.gather(hidden, 1, last[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)
            return self.m.score(picked)

    return LastToken().eval()


def export_classifier(model: Any, work: Path, max_length: int, output: str = "logits") -> ClassifierGraph:
    """Export ``model`` (a ``...ForSequenceClassification``) to ``work/classifier/model.onnx``.

    ``output="last_hidden_state"`` exports a bare encoder (``AutoModel``) for embeddings instead.
    The caller has checked the architecture (``check_supported``) before any slow step.
    """
    import inspect

    import torch

    if FUSABLE.get(model.config.model_type) and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # the pattern onnxruntime's Attention fusion knows; same numbers
    if is_decoder_classifier(model):
        return _export(_last_token(model), ["input_ids", "attention_mask"], output, work, max_length, model.config)
    accepts = inspect.signature(model.forward).parameters
    # Segment ids only where there is more than one segment to tell apart: RoBERTa and XLM-R
    # have one token type (type_vocab_size 1), so 0 is the only valid id and the graph goes without.
    with_types = "token_type_ids" in accepts and (getattr(model.config, "type_vocab_size", 0) or 0) > 1
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])

    class Output(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, *tensors):
            return getattr(self.m(**dict(zip(inputs, tensors))), output)

    return _export(Output().eval(), inputs, output, work, max_length, model.config)


def _export(module: Any, inputs: list[str], output: str, work: Path, max_length: int, cfg: Any) -> ClassifierGraph:
    import torch

    raw, out = work / "classifier" / "raw.onnx", work / "classifier" / "model.onnx"
    raw.parent.mkdir(parents=True, exist_ok=True)
    seq = min(8, max_length)
    args = tuple(torch.zeros(2, seq, dtype=torch.long) if n == "token_type_ids" else torch.ones(2, seq, dtype=torch.long)
                 for n in inputs)
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in inputs}
    axes[output] = {0: "batch_size"} if output == "logits" else {0: "batch_size", 1: "sequence_length"}
    with torch.no_grad(), quiet_warnings():
        torch.onnx.export(module, args, str(raw), input_names=inputs, output_names=[output],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    fused = optimize_graph(raw, out, cfg, FUSABLE)
    names_in, names_out, opset = interface(out)
    return ClassifierGraph(path=out, inputs=names_in, outputs=names_out, uses_token_type_ids="token_type_ids" in inputs,
                           fused=fused, opset=opset, fusions=op_counts(out))
