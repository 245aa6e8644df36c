"""The 8-bit frozen base on CPU, loaded tensor by tensor: never a full-precision copy of the model.

``load`` builds the task model with weightless parameters (``accelerate.init_empty_weights``;
buffers such as rotary frequencies are computed as usual), puts an ``Int8Linear`` in place of
every frozen Linear (GPT-2's Conv1D too), then reads the safetensors checkpoint one tensor at a
time. A frozen Linear's weight is mapped from the file and quantized a block of rows at a time into
int8 rows allocated once, with one fp32 scale per output row (absmax / 127, the weight format of
bitsandbytes' LLM.int8), and the map dropped (whole-matrix fp32 temporaries, freed, would stay in
the C heap); the trained blocks and heads are read into memory in fp32; the
frozen tensors kept as they are (embeddings, frozen norms) stay mapped from the file, as the
fp32 base's do, so embedding rows no batch touches take no memory. A head the
checkpoint lacks (a new classifier) is initialized by the model's own ``_init_weights`` after the
caller's seed; a tied head is tied again.

``Int8Linear`` holds only the int8 rows, their scales and the bias; each call multiplies by the
weight de-quantized for that call, and backward gives the input its gradient (the weight is frozen).

On CUDA the frozen base stays bitsandbytes' LLM.int8 (``edgeft.tune.model``): its int8 matmul
kernels are the point there. This path never imports bitsandbytes, whose import alone costs more
memory on CPU than a small model's int8 weights save.

This module knows torch, the safetensors file layout and transformers' model classes; it knows
nothing of data, training or the run folder.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeft.errors import EdgeftError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
QUANT_BLOCK = 2**20  # bytes of fp32 rows quantized at a time (Int8Linear.put)


# ---- the int8 layer -------------------------------------------------------------------

def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, fp32 scale per row) with ``w ~= q * scale[:, None]``."""
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


class _Scratch(threading.local):
    """One reusable buffer per thread for the weight of the call in progress.

    A frozen weight is widened for each call and dropped after it. Allocated afresh, a matrix of tens
    of MB is a new mapping each time (glibc maps allocations that large), whose pages the kernel faults
    in and zeroes on every call, forward and backward: a fifth of a large layer's time. The buffer is the
    largest frozen weight's size, once per thread; nothing holds the widened weight beyond its call (the
    autograd function saves the int8 rows)."""

    buf: torch.Tensor | None = None

    def widen(self, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.buf is None or self.buf.dtype != dtype or self.buf.numel() < q.numel():
            self.buf = None  # the old one goes before the new one is made
            self.buf = torch.empty(q.numel(), dtype=dtype)
        return self.buf[:q.numel()].view(q.shape).copy_(q)


_SCRATCH = _Scratch()


class _DequantMatmul(torch.autograd.Function):
    """``x @ (q * scale).T``, the weight de-quantized per call; the gradient is the input's only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        return F.linear(x, _widened(q, x.dtype)) * scale.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        q, scale = ctx.saved_tensors
        return (grad * scale.to(grad.dtype)) @ _widened(q, grad.dtype), None, None


def _widened(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q`` as ``dtype`` (a mixed-dtype multiply by the scales here would be several times slower than a
    copy, so the scales go on the output): in the thread's scratch buffer on CPU, a fresh tensor elsewhere."""
    return _SCRATCH.widen(q, dtype) if q.device.type == "cpu" else q.to(dtype)


class Int8Linear(nn.Module):
    """A frozen Linear stored as int8 rows and one fp32 scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, transposed: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.transposed = transposed  # the checkpoint stores the weight as (in, out): GPT-2's Conv1D
        meta = torch.device("meta")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=meta),
                                   requires_grad=False)
        self.register_buffer("scale", torch.empty(out_features, device=meta))
        self.bias = nn.Parameter(torch.empty(out_features, device=meta), requires_grad=False) if bias else None

    @classmethod
    def like(cls, module: nn.Module) -> Int8Linear:
        """An empty int8 stand-in for an ``nn.Linear`` or a transformers ``Conv1D``."""
        if isinstance(module, nn.Linear):
            return cls(module.in_features, module.out_features, module.bias is not None)
        rows, cols = module.weight.shape  # Conv1D: (in, out)
        return cls(rows, cols, module.bias is not None, transposed=True)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Take the checkpoint's ``weight`` (quantized here, a block of rows at a time) or ``bias``.

        The weight is best given mapped from the file: its pages are read once, then dropped with the
        map. The int8 rows are allocated once and filled block by block, so the full-precision
        temporaries are a block's (``QUANT_BLOCK`` bytes), never a whole matrix's: freed matrices
        would stay in the C heap (glibc serves allocations up to 32 MB from it once a large one was
        freed, and does not give it back), which kept about the fp32 model's size resident.
        """
        if name == "weight":
            rows = tensor.t() if self.transposed else tensor
            q = torch.empty(rows.shape, dtype=torch.int8)
            scale = torch.empty(rows.shape[0], dtype=torch.float32)
            step = max(1, QUANT_BLOCK // max(1, 4 * rows.shape[1]))
            for i in range(0, rows.shape[0], step):
                q[i:i + step], scale[i:i + step] = quantize_rows(rows[i:i + step].to(torch.float32))
            self.weight, self.scale = nn.Parameter(q, requires_grad=False), scale
        else:
            self.bias = nn.Parameter(tensor.to(torch.float32, copy=True), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantMatmul.apply(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows"


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


# ---- the checkpoint, tensor by tensor -------------------------------------------------

def checkpoint_files(path: Path | str) -> list[Path] | None:
    """The safetensors files of a local model folder, or None (no local safetensors)."""
    folder = Path(path)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return None


def read_tensors(file: Path) -> Iterator[tuple[str, Callable[[bool], torch.Tensor]]]:
    """Every tensor of a safetensors file in file order, as (name, ``get``): ``get(False)`` reads it into
    its own memory, ``get(True)`` maps just its bytes (copy-on-write: pages cost memory once touched)."""
    import numpy as np

    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = meta["data_offsets"]
            dtype, shape, offset = _DTYPES[meta["dtype"]], meta["shape"], 8 + size + start

            def get(mapped: bool, offset: int = offset, n: int = end - start, dtype: Any = dtype,
                    shape: list[int] = shape, name: str = name) -> torch.Tensor:
                if mapped and n:
                    raw = torch.from_numpy(np.memmap(file, dtype=np.uint8, mode="c", offset=offset, shape=(n,)))
                else:
                    f.seek(offset)
                    raw = torch.empty(n, dtype=torch.uint8)
                    if f.readinto(memoryview(raw.numpy())) != n:
                        raise EdgeftError(f"{file} is truncated at tensor {name}")
                return raw.view(dtype).reshape(shape)

            yield name, get


def model_key(name: str, keys: set[str], prefix: str) -> str | None:
    """The model's name for a checkpoint tensor (a base model's checkpoint lacks the task model's prefix)."""
    for candidate in (name, name.replace(".gamma", ".weight").replace(".beta", ".bias")):
        for key in (candidate, f"{prefix}.{candidate}", candidate.removeprefix(prefix + ".")):
            if key in keys:
                return key
    return None


# ---- the model ------------------------------------------------------------------------

def _inside(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _swap_frozen_linears(model: nn.Module, keep: list[str]) -> None:
    for name, module in list(model.named_modules()):
        if name and is_linear(module) and not _inside(name, keep):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, Int8Linear.like(module))


def _mapped(model: nn.Module, key: str, keep: list[str]) -> bool:
    """Whether a tensor is read mapped from the file: every frozen one. Kept as it is (embeddings, frozen
    norms), it stays mapped; a frozen Linear's is quantized from the map (which then goes), and one stored
    in another dtype is converted to fp32, so its map goes once it is read."""
    return not _inside(key.rpartition(".")[0], keep)


def _put(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner, _, attr = key.rpartition(".")
    module = model.get_submodule(owner)
    if isinstance(module, Int8Linear):
        module.put(attr, tensor)
    elif attr in module._parameters:
        value = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor


def _init_missing(model: nn.Module, heads: list[str]) -> None:
    """Initialize what the checkpoint lacked (a new head); anything else missing is a loader bug."""
    for name, module in model.named_modules():
        if not any(p.is_meta for p in module.parameters(recurse=False)):
            continue
        if not _inside(name, heads):
            missing = next(n for n, p in module.named_parameters(recurse=False) if p.is_meta)
            raise EdgeftError(f"the checkpoint has no {name}.{missing}")
        module.to_empty(device="cpu", recurse=False)
        model._init_weights(module)


def load(path: Path | str, model_class: Any, cfg: Any, keep: list[str], heads: list[str]) -> nn.Module:
    """The task model of ``path`` on CPU: Linear layers outside ``keep`` in int8, the rest fp32.

    ``heads``: modules the checkpoint may lack (initialized by the model). Raises EdgeftError when
    the folder has no safetensors checkpoint.
    """
    from accelerate import init_empty_weights

    files = checkpoint_files(path)
    if not files:
        raise EdgeftError(f"{path} has no safetensors checkpoint to load in int8 on CPU")
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(cfg, dtype=torch.float32)
    _swap_frozen_linears(model, keep)
    keys, prefix = set(model.state_dict().keys()), model.base_model_prefix
    for file in files:
        for name, get in read_tensors(file):
            key = model_key(name, keys, prefix)
            if key is not None:
                _put(model, key, get(_mapped(model, key, keep)))
    model.tie_weights()
    _init_missing(model, heads)
    return model.eval()
