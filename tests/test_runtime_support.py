"""Artifacts for the runtime tests, built once per session from the tiny fixture models.

Uses ``edgeft.export.export`` when the export stage is importable; until then a minimal
stand-in makes the same artifact layout: the onnxruntime-genai builder for llama (fused
GroupQueryAttention graph), torch.onnx for GPT-2 (the past/present convention) and for a
BERT sequence classifier. No tests live here.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

from edgeft import artifact


def _has_export() -> bool:
    try:
        from edgeft.export import ExportConfig, export  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def build(kind: str, src: str, root: str) -> Path:
    """The artifact folder for ``kind`` (llama, gpt2, bert) made from HF folder ``src`` under ``root``."""
    out = Path(root) / f"{kind}-art"
    if out.exists():
        shutil.rmtree(out)
    Path(root).mkdir(parents=True, exist_ok=True)
    return {"llama": _llama, "gpt2": _gpt2, "bert": _bert}[kind](Path(src), out)


def _tokenizer_section(src: Path, tpl_file: str | None = None) -> artifact.Tokenizer:
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    eos = cfg.get("eos_token")
    pad = cfg.get("pad_token")
    return artifact.Tokenizer(chat_template=tpl_file, bos_token=cfg.get("bos_token"), eos_token=eos,
                              pad_token_id=vocab.get(pad), eos_token_ids=[vocab[eos]] if eos in vocab else [])


def _copy_tokenizer(src: Path, dst: Path) -> str | None:
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(src / name, dst / name)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    tpl = cfg.get("chat_template")
    if tpl is None and (src / "chat_template.jinja").is_file():
        tpl = (src / "chat_template.jinja").read_text()
    if tpl:
        (dst / "chat_template.jinja").write_text(tpl)
        return "chat_template.jinja"
    return None


def _decoder(cfg: dict, uses_position_ids: bool) -> artifact.Decoder:
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    return artifact.Decoder(num_layers=layers, num_kv_heads=cfg.get("num_key_value_heads", heads),
                            head_dim=hidden // heads, vocab_size=cfg["vocab_size"],
                            context_length=cfg.get("max_position_embeddings", cfg.get("n_positions")),
                            uses_position_ids=uses_position_ids)


def _io(model: Path) -> tuple[list[str], list[str]]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]


def _llama(src: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
                    "-p", "fp32", "-e", "cpu"], check=True, capture_output=True)
    tpl = _copy_tokenizer(src, out)
    cfg = json.loads((src / "config.json").read_text())
    ins, outs = _io(out / "model.onnx")
    m = artifact.Manifest(
        task=artifact.Task.causal_lm, architecture="llama",
        graph=artifact.Graph(file="model.onnx", opset=21, inputs=ins, outputs=outs, builder="onnxruntime-genai",
                             fused=True, genai_config="genai_config.json"),
        tokenizer=_tokenizer_section(src, tpl), quantization={"scheme": "none"},
        decoder=_decoder(cfg, "position_ids" in ins), generation=artifact.Generation())
    artifact.write_manifest(out, m)
    return out


def _gpt2(src: Path, out: Path) -> Path:
    import torch
    from torch.export import Dim
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(src).eval()
    cfg = model.config
    layers, heads, dim = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head

    class WithCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(layers)])
            o = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True)
            return (o.logits, *[t for k, v, _ in o.past_key_values for t in (k, v)])

    past = [torch.randn(1, heads, 3, dim) for _ in range(2 * layers)]
    args = (torch.ones(1, 2, dtype=torch.long), torch.ones(1, 5, dtype=torch.long), torch.tensor([[3, 4]]), past)
    b, s, p = Dim("batch"), Dim("seq"), Dim("past")
    shapes = ({0: b, 1: s}, {0: b, 1: Dim("total")}, {0: b, 1: s}, [{0: b, 2: p}] * (2 * layers))
    names = [f"{{}}.{i}.{t}" for i in range(layers) for t in ("key", "value")]
    out.mkdir(parents=True)
    torch.onnx.export(WithCache(model).eval(), args, str(out / "model.onnx"), dynamo=True, dynamic_shapes=shapes,
                      input_names=["input_ids", "attention_mask", "position_ids",
                                   *[n.format("past_key_values") for n in names]],
                      output_names=["logits", *[n.format("present") for n in names]], opset_version=18,
                      verbose=False)
    tpl = _copy_tokenizer(src, out)
    ins, outs = _io(out / "model.onnx")
    m = artifact.Manifest(
        task=artifact.Task.causal_lm, architecture="gpt2",
        graph=artifact.Graph(file="model.onnx", opset=18, inputs=ins, outputs=outs, builder="torch.onnx"),
        tokenizer=_tokenizer_section(src, tpl), quantization={"scheme": "none"},
        decoder=_decoder(cfg.to_dict(), True), generation=artifact.Generation())
    artifact.write_manifest(out, m)
    return out


def bert_classifier(src: Path, labels: list[str]):
    """The tiny BERT with a seeded classification head (the reference model for the bert artifact)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    return AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}).eval()


LABELS = ["negative", "neutral", "positive"]


def _bert(src: Path, out: Path) -> Path:
    import torch

    model = bert_classifier(src, LABELS)

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    out.mkdir(parents=True)
    x = torch.ones(2, 7, dtype=torch.long)
    torch.onnx.export(Logits(model).eval(), (x, x, torch.zeros_like(x)), str(out / "model.onnx"), dynamo=False,
                      input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids")}
                      | {"logits": {0: "batch"}}, opset_version=17)
    _copy_tokenizer(src, out)
    ins, outs = _io(out / "model.onnx")
    m = artifact.Manifest(
        task=artifact.Task.classification, architecture="bert",
        graph=artifact.Graph(file="model.onnx", opset=17, inputs=ins, outputs=outs, builder="torch.onnx"),
        tokenizer=_tokenizer_section(src), quantization={"scheme": "none"},
        classifier=artifact.Classifier(labels=LABELS, max_length=128, uses_token_type_ids=True))
    artifact.write_manifest(out, m)
    return out
