"""Cut a split decoder's top again where its LM head begins, when the head is the base's.

A model that ties its head to its embeddings (SmolLM2) keeps the head frozen while tuning
(``TuneConfig.untie_head`` off), so every run tuned from one base carries the same head, the
largest part of each top. ``detach`` takes it out of a top cut by ``edgeft.export.trunk.cut_decoder``:

- ``top.onnx`` then ends at the head's input (the final norm's output, after the builder's
  ``logits_to_keep`` slice);
- ``head-<sha256, 16 hex>.onnx`` takes that tensor to ``logits``: one self-contained file, named by
  the hash of its bytes, loaded once per process like the trunk (``edgeft.runtime.trunks``).

The head is the base's when every weight it reads is also in the trunk, byte for byte: the
builder's tied embedding reads the head's matrix, and the trunk holds only the base's weights.
A trained head (``--untie-head``, or a base whose head is not tied) reads a matrix the trunk does
not hold, and so does a head quantized at another width than the embedding (its matrix then not
shared): those stay in the top, as does a head that is not one tensor and constants -> ``logits``.

This module knows onnx graphs; it knows nothing of torch, runs or the runtime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeft.artifact import Head
from edgeft.errors import EdgeftError
from edgeft.export.trunk import (_PROTOBUF_LIMIT, Cut, _ancestor_nodes, _constant_nodes, _producers,
                                 _subgraph, _types, write_named)

LOGITS = "logits"
# ops whose output has their first input's element type: the builder's ``logits_to_keep`` slice and the like
_SAME_TYPE = {"Slice", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose", "Flatten", "Expand"}


@dataclasses.dataclass(frozen=True)
class HeadCut:
    """A top without its head, and the head."""

    top: Any  # onnx.ModelProto: the top's inputs -> ``input`` and its caches
    head: Any  # ``input`` -> ``logits``
    input: str


def detach(model: Any, cut: Cut, log: Callable[[str], None]) -> tuple[Cut, HeadCut | None]:
    """``cut`` (of the decoder graph ``model``) with its top ending at the head's input, and the head; or ``cut``
    as it is and None (logged) when the head is not the base's or cannot be cut off."""
    try:
        found = cut_head(model, cut.trunk, cut.top)
    except EdgeftError as exc:
        log(f"the head stays in the top: {exc}")
        return cut, None
    log(f"the head is the base's: a shared head file (from {found.input!r})")
    return dataclasses.replace(cut, top=found.top), found


def write(folder: Path, found: HeadCut) -> Head:
    """Write the head beside the top, named by its content; its manifest section."""
    raw = found.head.SerializeToString()
    if len(raw) > _PROTOBUF_LIMIT:
        raise EdgeftError(f"the head is {len(raw) >> 20} MiB, over what one ONNX file holds")
    name, digest = write_named(folder, "head", raw)
    return Head(file=name, sha256=digest, input=found.input)


def head_nodes(graph: Any) -> tuple[set[int], str]:
    """The nodes that make ``logits`` from one tensor and constants (the constant ones included), and that tensor.

    Walks up from ``logits``, taking in the producer of the latest tensor still read from outside
    until one tensor is left; never a node whose outputs something else reads (a block's)."""
    producer = _producers(graph)
    readers: dict[str, set[int]] = {}
    for i, n in enumerate(graph.node):
        for x in n.input:
            readers.setdefault(x, set()).add(i)
    ends = {o.name for o in graph.output}
    inits = {t.name for t in graph.initializer}
    const = _constant_nodes(graph, inits)
    if LOGITS not in producer:
        raise EdgeftError("the top makes no logits")
    nodes = {producer[LOGITS]}
    for _ in range(len(graph.node)):
        outside = {x for i in nodes for x in graph.node[i].input if x and x not in inits and producer.get(x) not in nodes}
        consts = {producer[x] for x in outside if producer.get(x) in const}
        if consts:
            nodes |= _ancestor_nodes(graph, [o for i in consts for o in graph.node[i].output], producer)
            continue
        if len(outside) == 1:
            return nodes, outside.pop()
        if not outside:
            break
        latest = max(outside, key=lambda x: producer.get(x, -1))
        if latest not in producer or any(o in ends or readers.get(o, set()) - nodes
                                         for o in graph.node[producer[latest]].output):
            break
        nodes.add(producer[latest])
    raise EdgeftError("the logits are not made from one tensor by nodes of their own")


def cut_head(model: Any, trunk: Any, top: Any) -> HeadCut:
    """Cut ``top`` (of the decoder graph ``model``, ``trunk`` its trunk) before its head; EdgeftError (the reason)
    when the head is not the base's or cannot be cut off."""
    graph = top.graph
    nodes, hidden = head_nodes(graph)
    read = {x for i in nodes for x in graph.node[i].input}
    weights = [t for t in graph.initializer if t.name in read]
    held = {t.name: t for t in trunk.graph.initializer}
    if not weights or any(t.name not in held or held[t.name].SerializeToString() != t.SerializeToString()
                          for t in weights):
        raise EdgeftError("it reads weights the trunk does not hold (a trained or untied head, or one quantized "
                          "apart from the embedding)")
    const = _constant_nodes(graph, {t.name for t in graph.initializer})  # in both parts where both read them
    made = {o for i in nodes - const for o in graph.node[i].output}
    if made & {x for i in range(len(graph.node)) if i not in nodes for x in graph.node[i].input}:
        raise EdgeftError("the blocks read a tensor the head makes")
    outputs = [hidden if o.name == LOGITS else o.name for o in graph.output]
    if len(set(outputs)) != len(outputs) or made & set(outputs):
        raise EdgeftError("the head makes a graph output besides the logits")
    producer = _producers(graph)
    kept = sorted(_ancestor_nodes(graph, outputs, producer))
    types = _hidden_types(model, top, hidden)
    inputs = [i.name for i in graph.input]
    reads_kept = {x for i in kept for x in graph.node[i].input}
    new_top = _subgraph(top, kept, [n for n in inputs if n in reads_kept], outputs, types, "top")
    head = _subgraph(top, sorted(nodes), [hidden], [LOGITS], types, "head")
    return HeadCut(new_top, head, hidden)


def _hidden_types(model: Any, top: Any, hidden: str) -> dict[str, int]:
    """Element types, ``hidden``'s among them: read off the graph through ops that keep their input's type (the
    builder's slice of the final norm's output), else inferred over the whole graph ``model``."""
    graph = top.graph
    known = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input)}
    producer = _producers(graph)
    t = hidden
    for _ in range(len(graph.node)):
        if known.get(t) or t not in producer or graph.node[producer[t]].op_type not in _SAME_TYPE:
            break
        t = graph.node[producer[t]].input[0]
    if known.get(t):
        return known | {hidden: known[t]}
    return _types(model, [hidden])
