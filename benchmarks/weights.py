"""Bytes of weights read per decoded token, for each format the suite compares.

A decode step reads every weight matrix once (the tied embedding too, as the LM head),
but only one row of an embedding table used purely for lookup. ONNX graphs are handled
by ``edgeft.bench.onnx_weight_bytes``; this module adds safetensors folders (the
PyTorch baseline) and GGUF files (llama.cpp). Standard library plus ``gguf`` where
present.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from edgeft.bench import onnx_weight_bytes

_ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "F64": 8}


def safetensors_weight_bytes(folder: Path) -> int:
    """Bytes read per token by a PyTorch model stored as safetensors (tied head counted once)."""
    sizes: dict[str, int] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            sizes[name] = count * _ST_ITEMSIZE.get(meta["dtype"], 4)
    has_head = any(k.endswith("lm_head.weight") for k in sizes)
    return sum(v for k, v in sizes.items() if not (has_head and k.endswith("embed_tokens.weight")))


def gguf_weight_bytes(path: Path) -> int:
    """Bytes read per token by llama.cpp: every tensor, the token embedding only when tied."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return Path(path).stat().st_size
    reader = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    tied = "output.weight" not in sizes
    return sum(v for k, v in sizes.items() if tied or k != "token_embd.weight")


def weight_bytes(path: Path) -> int:
    """Dispatch on what ``path`` is: a .gguf file, an ONNX file or folder, or a safetensors folder."""
    path = Path(path)
    if path.suffix == ".gguf":
        return gguf_weight_bytes(path)
    if path.suffix == ".onnx":
        return onnx_weight_bytes(path)
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():
            return onnx_weight_bytes(path / json.loads(manifest.read_text())["graph"]["file"])
        if (path / "model.onnx").is_file():
            return onnx_weight_bytes(path / "model.onnx")
        return safetensors_weight_bytes(path)
    raise ValueError(f"cannot tell the weight format of {path}")
