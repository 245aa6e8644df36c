"""An 8-bit KV cache in the exported decoder graph (onnxruntime's CPU GroupQueryAttention, static scales)."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeft.errors import EdgeftError
from edgeft.export import decoder, smooth


def _decode(path, ids, layers, kv_heads, head_dim, dtype, steps=6):
    """Greedy decoding with raw onnxruntime (past grows each step): each step's last logits, the tokens."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, kv_heads, 0, head_dim), dtype)
            for i in range(layers) for kv in ("key", "value")}
    toks, x, logits = list(ids), np.array([ids], np.int64), []
    for _ in range(steps):
        feed = {"input_ids": x, "attention_mask": np.ones((1, len(toks)), np.int64), **past}
        if "logits_to_keep" in names:
            feed["logits_to_keep"] = np.array([1], np.int64)
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        logits.append(out["logits"][0, -1])
        past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present.")}
        toks.append(int(logits[-1].argmax()))
        x = np.array([[toks[-1]]], np.int64)
    return np.array(logits), toks, past


def test_an_int8_kv_cache_keeps_the_decoders_logits_and_stores_int8(llama_art, tmp_path):
    m = onnx.load(str(llama_art / "model.onnx"), load_external_data=False)
    inputs = [i.name for i in m.graph.input]
    layers = sum(1 for n in inputs if n.startswith("past_key_values") and n.endswith(".key"))
    spec = json.loads((llama_art / "manifest.json").read_text())["decoder"]
    kv_heads, head_dim, vocab = spec["num_kv_heads"], spec["head_dim"], spec["vocab_size"]
    for f in llama_art.glob("model.onnx*"):
        shutil.copy(f, tmp_path / f.name)
    graph = tmp_path / "model.onnx"
    rng = np.random.default_rng(0)
    calib = [rng.integers(3, vocab, 48).tolist() for _ in range(2)]
    scales = decoder.kv_cache_scales(graph, smooth.decoder_feeds(inputs, calib, kv_heads, head_dim), layers)
    assert set(scales) == {f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")}
    assert all(s.shape == (kv_heads, 1, head_dim) and (s > 0).all() for s in scales.values())

    prompt = rng.integers(3, vocab, 40).tolist()
    ref, ref_toks, _ = _decode(graph, prompt, layers, kv_heads, head_dim, np.float32)
    assert decoder.int8_kv_cache(graph, scales) == layers
    assert decoder._kv_dtype(graph) == "int8"
    got, toks, cache = _decode(graph, prompt, layers, kv_heads, head_dim, np.int8)
    assert all(v.dtype == np.int8 for v in cache.values())  # the cache is held at one byte a value
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.999 and toks == ref_toks


def test_an_int8_kv_cache_needs_group_query_attention(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])),
              str(tmp_path / "model.onnx"))
    with pytest.raises(EdgeftError, match="needs onnxruntime's GroupQueryAttention"):
        decoder.int8_kv_cache(tmp_path / "model.onnx", {})
