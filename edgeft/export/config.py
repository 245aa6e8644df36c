"""``ExportConfig``: every choice ``edgeft export`` makes, validated on construction.

This module knows the knobs (quantization scheme, block size, gate thresholds, eval
data) and their allowed values; it knows nothing of torch, ONNX or the runtime, so the
CLI can build a config (and fail on a bad flag) before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.artifact import Int4Grid, Task
from edgeft.errors import EdgeftError
from edgeft.flags import check_fields, enum_value, flag


class Quantize(str, enum.Enum):
    """How the weights are stored in the artifact."""

    none = "none"  # fp32: the reference, largest
    int8 = "int8"  # weight-only 8-bit (decoders, MatMulNBits); classifiers: dynamic or weight-only int8
    int4 = "int4"  # weight-only 4-bit (MatMulNBits), embeddings 4-bit too
    mixed = "mixed"  # MLP input projections (gate/up) of the middle blocks 4-bit; the rest 8-bit
    searched = "searched"  # 4 bits for the tensor groups the sensitivity pass finds cheapest, within the gate's budget
    auto = "auto"  # the smallest of int4, searched, mixed, int8 that passes the gate


class Int8Mode(str, enum.Enum):
    """int8 flavour. Classifiers: gate both and keep the one that passes with the most int8-activation
    matmuls, or force one. Decoders: best is weight-only; dynamic is asked for."""

    best = "best"
    dynamic = "dynamic"  # int8 weights and activations (DynamicQuantizeMatMul / MatMulInteger)
    weight_only = "weight-only"  # int8 weights, fp32 activations (MatMulNBits)


class KVCache(str, enum.Enum):
    """How a decoder's KV cache is stored."""

    float32 = "float32"
    int8 = "int8"  # static per-channel scales from held-out texts (onnxruntime's CPU GroupQueryAttention)


BLOCK_SIZES = (16, 32, 64, 128, 256)

# Smallest first: what ``auto`` tries, in order.
AUTO_ORDER = (Quantize.int4, Quantize.searched, Quantize.mixed, Quantize.int8)


@dataclass(frozen=True)
class ExportConfig:
    """One export: from a run folder or a base model to a gated artifact folder."""

    source: str = field(metadata=flag(argument=True))
    """Run folder from `edgeft tune`, a pulled model name, a Hugging Face folder or a hub id."""
    out: Path = field(metadata=flag("--out", "-o"))
    """Artifact folder to write (refused if it exists, see --overwrite)."""
    quantize: Quantize = field(default=Quantize.int8, metadata=flag("--quantize", "-q"))
    """Weights: none (fp32), int8, int4, mixed (MLP input projections of the middle blocks 4-bit, the rest
    8-bit), searched (4 bits where a sensitivity pass says perplexity suffers least, within the gate's budget)
    or auto (smallest that passes the gate)."""
    task: Task | None = None
    """causal-lm or classification for a bare base model whose architecture does not say; embedding for an
    encoder (a base, or a classifier run without its head)."""
    eval_data: Path | None = None
    """Held-out data for the gate (default: the run's eval data, else built-in texts)."""
    block_size: int = 32
    """Block size of weight-only quantization: 16, 32, 64, 128 or 256."""
    sensitivity_seconds: float = field(default=600.0, metadata=flag(min=0))
    """searched/auto: export-time budget of the sensitivity pass, in seconds (groups left unmeasured stay
    8-bit; results are cached per model and held-out ids, so a later export continues or reuses them)."""
    sensitivity_tokens: int = field(default=512, metadata=flag(min=1))
    """searched/auto: held-out tokens the sensitivity pass scores per measurement."""
    int8_activations: bool = field(default=True, metadata=flag(negative="--fp32-activations"))
    """Decoders: quantized matmuls compute on int8 activations (faster) or fp32 (closer to PyTorch)."""
    int8_mode: Int8Mode = Int8Mode.best
    """Classifiers: dynamic, weight-only, or best (gate both; of those that pass, the most matmuls on int8
    activations, then the smaller; the reason goes in the manifest). Decoders, for the int8 scheme:
    weight-only (what best gives) or dynamic (smoothed per-channel, int8 activations on a scale per row,
    integer GEMM: faster prompt prefill, calibrated on held-out texts)."""
    int4_mode: Int4Grid = Int4Grid.zero_point
    """Decoders' 4-bit blocks: zero-point (an integer zero point per block: onnxruntime's 4-bit kernel alone),
    symmetric (a scale per block and no zero point, llama.cpp's Q4_0 grid: the same kernel with less to read and
    unpack, a coarser grid), or float-offset (a float offset per block, the min/max grid of llama.cpp's Q4_1,
    offsets stored 8-bit, and the head at 8 bits as in Q4_1 files; closer to the model, but four small extra ops
    per matmul)."""
    kv_cache: KVCache = field(default=KVCache.float32, metadata=flag("--kv-cache"))
    """Decoders: the KV cache's storage, float32 or int8 (a quarter of the bytes each decode step reads at long
    contexts; per-channel scales measured on held-out texts, and the gate judges each candidate with it, as it
    judges the weights). Only onnxruntime-genai builder graphs (llama, qwen2, ...) can; gpt2's cannot."""
    max_accuracy_drop: float = field(default=1.0, metadata=flag(min=0))
    """Gate (classifiers): accuracy drop budget, in points; a drop over it fails when significant (McNemar
    p < 0.05), over 3x it always."""
    min_label_agreement: float = field(default=0.97, metadata=flag(min=0, max=1))
    """Gate (classifiers): least share of labels equal to PyTorch's."""
    min_cosine: float = field(default=0.99, metadata=flag(min=0, max=1))
    """Gate (embeddings): least mean cosine similarity to PyTorch's vectors."""
    max_perplexity_increase: float = field(default=5.0, metadata=flag(min=0))
    """Gate (LMs): allowed perplexity rise, in percent."""
    min_token_agreement: float = field(default=0.80, metadata=flag(min=0, max=1))
    """Gate (LMs): least share of greedy tokens equal to PyTorch's."""
    max_repetition_increase: float = field(default=0.20, metadata=flag(min=0))
    """Gate (LMs): allowed rise in repeated 4-grams of greedy continuations (catches looping)."""
    gate_texts: int | None = field(default=None, metadata=flag(min=1))
    """Held-out texts the gate scores (default: 32 for LMs, 1000 for classifiers)."""
    gate_prompts: int = field(default=8, metadata=flag(cli=False, min=1))
    """How many prompts the gate continues greedily (token agreement, repetition)."""
    gate_new_tokens: int = field(default=48, metadata=flag(cli=False, min=1))
    """Tokens generated per gate prompt."""
    context_length: int | None = field(default=None, metadata=flag(min=1))
    """Decoder context recorded in the manifest (default: the model's)."""
    max_length: int | None = field(default=None, metadata=flag(min=1))
    """Classifier: longest input in tokens (default: the run's, else 128)."""
    labels: tuple[str, ...] | None = field(default=None, metadata=flag(comma=True))
    """Classifier label names, comma-separated (default: the run's)."""
    trunk_blocks: int | None = field(default=None, metadata=flag(min=0))
    """Classifiers: cut the artifact before this encoder block into a trunk (embeddings and the blocks below,
    named by its hash) and the model's own top; models tuned from one base with the same boundary and
    quantization (--int8-mode dynamic or weight-only: best may pick either per run) carry the same trunk, which
    the runtime loads once. Default: a run's frozen block count (a base model: one graph); 0: one graph.
    Decoders (onnxruntime-genai builder graphs, not gpt2's) are cut only when asked: the trunk holds blocks
    0..K-1 and their KV cache, the top the blocks above, the final norm and the head."""
    truncation_dims: tuple[int, ...] = field(default=(), metadata=flag(comma=True, min=1))
    """Embeddings: comma-separated sizes the model was trained to be truncated to (Matryoshka); the server's
    `dimensions` takes only these."""
    threads: int | None = field(default=None, metadata=flag(min=1))
    """Threads for PyTorch and the gate's onnxruntime sessions."""
    allow_degraded: bool = False
    """Write the artifact even if the gate fails (marked degraded)."""
    overwrite: bool = False
    """Replace an existing artifact at --out."""
    progress: bool = True
    """Progress bars on stderr."""
    sign_key: Path | None = field(default=None, metadata=flag("--sign"))
    """Ed25519 private key (PEM, from edgeft keygen) to sign the artifact with."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.sign_key is not None:
            object.__setattr__(self, "sign_key", Path(self.sign_key))
            if not self.sign_key.is_file():
                raise EdgeftError(f"--sign {self.sign_key} is not a file")
        object.__setattr__(self, "quantize", enum_value(Quantize, self.quantize, "--quantize"))
        object.__setattr__(self, "int8_mode", enum_value(Int8Mode, self.int8_mode, "--int8-mode"))
        object.__setattr__(self, "int4_mode", enum_value(Int4Grid, self.int4_mode, "--int4-mode"))
        object.__setattr__(self, "kv_cache", enum_value(KVCache, self.kv_cache, "--kv-cache"))
        if self.task is not None:
            object.__setattr__(self, "task", enum_value(Task, self.task, "--task"))
        if self.eval_data is not None:
            object.__setattr__(self, "eval_data", Path(self.eval_data))
            if not self.eval_data.is_file():
                raise EdgeftError(f"--eval-data {self.eval_data} is not a file")
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "truncation_dims", tuple(int(d) for d in self.truncation_dims))
        check_fields(self)
        if not str(self.source).strip():
            raise EdgeftError("give a source: a run folder, a pulled model name, a Hugging Face folder or a hub id")
        if self.block_size not in BLOCK_SIZES:
            raise EdgeftError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, not {self.block_size}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, enum.Enum):
                d[k] = v.value
            elif isinstance(v, Path):
                d[k] = str(v)
            elif isinstance(v, tuple):
                d[k] = list(v)
        return d

