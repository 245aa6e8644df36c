"""Calibration of the dynamic-int8 rewrite (edgeft.export.smooth) for models past protobuf's 2 GB limit."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeft.export import smooth


def _matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_model_too_large_to_serialize_is_calibrated_from_a_scratch_file_with_equal_figures(tmp_path, monkeypatch):
    feeds = [{"x": np.random.default_rng(i).standard_normal((3, 8)).astype(np.float32)} for i in range(2)]
    inline = smooth.calibrate(_matmul_model(), ["h"], feeds)
    monkeypatch.setattr(smooth, "INLINE_LIMIT", 0)  # as if the weights were over 1 GiB
    import onnxruntime as ort

    made = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda model, *a, **k: made.append(model) or real(model, *a, **k))
    model = _matmul_model()
    on_disk = smooth.calibrate(model, ["h"], feeds, work=tmp_path)
    np.testing.assert_array_equal(inline["h"], on_disk["h"])
    assert len(made) == 1 and isinstance(made[0], str) and made[0].startswith(str(tmp_path))  # a file, not bytes
    assert list(tmp_path.iterdir()) == []  # the scratch copy is gone
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]),  # the caller's model keeps
                                  numpy_helper.to_array(_matmul_model().graph.initializer[0]))  # its weights
    assert not model.graph.initializer[0].external_data
    assert [o.name for o in model.graph.output] == ["y"]
