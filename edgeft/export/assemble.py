"""Lay out an artifact folder and fill its manifest: graph, tokenizer, configs, labels.

Beside the ONNX graph go ``tokenizer.json``, the tokenizer config and chat template,
``config.json`` (and ``generation_config.json``) so optimum's ``ORTModelFor...`` classes
can open the folder, ``genai_config.json`` where onnxruntime-genai's builder made the
graph (so its runtime works on the folder too), ``labels.json`` for classifiers and
``export.json`` (the resolved ``ExportConfig``). This module knows transformers'
tokenizer and config objects and the manifest dataclasses; it builds no graphs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgeft.artifact import (Batching, Classifier, Decoder, Embedding, Generation, Graph, Manifest, Provenance,
                             Quantization, Task, Tokenizer)
from edgeft.fsutil import atomic_write_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_graph(model_path: Path, dest: Path) -> None:
    """Copy ``model.onnx`` and its external data file into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_path, dest / "model.onnx")
    data = model_path.with_name(model_path.name + ".data")
    if data.is_file():
        shutil.copy2(data, dest / "model.onnx.data")


def copy_support_files(hf_dir: Path, dest: Path, genai_config: Path | None, tokenizer: Any,
                       labels: list[str] | None, export_config: dict[str, Any],
                       context_length: int | None = None) -> None:
    """Everything but the graph: tokenizer files, HF configs, genai config, labels, export.json."""
    for name in (*TOKENIZER_FILES, "config.json", "generation_config.json"):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, dest / name)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template and not (dest / "chat_template.jinja").is_file():
        (dest / "chat_template.jinja").write_text(template)
    if genai_config is not None:
        genai = json.loads(genai_config.read_text())
        if context_length:  # keep onnxruntime-genai's view of the context equal to the manifest's
            genai["model"]["context_length"] = context_length
            genai.setdefault("search", {})["max_length"] = context_length
        atomic_write_json(dest / "genai_config.json", genai)
    if labels:
        atomic_write_json(dest / "labels.json", {"labels": list(labels)})
    atomic_write_json(dest / "export.json", export_config)


def tokenizer_section(tokenizer: Any, hf_config: Any, generation_config: Any, dest: Path) -> Tokenizer:
    """Special tokens the runtime needs, read from the Hugging Face tokenizer and configs."""
    from tokenizers import Tokenizer as RawTokenizer

    eos: list[int] = []
    for source in (generation_config, hf_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in eos:
                eos.append(v)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    raw = RawTokenizer.from_file(str(dest / "tokenizer.json")).encode("hello", add_special_tokens=True).ids
    hf_ids = tokenizer("hello")["input_ids"]
    bos = tokenizer.bos_token_id
    add_bos = bos is not None and bool(hf_ids) and hf_ids[0] == bos and (not raw or raw[0] != bos)
    return Tokenizer(
        file="tokenizer.json",
        config_file="tokenizer_config.json" if (dest / "tokenizer_config.json").is_file() else None,
        chat_template="chat_template.jinja" if (dest / "chat_template.jinja").is_file() else None,
        bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None),
        eos_token_ids=eos, add_bos=add_bos,
    )


def generation_section(generation_config: Any) -> Generation:
    """Default sampling from ``generation_config.json`` (greedy unless it samples)."""
    g = generation_config
    if g is None or not getattr(g, "do_sample", False):
        return Generation(repetition_penalty=float(getattr(g, "repetition_penalty", None) or 1.0))
    return Generation(temperature=float(g.temperature or 1.0), top_k=int(g.top_k or 0), top_p=float(g.top_p or 1.0),
                      repetition_penalty=float(g.repetition_penalty or 1.0))


def decoder_manifest(graph: Any, tok: Tokenizer, gen: Generation, quant: Quantization, architecture: str,
                     context_length: int | None, source: Provenance) -> Manifest:
    n = graph.num_layers
    return Manifest(
        task=Task.causal_lm, architecture=architecture,
        graph=Graph(file="model.onnx", opset=graph.opset, inputs=graph.inputs, outputs=graph.outputs,
                    builder=graph.builder, fused=graph.fused,
                    genai_config="genai_config.json" if graph.genai_config else None),
        tokenizer=tok, quantization=quant, generation=gen, source=source,
        decoder=Decoder(num_layers=n, num_kv_heads=graph.num_kv_heads, head_dim=graph.head_dim,
                        vocab_size=graph.vocab_size, context_length=context_length or graph.context_length,
                        uses_position_ids=graph.uses_position_ids, kv_dtype=graph.kv_dtype,
                        batching=_batching(graph).value, logits_to_keep=graph.logits_to_keep),
    )


def _batching(graph: Any) -> Batching:
    """How the runtime may batch this graph: GQA's shared buffer has per-row lengths; torch.onnx
    graphs with a mask and position ids take left-padded rows; anything else decodes alone."""
    if graph.builder == "onnxruntime-genai" and graph.fused:
        return Batching.slots
    if "attention_mask" in graph.inputs and graph.uses_position_ids:
        return Batching.padded
    return Batching.none


def classifier_manifest(graph: Any, tok: Tokenizer, quant: Quantization, architecture: str, labels: list[str],
                        max_length: int, source: Provenance) -> Manifest:
    return Manifest(
        task=Task.classification, architecture=architecture,
        graph=Graph(file="model.onnx", opset=graph.opset, inputs=graph.inputs, outputs=graph.outputs,
                    builder="torch.onnx", fused=graph.fused),
        tokenizer=tok, quantization=quant, source=source,
        classifier=Classifier(labels=list(labels), max_length=max_length,
                              uses_token_type_ids=graph.uses_token_type_ids),
    )


def embedding_manifest(graph: Any, tok: Tokenizer, quant: Quantization, architecture: str, spec: Embedding,
                       source: Provenance) -> Manifest:
    return Manifest(
        task=Task.embedding, architecture=architecture,
        graph=Graph(file="model.onnx", opset=graph.opset, inputs=graph.inputs, outputs=graph.outputs,
                    builder="torch.onnx", fused=graph.fused),
        tokenizer=tok, quantization=quant, source=source, embedding=spec,
    )


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
