"""Decoder LMs to ONNX with a KV cache, one input/output convention for every architecture.

Architectures onnxruntime-genai's model builder knows (the Llama family, SmolLM2
included, Mistral, Qwen, Phi, Gemma...) go through it: a fused graph
(GroupQueryAttention, SkipSimplifiedLayerNormalization, rotary embedding inside the
attention op) that needs no ``position_ids``, plus the ``genai_config.json`` its own
runtime reads. Where the builder's graph differs from transformers (sliding windows it
leaves out, norm epsilons it does not read, OLMo's norms) the graph is corrected after it.
Others (GPT-2, SmolLM3) go through ``torch.onnx.export`` with the same names, then
onnxruntime's transformer optimizer where its fusions apply. Which architecture takes
which route is ``edgeft.export.architectures``'s table.

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
from edgeft.export.architectures import BUILDER, TORCH, names, of_task
from edgeft.export.graphs import add_logits_to_keep, interface, op_counts, optimize_graph, quiet_warnings

# Hugging Face architecture -> model_type, by route (the table in ``edgeft.export.architectures``).
BUILDER_ARCHITECTURES = {a.hf_class: a.name for a in of_task("causal-lm", BUILDER)}
TORCH_ARCHITECTURES = {a.hf_class: a.name for a in of_task("causal-lm", TORCH)}
# The builder's options. fuse_mlp_gate_up: the MLP's gate and up projections as one MatMul (then a
# Split), so a decode step runs one weight matrix fewer per block
# (benchmarks/results/2026-12-03-vm-fused-mlp-avx2.md); only for MLPs that have both (Nemotron's
# has no gate: the builder then fails with an AttributeError, not a refusal).
FUSE_GATE_UP = "fuse_mlp_gate_up=true"
# windowed_kv_cache=false: sliding-window blocks keep a full-length cache like the others and
# GroupQueryAttention masks the window (local_window_size). The builder's default, a cache
# bounded to the window, is a ring the kernel indexes modulo its capacity and refuses when the
# capacity is smaller than the window (Gemma-2: 4096); edgeft's runtime keeps one linear cache
# per sequence, as long as the sequence, which it rewinds, grows and copies prefixes of.
BUILDER_OPTIONS = ["windowed_kv_cache=false"]
OPTIMIZER_TYPES = {"gpt2": "gpt2"}


def supported() -> str:
    return names("causal-lm")


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
    if getattr(hf_config, "model_type", None) == "olmo" and getattr(hf_config, "clip_qkv", None):
        raise EdgeftError(f"cannot export an OLMo model with clip_qkv={hf_config.clip_qkv}: onnxruntime-genai's "
                          "builder does not clamp the attention's q, k and v")
    if any(a in BUILDER_ARCHITECTURES for a in archs):
        return "builder"
    if any(a in TORCH_ARCHITECTURES for a in archs):
        return "torch"
    raise EdgeftError(f"cannot export a {getattr(hf_config, 'model_type', '?')} decoder "
                      f"({', '.join(archs) or 'no architectures'}); supported decoders: {supported()}")


def export_decoder(model: Any, hf_dir: Path, work: Path, route: str) -> DecoderGraph:
    """Export the fp32 decoder ``model`` into ``work``; ``hf_dir`` holds its configs and tokenizer files (the
    builder reads them there, and its weights from ``model``: ``edgeft.export.genai``).

    ``route`` is what ``check_supported`` said of the model's config: "builder" or "torch".
    The graph gets an optional ``logits_to_keep`` input (``graphs.add_logits_to_keep``) so that
    prompt prefill computes the head for the last position only.
    """
    if route == "builder":
        graph = _builder_export(model, hf_dir, work, _builder_options(model))
        _match_windows(graph.path, hf_windows(model.config))
        _match_norms(graph.path, model.config)
    else:
        graph = _torch_export(model, work)
    graph.logits_to_keep = add_logits_to_keep(graph.path)
    return graph


# ---------------------------------------------------------------- onnxruntime-genai builder

def _builder_options(model: Any) -> list[str]:
    """The builder's options for ``model``: the fused gate/up MatMul only where its MLP is gated."""
    blocks = getattr(getattr(model, "model", None), "layers", None) or [None]
    mlp = getattr(blocks[0], "mlp", None)
    gated = hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj")
    return [FUSE_GATE_UP, *BUILDER_OPTIONS] if gated else list(BUILDER_OPTIONS)


def _builder_export(model: Any, hf_dir: Path, work: Path, options: list[str]) -> DecoderGraph:
    from onnxruntime_genai.models import builder

    from edgeft.export.genai import handed_over

    out, cache = work / "builder", work / "builder-cache"
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    tries = [options] + ([BUILDER_OPTIONS] if FUSE_GATE_UP in options else [])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            handed_over(model) as asked:
        for i, extra in enumerate(tries):  # without the fused gate/up where the builder refuses it
            try:
                opts = builder.parse_extra_options(None, str(hf_dir), str(out), "fp32", "cpu", str(cache), extra)
                builder.create_model(None, str(hf_dir), str(out), "fp32", "cpu", str(cache), **opts)
                break
            except (NotImplementedError, ValueError) as exc:
                shutil.rmtree(out, ignore_errors=True)
                if i == len(tries) - 1:
                    raise EdgeftError(f"onnxruntime-genai's builder refused this model: {exc}") from None
    shutil.rmtree(cache, ignore_errors=True)
    if not asked:  # a builder class with a loader of its own would have read the (weightless) folder
        raise RuntimeError("onnxruntime-genai's builder did not load the model handed to it")
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


# Where a config names its norms' epsilon (the builder reads ``rms_norm_eps`` only, else uses 1e-6).
EPSILON_KEYS = ("rms_norm_eps", "layer_norm_eps", "norm_eps", "layer_norm_epsilon")
# OLMo's norms are LayerNorms without weight or bias, epsilon 1e-5 (transformers' OlmoLayerNorm).
OLMO_NORM_EPSILON = 1e-5
NORM_OPS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization")


def norm_epsilon(cfg: Any) -> float | None:
    """The epsilon of the model's own norms, from its config."""
    if cfg.model_type == "olmo":
        return OLMO_NORM_EPSILON
    return next((float(v) for k in EPSILON_KEYS if (v := getattr(cfg, k, None)) is not None), None)


def _match_norms(path: Path, cfg: Any) -> None:
    """Make the builder's norms normalize as the model's own do, in place.

    onnxruntime-genai 0.18 reads ``rms_norm_eps`` only: Phi's ``layer_norm_eps`` and
    Nemotron's ``norm_eps`` (1e-5) became 1e-6, a drift of up to 1e-2 in the logits of a
    tiny random model. Its OLMo builder gives the norms unit weights but keeps the RMS norm
    (no mean subtracted): greedy agreement 0.3-0.4 with PyTorch. The fused RMS-norm ops have
    LayerNorm twins with the same inputs and outputs; a weightless norm's beta is 0.
    """
    import onnx
    from onnx import helper

    eps = norm_epsilon(cfg)
    twins = {"SimplifiedLayerNormalization": "LayerNormalization",
             "SkipSimplifiedLayerNormalization": "SkipLayerNormalization"} if cfg.model_type == "olmo" else {}
    m = onnx.load(str(path), load_external_data=False)
    changed = False
    for n in m.graph.node:
        if n.op_type not in NORM_OPS:
            continue
        if n.op_type in twins:
            n.op_type, changed = twins[n.op_type], True
        for a in n.attribute:
            if a.name == "epsilon" and eps is not None and abs(a.f - eps) > 1e-3 * eps:
                a.CopyFrom(helper.make_attribute("epsilon", eps))
                changed = True
    if changed:
        onnx.save(m, str(path))


def hf_windows(cfg: Any) -> list[int]:
    """Each block's attention window as transformers applies it (-1: the whole context).

    ``sliding_window`` with no ``layer_types`` (Mistral, Phi-3) windows every block; with
    ``layer_types`` (Gemma-2, Qwen2) the blocks marked ``sliding_attention``.
    """
    window = getattr(cfg, "sliding_window", None) or -1
    types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * cfg.num_hidden_layers
    return [window if t == "sliding_attention" else -1 for t in types]


def _match_windows(path: Path, windows: list[int]) -> None:
    """Give each block's GroupQueryAttention the window transformers applies, in place.

    onnxruntime-genai 0.18 reads ``layer_types`` only, so it leaves Mistral's and Phi-3's
    windows out (-1: past the window the graph attends to tokens PyTorch masks). With a
    full-length cache, ``local_window_size`` W attends to the same W positions as
    transformers' sliding window of W (checked step by step in tests/test_architectures.py).
    """
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    attn = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    if len(attn) != len(windows):
        if all(w == -1 for w in windows):
            return  # no window to set, whatever attention op the builder chose
        raise EdgeftError(f"cannot export this {len(windows)}-block model with sliding windows: onnxruntime-genai's "
                          f"graph has {len(attn)} GroupQueryAttention nodes")
    changed = False
    for node, window in zip(attn, windows):
        for a in node.attribute:
            if a.name == "local_window_size" and a.i != window:
                a.i, changed = window, True
    if changed:
        onnx.save(m, str(path))


def _kv_dtype(path: Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for i in m.graph.input:
        if i.name.startswith("past_key_values"):
            return {1: "float32", 3: "int8", 10: "float16", 16: "bfloat16"}.get(i.type.tensor_type.elem_type, "float32")
    return "float32"


# ---------------------------------------------------------------- 8-bit KV cache

KV_SCALE_INPUTS = (12, 13)  # GroupQueryAttention's k_scale and v_scale input slots (onnxruntime 1.2x-1.3x)


def kv_cache_scales(path: Path, feeds: list[dict], num_layers: int, headroom: float = 1.0) -> dict[str, Any]:
    """Static per-channel scales of each layer's key and value cache, from the fp32 graph at ``path`` run on
    ``feeds`` (``smooth.decoder_feeds``): the largest |value| a channel of a KV head held over every
    calibration position (keys after rotary, as the cache stores them) x ``headroom`` / 127, shaped
    ``[kv_heads, 1, head_dim]`` as onnxruntime's CPU GroupQueryAttention reads a PER_CHANNEL scale.
    Returns ``{"present.{i}.key": scale, ...}``."""
    import numpy as np
    import onnxruntime as ort

    names = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    peak: dict[str, Any] = {}
    for feed in feeds:
        for name, x in zip(names, sess.run(names, feed)):
            m = np.abs(x).max(axis=(0, 2))  # [kv_heads, head_dim]
            peak[name] = m if name not in peak else np.maximum(peak[name], m)
    # a channel that was always zero keeps a tiny scale rather than a zero one (no division by zero)
    return {n: (np.maximum(m, 1e-6) * headroom / 127.0).astype(np.float32)[:, None, :] for n, m in peak.items()}


def int8_kv_cache(path: Path, scales: dict[str, Any]) -> int:
    """Rewrite the decoder graph at ``path`` in place to keep an 8-bit KV cache: every GroupQueryAttention
    stores its past/present as int8 with the static per-channel ``scales`` (``kv_cache_scales``), and the
    graph's past/present tensors become int8. onnxruntime's CPU kernel quantizes the new keys and values
    into the cache and reads it back at its scales. Returns the attention nodes changed; a graph without
    GroupQueryAttention (the torch.onnx route) cannot: one clear error."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(path), load_external_data=False)
    attn = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    if not attn:
        raise EdgeftError("an 8-bit KV cache needs onnxruntime's GroupQueryAttention, which this decoder graph "
                          "(exported by torch.onnx) does not use")
    for value in list(m.graph.input) + list(m.graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.INT8
    for node in attn:
        present_k, present_v = node.output[1], node.output[2]
        slots = list(node.input) + [""] * (max(KV_SCALE_INPUTS) + 1 - len(node.input))
        for slot, present in zip(KV_SCALE_INPUTS, (present_k, present_v)):
            name = f"{present}.scale"
            m.graph.initializer.append(numpy_helper.from_array(scales[present], name))
            slots[slot] = name
        del node.input[:]
        node.input.extend(slots)
        keep = [a for a in node.attribute if a.name not in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")]
        del node.attribute[:]
        node.attribute.extend(keep + [helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                                      helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                                      helper.make_attribute("kv_cache_bit_width", 8)])
    onnx.save(m, str(path))
    return len(attn)


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
