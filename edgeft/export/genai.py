"""onnxruntime-genai's model builder, run on the export's own model with no second copy of its weights.

Left to itself the builder loads the Hugging Face folder it is given (``from_pretrained``), so the
export would first write the merged fp32 model there (its size again on disk) and the builder would
hold a second model; and every weight it fuses (q, k and v packed into one MatMul, the MLP's gate and
up projections into one) is a new tensor made while the graph is built and kept until the graph is
saved: about two thirds of a block's weights, for every block at once.

``handed_over(model)`` changes three things for the length of one build, and nothing else:
- the builder's loader returns ``model`` (the folder then needs its configs and tokenizer only);
- ``torch.cat`` of two or more 2-D parameters along rows, as the builder's base module calls it, gives a
  ``Fused`` that concatenates them only when read;
- an initializer made from a ``Fused`` (or from a weight of 1 MiB or more) is the builder's own lazy
  initializer, read when the graph is saved, one tensor at a time; once a weight is copied out for writing,
  the kernel is asked to reclaim its pages (``page_out``): pages mapped from the weights file leave the
  process, so the build does not end holding every page of the model.
The bytes written are the same (the same concatenation, the same transpose, at save time instead of at
build time). The internals named here are onnxruntime-genai 0.18's (``builders.base``); this module knows
nothing of edgeft's corrections to the graph or of quantization.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any


class Fused:
    """Parameters concatenated along their rows, made only when read (optionally transposed)."""

    def __init__(self, parts: tuple, transposed: bool = False) -> None:
        self.parts, self.transposed = parts, transposed

    @property
    def shape(self) -> Any:
        import torch

        rows = (sum(int(p.shape[0]) for p in self.parts), *self.parts[0].shape[1:])
        return torch.Size(rows[::-1] if self.transposed else rows)

    @property
    def dtype(self) -> Any:
        return self.parts[0].dtype

    @property
    def T(self) -> Fused:  # noqa: N802 - torch's name
        return Fused(self.parts, not self.transposed)

    def dim(self) -> int:
        return 2

    def reshape(self, *shape: Any) -> Any:
        """The builder reshapes its packed q/k/v weight to the shape it has: itself; any other shape: a tensor."""
        import torch

        want = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return self if torch.Size(want) == self.shape else self.tensor().reshape(*shape)

    def tensor(self) -> Any:
        import torch

        t = torch.cat(self.parts, 0)
        return t.T if self.transposed else t

    def __getattr__(self, name: str) -> Any:  # anything else the builder asks of it: the real tensor's
        if name.startswith("__") or name in ("parts", "transposed"):
            raise AttributeError(name)
        return getattr(self.tensor(), name)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        def real(x: Any) -> Any:
            return x.tensor() if isinstance(x, Fused) else x

        return func(*[real(a) for a in args], **{k: real(v) for k, v in (kwargs or {}).items()})


def _fusing_torch() -> types.ModuleType:
    """``torch`` as the builder's base module sees it: ``cat`` of 2-D parameters along rows is a ``Fused``."""
    import torch

    class FusingTorch(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

        @staticmethod
        def cat(tensors: Any, dim: int = 0, **kwargs: Any) -> Any:
            parts = tuple(tensors)
            if (dim == 0 and not kwargs and len(parts) > 1
                    and all(isinstance(p, torch.nn.Parameter) and p.dim() == 2 for p in parts)):
                return Fused(parts)
            return torch.cat(parts, dim, **kwargs)

    return FusingTorch("torch")


PAGE = 4096
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages (clean file pages leave the process; data is kept)
PAGED_OUT = 1 << 20  # weights of at least this many bytes give their pages back once copied for writing


def page_out(tensors: tuple) -> None:
    """Ask the kernel to reclaim the pages of ``tensors`` (whole pages inside each one's bytes). Pages mapped
    from a weights file and never written are dropped from the process (read again from the file if touched
    again); others stay where they are: nothing is lost. A no-op where ``madvise`` is not there."""
    import ctypes

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    for t in tensors:
        start = t.data_ptr()
        lo, hi = -(-start // PAGE) * PAGE, (start + t.numel() * t.element_size()) // PAGE * PAGE
        if hi > lo:
            madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_PAGEOUT)


def _written(tensor: Any, dtype: Any, name: str) -> Any:
    """What the builder's lazy initializer gives when the graph is saved (the tensor cast to ``dtype``, as a
    ``TorchTensor``), copied out first so that the pages of the weights it came from can go (``page_out``)."""
    from onnx_ir.tensor_adapters import TorchTensor

    parts = tensor.parts if isinstance(tensor, Fused) else (tensor,)
    t = (tensor.tensor() if isinstance(tensor, Fused) else tensor).detach().to(dtype)
    copy = t.contiguous()
    if any(copy.data_ptr() == p.data_ptr() for p in parts):
        copy = copy.clone()
    page_out(parts)
    return TorchTensor(copy, name=name)


def _lazy_initializers(original: Any) -> Any:
    """The builder's ``make_initializer``, with a ``Fused`` or a large weight registered as the lazy, cast
    initializer it would have made (read when the graph is saved), which gives its pages back once read."""
    import torch

    def make_initializer(self: Any, tensor: Any, /, name: str, *, to: Any = None, raw: bool = False) -> None:
        large = isinstance(tensor, torch.Tensor) and tensor.numel() * tensor.element_size() >= PAGED_OUT
        if not isinstance(tensor, Fused) and not (large and to is not None and not raw):
            return original(self, tensor, name, to=to, raw=raw)
        if to is None or raw:
            return original(self, tensor.tensor(), name, to=to, raw=raw)
        import onnx_ir as ir
        from onnx_ir.tensor_adapters import to_torch_dtype

        dtype = to_torch_dtype(to)
        lazy = ir.LazyTensor(lambda: _written(tensor, dtype, name), dtype=to, shape=ir.Shape(tensor.shape), name=name)
        value = self.make_value(name, lazy.dtype, lazy.shape)
        value.const_value = lazy
        self.model.graph.register_initializer(value)
        return None

    return make_initializer


@contextlib.contextmanager
def handed_over(model: Any) -> Iterator[list[str]]:
    """Within: the builder reads ``model`` (not its folder's weights) and fuses weights when saving them.
    Yields the list of folders the builder asked its loader for (empty: it never loaded a model)."""
    import sys

    from onnxruntime_genai.models import builder

    # the builder imports its classes as the top-level ``builders`` package (its folder on sys.path): the
    # module to change is the one its model classes come from
    base = sys.modules[next(c for c in builder.LlamaModel.__mro__ if c.__name__ == "Model").__module__]
    asked: list[str] = []

    def load_weights(self: Any, input_path: str) -> Any:
        asked.append(input_path)
        return model

    saved = (base.Model.load_weights, base.Model.make_initializer, base.torch)
    base.Model.load_weights = load_weights
    base.Model.make_initializer = _lazy_initializers(saved[1])
    base.torch = _fusing_torch()
    try:
        yield asked
    finally:
        base.Model.load_weights, base.Model.make_initializer, base.torch = saved
