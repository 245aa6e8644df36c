"""Sentence embeddings: pooling read from sentence-transformers' files, and PyTorch's reference vectors.

A sentence-transformers folder lists its modules in ``modules.json``; the Pooling module's
``config.json`` (all-MiniLM: ``1_Pooling/config.json``) says mean or CLS pooling, and a
Normalize module makes vectors unit length. A folder without ``modules.json`` gets CLS
pooling, unnormalized. The graph itself (``last_hidden_state`` out) is exported by
``edgeft.export.classifier``; the runtime pools it as the manifest says, and the gate's
reference here pools PyTorch's output the same way.

This module knows torch and the sentence-transformers file layout; it knows nothing of ONNX.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.artifact import Pooling
from edgeft.errors import EdgeftError
from edgeft.runtime.embed import pool

MAX_LENGTH = 128  # when neither the flag, the run nor sentence_bert_config.json says


def read_pooling(folder: Path | str | None) -> tuple[Pooling, bool]:
    """(pooling, normalize) from a model folder's sentence-transformers files."""
    if not isinstance(folder, Path) or not (folder / "modules.json").is_file():
        return Pooling.cls, False
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except ValueError as exc:
        raise EdgeftError(f"{folder / 'modules.json'} is not valid JSON: {exc}") from None
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    pool = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    if pool is None:
        return Pooling.cls, normalize
    cfg_path = folder / pool.get("path", "") / "config.json"
    if not cfg_path.is_file():
        raise EdgeftError(f"{folder} lists a pooling module but {cfg_path.relative_to(folder)} is missing "
                          "(a cache from an older edgeft: run `edgeft pull` for this model again)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("pooling_mode_mean_tokens"):
        return Pooling.mean, normalize
    if cfg.get("pooling_mode_cls_token"):
        return Pooling.cls, normalize
    modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v)
    raise EdgeftError(f"{cfg_path}: pooling {', '.join(modes) or 'none'} is not supported (mean or cls)")


def default_max_length(folder: Path | str | None, hf_config: Any) -> int:
    """sentence_bert_config.json's max_seq_length, else 128, within the model's positions."""
    n = MAX_LENGTH
    if isinstance(folder, Path) and (folder / "sentence_bert_config.json").is_file():
        n = int(json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length") or n)
    return min(n, int(getattr(hf_config, "max_position_embeddings", n) or n))


def torch_vectors(model: Any, tokenizer_json: Path, texts: list[str], pooling: Pooling, normalize: bool,
                  max_length: int) -> np.ndarray:
    """PyTorch's vectors for ``texts``, tokenized exactly as the runtime does (one text per call)."""
    import inspect

    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.enable_truncation(max_length)
    types = "token_type_ids" in inspect.signature(model.forward).parameters
    rows = []
    with torch.no_grad():
        for e in tok.encode_batch(list(texts)):
            kw = {"input_ids": torch.tensor([e.ids]), "attention_mask": torch.ones(1, len(e.ids), dtype=torch.long)}
            if types:
                kw["token_type_ids"] = torch.tensor([e.type_ids])
            hidden = model(**kw).last_hidden_state.float().numpy()
            rows.append(pool(hidden, np.ones((1, len(e.ids))), pooling, normalize)[0])
    return np.stack(rows) if rows else np.zeros((0, model.config.hidden_size), dtype=np.float32)
