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


def test_symmetric_int4_blocks_carry_no_zero_points_and_match_onnxruntimes_symmetric_quantizer(tmp_path):
    """``--int4-mode symmetric`` (llama.cpp's Q4_0 grid): each 4-bit block is a scale and 16 signed levels,
    stored as onnxruntime's symmetric quantizer stores them, with no zero-point input; the default grid keeps
    its zero points."""
    import onnx
    import onnxruntime as ort

    from edgeft.artifact import Int4Grid
    from edgeft.export import quantize
    from edgeft.export.config import Quantize

    src, (up, _) = _graph(tmp_path)
    made = {}
    for grid in (Int4Grid.symmetric, Int4Grid.zero_point):
        (tmp_path / grid.value).mkdir()
        q = quantize.quantize_decoder(src, tmp_path / grid.value / "model.onnx", Quantize.int4, 32, 1, 40,
                                      int4_grid=grid)
        assert q.int4_grid is grid and q.to_dict()["int4_grid"] == grid.value
        made[grid] = onnx.load(str(tmp_path / grid.value / "model.onnx"))
    node = {g: next(n for n in m.graph.node if n.op_type == "MatMulNBits" and "up_proj" in n.name)
            for g, m in made.items()}
    assert len(node[Int4Grid.symmetric].input) == 3 and len(node[Int4Grid.zero_point].input) == 4
    assert {a.name: a.i for a in node[Int4Grid.symmetric].attribute}["bits"] == 4

    ref = onnx.load(str(src))
    ref = quantize._nbits_pass(ref, ["/model/layers.0/mlp/up_proj/MatMul"], [], 4, 32, 4, True)
    want = {t.name: onnx.numpy_helper.to_array(t) for t in ref.graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in made[Int4Grid.symmetric].graph.initializer}
    for name in node[Int4Grid.symmetric].input[1:]:
        assert np.array_equal(got[name], want[name]), name

    x = np.random.default_rng(2).normal(size=(1, 80)).astype(np.float32)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    exact = x @ w[up] @ w["lm_head.weight"]
    for grid in made:
        got_logits = ort.InferenceSession(str(tmp_path / grid.value / "model.onnx")).run(None, {"x": x})[0]
        err = np.abs(got_logits - exact).max() / np.abs(exact).max()
        assert 0 < err < 0.15, (grid, err)  # a 4-bit grid: not exact, not garbage
