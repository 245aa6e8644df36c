"""Decoder LMs to ONNX with a KV cache, one input/output convention for every architecture.

Architectures onnxruntime-genai's model builder knows (the Llama family, SmolLM2
included, Mistral, Qwen, Phi, Gemma...) go through it: a fused graph
(GroupQueryAttention, SkipSimplifiedLayerNormalization, rotary embedding inside the
attention op) that needs no ``position_ids``, plus the ``genai_config.json`` its own
runtime reads. Others (GPT-2 first) go through ``torch.onnx.export`` with the same names,
then onnxruntime's transformer optimizer where its fusions apply.

The graph built here is full precision; ``edgeft.export.quantize`` narrows it. This
module knows transformers, the builder and torch.onnx; it knows nothing of the gate.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.export.graphs import add_logits_to_keep, interface, op_counts, optimize_graph, quiet_warnings

# Hugging Face architecture -> model_type, for those onnxruntime-genai's builder turns into a fused graph.
BUILDER_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "PhiForCausalLM": "phi", "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2", "GraniteForCausalLM": "granite",
    "OlmoForCausalLM": "olmo", "NemotronForCausalLM": "nemotron", "SmolLM3ForCausalLM": "smollm3",
}
# The builder's options: the MLP's gate and up projections as one MatMul (then a Split), so a
# decode step runs one weight matrix fewer per block (benchmarks/results/2026-12-03-vm-fused-mlp-avx2.md).
BUILDER_OPTIONS = ["fuse_mlp_gate_up=true"]
# Exported with torch.onnx (and checked against PyTorch in the tests).
TORCH_ARCHITECTURES = {"GPT2LMHeadModel": "gpt2"}
OPTIMIZER_TYPES = {"gpt2": "gpt2"}


def supported() -> str:
    names = sorted(set(BUILDER_ARCHITECTURES.values())) + sorted(set(TORCH_ARCHITECTURES.values()))
    return ", ".join(names)


@dataclass
class DecoderGraph:
    """An exported fp32 decoder graph in a work folder, and how to drive it."""

    path: Path  # model.onnx (+ model.onnx.data)
    builder: str  # "onnxruntime-genai" or "torch.onnx"
    fused: bool
    inputs: list[str]
    outputs: list[str]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    uses_position_ids: bool
    kv_dtype: str = "float32"
    opset: int = 0
    genai_config: Path | None = None
    fusions: dict[str, int] = field(default_factory=dict)
    logits_to_keep: str | None = None  # the optional input that cuts the logits to the last K positions


def check_supported(hf_config: Any) -> str:
    """'builder' or 'torch' for a decoder config; one line naming the supported ones otherwise."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if any(a in BUILDER_ARCHITECTURES for a in archs):
        return "builder"
    if any(a in TORCH_ARCHITECTURES for a in archs):
        return "torch"
    raise EdgeftError(f"cannot export a {getattr(hf_config, 'model_type', '?')} decoder "
                      f"({', '.join(archs) or 'no architectures'}); supported decoders: {supported()}")


def export_decoder(model: Any, hf_dir: Path, work: Path, route: str) -> DecoderGraph:
    """Export the fp32 decoder saved at ``hf_dir`` (and loaded as ``model``) into ``work``.

    ``route`` is what ``check_supported`` said of the model's config: "builder" or "torch".
    The graph gets an optional ``logits_to_keep`` input (``graphs.add_logits_to_keep``) so that
    prompt prefill computes the head for the last position only.
    """
    graph = _builder_export(hf_dir, work) if route == "builder" else _torch_export(model, work)
    graph.logits_to_keep = add_logits_to_keep(graph.path)
    return graph


# ---------------------------------------------------------------- onnxruntime-genai builder

def _builder_export(hf_dir: Path, work: Path) -> DecoderGraph:
    from onnxruntime_genai.models import builder

    out, cache = work / "builder", work / "builder-cache"
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for extra in (BUILDER_OPTIONS, []):  # without the options where the builder refuses them
            try:
                opts = builder.parse_extra_options(None, str(hf_dir), str(out), "fp32", "cpu", str(cache), extra)
                builder.create_model(None, str(hf_dir), str(out), "fp32", "cpu", str(cache), **opts)
                break
            except (NotImplementedError, ValueError) as exc:
                shutil.rmtree(out, ignore_errors=True)
                if not extra:
                    raise EdgeftError(f"onnxruntime-genai's builder refused this model: {exc}") from None
    shutil.rmtree(cache, ignore_errors=True)
    genai = json.loads((out / "genai_config.json").read_text())
    dec = genai["model"]["decoder"]
    path = out / dec.get("filename", "model.onnx")
    inputs, outputs, opset = interface(path)
    return DecoderGraph(
        path=path, builder="onnxruntime-genai", fused=True,
        inputs=inputs, outputs=outputs, num_layers=dec["num_hidden_layers"],
        num_kv_heads=dec["num_key_value_heads"], head_dim=dec["head_size"],
        vocab_size=genai["model"]["vocab_size"], context_length=genai["model"]["context_length"],
        uses_position_ids="position_ids" in inputs, kv_dtype=_kv_dtype(path),
        opset=opset, genai_config=out / "genai_config.json", fusions=op_counts(path),
    )


def _kv_dtype(path: Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for i in m.graph.input:
        if i.name.startswith("past_key_values"):
            return {1: "float32", 10: "float16", 16: "bfloat16"}.get(i.type.tensor_type.elem_type, "float32")
    return "float32"


# ---------------------------------------------------------------- torch.onnx

def _past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def _present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def _wrapper(model: Any, num_layers: int) -> Any:
    import torch
    from transformers import DynamicCache

    class WithCache(torch.nn.Module):
        """Flat tensors in and out: the runtime's convention around a Hugging Face decoder."""

        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            flat = []
            for layer in out.past_key_values.layers[:num_layers]:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return WithCache().eval()


def _torch_export(model: Any, work: Path) -> DecoderGraph:
    import torch

    cfg = model.config
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    raw, out = work / "torch" / "raw.onnx", work / "torch" / "model.onnx"
    raw.parent.mkdir(parents=True, exist_ok=True)
    ids, pos = torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])
    mask = torch.ones(1, 5, dtype=torch.long)
    past = [torch.zeros(1, kv_heads, 2, head_dim) for _ in range(2 * layers)]
    names_in = ["input_ids", "attention_mask", "position_ids", *_past_names(layers)]
    names_out = ["logits", *_present_names(layers)]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in _past_names(layers)})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in _present_names(layers)})
    with torch.no_grad(), quiet_warnings():
        torch.onnx.export(_wrapper(model, layers), (ids, mask, pos, *past), str(raw), input_names=names_in,
                          output_names=names_out, dynamic_axes=axes, opset_version=17, dynamo=False)
    fused = optimize_graph(raw, out, cfg, OPTIMIZER_TYPES)
    inputs, outputs, opset = interface(out)
    return DecoderGraph(path=out, builder="torch.onnx", fused=fused, inputs=inputs, outputs=outputs,
                        num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=cfg.vocab_size,
                        context_length=getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024),
                        uses_position_ids=True, opset=opset, fusions=op_counts(out))
