"""An 8-bit KV cache in the exported decoder graph (onnxruntime's CPU GroupQueryAttention, static scales):
the graph rewrite, ``edgeft export --kv-cache int8`` through the gate, and the runtime's paths on its int8 cache."""

import json
import shutil
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeft.errors import EdgeftError
from edgeft.export import ExportConfig, decoder, export, smooth
from edgeft.runtime import Generator, SamplingParams
from edgeft.runtime.engine import Engine
from test_engine import Tap  # the logits-keeping processor the engine tests use

GATE = {"gate_prompts": 4, "gate_new_tokens": 12, "gate_texts": 12, "threads": 1, "progress": False}


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


@pytest.fixture(scope="module")
def int8_pair(tiny_llama_dir, tmp_path_factory):
    """The tiny llama exported -q int8 twice: with a float32 cache and with --kv-cache int8 (must pass the gate)."""
    root = tmp_path_factory.mktemp("kv")
    return tuple(export(ExportConfig(source=str(tiny_llama_dir), out=root / kv, quantize="int8", kv_cache=kv, **GATE),
                        log=None) for kv in ("float32", "int8"))


def test_export_kv_cache_int8_passes_the_gate_with_an_int8_cache(int8_pair):
    _, art = int8_pair
    m = json.loads((art / "manifest.json").read_text())
    assert m["gate"]["passed"] and not m["gate"]["degraded"]
    assert m["decoder"]["kv_dtype"] == "int8"
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False)
    past = [i for i in graph.graph.input if i.name.startswith("past_key_values")]
    assert past and all(i.type.tensor_type.elem_type == onnx.TensorProto.INT8 for i in past)


def test_the_runtime_decodes_on_an_int8_cache_close_to_the_float_one(int8_pair):
    ref_art, art = int8_pair
    gen, ref = Generator.open(art), Generator.open(ref_art)
    assert gen.engine.kv_dtype == np.int8 and ref.engine.kv_dtype == np.float32
    params = SamplingParams(max_new_tokens=12, temperature=0.0, speculate="off")
    prompt = list(range(5, 45))
    taps = Tap(), Tap()
    out = gen.generate(prompt, params, processors=[taps[0]])
    # each decoding step's logits against the float-cache artifact's on the same prefix
    for i, row in enumerate(taps[0].rows):
        want = ref.score(prompt + out.token_ids[:i])[-1]
        assert float(row @ want / np.linalg.norm(row) / np.linalg.norm(want)) > 0.999
    assert len(taps[0].rows) == len(out.token_ids)


def test_the_slot_engine_and_speculation_agree_with_the_generator_on_an_int8_cache(int8_pair):
    _, art = int8_pair
    gen = Generator.open(art)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, speculate="off")
    prompts = [list(range(5, 45)), list(range(60, 71))]
    alone = [gen.generate(p, params).token_ids for p in prompts]
    engine = Engine(gen, parallel=2, ctx_size=2 * 128)
    assert engine.kv.kind == "slots"
    try:
        got: list[list] = [[], []]
        done = [threading.Event(), threading.Event()]

        def receiver(i):
            def on_chunk(chunk):
                got[i].append(chunk if isinstance(chunk, BaseException) else chunk.token_id)
                if isinstance(chunk, BaseException) or chunk.finish_reason is not None:
                    done[i].set()
            return on_chunk

        for i, p in enumerate(prompts):
            engine.submit(p, params, receiver(i), [])
        assert all(d.wait(120) for d in done)
    finally:
        engine.close()
    assert [[t for t in g if t is not None] for g in got] == alone
    spec = gen.generate(prompts[0] * 2, SamplingParams(max_new_tokens=12, temperature=0.0, speculate="on")).token_ids
    assert spec == gen.generate(prompts[0] * 2, params).token_ids


def test_kv_cache_int8_on_a_torch_onnx_decoder_is_one_line(tiny_gpt2_dir, tmp_path):
    with pytest.raises(EdgeftError) as e:
        export(ExportConfig(source=str(tiny_gpt2_dir), out=tmp_path / "gpt2", quantize="int8", kv_cache="int8",
                            **GATE), log=None)
    assert "--kv-cache int8 needs an onnxruntime-genai builder graph" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "gpt2").exists()


def test_a_split_decoder_keeps_its_int8_cache_in_both_parts(int8_pair, tiny_llama_dir, tmp_path):
    _, whole = int8_pair
    art = export(ExportConfig(source=str(tiny_llama_dir), out=tmp_path / "split", quantize="int8", kv_cache="int8",
                              trunk_blocks=2, **GATE), log=None)
    m = json.loads((art / "manifest.json").read_text())
    assert m["decoder"]["kv_dtype"] == "int8" and m["gate"]["passed"]
    gen = Generator.open(art)
    assert gen.engine.trunk is not None and gen.engine.kv_dtype == np.int8
    params = SamplingParams(max_new_tokens=12, temperature=0.0, speculate="off")
    prompt = list(range(5, 45))
    assert gen.generate(prompt, params).token_ids == Generator.open(whole).generate(prompt, params).token_ids
    engine = Engine(gen, parallel=1, ctx_size=128)
    try:
        got, done = [], threading.Event()

        def on_chunk(chunk):
            got.append(chunk if isinstance(chunk, BaseException) else chunk.token_id)
            if isinstance(chunk, BaseException) or chunk.finish_reason is not None:
                done.set()

        engine.submit(prompt, params, on_chunk, [])
        assert done.wait(120)
    finally:
        engine.close()
    assert [t for t in got if t is not None] == gen.generate(prompt, params).token_ids
