"""Weight quantization of exported ONNX graphs, and the per-group record of what was done.

Decoders get weight-only block quantization: every MatMul with a constant weight becomes
``MatMulNBits`` (8 or 4 bits, selectable block size, int8 activations on CPU), and the
token embedding becomes ``GatherBlockQuantized`` at the same width, sharing the head's
quantized matrix when the model ties them. 8-bit blocks are symmetric; 4-bit blocks have
a zero point (asymmetric; none with ``--int4-mode symmetric``, llama.cpp's Q4_0 grid), except the head,
whose matrix the embedding may share. The 8-bit
and 4-bit blocks are made one weight at a time from the fp32 graph's external file (``_block_pass``,
with onnxruntime's own kernels), so the fp32 weights of the MatMuls are never all in memory.

With ``--int4-mode float-offset`` the 4-bit blocks are instead stored as llama.cpp's Q4_1 stores
them, ``offset + scale * q`` with a float offset per block (``offset_pass``: onnxruntime's 4-bit
kernel plus a small 8-bit matmul of the input's block sums with the offsets), and the head stays
at 8 bits.

``mixed`` puts 4 bits only where they cost least: the MLP's input projections (gate/up,
``fc1``, ``c_fc``) of the middle blocks. Attention, the MLP's output projection, the first
and last blocks, head and embeddings stay at 8 (the measurements behind that choice are in
``benchmarks/results/design-measurements.md``).

Classifiers get int8: dynamic (int8 weights and activations, ``quantize_dynamic``) or
weight-only (``MatMulNBits`` 8-bit); ``edgeft.export`` gates both and keeps, by a rule on
the graphs, the one whose matmuls run on int8 activations.

This module knows ONNX graphs and onnxruntime's quantizers; it knows nothing of torch,
tokenizers or where a model came from. Tensor groups are found by name (``layers.3``,
``h.3``, ``layer.3``...), so it works on both the genai builder's and torch.onnx's graphs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.artifact import Int4Grid, Quantization
from edgeft.export.config import Quantize

_BLOCK_RE = re.compile(r"(?:^|[./_])(?:layers|layer|h|blocks|block)[._/](\d+)(?:[./_]|$)")
EXTERNAL_DATA_THRESHOLD = 1024
QUANT_ROWS = 2**18  # fp32 values of a weight quantized at a time by the 8-bit pass (1 MiB)


_MLP_IN_RE = re.compile(r"(?:gate_proj|up_proj|gate_up|c_fc|fc1|dense_h_to_4h|intermediate[./_]dense|[./_]w[13][./_])")


@dataclass
class MatMulTarget:
    """A MatMul whose weight is a constant, and the tensor group it belongs to."""

    node: str
    weight: str
    group: str  # "head", "block.N" or "other"
    mlp_in: bool = False  # an MLP input projection (gate/up, fc1, c_fc): the least sensitive to 4 bits


def _quiet() -> None:
    for name in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------- graph helpers

def load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def load_graph(path: Path):
    """The graph at ``path`` with its external tensors left in their file (``materialize`` reads them)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _external(t) -> bool:
    from onnx import TensorProto

    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def materialize(model, base: Path, keep: set[str] = frozenset()) -> None:
    """Read into the graph every external tensor but those named in ``keep`` (what ``onnx.load`` does for all)."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor

    for t in model.graph.initializer:
        if _external(t) and t.name not in keep:
            load_external_data_for_tensor(t, str(base))
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]


def _weight(t, base: Path) -> np.ndarray:
    """An fp32 initializer as an array: mapped from its external file (pages dropped with the map), or its bytes."""
    from onnx import numpy_helper

    if not _external(t):
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    shape = tuple(int(d) for d in t.dims)
    return np.memmap(base / info["location"], dtype=np.float32, mode="r", offset=int(info.get("offset", 0)),
                     shape=shape)


def save(model, path: Path) -> None:
    """Save with every tensor over 1 KiB in ``<name>.data`` beside the graph."""
    import onnx

    path = Path(path)
    _ensure_domains(model)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=EXTERNAL_DATA_THRESHOLD, convert_attribute=False)


def _ensure_domains(model) -> None:
    """Declare every operator domain the nodes use (fusions add com.microsoft ops without it)."""
    from onnx import helper

    have = {o.domain for o in model.opset_import}
    for domain in sorted({n.domain for n in model.graph.node} - have - {"ai.onnx"}):
        model.opset_import.append(helper.make_opsetid(domain, 1))


def _inits(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def _producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def block_of(*names: str) -> int | None:
    for name in names:
        m = _BLOCK_RE.search(name)
        if m:
            return int(m.group(1))
    return None


def gemm_to_matmul(model) -> int:
    """Rewrite plain ``Gemm`` nodes with a constant weight as ``MatMul`` + ``Add`` (so they quantize)."""
    from onnx import helper, numpy_helper

    inits, changed, nodes = _inits(model), 0, []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[weight]).T.copy()
            weight = f"{weight}_T"
            model.graph.initializer.append(numpy_helper.from_array(w, weight))
        mm_out = node.output[0] if len(node.input) < 3 else f"{node.output[0]}_mm"
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=f"{node.name}_MatMul"))
        if len(node.input) >= 3 and node.input[2]:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
        changed += 1
    if changed:
        model.graph.ClearField("node")
        model.graph.node.extend(nodes)
    return changed


def matmul_targets(model, vocab_size: int | None = None) -> list[MatMulTarget]:
    """Every MatMul with a constant 2-D weight, grouped as head / block.N / other."""
    inits, out = _inits(model), []
    logits_producers = logits_chain(model)
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = list(inits[node.input[1]].dims)
        if len(dims) != 2:
            continue
        if "lm_head" in node.name or "lm_head" in node.input[1] or node.name in logits_producers:
            group = "head"
        elif (b := block_of(node.input[1], node.name)) is not None:
            group = f"block.{b}"
        elif vocab_size and dims[1] == vocab_size:
            group = "head"
        else:
            group = "other"
        mlp_in = bool(_MLP_IN_RE.search(f"{node.name} {node.input[1]}"))
        out.append(MatMulTarget(node.name, node.input[1], group, mlp_in and group.startswith("block.")))
    return out


def logits_chain(model) -> set[str]:
    """Names of nodes that feed ``logits`` through shape-only ops (to spot the head)."""
    producers, seen, todo = _producers(model), set(), ["logits"]
    while todo:
        node = producers.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("Reshape", "Add", "Identity", "Cast", "Squeeze", "Unsqueeze"):
            todo.extend(node.input[:1])
    return seen


# ---------------------------------------------------------------- decoder schemes

def bits_for(group: str, scheme: Quantize, num_layers: int, mlp_in: bool = False) -> int:
    """Width of one tensor group under a scheme (0: keep fp32)."""
    if scheme is Quantize.none:
        return 0
    if scheme is Quantize.int8:
        return 8
    if scheme is Quantize.int4:
        return 4
    if scheme is Quantize.mixed:
        middle = group.startswith("block.") and group not in ("block.0", f"block.{num_layers - 1}")
        return 4 if middle and mlp_in else 8
    raise ValueError(f"no fixed widths for {scheme}")


def _width_plan(targets: list, scheme: Quantize, num_layers: int, widths: dict[str, int] | None,
                q4_1_head: Any = None) -> dict[str, int]:
    """MatMul node -> 4 or 8 bits: the scheme's fixed widths, or ``widths`` (nodes not named: 8);
    ``q4_1_head``: the head kept at 8 bits (llama.cpp's Q4_1 layout, with the embedding sharing it)."""
    if widths is None:
        plan = {t.node: bits_for(t.group, scheme, num_layers, t.mlp_in) for t in targets}
    else:
        plan = {t.node: widths.get(t.node, 8) for t in targets}
    if q4_1_head is not None:
        plan[q4_1_head.node] = 8
    return plan


def _read_once(model: Any, targets: list) -> set[str]:
    """The weights of ``targets`` that no other node reads (so a pass may read them from the file itself)."""
    read_by: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            read_by[i] = read_by.get(i, 0) + 1
    return {t.weight for t in targets if read_by.get(t.weight) == 1}


def quantize_decoder(src: Path, dest: Path, scheme: Quantize, block_size: int, num_layers: int,
                     vocab_size: int, int8_activations: bool = True,
                     widths: dict[str, int] | None = None,
                     int4_grid: Int4Grid = Int4Grid.zero_point) -> Quantization:
    """Quantize a decoder graph's weights; write ``dest`` (+ ``.data``); say what went where (the manifest's
    ``quantization`` section).

    ``int4_grid`` float-offset: 4-bit blocks take a float offset each (``offset_pass``) instead of an
    integer zero point, and the head stays at 8 bits, shared with the embedding (the layout of
    llama.cpp's Q4_1 files, whose head and embedding are Q8_0).

    ``widths`` (MatMul node -> 4 or 8; nodes not named: 8) replaces the scheme's fixed widths
    (``searched``); the token embedding then follows the head's width when the two are tied
    (sharing its matrix), and stays at 8 bits when they are not.
    """
    _quiet()
    base = Path(src).parent
    model = load_graph(src)
    materialize(model, base, keep={i for n in model.graph.node if n.op_type == "MatMul" for i in n.input[1:2]})
    gemm_to_matmul(model)
    targets = matmul_targets(model, vocab_size)
    head = next((t for t in targets if t.group == "head"), None)
    offsets = int4_grid is Int4Grid.float_offset
    plan = _width_plan(targets, scheme, num_layers, widths, head if offsets else None)
    level = 4 if int8_activations else 1
    four = [n for n, b in plan.items() if b == 4]
    eight = [n for n, b in plan.items() if b == 8]
    # the weights of the 8- and 4-bit passes stay in their file until the pass reads them one at a time (the
    # float-offset 4-bit grid reads its weights into the graph); the rest is read now
    streamed = eight if offsets else eight + four
    materialize(model, base, keep=_read_once(model, [t for t in targets if t.node in streamed]))
    if offsets:
        model = _int8_pass(model, base, eight, block_size, level)
        model = offset_pass(model, four, block_size, level)  # after the 8-bit pass: it quantizes its own
        emb_bits = 8
        shared = _quantize_embedding(model, emb_bits, block_size, head, 8)
    else:
        # (bits, symmetric, nodes): 4-bit blocks with zero points; a 4-bit head stays symmetric, as
        # the embedding lookup may share its quantized matrix
        passes = [(4, int4_grid is Int4Grid.symmetric, [n for n in four if head is None or n != head.node]),
                  (4, True, [head.node] if head is not None and plan[head.node] == 4 else []),
                  (8, True, eight)]
        for bits, symmetric, nodes in passes:
            model = _block_pass(model, base, nodes, block_size, level, bits, symmetric)
        emb_bits = (bits_for("embeddings", scheme, num_layers) if widths is None
                    else _searched_embedding_bits(model, head, plan))
        shared = _quantize_embedding(model, emb_bits, block_size, head, plan.get(head.node, 0) if head else 0)
    _drop_unused_initializers(model)
    materialize(model, base)  # anything still in the source's file (none when every MatMul was quantized)
    save(model, dest)
    return Quantization(scheme=scheme.value, block_size=block_size,
                       groups=_group_widths(targets, plan, emb_bits, num_layers),
                       tied_embeddings_shared=shared, activations="int8" if int8_activations else "fp32",
                       int4_grid=int4_grid if four else None)


def offset_grid(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit min/max blocks along K of a [K, N] weight: ``w ~ offset + scale * q``, q in 0..15.

    Returns ``q`` [N, blocks, block_size] (uint8), ``scales`` and ``offsets`` [N, blocks] (float32).
    This is llama.cpp's Q4_1 grid: weights already on such a grid (the de-quantized blocks of a
    Q4_1 GGUF) come back exactly. K is padded with zeros to whole blocks.
    """
    k, n = w.shape
    nb = -(-k // block_size)
    padded = np.zeros((nb * block_size, n), np.float32)
    padded[:k] = w
    blocks = padded.T.reshape(n, nb, block_size)
    if k % block_size:  # the padding must not widen the last block's range
        last = blocks[:, -1, : k % block_size]
        blocks[:, -1, k % block_size:] = last.min(axis=1, keepdims=True)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    scales = (hi - lo) / 15.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint((blocks - lo[:, :, None]) / scales[:, :, None]), 0, 15).astype(np.uint8)
    return q, scales.astype(np.float32), lo.astype(np.float32)


def _ranks(model) -> dict[str, int]:
    """Known ranks of the graph's tensors, by shape inference on a copy without the weights' bytes
    (initializers become typed inputs), so a model past protobuf's 2 GB limit is inferred too."""
    import onnx
    from onnx import helper

    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    graph.ClearField("initializer")
    graph.input.extend(weights)
    light = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=False).graph
    except Exception:  # noqa: BLE001 - a graph shape inference cannot read: ranks stay unknown
        inferred = graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.input, *inferred.value_info, *inferred.output)
            if v.type.tensor_type.HasField("shape")}


def _blocksum_nodes(x: str, out: str, base: str, k: int, nb: int, block_size: int, rank3: bool,
                    const: Any) -> list:
    """Nodes computing ``out``, the sums of ``x``'s blocks of ``block_size`` along its last axis (K)."""
    from onnx import helper

    if k % block_size == 0 and rank3:  # [b, s, K] -> [b, s, blocks, block] -> sum
        shape = const(f"blocksums_{k}_shape", np.array([0, 0, nb, block_size], np.int64))
        axes = const("blocksums_axes", np.array([-1], np.int64))
        return [helper.make_node("Reshape", [x, shape], [f"{base}_blocked"], name=f"{base}_Blocked"),
                helper.make_node("ReduceSum", [f"{base}_blocked", axes], [out], keepdims=0,
                                 name=f"{base}_BlockSums")]
    # any rank, or a padded last block: x @ E, E a 0/1 [K, blocks] matrix
    e = const(f"blocksums_{k}x{nb}_E", (np.arange(k)[:, None] // block_size == np.arange(nb)[None, :]).astype(np.float32))
    return [helper.make_node("MatMul", [x, e], [out], name=f"{base}_BlockSums")]


def offset_pass(model, nodes: list[str], block_size: int, level: int = 4, offset_bits: int | None = 8):
    """Replace each named MatMul by 4-bit ``MatMulNBits`` plus its blocks' float offsets; the model.

    ``x @ w = x @ (scale * (q - 8)) + blocksums(x) @ (offset + 8 * scale)``: the first term is
    onnxruntime's fast 4-bit kernel at its default zero point (8, so no zero points are stored or
    read); the second a small matmul of the input's per-block sums (``Reshape`` + ``ReduceSum``,
    once per input, shared by the matmuls that read it; ``x @ E`` with a 0/1 [K, blocks] matrix
    where the rank is unknown or K is not whole blocks) with the offsets, then an ``Add``. The
    offsets are stored 8-bit (``offset_bits``, symmetric blocks along the block axis: about a
    thirtieth of a grid step off, and a quarter of the bytes of fp32) or, with ``None``, in fp32,
    which holds them exactly. MatMulNBits' own float zero points would hold them too, at many times
    the cost per call.
    """
    if not nodes:
        return model
    from onnx import helper, numpy_helper

    inits, wanted = _inits(model), set(nodes)
    sums: dict[str, str] = {}
    rank = _ranks(model)

    def const(name: str, value: np.ndarray) -> str:  # an initializer shared by every node that needs it
        if name not in inits:
            model.graph.initializer.append(numpy_helper.from_array(value, name))
            inits[name] = model.graph.initializer[-1]
        return name

    out = []
    for node in model.graph.node:
        if node.name not in wanted:
            out.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        k, n = w.shape
        q, scales, offsets = offset_grid(w, block_size)
        nb = q.shape[1]
        packed = pack4(q)
        base, x = node.name, node.input[0]
        names = {"q": f"{base}_Q4", "s": f"{base}_scales", "o": f"{base}_offsets"}
        model.graph.initializer.extend([
            numpy_helper.from_array(packed, names["q"]),
            numpy_helper.from_array(scales.reshape(-1), names["s"]),
            numpy_helper.from_array(np.ascontiguousarray((offsets + 8.0 * scales).T), names["o"])])
        if x not in sums:
            sums[x] = f"{base}_blocksums"
            out.extend(_blocksum_nodes(x, sums[x], base, k, nb, block_size, rank.get(x) == 3, const))
        y = node.output[0]
        out.extend([
            helper.make_node("MatMulNBits", [x, names["q"], names["s"]], [f"{y}_scaled"],
                             name=f"{base}_Q4", domain="com.microsoft", K=k, N=n, bits=4,
                             block_size=block_size, accuracy_level=level),
            helper.make_node("MatMul", [sums[x], names["o"]], [f"{y}_offset"], name=f"{base}_Offsets"),
            helper.make_node("Add", [f"{y}_scaled", f"{y}_offset"], [y], name=f"{base}_AddOffsets")])
    model.graph.ClearField("node")
    model.graph.node.extend(out)
    _ensure_domains(model)
    return model if offset_bits is None else _offsets_at(model, out, offset_bits, level)


def _offsets_at(model, nodes: list, bits: int, level: int):
    """The offsets' small matmuls (``*_Offsets``) stored at ``bits`` (symmetric blocks of 32)."""
    offsets = [n.name for n in nodes if n.name.endswith("_Offsets")]
    rest = [n.name for n in nodes if n.op_type == "MatMul" and n.name not in offsets]
    return _nbits_pass(model, offsets, rest, bits, 32, level, True)


def _searched_embedding_bits(model, head: MatMulTarget | None, plan: dict[str, int]) -> int:
    _, _, tied = _embedding_gather(model, head.weight if head else None)
    return plan[head.node] if tied and head is not None else 8


def _int8_pass(model, base: Path, include: list[str], block_size: int, level: int = 4):
    return _block_pass(model, base, include, block_size, level, 8, True)


def _columns(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> tuple[np.ndarray, ...]:
    """``w`` ([K, N], mapped) quantized by onnxruntime's own kernel a block of output columns at a time:
    ``[N, K/block, block * bits / 8]`` bytes, ``[N, K/block]`` scales and the packed zero points."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    kernel = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    k, n = w.shape
    nb, per_byte = -(-k // block_size), 8 // bits
    blob, zwidth = block_size // per_byte, -(-nb // per_byte)
    packed, scales = np.zeros((n, nb, blob), np.uint8), np.zeros((n, nb), np.float32)
    zeros = np.zeros((n, zwidth), np.uint8)
    step = max(1, QUANT_ROWS // max(1, k))
    for c in range(0, n, step):
        cols = min(step, n - c)
        chunk = np.zeros((nb * block_size, cols), np.float32)
        chunk[:k] = w[:, c:c + cols]
        part, sc, zp = np.zeros((cols, nb, blob), np.uint8), np.zeros((cols, nb), np.float32), \
            np.zeros((cols, zwidth), np.uint8)
        kernel(part, chunk, sc, zp, block_size, cols, k, symmetric)
        packed[c:c + cols], scales[c:c + cols], zeros[c:c + cols] = part, sc, zp
    return packed, scales, zeros


def _block_pass(model, base: Path, include: list[str], block_size: int, level: int = 4, bits: int = 8,
                symmetric: bool = True):
    """``bits``-bit ``MatMulNBits`` (8 or 4) for the MatMuls ``include``, one weight at a time and a block of
    columns at a time, read from the weights' external file where they still are: the graph never holds
    their fp32 bytes. Numbers, layout and names are onnxruntime's own (its ``quantize_matmul_8bits`` and
    ``quantize_matmul_4bits`` kernels, which ``MatMulNBitsQuantizer`` calls): ``[N, K/block, blob]`` bytes,
    ``[N, K/block]`` scales, and packed zero points where the blocks are not symmetric."""
    from onnx import helper, numpy_helper

    if not include:
        return model
    inits, wanted = _inits(model), set(include)
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    nodes, drop = [], set()
    for node in model.graph.node:
        if node.name not in wanted:
            nodes.append(node)
            continue
        t = inits[node.input[1]]
        w = _weight(t, base)  # [K, N]
        k, n = w.shape
        packed, scales, zeros = _columns(w, bits, block_size, symmetric)
        del w
        made = [numpy_helper.from_array(packed, f"{t.name}_Q{bits}"), numpy_helper.from_array(scales, f"{t.name}_scales")]
        if not symmetric:
            made.append(numpy_helper.from_array(zeros, f"{t.name}_zero_points"))
        model.graph.initializer.extend(made)
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block_size} | ({"accuracy_level": level} if level else {})
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *(m.name for m in made)], list(node.output),
                                      name=f"{node.name}_Q{bits}", domain="com.microsoft", **attrs))
        if readers.get(t.name, 0) == 1:
            drop.add(t.name)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    remove_initializers(model, drop)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _nbits_pass(model, include: list[str], exclude: list[str], bits: int, block_size: int, level: int = 4,
                symmetric: bool = True):
    if not include:
        return model
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric, accuracy_level=level,
                             nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
    q.process()
    return q.model.model


def _group_widths(targets: list[MatMulTarget], plan: dict[str, int], emb_bits: int, num_layers: int) -> dict[str, str]:
    """Collapse per-node widths into readable groups: embeddings, head, blocks.a-b, other."""
    def name(bits: int) -> str:
        return f"int{bits}" if bits else "fp32"

    groups = {"embeddings": name(emb_bits)}
    per_block: dict[int, set[int]] = {}
    for t in targets:
        if t.group.startswith("block."):
            per_block.setdefault(int(t.group[6:]), set()).add(plan[t.node])
        else:
            groups[t.group] = name(plan[t.node])
    runs: list[tuple[int, int, str]] = []
    for b in sorted(per_block):
        w = "+".join(name(x) for x in sorted(per_block[b]))
        if runs and runs[-1][2] == w and runs[-1][1] == b - 1:
            runs[-1] = (runs[-1][0], b, w)
        else:
            runs.append((b, b, w))
    for a, b, w in runs:
        groups[f"blocks.{a}" if a == b else f"blocks.{a}-{b}"] = w
    return groups


# ---------------------------------------------------------------- embeddings

def _embedding_gather(model, head_weight: str | None):
    """The token-embedding Gather: (node, fp32 matrix name or None, tied-to-head?)."""
    inits, producers = _inits(model), _producers(model)
    for node in model.graph.node:
        if node.op_type != "Gather":
            continue
        if node.input[1] != "input_ids" and "input_ids" not in _ancestors(producers, node.input[1]):
            continue
        data = node.input[0]
        if data in inits and len(inits[data].dims) == 2:
            return node, data, False
        prod = producers.get(data)
        if prod is not None and prod.op_type == "Transpose" and prod.input[0] == head_weight:
            return node, None, True
    return None, None, False


def _ancestors(producers: dict, name: str, depth: int = 4) -> set[str]:
    seen, frontier = set(), [name]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            node = producers.get(n)
            if node is not None:
                seen.update(node.input)
                nxt.extend(node.input)
        frontier = nxt
    return seen


def _quantize_embedding(model, bits: int, block_size: int, head: MatMulTarget | None, head_bits: int,
                        base: Path | None = None) -> bool:
    """Replace the token-embedding Gather by GatherBlockQuantized; True when it shares the head's weight.
    With ``base``, a matrix still in its external file is read from it a block of rows at a time."""
    from onnx import helper, numpy_helper

    if not bits:
        return False
    node, matrix, tied = _embedding_gather(model, head.weight if head else None)
    if node is None:
        return False
    inits = _inits(model)
    if tied and head_bits == bits:
        qnode = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith(head.node))
        attrs = {a.name: helper.get_attribute_value(a) for a in qnode.attribute}
        qweight, scales = qnode.input[1], qnode.input[2]
        vocab, hidden = attrs["N"], attrs["K"]
        nb = int(inits[qweight].dims[1])
        flat = nb * attrs["block_size"] * bits // 8
        shape_name = f"{node.name}_qshape"
        model.graph.initializer.append(numpy_helper.from_array(np.array([vocab, flat], np.int64), shape_name))
        reshape = helper.make_node("Reshape", [qweight, shape_name], [f"{node.name}_qdata"], name=f"{node.name}_Reshape")
        new = _gbq_nodes(node, reshape.output[0], scales, bits, attrs["block_size"], hidden, nb * attrs["block_size"], model)
        replace_node(model, node, [reshape, *new])
        return True
    if base is not None:
        w = _weight(inits[head.weight], base).T if matrix is None else _weight(inits[matrix], base)
        data, scales = _block_quantize_mapped(w, bits, block_size)
    else:
        if matrix is None:  # tied, but the head stays at another width: materialize the matrix
            w = numpy_helper.to_array(inits[head.weight]).T
        else:
            w = numpy_helper.to_array(inits[matrix])
        data, scales = block_quantize_rows(w.astype(np.float32), bits, block_size)
    vocab, hidden = w.shape
    dname, sname = f"{node.name}_Q{bits}", f"{node.name}_scales"
    model.graph.initializer.extend([numpy_helper.from_array(data, dname), numpy_helper.from_array(scales, sname)])
    new = _gbq_nodes(node, dname, sname, bits, block_size, hidden, data.shape[1] * 8 // bits, model)
    replace_node(model, node, new)
    return False


def _gbq_nodes(node, data: str, scales: str, bits: int, block_size: int, hidden: int, padded: int, model) -> list:
    from onnx import helper, numpy_helper

    out = node.output[0] if padded == hidden else f"{node.output[0]}_padded"
    gbq = helper.make_node("GatherBlockQuantized", [data, node.input[1], scales], [out], name=f"{node.name}_Q{bits}",
                           domain="com.microsoft", bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)
    if padded == hidden:
        return [gbq]
    consts = {f"{node.name}_s0": [0], f"{node.name}_s1": [hidden], f"{node.name}_ax": [-1]}
    for name, value in consts.items():
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
    sl = helper.make_node("Slice", [out, *consts], [node.output[0]], name=f"{node.name}_Slice")
    return [gbq, sl]


def replace_node(model, old, new: list) -> None:
    """Put the nodes ``new`` where ``old`` stands in the graph's (topological) node list."""
    nodes = []
    for n in model.graph.node:
        nodes.extend(new if n is old else [n])
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(__import__("onnx").helper.make_opsetid("com.microsoft", 1))


def block_quantize_rows(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block quantization of each row of ``w`` [V, H] into uint8 (zero point 2^(bits-1)).

    Returns ``data`` [V, padded_H * bits / 8] (4-bit values packed low nibble first, as
    GatherBlockQuantized reads them) and ``scales`` [V, blocks] in float32.
    """
    rows, cols = w.shape
    nb = -(-cols // block_size)
    padded = np.zeros((rows, nb * block_size), np.float32)
    padded[:, :cols] = w
    blocks = padded.reshape(rows, nb, block_size)
    qmax = 2 ** (bits - 1) - 1
    scales = np.abs(blocks).max(axis=2) / qmax
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(blocks / scales[:, :, None]), -qmax - 1, qmax).astype(np.int16) + 2 ** (bits - 1)
    q = q.reshape(rows, nb * block_size).astype(np.uint8)
    if bits == 4:
        q = pack4(q)
    return np.ascontiguousarray(q), scales.astype(np.float32)


def _block_quantize_mapped(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``block_quantize_rows`` of ``w`` (mapped from its file) a block of rows at a time: the same bytes."""
    rows, cols = w.shape
    nb = -(-cols // block_size)
    data, scales = np.empty((rows, nb * block_size * bits // 8), np.uint8), np.empty((rows, nb), np.float32)
    step = max(1, QUANT_ROWS // max(1, cols))
    for r in range(0, rows, step):
        data[r:r + step], scales[r:r + step] = block_quantize_rows(np.asarray(w[r:r + step], dtype=np.float32),
                                                                   bits, block_size)
    return data, scales


def pack4(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, low nibble first (MatMulNBits' and
    GatherBlockQuantized's order)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _drop_unused_initializers(model) -> None:
    """Remove nodes nothing reads (a tied Transpose left behind), then unused initializers."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | outputs
        live = [n for n in model.graph.node if any(o in used for o in n.output)]
        if len(live) == len(model.graph.node):
            break
        model.graph.ClearField("node")
        model.graph.node.extend(live)
    used = {i for n in model.graph.node for i in n.input}
    used |= {o.name for o in model.graph.output}
    remove_initializers(model, {t.name for t in model.graph.initializer if t.name not in used})


def default_opset(model, missing: int = 13) -> int:
    """The version of the default (``ai.onnx``) operator set ``model`` imports; ``missing`` when it names none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), missing)


def remove_initializers(model, names: set[str]) -> None:
    """Delete the initializers named ``names`` in place. Rebuilding the list instead (clear, then extend with
    the kept ones) copies every kept tensor's bytes, and protobuf's arena keeps the cleared copies until the
    whole model is freed: each rebuild held the quantized model once more."""
    inits = model.graph.initializer
    for i in reversed([i for i, t in enumerate(inits) if t.name in names]):
        del inits[i]


# ---------------------------------------------------------------- classifiers

def quantize_classifier_dynamic(src: Path, dest: Path) -> Quantization:
    """int8 weights and activations (per-channel), computed in int8 at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet()
    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing": the graph is already optimized
    tmp = Path(dest).with_name("dynamic-tmp.onnx")
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                     use_external_data_format=True, extra_options={"MatMulConstBOnly": True,
                                   "DefaultTensorType": 1})  # fused ops defeat shape inference: float
    model = load(tmp)
    save(model, dest)
    return Quantization(scheme="int8", method="dynamic", block_size=None, groups=_classifier_groups(model),
                       activations="int8")


def quantize_classifier_weight_only(src: Path, dest: Path, block_size: int) -> Quantization:
    """int8 weights (MatMulNBits), fp32 activations."""
    _quiet()
    model = load(src)
    gemm_to_matmul(model)
    targets = matmul_targets(model)
    model = _nbits_pass(model, [t.node for t in targets], [], 8, block_size, 1)
    _drop_unused_initializers(model)
    save(model, dest)
    return Quantization(scheme="int8", method="weight-only", block_size=block_size, groups=_classifier_groups(model))


def _classifier_groups(model) -> dict[str, str]:
    """What the quantizer actually reached, read off the graph's operators."""
    ops = {n.op_type for n in model.graph.node}
    dense = "int8" if ops & {"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul"} else "fp32"
    attention = "int8" if "QAttention" in ops else ("fp32" if "Attention" in ops else dense)
    return {"embeddings": "fp32", "attention": attention, "dense": dense}
