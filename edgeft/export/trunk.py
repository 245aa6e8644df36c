"""Split a classifier's graph at the freeze boundary: a shared trunk and the model's own top.

Tuning trains only the top blocks; the embeddings and the blocks below stay the base's,
and export writes them from the base's original weights (``edgeft.export.merge``). So the
graph's lower part is the same for every run tuned from one base. ``split`` cuts a built
(fused, quantized) graph at the hidden state entering block K:

- ``trunk-<sha256, 16 hex>.onnx``: the graph's inputs -> that hidden state, plus whatever else the
  upper blocks take from below (the attention mask as the fused embedding computes it);
  one self-contained file (no external data), named by the hash of its bytes;
- ``top.onnx``: those tensors (and graph inputs the top reads itself) -> ``logits``.

Nothing is recomputed: the two graphs hold the original nodes and initializers, in the
original order, so the trunk's bytes depend only on the base, K and the quantization.
Constant subgraphs (a dequantized weight both parts read) are copied into both, never passed
across. The block a tensor belongs to is read off torch.onnx's scoped names
(``/m/bert/encoder/layer.3/...``), which fusion and quantization keep on their outputs.

This module knows onnx graphs and the manifest; it knows nothing of torch, the gate or
the runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeft.artifact import Manifest, Trunk
from edgeft.errors import EdgeftError

TOP_FILE = "top.onnx"
TRUNK_FORMAT_VERSION = 2
HEAD_FORMAT_VERSION = 3  # with a shared head (``edgeft.export.head``)
_PROTOBUF_LIMIT = (2 << 30) - (64 << 20)  # a trunk is one file: protobuf's 2 GiB, less room for the graph
_LAYER = re.compile(r"/layers?\.(\d+)/")


def write_named(folder: Path, prefix: str, raw: bytes) -> tuple[str, str]:
    """Write a shared part's bytes as ``<prefix>-<first 16 hex of sha256>.onnx``; its name and sha256."""
    digest = hashlib.sha256(raw).hexdigest()
    name = f"{prefix}-{digest[:16]}.onnx"
    (folder / name).write_bytes(raw)
    return name, digest


def _write_parts(folder: Path, raw: bytes, cut: Cut, src: Path) -> tuple[str, str]:
    """Write the trunk (named by its content) and the top beside each other, remove the whole graph
    ``src`` (and its data file); return the trunk's file name and sha256."""
    from edgeft.export.quantize import save

    name, digest = write_named(folder, "trunk", raw)
    save(cut.top, folder / TOP_FILE)
    src.unlink()
    src.with_name(src.name + ".data").unlink(missing_ok=True)
    return name, digest


def frozen_blocks(asked: int | None, trained: int | None, num_layers: int) -> int:
    """The boundary to cut at: ``asked`` (``--trunk-blocks``), else the run's frozen count; 0: no split.

    ``trained`` is the run's trainable block count (None: a base model, exported whole unless
    asked). A boundary above the run's frozen blocks would put trained weights in the trunk."""
    if asked is None:
        return 0 if not trained else max(0, num_layers - trained)
    if not 0 <= asked <= num_layers:
        raise EdgeftError(f"--trunk-blocks must be between 0 and the model's {num_layers} blocks, not {asked}")
    if trained and asked > num_layers - trained:
        raise EdgeftError(f"--trunk-blocks {asked} is above the run's {num_layers - trained} frozen blocks: "
                          "the trunk would hold trained weights")
    return asked


@dataclasses.dataclass(frozen=True)
class Cut:
    """The two graphs of one split and how they meet."""

    trunk: Any  # onnx.ModelProto
    top: Any
    outputs: list[str]  # the trunk's, the hidden state first
    top_inputs: list[str]


def split(folder: Path, manifest: Manifest, blocks: int, log: Callable[[str], None], asked: bool = True) -> Manifest:
    """Replace ``folder``'s ``model.onnx`` (and its data) by a trunk and a top cut before block ``blocks``.

    Returns ``manifest`` with the trunk section (format 2) and ``graph.file`` naming the top;
    the caller writes it (``write_manifest`` hashes the new files). A graph that cannot be cut
    there is an error when the split was ``asked`` for (``--trunk-blocks``), else it stays one
    graph, and ``log`` says why."""
    from edgeft.export.quantize import load

    src = folder / manifest.graph.file
    model = load(src)
    try:
        cut = cut_graph(model, blocks)
        raw = cut.trunk.SerializeToString()
        if len(raw) > _PROTOBUF_LIMIT:
            raise EdgeftError(f"the trunk is {len(raw) >> 20} MiB, over what one ONNX file holds: export with "
                              "--trunk-blocks 0")
    except EdgeftError as exc:
        if asked:
            raise
        log(f"kept as one graph: {exc}")
        return manifest
    log(f"split before block {blocks}: a shared trunk ({len(cut.outputs)} tensor(s) across) and this model's top")
    name, digest = _write_parts(folder, raw, cut, src)
    section = Trunk(file=name, sha256=digest, blocks=blocks, outputs=cut.outputs, top_inputs=cut.top_inputs)
    return dataclasses.replace(manifest, graph=dataclasses.replace(manifest.graph, file=TOP_FILE), trunk=section,
                               format_version=TRUNK_FORMAT_VERSION)


def graph_files(folder: Path, manifest: Manifest | None) -> list[Path]:
    """The ONNX files that make up an artifact's model: the graph, and the trunk (and head) where it is split
    (no manifest: ``model.onnx``)."""
    if manifest is None:
        return [folder / "model.onnx"]
    return [folder / manifest.graph.file] + [folder / p.file for p in (manifest.trunk, manifest.head) if p is not None]


# ---------------------------------------------------------------- the cut

def _block(name: str) -> int | None:
    found = _LAYER.findall(name)
    return int(found[-1]) if found else None


def _node_block(node: Any) -> int | None:
    blocks = [b for b in map(_block, node.output) if b is not None]
    return max(blocks) if blocks else None


def boundary(model: Any, blocks: int) -> str:
    """The hidden state entering block ``blocks`` (>= 1): of block ``blocks - 1``'s tensors that the
    nodes above read, those whose values come from the token ids (not a mask, not positions made
    from a shape), and of these the one the others derive from (its int8 copy, its scale)."""
    graph = model.graph
    crossing = []
    for node in graph.node:
        above = _node_block(node)
        if above is not None and above < blocks:
            continue
        crossing += [t for t in node.input if t and _block(t) == blocks - 1 and t not in crossing]
    producer = _producers(graph)
    carriers = [t for t in crossing if _from_token_ids(graph, t, producer)]
    roots = [t for t in carriers if not (_ancestor_tensors(graph, [t], producer) - {t}) & set(carriers)]
    if len(roots) != 1:
        raise EdgeftError(f"cannot find the hidden state entering block {blocks} in the graph "
                          f"({len(roots)} candidates): export with --trunk-blocks 0")
    return roots[0]


def cut_graph(model: Any, blocks: int) -> Cut:
    """Cut ``model`` before block ``blocks``: the trunk computes the hidden state (and the tensors the
    top reads from below), the top the rest. Every node lands in one part (constant ones in both)."""
    graph = model.graph
    hidden = boundary(model, blocks)
    producer = _producers(graph)
    inits = {t.name for t in graph.initializer}
    const = _constant_nodes(graph, inits)
    trunk_nodes = _ancestor_nodes(graph, [hidden], producer)
    if any((b := _node_block(graph.node[i])) is not None and b >= blocks for i in trunk_nodes):
        raise EdgeftError(f"the graph's block {blocks} feeds the layers below it: it cannot be cut there")
    top_nodes, crossing = set(), []
    stack = [o.name for o in graph.output]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen or t in inits or t not in producer:
            continue
        seen.add(t)
        i = producer[t]
        if i in trunk_nodes and i not in const:
            crossing.append(t)
            continue
        if i not in top_nodes:
            top_nodes.add(i)
            stack += [x for x in graph.node[i].input if x]
    order = {t: k for k, t in enumerate(o for n in graph.node for o in n.output)}
    outputs = [hidden] + sorted(set(crossing) - {hidden}, key=order.__getitem__)
    graph_inputs = [i.name for i in graph.input if i.name not in inits]
    read = {x for i in top_nodes for x in graph.node[i].input}
    top_inputs = [t for t in outputs if t in set(crossing)] + [n for n in graph_inputs if n in read]
    types = _types(model, outputs)
    trunk = _subgraph(model, sorted(trunk_nodes), [n for n in graph_inputs if n in _reads(graph, trunk_nodes)],
                      outputs, types, "trunk")
    top = _subgraph(model, sorted(top_nodes), top_inputs, [o.name for o in graph.output], types, "top")
    return Cut(trunk, top, outputs, top_inputs)


def _from_token_ids(graph: Any, tensor: str, producer: dict[str, int]) -> bool:
    """Whether ``tensor``'s values depend on ``input_ids`` (a Shape or Size of it does not count)."""
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t == "input_ids":
            return True
        i = producer.get(t)
        if t in seen or i is None or graph.node[i].op_type in ("Shape", "Size"):
            continue
        seen.add(t)
        stack += [x for x in graph.node[i].input if x]
    return False


def _producers(graph: Any) -> dict[str, int]:
    return {o: i for i, n in enumerate(graph.node) for o in n.output if o}


def _reads(graph: Any, nodes: set[int]) -> set[str]:
    return {x for i in nodes for x in graph.node[i].input}


def _ancestor_nodes(graph: Any, tensors: list[str], producer: dict[str, int]) -> set[int]:
    found: set[int] = set()
    stack = list(tensors)
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in found:
            found.add(i)
            stack += [x for x in graph.node[i].input if x]
    return found


def _ancestor_tensors(graph: Any, tensors: list[str], producer: dict[str, int]) -> set[str]:
    nodes = _ancestor_nodes(graph, tensors, producer)
    return set(tensors) | {x for i in nodes for x in graph.node[i].input if x}


def _constant_nodes(graph: Any, inits: set[str]) -> set[int]:
    """Nodes that read only initializers and other such nodes (the graph is in topological order)."""
    known, const = set(inits), set()
    for i, n in enumerate(graph.node):
        if all(not x or x in known for x in n.input):
            const.add(i)
            known.update(n.output)
    return const


def _types(model: Any, names: list[str]) -> dict[str, int]:
    """ONNX element types of the boundary tensors (onnxruntime's shape inference knows the fused ops)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    known = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    if all(known.get(n) for n in names):
        return known
    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception as exc:  # noqa: BLE001 - any failure: the types stay unknown, said below
        raise EdgeftError(f"cannot infer the boundary's types ({type(exc).__name__}): export with "
                          "--trunk-blocks 0") from None
    known |= {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    missing = [n for n in names if not known.get(n)]
    if missing:
        raise EdgeftError(f"cannot infer the type of {missing[0]!r}: export with --trunk-blocks 0")
    return known


def _subgraph(model: Any, nodes: list[int], inputs: list[str], outputs: list[str], types: dict[str, int],
              name: str) -> Any:
    """A model of ``model``'s nodes at ``nodes`` (in order) and the initializers they read."""
    from onnx import helper

    graph = model.graph
    declared = {v.name: v for v in (*graph.input, *graph.output)}

    def info(t: str) -> Any:
        return declared[t] if t in declared else helper.make_tensor_value_info(t, types[t], None)

    kept = [graph.node[i] for i in nodes]
    reads = {x for n in kept for x in n.input}
    made = {o for n in kept for o in n.output}
    sub = helper.make_graph(kept, name, [info(t) for t in inputs], [info(t) for t in outputs],
                            initializer=[t for t in graph.initializer if t.name in reads],
                            value_info=[v for v in graph.value_info if v.name in made and v.name not in outputs])
    # not the builder's "+<git HEAD of the repository around the venv>": bytes from base, boundary, quantization only
    out = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                            producer_name=model.producer_name, producer_version=model.producer_version.split("+")[0])
    for p in model.metadata_props:
        out.metadata_props.add(key=p.key, value=p.value)
    return out


# ---------------------------------------------------------------- decoders

# A decoder block's scope in the onnxruntime-genai builder's names (``/model/layers.3/attn/...``).
# The final norm is ``/model/layers.{num_layers}/final_norm_layernorm``: above every boundary.
_KV_LAYER = re.compile(r"\.(\d+)\.(?:key|value)$")


def split_decoder(folder: Path, manifest: Manifest, blocks: int, log: Callable[[str], None]) -> Manifest:
    """Replace a decoder artifact's graph in ``folder`` by a trunk (embeddings, blocks 0..``blocks``-1
    and their KV cache) and a top (the blocks above, the final norm, the head and their KV cache); a head
    that is the base's goes to a shared file of its own (``edgeft.export.head``).

    Only the onnxruntime-genai builder's graph is cut (its blocks are named ``layers.N``);
    ``genai_config.json`` is dropped, since onnxruntime-genai's own loop drives one graph.
    Returns ``manifest`` with the trunk (and head) section; the caller writes it."""
    from edgeft.export import head
    from edgeft.export.quantize import load

    dec = manifest.decoder
    if dec is None or manifest.graph.builder != "onnxruntime-genai":
        raise EdgeftError(f"--trunk-blocks splits the onnxruntime-genai builder's decoder graphs; this "
                          f"{manifest.architecture} graph ({manifest.graph.builder}) exports as one: drop --trunk-blocks")
    if not 0 < blocks < dec.num_layers + 1:
        raise EdgeftError(f"--trunk-blocks must be between 1 and the model's {dec.num_layers} blocks, not {blocks}")
    src = folder / manifest.graph.file
    model = load(src)
    cut, base_head = head.detach(model, cut_decoder(model, blocks), log)
    raw = cut.trunk.SerializeToString()
    if len(raw) > _PROTOBUF_LIMIT:
        raise EdgeftError(f"the trunk is {len(raw) >> 20} MiB, over what one ONNX file holds: export with a "
                          "lower --trunk-blocks")
    log(f"split before block {blocks}: a shared trunk (blocks 0-{blocks - 1}, {len(cut.outputs)} tensor(s) "
        "across) and this model's top")
    name, digest = _write_parts(folder, raw, cut, src)
    if manifest.graph.genai_config:
        (folder / manifest.graph.genai_config).unlink(missing_ok=True)
    section = Trunk(file=name, sha256=digest, blocks=blocks, outputs=cut.outputs, top_inputs=cut.top_inputs)
    graph = dataclasses.replace(manifest.graph, file=TOP_FILE, genai_config=None)
    shared = head.write(folder, base_head) if base_head is not None else None
    return dataclasses.replace(manifest, graph=graph, trunk=section, head=shared,
                               format_version=TRUNK_FORMAT_VERSION if shared is None else HEAD_FORMAT_VERSION)


def _kv_layer(name: str) -> int | None:
    found = _KV_LAYER.search(name)
    return int(found.group(1)) if found and name.startswith(("past_key_values.", "present.")) else None


def _input_needs(graph: Any, graph_inputs: list[str]) -> list[set[str]]:
    """For each node (in the graph's topological order), the graph inputs its values depend on."""
    needs: dict[str, set[str]] = {n: {n} for n in graph_inputs}
    node_needs: list[set[str]] = []
    for n in graph.node:
        got = set().union(*(needs.get(x, set()) for x in n.input if x))
        node_needs.append(got)
        for o in n.output:
            needs[o] = got
    return node_needs


def _top_walk(graph: Any, top_outputs: list[str], producer: dict[str, int], trunk_only: set[int]
              ) -> tuple[set[int], list[str]]:
    """(the top's nodes, the tensors that cross): walk up from the top's outputs, stopping at nodes
    only the trunk computes."""
    top_nodes: set[int] = set()
    crossing: list[str] = []
    seen: set[str] = set()
    stack = list(top_outputs)
    while stack:
        t = stack.pop()
        if t in seen or t not in producer:
            continue
        seen.add(t)
        i = producer[t]
        if i in trunk_only:
            crossing.append(t)
            continue
        top_nodes.add(i)
        stack += [x for x in graph.node[i].input if x]
    return top_nodes, crossing


def cut_decoder(model: Any, blocks: int) -> Cut:
    """Cut a decoder graph before block ``blocks``.

    The trunk computes what blocks 0..``blocks``-1 produce (their ``present`` caches too) from
    ``input_ids`` and their ``past`` caches; the top reads the tensors that cross (in the
    builder's graph block K-1's MLP output and residual sum, which the next block's fused
    SkipSimplifiedLayerNormalization adds) and its own caches. Nodes that depend only on the
    attention mask or positions (the mask's sequence lengths) and constants are in both parts,
    never passed across."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    graph_inputs = [i.name for i in graph.input]
    data_inputs = [n for n in graph_inputs if n not in inits]
    below = {n for n in data_inputs if n == "input_ids" or ((k := _kv_layer(n)) is not None and k < blocks)}
    shared = {n for n in data_inputs if n in ("attention_mask", "position_ids")}
    above = set(graph_inputs) - below - shared  # its caches, and logits_to_keep (an input with a default)
    trunk_outputs = [o.name for o in graph.output if (k := _kv_layer(o.name)) is not None and k < blocks]
    top_outputs = [o.name for o in graph.output if o.name not in trunk_outputs]
    producer = _producers(graph)
    node_needs = _input_needs(graph, graph_inputs)
    both = {i for i, got in enumerate(node_needs) if got <= shared}
    targets = trunk_outputs + [o for n in graph.node if (b := _node_block(n)) is not None and b < blocks
                               for o in n.output if o]
    trunk_nodes = _ancestor_nodes(graph, targets, producer)
    for i in trunk_nodes:
        n = graph.node[i]
        if (b := _node_block(n)) is not None and b >= blocks or node_needs[i] & (above - inits):
            raise EdgeftError(f"the graph's node {n.name!r} (above block {blocks}) feeds the blocks below it: "
                              "it cannot be cut there")
    top_nodes, crossing = _top_walk(graph, top_outputs, producer, trunk_nodes - both)
    read = _reads(graph, top_nodes)
    if read & below:
        raise EdgeftError(f"the blocks above {blocks} read {sorted(read & below)[0]!r} themselves: the graph "
                          "cannot be cut there")
    order = {t: k for k, t in enumerate(o for n in graph.node for o in n.output)}
    outputs = sorted(set(crossing), key=order.__getitem__)
    if not outputs:
        raise EdgeftError(f"nothing crosses from the blocks below {blocks} to the top: the graph cannot be cut there")
    top_inputs = outputs + [n for n in graph_inputs if n in read]
    trunk_reads = _reads(graph, trunk_nodes)
    types = _types(model, outputs)
    trunk = _subgraph(model, sorted(trunk_nodes), [n for n in graph_inputs if n in trunk_reads and n not in inits],
                      outputs + trunk_outputs, types, "trunk")
    top = _subgraph(model, sorted(top_nodes), top_inputs, top_outputs, types, "top")
    return Cut(trunk, top, outputs, top_inputs)
