"""``edgeft export``: a run folder or base model -> a gated, quantized ONNX artifact.

Steps (one module each): ``merge`` (trained parameters into the base's fp32 weights),
``decoder`` / ``classifier`` (fp32 ONNX graph: onnxruntime-genai's fused builder graph
or torch.onnx + onnxruntime's fusions), ``quantize`` (int8 / int4 / mixed weights),
``assemble`` (artifact folder and manifest), ``gate`` (the artifact through edgeft's own
runtime against PyTorch), ``pipeline`` (the order, atomic publishing). Importing this
package imports nothing heavy; torch and onnx load when ``export`` runs.
"""

from __future__ import annotations

from pathlib import Path

from edgeft.export.config import ExportConfig, Int8Mode, Quantize

__all__ = ["ExportConfig", "Quantize", "Int8Mode", "export"]


def export(config: ExportConfig, log=...) -> Path:
    """Write the artifact for ``config`` at ``config.out`` (atomically) and return its path.

    ``log`` receives progress lines (default: stderr; None: silent).
    """
    from edgeft.export import pipeline

    if log is ...:
        return pipeline.export(config)
    return pipeline.export(config, log=log)
