"""Smoothed dynamic int8 made one weight at a time (``edgeft.export.dynamic``) is the whole-graph path's artifact.

The reference is the path the dynamic scheme took before: the fp32 graph read whole into protobuf, smoothed and
row-scaled in memory (``smooth.rewrite``), saved, quantized by onnxruntime's ``quantize_dynamic``, loaded again,
its embedding quantized. The streamed path must write the same nodes in the same order, the same int8 weights,
scales and zero points to the bit, and so the same logits; and it must never read the MatMuls' fp32 weights (nor
the embedding) into the graph.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeft.export import dynamic, smooth
from edgeft.export.quantize import _external


def _fp32_graph(model_dir: Path, work: Path):
    from edgeft.export import ExportConfig
    from edgeft.export.decoder import check_supported, export_decoder
    from edgeft.export.merge import load_source, save_hf_configs

    source = load_source(ExportConfig(source=str(model_dir), out=work / "unused", quantize="int8"))
    hf = save_hf_configs(source, work / "hf")
    return export_decoder(source.model, hf, work, check_supported(source.model.config))


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir"])
def graph(request, tmp_path_factory):
    """The fp32 decoder graph of a tiny llama (genai builder) and of a tiny gpt2 (torch.onnx)."""
    return _fp32_graph(request.getfixturevalue(request.param), tmp_path_factory.mktemp(request.param))


def _feeds(graph, sizes=(9, 16), seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    chunks = [list(rng.integers(3, 300, size=n)) for n in sizes]
    return smooth.decoder_feeds(graph.inputs, chunks, graph.num_kv_heads, graph.head_dim, graph.kv_dtype)


def _old_path(src: Path, dest: Path, vocab_size: int, block_size: int, feeds: list[dict]) -> None:
    """The dynamic scheme as it was: the whole fp32 graph in protobuf, then ``quantize_dynamic``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeft.export.quantize import _drop_unused_initializers, _quantize_embedding, load, save

    model = load(src)
    targets, _ = smooth.rewrite(model, vocab_size, feeds, work=dest.parent)
    tmp_in, tmp_out = dest.with_name("smoothed-tmp.onnx"), dest.with_name("dynamic-tmp.onnx")
    save(model, tmp_in)
    del model
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(tmp_in), str(tmp_out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=["MatMul"], nodes_to_quantize=[t.node for t in targets],
                         use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": 1})
    finally:
        logging.getLogger().setLevel(level)
    model = load(tmp_out)
    _quantize_embedding(model, 8, block_size, next((t for t in targets if t.group == "head"), None), 0)
    _drop_unused_initializers(model)
    save(model, dest)


def _nodes(model) -> list[tuple]:
    return [(n.op_type, n.name, list(n.input), list(n.output),
             sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute if a.name != "value"))
            for n in model.graph.node]


def _logits(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(["logits"], f)[0] for f in feeds]


def test_streamed_artifact_is_the_whole_graph_paths(graph, tmp_path, monkeypatch):
    feeds = _feeds(graph)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    _old_path(graph.path, tmp_path / "old" / "model.onnx", graph.vocab_size, 32, feeds)
    from edgeft.export import quantize

    monkeypatch.setattr(dynamic, "CHUNK", 200)  # several blocks of rows per weight
    monkeypatch.setattr(quantize, "QUANT_ROWS", 1000)  # and per embedding
    got = smooth.quantize_decoder_dynamic(graph.path, tmp_path / "new" / "model.onnx", graph.vocab_size,
                                          graph.num_layers, 32, feeds)
    assert got.method == "dynamic-smoothed" and got.activations == "int8-per-row"
    old, new = (onnx.load(str(tmp_path / d / "model.onnx")) for d in ("old", "new"))
    ops = [n.op_type for n in new.graph.node]
    fp32 = onnx.load(str(graph.path), load_external_data=False)
    weights = {t.name for t in fp32.graph.initializer if len(t.dims) == 2}
    constant_b = [n for n in fp32.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert ops.count("MatMulInteger") == len(constant_b) == 4 * graph.num_layers + 1  # 4 a block, the head
    assert ops.count("DynamicQuantizeLinear") == len({n.input[0] for n in new.graph.node if n.op_type == "MatMulInteger"})
    assert _nodes(new) == _nodes(old)  # the same nodes, names and wiring, in the same order
    want = {t.name: numpy_helper.to_array(t) for t in old.graph.initializer}
    have = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    assert list(have) == list(want)
    for name, value in want.items():  # int8 weights, scales, zero points, smoothed gains: to the bit
        assert have[name].dtype == value.dtype and np.array_equal(have[name], value), name
    assert any(n.endswith("_quantized") and v.dtype == np.int8 for n, v in have.items())
    for a, b in zip(_logits(tmp_path / "new" / "model.onnx", _feeds(graph, (7, 12), 1)),
                    _logits(tmp_path / "old" / "model.onnx", _feeds(graph, (7, 12), 1))):
        assert np.array_equal(a, b)
    assert sorted(p.name for p in graph.path.parent.iterdir() if p.name.startswith(".calibrate-")) == []


def test_no_fp32_matmul_weight_is_read_into_the_graph(graph, tmp_path, monkeypatch):
    """The old path read every external tensor into protobuf (``onnx.load``), and handed onnxruntime the whole
    model as bytes; the streamed one reads only the small tensors the quantized graph keeps, and gives the
    calibration session a file."""
    import onnx.external_data_helper as ext
    import onnxruntime as ort

    base = graph.path.parent
    fp32 = onnx.load(str(graph.path), load_external_data=False)
    weights = {n.input[1] for n in fp32.graph.node if n.op_type in ("MatMul", "Gemm")}
    external = {t.name: int(np.prod(t.dims)) * 4 for t in fp32.graph.initializer if _external(t)}
    assert weights & set(external)
    loaded: list[str] = []
    real_load = ext.load_external_data_for_tensor
    monkeypatch.setattr(ext, "load_external_data_for_tensor", lambda t, b: (loaded.append(t.name), real_load(t, b)))
    sessions: list = []
    real_session = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda m, *a, **k: (sessions.append(m), real_session(m, *a, **k))[1])
    (tmp_path / "new").mkdir()
    smooth.quantize_decoder_dynamic(graph.path, tmp_path / "new" / "model.onnx", graph.vocab_size, graph.num_layers,
                                    32, _feeds(graph))
    assert not set(loaded) & weights  # no MatMul weight in protobuf
    gather = next(n for n in fp32.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    made_by = {o: n for n in fp32.graph.node for o in n.output}
    embedding = gather.input[0] if gather.input[0] in external else made_by[gather.input[0]].input[0]  # tied: a Transpose
    assert embedding in external and embedding not in loaded  # nor the embedding (read a block of rows at a time)
    assert sum(external[n] for n in loaded) <= 0.1 * sum(external.values())
    from edgeft.export.quantize import matmul_targets

    found = smooth.sites(fp32, [t.node for t in matmul_targets(fp32, graph.vocab_size)])
    assert len(sessions) == (1 if found else 0)  # llama: its norms and MLPs; gpt2: none (row scales only)
    assert all(isinstance(s, str) and Path(s).parent == base for s in sessions)
    assert not [p for p in base.iterdir() if p.name.startswith(".calibrate-")]  # the graph's copy is gone


def test_columns_are_onnxruntimes_per_channel_int8_to_the_bit(tmp_path):
    """Zero columns, tiny ones (a scale under float32's smallest normal), exact halves, large values."""
    from onnxruntime.quantization.quant_utils import QuantType, quantize_data

    rng = np.random.default_rng(3)
    w = rng.standard_normal((37, 9)).astype(np.float32)
    w[:, 1] = 0
    w[:, 2] *= 1e-39
    w[:, 3] = np.arange(37, dtype=np.float32) - 18.5  # absmax 18.5: many values land on halves of the step
    w[:, 4] = np.abs(w[:, 4])  # positive only
    w[:, 5] *= 3e4
    t = numpy_helper.from_array(w, "w")
    ops = [("rows", np.linspace(0.5, 2, 37)), ("cols", 6, 9, np.array([3.0, 0.25, 7.0]))]
    for applied in ([], ops):
        ref = w.astype(np.float64)
        if applied:
            ref = (w * applied[0][1][:, None]).astype(np.float32)
            ref[:, 6:9] /= applied[1][3][None, :]
        q, scale, zero = dynamic.quantize_columns(t, tmp_path, applied)
        for c in range(w.shape[1]):
            zp, sc, qc = quantize_data(np.asarray(ref[:, c], np.float32), QuantType.QInt8.tensor_type, True,
                                       reduce_range=True)
            assert zero[c] == zp and scale[c] == sc and scale.dtype == np.float32, c
            assert np.array_equal(q[:, c], qc.astype(np.int8)), c


@pytest.mark.parametrize("graph", ["tiny_llama_dir"], indirect=True)
def test_calibration_session_holds_only_what_the_measured_tensors_need(graph, monkeypatch):
    """The session's graph measures each tensor's channel maxima in the graph and has lost the head; its figures
    are the whole graph's (``smooth.calibrate``, every tensor an output, the model in memory) to the bit."""
    import onnxruntime as ort

    from edgeft.export.quantize import load, load_graph, matmul_targets

    model = load_graph(graph.path)
    targets = matmul_targets(model, graph.vocab_size)
    tensors = [s.tensor for s in smooth.sites(model, [t.node for t in targets])]
    assert tensors
    seen: list = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession",
                        lambda p, *a, **k: (seen.append(onnx.load(p, load_external_data=False)), real(p, *a, **k))[1])
    outputs = [o.name for o in model.graph.output]
    got = dynamic.calibrate_file(model, graph.path, tensors, _feeds(graph))
    assert [o.name for o in model.graph.output] == outputs  # the caller's graph as it came
    monkeypatch.setattr(ort, "InferenceSession", real)
    want = smooth.calibrate(load(graph.path), tensors, _feeds(graph))
    assert set(got) == set(want) and all(np.array_equal(got[t], want[t]) for t in tensors)
    session_graph = seen[0]
    assert [o.name for o in session_graph.graph.output] == [f"{t}/edgeft_amax" for t in tensors]
    head = next(t for t in targets if t.group == "head")
    assert head.node not in {n.name for n in session_graph.graph.node}  # (its weight stays where the embedding
    assert not [n for n in session_graph.graph.node if n.op_type == "MatMul" and n.input[1] == head.weight]  # is it)


def test_shared_inputs_and_weights_are_quantized_once_as_onnxruntime_does(tmp_path):
    """Two MatMuls on one input share its ``DynamicQuantizeLinear``; two on one weight share its int8 copy."""
    from onnx import TensorProto, helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeft.export.quantize import load, load_graph, save

    rng = np.random.default_rng(5)
    w = {n: numpy_helper.from_array(rng.standard_normal((32, 24)).astype(np.float32), n) for n in ("wa", "wb")}
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], "mm_a"), helper.make_node("MatMul", ["x", "wb"], ["b"], "mm_b"),
             helper.make_node("Relu", ["x"], ["r"], "relu"), helper.make_node("MatMul", ["r", "wa"], ["c"], "mm_c"),
             helper.make_node("Sum", ["a", "b", "c"], ["y"], "sum")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 24])], list(w.values()))
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "fp32.onnx")
    quantize_dynamic(str(tmp_path / "fp32.onnx"), str(tmp_path / "ref.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, reduce_range=True, op_types_to_quantize=["MatMul"],
                     nodes_to_quantize=["mm_a", "mm_b", "mm_c"], use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": 1})
    ref = load(tmp_path / "ref.onnx")
    ours = load_graph(tmp_path / "fp32.onnx")
    dynamic.integer_matmuls(ours, tmp_path, ["mm_a", "mm_b", "mm_c"], {})
    assert _nodes(ours) == _nodes(ref)
    assert [n.op_type for n in ours.graph.node].count("DynamicQuantizeLinear") == 2
    have = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    assert [t.name for t in ours.graph.initializer] == list(want) == ["wa_scale", "wa_zero_point", "wa_quantized", "wb_scale", "wb_zero_point",
                                        "wb_quantized"]
    assert all(np.array_equal(have[n], want[n]) and have[n].dtype == want[n].dtype for n in want)
