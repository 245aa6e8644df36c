"""The decoder quantizer reads each 8-bit weight from the graph's external file one at a time (never the
whole fp32 model into memory), and gives exactly what onnxruntime's MatMulNBitsQuantizer gives."""

from __future__ import annotations

import numpy as np


def _graph(folder, k: int = 80, n: int = 48, vocab: int = 40):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    up = numpy_helper.from_array(rng.normal(0, 0.02, (k, n)).astype(np.float32), "model.layers.0.mlp.up_proj.weight")
    head = numpy_helper.from_array(rng.normal(0, 0.02, (n, vocab)).astype(np.float32), "lm_head.weight")
    nodes = [helper.make_node("MatMul", ["x", up.name], ["h"], name="/model/layers.0/mlp/up_proj/MatMul"),
             helper.make_node("MatMul", ["h", head.name], ["logits"], name="/lm_head/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, vocab])], [up, head])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return path, [up.name, head.name]


def test_int8_weights_are_read_one_at_a_time_and_match_onnxruntimes_quantizer(tmp_path, monkeypatch):
    import onnx
    import onnx.external_data_helper as ext
    import onnxruntime as ort

    from edgeft.export import quantize
    from edgeft.export.config import Quantize

    src, weights = _graph(tmp_path)
    loaded: list[str] = []
    real = ext.load_external_data_for_tensor
    monkeypatch.setattr(ext, "load_external_data_for_tensor", lambda t, base: (loaded.append(t.name), real(t, base)))
    (tmp_path / "out").mkdir()
    quantize.quantize_decoder(src, tmp_path / "out" / "model.onnx", Quantize.int8, 32, 1, 40)
    assert not set(loaded) & set(weights), loaded  # no 8-bit weight was read into the graph

    monkeypatch.setattr(ext, "load_external_data_for_tensor", real)
    ref = onnx.load(str(src))
    ref = quantize._nbits_pass(ref, [n.name for n in ref.graph.node], [], 8, 32, 4, True)
    got = onnx.load(str(tmp_path / "out" / "model.onnx"))
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in got.graph.initializer}
    for t in ref.graph.initializer:
        assert np.array_equal(arrays[t.name], onnx.numpy_helper.to_array(t)), t.name
    assert [(n.op_type, n.name) for n in got.graph.node] == [(n.op_type, n.name) for n in ref.graph.node]

    x = np.random.default_rng(1).normal(size=(1, 80)).astype(np.float32)
    a = ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(None, {"x": x})[0]
    (tmp_path / "ref").mkdir()
    quantize.save(ref, tmp_path / "ref" / "model.onnx")
    b = ort.InferenceSession(str(tmp_path / "ref" / "model.onnx")).run(None, {"x": x})[0]
    assert np.array_equal(a, b)
