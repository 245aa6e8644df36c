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

from edgeft.export.quantize import load, save

# Operators that show a fusion took place (reported in the manifest).
FUSED_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention", "SkipSimplifiedLayerNormalization",
             "SkipLayerNormalization", "SimplifiedLayerNormalization", "FastGelu", "BiasGelu", "Gelu",
             "RotaryEmbedding", "EmbedLayerNormalization", "LayerNormalization")
# Operators whose matrix products run on int8 activations (integer GEMM), not dequantized weights.
INT8_COMPUTE_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul",
                    "QAttention", "QGemm")


def interface(path: Path) -> tuple[list[str], list[str], int]:
    """(input names, output names, default-domain opset) of the graph at ``path``."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
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
