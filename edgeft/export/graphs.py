"""ONNX helpers both exporters (``decoder``, ``classifier``) use.

A graph's interface (inputs, outputs, opset) and operator counts, onnxruntime's
transformer-optimizer pass, and quiet tracing. This module knows onnx and onnxruntime's
optimizer; it knows nothing of models, quantization choices or the gate.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

from edgeft.export.quantize import default_opset, load, logits_chain, replace_node, save

# Operators that show a fusion took place (reported in the manifest).
FUSED_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention", "SkipSimplifiedLayerNormalization",
             "SkipLayerNormalization", "SimplifiedLayerNormalization", "FastGelu", "BiasGelu", "Gelu",
             "RotaryEmbedding", "EmbedLayerNormalization", "LayerNormalization")
# Operators whose matrix products run on int8 activations (integer GEMM), not dequantized weights.
INT8_COMPUTE_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul",
                    "QAttention", "QGemm")


# The optional decoder input that keeps the head's logits for the last K positions (0: all).
LOGITS_TO_KEEP = "logits_to_keep"


def add_logits_to_keep(path: Path) -> str | None:
    """Give the decoder graph at ``path`` an optional input ``logits_to_keep`` (int64 [1]).

    The head then runs on the last K positions of the hidden states only; 0, the input's
    default (an initializer listed as an input, so a caller that does not feed it, such as
    onnxruntime-genai's own loop, gets every position as before), keeps them all. Prompt
    prefill needs one row of logits, scoring and draft verification need every row. The
    graph is rewritten in place, its external weights untouched. Returns the input's name,
    or None where the head is not a MatMul fed by the hidden states (graph left as it was).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(path), load_external_data=False)
    chain = logits_chain(m)
    heads = [n for n in m.graph.node if n.name in chain and n.op_type == "MatMul"]
    if len(heads) != 1 or LOGITS_TO_KEEP in {i.name for i in m.graph.input}:
        return None
    head = heads[0]
    hidden, kept, start = head.input[0], f"{head.input[0]}/last_k", f"/{LOGITS_TO_KEEP}/start"
    ends, axes = f"/{LOGITS_TO_KEEP}/ends", f"/{LOGITS_TO_KEEP}/axes"
    m.graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), LOGITS_TO_KEEP),
                                numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), ends),
                                numpy_helper.from_array(np.array([1], np.int64), axes)])
    m.graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    # -K..end along the sequence axis; -0 is 0, so K = 0 keeps every position
    cut = [helper.make_node("Neg", [LOGITS_TO_KEEP], [start], name=f"/{LOGITS_TO_KEEP}/Neg"),
           helper.make_node("Slice", [hidden, start, ends, axes], [kept], name=f"/{LOGITS_TO_KEEP}/Slice")]
    head.input[0] = kept
    replace_node(m, head, [*cut, head])
    if m.ir_version < 4:  # inputs with an initializer are overridable from IR version 4 on
        m.ir_version = 4
    onnx.save(m, str(path))
    return LOGITS_TO_KEEP


def interface(path: Path) -> tuple[list[str], list[str], int]:
    """(input names, output names, default-domain opset) of the graph at ``path``."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    opset = default_opset(m, missing=0)
    init = {t.name for t in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in init], [o.name for o in m.graph.output], opset


def op_counts(path: Path, ops: tuple[str, ...] = FUSED_OPS) -> dict[str, int]:
    """{operator: count} of the graph's nodes whose type is one of ``ops``."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in m.graph.node:
        if n.op_type in ops:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


@contextlib.contextmanager
def quiet_warnings():
    """Silence Python warnings (torch.onnx's tracer warnings) for the duration."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def optimize_graph(raw: Path, out: Path, cfg: Any, kinds: dict[str, str]) -> bool:
    """Apply onnxruntime's transformer fusions where ``kinds`` maps the model type to an
    optimizer type; else copy. Returns whether anything fused."""
    kind = kinds.get(cfg.model_type)
    if kind is None:
        save(load(raw), out)
        return False
    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        opt = optimizer.optimize_model(str(raw), model_type=kind, num_heads=cfg.num_attention_heads,
                                       hidden_size=cfg.hidden_size, opt_level=0)
    stats = opt.get_fused_operator_statistics()
    save(opt.model, out)
    return any(stats.values())
