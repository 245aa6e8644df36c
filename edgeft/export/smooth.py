"""Smoothed dynamic int8 for decoders: every matmul on int8 activations, each row on its own scale.

onnxruntime's dynamic quantization (``DynamicQuantizeMatMul``: int8 weights per output
channel, the activations quantized at run time) runs the integer GEMM that makes prefill
fast on CPUs, but it gives a whole call's activations one scale, which is too coarse for a
language model: a few channels, and a few tokens, carry values tens of times larger than the
rest. Two rewrites of the fp32 graph, both exact in fp32, come before the quantizer:

- **smoothing** (SmoothQuant): for each input channel k of a matmul,
  ``s_k = max|x_k|^alpha / max|W_k,:|^(1 - alpha)``, with ``max|x_k|`` measured on calibration
  ids; x is divided by s where it is made (the gain of the norm before the matmul, or the
  columns of the MLP's up projection before the down projection) and W's row k multiplied by it;
- **per-row scales**: each matmul input is divided by its rows' largest magnitude and the
  product multiplied back, so every row lies in [-1, 1] and the call's one scale is at most
  twice what a row would get alone: a token with huge activations (the first of a prompt often
  has them) no longer coarsens every other token's step, nor one sequence of a batch another's.

Weights are 7-bit (``reduce_range``): on AVX2 without VNNI, onnxruntime's u8 x s8 kernels add
pairs of products in 16 bits, which full-range int8 weights overflow. The token embedding is
8-bit ``GatherBlockQuantized``, as in the weight-only scheme.

The export (``quantize_decoder_dynamic``) leaves the fp32 weights in their file and makes the
int8 graph one weight at a time (``edgeft.export.dynamic``). ``rewrite`` (``calibrate``,
``smooth``, ``per_row`` on a graph held whole in memory) is the same rewrite on a small graph:
the tests check with it that the rewrite is exact in fp32, and that the export's graph is what it
and onnxruntime's ``quantize_dynamic`` make.

This module knows ONNX graphs and onnxruntime; nothing of torch or tokenizers: the
calibration ids come from the caller.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.artifact import Quantization
from edgeft.export import dynamic
from edgeft.export.dynamic import EPS, site_scale
from edgeft.export.quantize import (MatMulTarget, _drop_unused_initializers, _group_widths, _inits, _producers,
                                    _quantize_embedding, _quiet, default_opset, gemm_to_matmul, load_graph, materialize,
                                    matmul_targets, save)

INLINE_LIMIT = 1 << 30  # bytes of weights up to which calibration hands onnxruntime the model in memory
ALPHA = 0.5  # SmoothQuant's migration strength (0.75 and 0.9 were worse on SmolLM2: results/dynamic_int8.md)
_NORMS = {"SimplifiedLayerNormalization": (1, None), "LayerNormalization": (1, 2),
          "SkipSimplifiedLayerNormalization": (2, None), "SkipLayerNormalization": (2, 3)}  # gain, bias inputs


@dataclass
class Site:
    """One matmul input that can be smoothed: where it is made, and the matmuls that read it."""

    tensor: str
    matmuls: list[str]  # node names
    weights: list[str]  # their weight initializers, [K, N]
    kind: str  # "norm" or "up"
    scale_inits: list[str] = field(default_factory=list)  # norm: gain (and bias); up: the up projection's weight
    columns: tuple[int, int] | None = None  # up: the columns of that weight that make this input


def _consumers(model) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def sites(model, targets: Sequence[str]) -> list[Site]:
    """The inputs of ``targets`` (MatMul node names) whose scale can be moved into their maker."""
    inits, made_by, read_by = _inits(model), _producers(model), _consumers(model)
    nodes = {n.name: n for n in model.graph.node}
    target_set = set(targets)
    graph_outputs = {o.name for o in model.graph.output}
    found: list[Site] = []
    by_input: dict[str, list] = {}
    for name in targets:
        by_input.setdefault(nodes[name].input[0], []).append(nodes[name])
    for tensor, mms in by_input.items():
        readers = read_by.get(tensor, [])
        if any(r.name not in target_set for r in readers) or tensor in graph_outputs:
            continue  # something else reads the input: scaling it would change that too
        weights = [m.input[1] for m in mms]
        if any(w not in inits or len(read_by.get(w, [])) != 1 for w in weights):
            continue  # a weight shared with another node (a tied head) cannot take the scales
        maker = made_by.get(tensor)
        if maker is None:
            continue
        if maker.op_type in _NORMS and maker.output[0] == tensor:
            gain, bias = _NORMS[maker.op_type]
            names = [maker.input[i] for i in (gain, bias) if i is not None and i < len(maker.input) and maker.input[i]]
            if all(n in inits and len(read_by.get(n, [])) == 1 for n in names):
                found.append(Site(tensor, [m.name for m in mms], weights, "norm", names))
        elif maker.op_type == "Mul":
            up = _up_side(maker, inits, made_by, read_by)
            if up is not None:
                found.append(Site(tensor, [m.name for m in mms], weights, "up", [up[0]], up[1]))
    return found


def _up_side(mul, inits, made_by, read_by) -> tuple[str, tuple[int, int]] | None:
    """For ``act(gate) * up``: the up projection's weight and the columns that make ``up``."""
    for operand in mul.input:
        if len(read_by.get(operand, [])) != 1:
            continue
        p = made_by.get(operand)
        if p is not None and p.op_type == "MatMul" and p.input[1] in inits and len(read_by.get(p.input[1], [])) == 1:
            n = int(inits[p.input[1]].dims[1])
            return p.input[1], (0, n)
        if p is not None and p.op_type == "Split":
            src = made_by.get(p.input[0])
            if (src is None or src.op_type != "MatMul" or src.input[1] not in inits
                    or len(read_by.get(p.input[0], [])) != 1 or len(read_by.get(src.input[1], [])) != 1):
                continue
            attrs = {a.name: a for a in p.attribute}
            axis = attrs["axis"].i if "axis" in attrs else 0
            if axis not in (-1, 1):
                continue
            n = int(inits[src.input[1]].dims[1])
            if len(p.input) > 1 and p.input[1]:
                if p.input[1] not in inits:
                    continue
                from onnx import numpy_helper

                sizes = [int(v) for v in numpy_helper.to_array(inits[p.input[1]])]
            else:
                k = len(p.output)
                sizes = [n // k] * k
            j = list(p.output).index(operand)
            start = sum(sizes[:j])
            return src.input[1], (start, start + sizes[j])
    return None


def calibrate(model, tensors: Sequence[str], feeds: Sequence[dict], threads: int | None = None,
              work: Path | None = None) -> dict[str, np.ndarray]:
    """Largest magnitude per channel (last axis) of each of ``tensors`` over the runs ``feeds``.

    ``model`` is given the tensors as outputs for the runs and left as it came. One over
    ``INLINE_LIMIT`` bytes of weights (a 1B decoder in fp32) goes to a scratch folder under ``work``
    for the session (protobuf serializes at most 2 GB in one piece) and is read back after it, so
    its weights are held once at a time, not copied."""
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import load_external_data_for_model

    before = len(model.graph.output)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in have)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    inline = sum(len(t.raw_data) for t in model.graph.initializer) < INLINE_LIMIT
    out: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="calibrate-", dir=work) as tmp:
        try:
            if inline:
                session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            else:
                save(model, Path(tmp) / "calibrate.onnx")  # moves the weights out of ``model`` into the file
                session = ort.InferenceSession(str(Path(tmp) / "calibrate.onnx"), opts,
                                               providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            for feed in feeds:
                values = dict(zip(names, session.run(None, feed)))
                for t in tensors:
                    v = np.abs(values[t].reshape(-1, values[t].shape[-1])).max(0)
                    out[t] = v if t not in out else np.maximum(out[t], v)
            del session
        finally:
            if not inline:
                load_external_data_for_model(model, tmp)
            del model.graph.output[before:]
    return out


def smooth(model, found: Sequence[Site], amax: dict[str, np.ndarray], alpha: float = ALPHA) -> int:
    """Move each site's per-channel scale from the activation into the weights (exact in fp32)."""
    from onnx import numpy_helper

    inits = _inits(model)

    def get(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name]).astype(np.float32)

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    done = 0
    for site in found:
        ws = [get(w) for w in site.weights]
        s = site_scale(amax[site.tensor], np.max([np.abs(m).max(1) for m in ws], axis=0), ws[0].shape[0], alpha)
        if s is None:
            continue
        for name, m in zip(site.weights, ws):
            put(name, m * s[:, None])
        if site.kind == "norm":
            for name in site.scale_inits:
                put(name, get(name) / s)
        else:
            up = get(site.scale_inits[0])
            a, b = site.columns
            up[:, a:b] /= s[None, :]
            put(site.scale_inits[0], up)
        done += 1
    return done


def per_row(model, targets: Sequence[str]) -> int:
    """Divide each target's input by its rows' largest magnitude; multiply the product back."""
    from onnx import helper, numpy_helper

    opset = default_opset(model)
    axes = "edgeft_rowq_axes"
    model.graph.initializer.extend([numpy_helper.from_array(np.array([-1], np.int64), axes),
                                    numpy_helper.from_array(np.array(EPS, np.float32), "edgeft_rowq_eps")])
    target_set, normed, new = set(targets), {}, []
    for n in model.graph.node:
        if n.name not in target_set:
            new.append(n)
            continue
        x = n.input[0]
        if x not in normed:
            base = f"{x}/edgeft_rowq"
            reduce = dynamic.reduce_max(opset, f"{base}/abs", f"{base}/max", -1, axes, keepdims=1,
                                        name=f"{base}/ReduceMax")
            new += [helper.make_node("Abs", [x], [f"{base}/abs"], name=f"{base}/Abs"), reduce,
                    helper.make_node("Max", [f"{base}/max", "edgeft_rowq_eps"], [f"{base}/scale"], name=f"{base}/Max"),
                    helper.make_node("Div", [x, f"{base}/scale"], [f"{base}/rows"], name=f"{base}/Div")]
            normed[x] = base
        base, out = normed[x], n.output[0]
        n.input[0] = f"{base}/rows"
        n.output[0] = f"{out}/edgeft_rowq"
        new += [n, helper.make_node("Mul", [f"{out}/edgeft_rowq", f"{base}/scale"], [out], name=f"{n.name}/RowScale")]
    model.graph.ClearField("node")
    model.graph.node.extend(new)
    return len(normed)


def rewrite(model, vocab_size: int, feeds: Sequence[dict], threads: int | None = None,
            alpha: float = ALPHA, work: Path | None = None) -> tuple[list[MatMulTarget], dict[str, int]]:
    """Smooth and row-scale ``model`` in place (still fp32); the target MatMuls and what was done.

    The targets' node names and weights are those the quantizer will see (the rewrite renames
    their outputs only)."""
    gemm_to_matmul(model)
    targets = matmul_targets(model, vocab_size)
    names = [t.node for t in targets]
    found = sites(model, names)
    amax = calibrate(model, [s.tensor for s in found], feeds, threads, work) if found else {}
    smoothed = smooth(model, found, amax, alpha)
    rows = per_row(model, names)
    return targets, {"matmuls": len(targets), "smoothed_inputs": smoothed, "row_scaled_inputs": rows}


def quantize_decoder_dynamic(src: Path, dest: Path, vocab_size: int, num_layers: int, block_size: int,
                             feeds: Sequence[dict], threads: int | None = None, alpha: float = ALPHA) -> Quantization:
    """The fp32 decoder graph at ``src`` -> smoothed, row-scaled dynamic int8 at ``dest``, its weights read from
    ``src``'s data file one at a time (``edgeft.export.dynamic``): the fp32 weights are never all in memory,
    and the graph is what ``rewrite`` then onnxruntime's ``quantize_dynamic`` (per channel, 7-bit weights,
    MatMuls with a constant weight only) made of the whole graph in memory."""
    src = Path(src)
    base = src.parent
    _quiet()
    model = load_graph(src)
    transposed = {n.input[1] for n in model.graph.node if n.op_type == "Gemm" and len(n.input) > 1
                  and any(a.name == "transB" and a.i for a in n.attribute)}  # gemm_to_matmul reads these
    materialize(model, base, keep={t.name for t in model.graph.initializer} - transposed)
    gemm_to_matmul(model)
    targets = matmul_targets(model, vocab_size)
    names = [t.node for t in targets]
    found = sites(model, names)
    amax = dynamic.calibrate_file(model, src, [s.tensor for s in found], feeds, threads) if found else {}
    ops, _ = dynamic.smooth_file(model, base, found, amax, alpha)
    per_row(model, names)
    dynamic.integer_matmuls(model, base, names, ops)
    head = next((t for t in targets if t.group == "head"), None)
    _quantize_embedding(model, 8, block_size, head, 0, base)
    _drop_unused_initializers(model)
    materialize(model, base)  # what is left in the source's file: the small tensors the graph reads
    save(model, dest)
    return Quantization(scheme="int8", method="dynamic-smoothed", block_size=block_size,
                       groups=_group_widths(targets, {t.node: 8 for t in targets}, 8, num_layers),
                       activations="int8-per-row")


def decoder_feeds(inputs: Sequence[str], id_chunks: Sequence[Sequence[int]], num_kv_heads: int, head_dim: int,
                  kv_dtype: str = "float32") -> list[dict]:
    """Prompt-only feeds (empty past) for the fp32 decoder graph, one per chunk of ids."""
    feeds = []
    for ids in id_chunks:
        x = np.asarray([list(ids)], dtype=np.int64)
        feed: dict = {}
        for name in inputs:
            if name == "input_ids":
                feed[name] = x
            elif name == "attention_mask":
                feed[name] = np.ones_like(x)
            elif name == "position_ids":
                feed[name] = np.arange(x.shape[1], dtype=np.int64)[None]
            elif name.startswith("past"):
                feed[name] = np.zeros((1, num_kv_heads, 0, head_dim), dtype=np.dtype(kv_dtype))
            else:  # logits_to_keep: the last position is enough
                feed[name] = np.asarray([1], dtype=np.int64)
        feeds.append(feed)
    return feeds
