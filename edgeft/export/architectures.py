"""The architectures ``edgeft export`` knows: one table, read by the exporters, ``--help`` and the tests.

Each row names a Hugging Face ``model_type``, the transformers class that is exported, the
task, and the route its graph takes (onnxruntime-genai's model builder, or torch.onnx). The
default test suite builds a tiny random model for every row (``tests/test_architectures.py``)
and runs it through export, so a row here is a claim the suite checks; ``markdown()`` prints
the table the README's supported-models section is generated from.

This module is plain data (no torch, no onnx): ``--help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

BUILDER = "onnxruntime-genai"
TORCH = "torch.onnx"


@dataclass(frozen=True)
class Architecture:
    name: str  # the config's model_type
    hf_class: str  # the transformers class exported
    task: str  # "causal-lm" or "classification" (encoders also export as embedding models)
    route: str  # BUILDER or TORCH
    note: str = ""


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", "LlamaForCausalLM", "causal-lm", BUILDER, "Llama 2/3, SmolLM2"),
    Architecture("mistral", "MistralForCausalLM", "causal-lm", BUILDER, "sliding window"),
    Architecture("qwen2", "Qwen2ForCausalLM", "causal-lm", BUILDER, "Qwen2, Qwen2.5"),
    Architecture("qwen3", "Qwen3ForCausalLM", "causal-lm", BUILDER, "q/k norms"),
    Architecture("phi", "PhiForCausalLM", "causal-lm", BUILDER, "Phi-1.5, Phi-2"),
    Architecture("phi3", "Phi3ForCausalLM", "causal-lm", BUILDER, "Phi-3, Phi-3.5, Phi-4-mini"),
    Architecture("gemma", "GemmaForCausalLM", "causal-lm", BUILDER),
    Architecture("gemma2", "Gemma2ForCausalLM", "causal-lm", BUILDER, "sliding window on every other block"),
    Architecture("gemma3_text", "Gemma3ForCausalLM", "causal-lm", TORCH,
                 "Gemma 3 text models (270M, 1B); not the builder: it cannot read per-block-type rope_parameters"),
    Architecture("granite", "GraniteForCausalLM", "causal-lm", BUILDER),
    Architecture("olmo", "OlmoForCausalLM", "causal-lm", BUILDER,
                 "the builder's RMS norms replaced by OLMo's weightless layer norms"),
    Architecture("nemotron", "NemotronForCausalLM", "causal-lm", BUILDER, "ungated MLP: no fused gate/up"),
    Architecture("smollm3", "SmolLM3ForCausalLM", "causal-lm", TORCH,
                 "blocks without rotary embeddings, which onnxruntime-genai's builder cannot build"),
    Architecture("gpt2", "GPT2LMHeadModel", "causal-lm", TORCH),
    Architecture("bert", "BertForSequenceClassification", "classification", TORCH, "MiniLM, BGE"),
    Architecture("roberta", "RobertaForSequenceClassification", "classification", TORCH),
    Architecture("xlm-roberta", "XLMRobertaForSequenceClassification", "classification", TORCH),
    Architecture("distilbert", "DistilBertForSequenceClassification", "classification", TORCH),
    Architecture("electra", "ElectraForSequenceClassification", "classification", TORCH),
    Architecture("deberta-v2", "DebertaV2ForSequenceClassification", "classification", TORCH, "DeBERTa-v3"),
    Architecture("modernbert", "ModernBertForSequenceClassification", "classification", TORCH),
    # decoders with a classification head (the score layer on the last real token's hidden state);
    # not GPT-2, whose traced graph scores other lengths than the tracing example's wrongly
    *(Architecture(name, f"{prefix}ForSequenceClassification", "classification", TORCH,
                   "a decoder: the score head on the last real token")
      for name, prefix in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"),
                           ("phi", "Phi"), ("phi3", "Phi3"), ("gemma", "Gemma"), ("gemma2", "Gemma2"),
                           ("olmo", "Olmo"), ("nemotron", "Nemotron"), ("smollm3", "SmolLM3"))),
)


def of_task(task: str, route: str | None = None) -> list[Architecture]:
    return [a for a in ARCHITECTURES if a.task == task and route in (None, a.route)]


def names(task: str) -> str:
    """The supported model types of ``task``, comma-separated (for one-line errors and ``--help``)."""
    return ", ".join(a.name for a in of_task(task))


def help_text() -> str:
    """The supported architectures in a paragraph, for ``edgeft export --help``."""
    return ("Supported architectures (each tested end to end on a tiny model): text generation: "
            f"{names('causal-lm')}; classification: {names('classification')}. "
            "Print the table with: python -m edgeft.export.architectures")


def markdown() -> str:
    """The supported-architectures table, in Markdown (the README's section is generated from it)."""
    rows = ["| model_type | class | task | graph | note |", "|---|---|---|---|---|"]
    rows += [f"| {a.name} | {a.hf_class} | {a.task} | {a.route} | {a.note} |" for a in ARCHITECTURES]
    return "\n".join(rows)


def summary() -> str:
    """The supported architectures by task and graph route, one bullet each (the README's short form)."""
    decoder_classifiers = [a.name for a in ARCHITECTURES if a.task == "classification" and a.hf_class.endswith(
        "ForSequenceClassification") and any(d.name == a.name for d in of_task("causal-lm"))]
    encoders = [a.name for a in of_task("classification") if a.name not in decoder_classifiers]
    lines = [f"- text generation, onnxruntime-genai's fused graph: {', '.join(a.name for a in of_task('causal-lm', BUILDER))}",
             f"- text generation, torch.onnx: {', '.join(a.name for a in of_task('causal-lm', TORCH))}",
             f"- classification (and embeddings), encoders: {', '.join(encoders)}",
             f"- classification, decoders (the score head on the last real token): {', '.join(decoder_classifiers)}"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
