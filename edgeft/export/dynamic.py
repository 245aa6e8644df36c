"""Smoothed dynamic int8 made one weight at a time, the fp32 weights left in their external file.

The steps of ``edgeft.export.smooth`` (calibrate, smooth, quantize), done without the whole fp32
graph in memory:

- **calibration** runs a session on the fp32 graph's own file: a copy of the graph alone is written
  beside it, naming the same data file, each tensor to measure reduced to its channels' maxima in the
  graph and what only the head needs left out;
- **smoothing** changes the norms' gains in the graph (they are small) and, for the weights, only
  notes what to do to each (rows times a scale, a range of columns divided by one), in the order the
  whole-graph rewrite does it, so the numbers are its numbers to the bit;
- **quantization** reads each weight from the file a block of rows at a time, applies its notes, and
  writes int8 per output column, 7-bit (``reduce_range``), with the nodes onnxruntime's
  ``quantize_dynamic`` writes for a MatMul with a constant weight (``DynamicQuantizeLinear``,
  ``MatMulInteger``, ``Cast``, two ``Mul``; onnxruntime fuses them into ``DynamicQuantizeMatMul`` when
  it loads the graph), its names, its rounding and its node order (for opset 11 and later, where
  ``quantize_dynamic`` writes ``DynamicQuantizeLinear``). What it does not write: the shapes
  ``quantize_dynamic``'s shape inference records (``value_info``) and its producer name.

This module knows ONNX graphs, onnxruntime and numpy; it does not know how the sites to smooth are
found (``smooth.sites``) nor where the calibration ids come from.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.export.quantize import _inits, _weight, default_opset, remove_initializers

CHUNK = 1 << 22  # fp32 values of a weight read from its file at a time (16 MiB)
EPS = 1e-6
QMAX = 64  # onnxruntime's int8 range with reduce_range: [-64, 64]

Ops = dict[str, list[tuple]]  # weight -> ("rows", s) | ("cols", a, b, s), in the order they apply


def site_scale(amax: np.ndarray, row_max: np.ndarray, rows: int, alpha: float) -> np.ndarray | None:
    """SmoothQuant's per-input-channel scale ``max|x|^alpha / max|W|^(1-alpha)`` (1 where either is ~0);
    None where it is not finite or does not fit the weights' ``rows``."""
    x = amax.astype(np.float64)
    w = row_max.astype(np.float64)
    s = np.where((x > EPS) & (w > EPS), np.clip(x, EPS, None) ** alpha / np.clip(w, EPS, None) ** (1 - alpha), 1.0)
    if not np.all(np.isfinite(s)) or len(s) != rows:
        return None
    return s


# ---------------------------------------------------------------- calibration on the file

def calibrate_file(model: Any, src: Path, tensors: Sequence[str], feeds: Sequence[dict],
                   threads: int | None = None) -> dict[str, np.ndarray]:
    """Largest magnitude per channel (last axis) of each of ``tensors`` over the runs ``feeds``, from a session
    on a copy of ``model``'s graph saved beside ``src`` (its external tensors name ``src``'s data file: the session
    reads the weights, nothing else holds them). The copy reduces each tensor to its channels' maxima in the
    graph (``Abs``, ``Flatten``, ``ReduceMax``: exact), so a run returns a few KiB, not the activations. The
    session keeps onnxruntime's prepacked weights: without them its sums, and so the maxima, differ in the last
    bits from the whole-graph path's."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_mem_pattern = False  # a few prompts: planned blocks and an arena would outlive each op's buffers
    opts.enable_cpu_mem_arena = False
    if threads:
        opts.intra_op_num_threads = threads
    fd, name = tempfile.mkstemp(prefix=".calibrate-", suffix=".onnx", dir=Path(src).parent)
    os.close(fd)
    out: dict[str, np.ndarray] = {}
    try:
        onnx.save_model(_with_maxima(model, tensors), name)  # the graph alone: the tensors stay where they are
        session = ort.InferenceSession(name, opts, providers=["CPUExecutionProvider"])
        inputs = {i.name for i in session.get_inputs()}
        for feed in feeds:
            feed = {k: v for k, v in feed.items() if k in inputs}
            for t, v in zip(tensors, session.run([f"{t}/edgeft_amax" for t in tensors], feed)):
                out[t] = v if t not in out else np.maximum(out[t], v)
        del session
    finally:
        Path(name).unlink(missing_ok=True)
    return out


def _with_maxima(model: Any, tensors: Sequence[str]) -> Any:
    """A copy of ``model`` (a graph whose weights are external) with ``{t}/edgeft_amax`` outputs: the largest
    |value| of each channel (last axis) of each of ``tensors``."""
    import onnx
    from onnx import TensorProto, helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    opset = default_opset(model)
    if opset >= 18:
        copy.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), "edgeft_amax_axes"))
    for t in tensors:
        base = f"{t}/edgeft_amax"
        reduce = reduce_max(opset, f"{base}/rows", base, 0, "edgeft_amax_axes", keepdims=0)
        copy.graph.node.extend([helper.make_node("Abs", [t], [f"{base}/abs"]),
                                helper.make_node("Flatten", [f"{base}/abs"], [f"{base}/rows"], axis=-1), reduce])
        copy.graph.output.append(helper.make_tensor_value_info(base, TensorProto.FLOAT, None))
    _keep_only(copy, [f"{t}/edgeft_amax" for t in tensors])
    return copy


def reduce_max(opset: int, x: str, out: str, axis: int, axes: str, keepdims: int, name: str | None = None) -> Any:
    """A ``ReduceMax`` node over one ``axis`` of ``x``, written for ``opset``: from opset 18 the axes are an input,
    the initializer named ``axes`` (holding ``[axis]``, which the caller adds); before it, an attribute."""
    from onnx import helper

    if opset >= 18:
        return helper.make_node("ReduceMax", [x, axes], [out], keepdims=keepdims, name=name)
    return helper.make_node("ReduceMax", [x], [out], axes=[axis], keepdims=keepdims, name=name)


def _keep_only(model: Any, outputs: Sequence[str]) -> None:
    """Make ``outputs`` the graph's only outputs and drop the nodes and initializers they do not need (the
    head, whose input is measured but whose product is not): the session holds no weight it does not use."""
    made_by = {o: n for n in model.graph.node for o in n.output}
    needed, todo = set(), list(outputs)
    while todo:
        node = made_by.get(todo.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            todo.extend(i for i in node.input if i)
    keep = [n for n in model.graph.node if id(n) in needed]
    model.graph.ClearField("node")
    model.graph.node.extend(keep)
    wanted = set(outputs)
    for i in reversed([i for i, o in enumerate(model.graph.output) if o.name not in wanted]):
        del model.graph.output[i]
    used = {i for n in model.graph.node for i in n.input} | {i.name for i in model.graph.input}
    remove_initializers(model, {t.name for t in model.graph.initializer if t.name not in used})


# ---------------------------------------------------------------- a weight, a block of rows at a time

def _blocks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK // max(1, cols))
    for r in range(0, rows, step):
        yield r, min(rows, r + step)


def _rows(t: Any, base: Path, ops: list[tuple], r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of the fp32 weight ``t`` with ``ops`` applied, as the whole-graph rewrite computes them
    (float64 products and quotients rounded to float32)."""
    x = np.array(_weight(t, base)[r0:r1], dtype=np.float32)
    for op in ops:
        if op[0] == "rows":
            x = (x * op[1][r0:r1, None]).astype(np.float32)
        else:
            _, a, b, s = op
            x[:, a:b] /= s[None, :]
    return x


def _row_max(t: Any, base: Path, ops: list[tuple]) -> np.ndarray:
    k, n = (int(d) for d in t.dims)
    return np.concatenate([np.abs(_rows(t, base, ops, a, b)).max(1) for a, b in _blocks(k, n)])


def smooth_file(model: Any, base: Path, found: Sequence[Any], amax: dict[str, np.ndarray],
                alpha: float) -> tuple[Ops, int]:
    """``smooth.smooth`` with the weights left in their file: the norms' gains (and biases) are rewritten in
    the graph, each weight gets the list of what to do to it; returns that and the sites smoothed."""
    from onnx import numpy_helper

    inits = _inits(model)
    ops: Ops = {}
    done = 0
    for site in found:
        row_max = np.max([_row_max(inits[w], base, ops.get(w, [])) for w in site.weights], axis=0)
        s = site_scale(amax[site.tensor], row_max, int(inits[site.weights[0]].dims[0]), alpha)
        if s is None:
            continue
        for w in site.weights:
            ops.setdefault(w, []).append(("rows", s))
        if site.kind == "norm":
            for name in site.scale_inits:
                gain = np.asarray(_weight(inits[name], base), dtype=np.float32)
                inits[name].CopyFrom(numpy_helper.from_array((gain / s).astype(np.float32), name))
        else:
            a, b = site.columns
            ops.setdefault(site.scale_inits[0], []).append(("cols", a, b, s))
        done += 1
    return ops, done


def quantize_columns(t: Any, base: Path, ops: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 ``[K, N]``, scales ``[N]`` and zero points ``[N]`` of the weight ``t`` (with ``ops``), each output
    column on its own symmetric 7-bit scale: onnxruntime's ``quantize_data`` per channel, vectorized
    (scale ``2 max|w| / 128`` in float64 stored as float32, 1 where under float32's smallest normal;
    ``round(w / scale)`` in float32, halves to even)."""
    k, n = (int(d) for d in t.dims)
    lo, hi = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for a, b in _blocks(k, n):
        x = _rows(t, base, ops, a, b)
        lo, hi = np.minimum(lo, x.min(0)), np.maximum(hi, x.max(0))
    absmax = np.maximum(np.abs(lo), np.abs(hi))
    wide = 2 * absmax.astype(np.float64) / (2 * QMAX)
    scale = np.where(wide < np.finfo(np.float32).tiny, 1.0, wide).astype(np.float32)
    q = np.empty((k, n), np.int8)
    for a, b in _blocks(k, n):
        x = np.round(_rows(t, base, ops, a, b) / scale[None, :])
        q[a:b] = np.clip(x, -128, 127).astype(np.int8)
    return q, scale, np.zeros(n, np.int8)


# ---------------------------------------------------------------- onnxruntime's dynamic MatMul nodes

def _integer_nodes(node: Any, x: tuple[str, str, str], weight: str) -> list:
    """``quantize_dynamic``'s nodes for one MatMul (its ``MatMulInteger`` operator), input ``x`` quantized
    (data, scale, zero point)."""
    from onnx import TensorProto, helper

    out, name = node.output[0], f"{node.name}_quant"
    q_out, cast_out, scales = f"{out}_output_quantized", f"{out}_output_quantized_cast_output", f"{name}_scales_mul"
    return [helper.make_node("MatMulInteger", [x[0], f"{weight}_quantized", x[2], f"{weight}_zero_point"],
                             [q_out], name),
            helper.make_node("Cast", [q_out], [cast_out], f"{q_out}_cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [x[1], f"{weight}_scale"], [f"{scales}:0"], scales),
            helper.make_node("Mul", [cast_out, f"{scales}:0"], [out], f"{name}_output_scale_mul")]


def integer_matmuls(model: Any, base: Path, nodes: Sequence[str], ops: Ops) -> None:
    """Replace the MatMuls ``nodes`` by dynamic int8 ones, one weight read and quantized at a time; the fp32
    weights no other node reads leave the graph; the nodes end in onnxruntime's topological order."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.onnx_model import ONNXModel

    inits, wanted = _inits(model), set(nodes)
    quantized: dict[str, tuple[str, str, str]] = {}
    new, done = [], set()
    for node in model.graph.node:
        if node.name not in wanted:
            new.append(node)
            continue
        x = node.input[0]
        if x not in quantized:
            quantized[x] = (f"{x}_quantized", f"{x}_scale", f"{x}_zero_point")
            new.append(helper.make_node("DynamicQuantizeLinear", [x], list(quantized[x]), f"{x}_QuantizeLinear"))
        t = inits[node.input[1]]
        if t.name not in done:  # a weight two MatMuls read is quantized once, as onnxruntime does
            q, scale, zero = quantize_columns(t, base, ops.get(t.name, []))
            # as onnxruntime adds them, one weight at a time: scale and zero point (as lists), then the data
            model.graph.initializer.extend([
                helper.make_tensor(f"{t.name}_scale", TensorProto.FLOAT, [len(scale)], scale.tolist()),
                helper.make_tensor(f"{t.name}_zero_point", TensorProto.INT8, [len(zero)], zero.tolist()),
                numpy_helper.from_array(q, f"{t.name}_quantized")])
            done.add(t.name)
            del q
        new += _integer_nodes(node, quantized[x], t.name)
    model.graph.ClearField("node")
    model.graph.node.extend(new)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    remove_initializers(model, {t.name for t in model.graph.initializer if t.name not in used})
    ONNXModel(model).topological_sort()
