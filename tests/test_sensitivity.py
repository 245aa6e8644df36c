"""The sensitivity pass behind ``--quantize searched``: simulated blocks equal MatMulNBits' own, the
replayed forward equals the full one, a deliberately damaged tensor group is found and kept at 8
bits, the second export reads the cache, and the runtime opens what was written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeft.export import ExportConfig, export, sensitivity

FAST_GATE = {"gate_prompts": 4, "gate_new_tokens": 12, "gate_texts": 12, "threads": 1, "progress": False}
REPO = Path(__file__).resolve().parents[1]
DAMAGED = "block.1.mlp.gate_up_proj"  # the builder fuses gate and up into one MatMul


@pytest.mark.parametrize("bits,symmetric,k,n,block", [(4, False, 96, 40, 32), (4, True, 64, 24, 32),
                                                      (8, True, 100, 24, 32), (4, False, 256, 16, 128)])
def test_fake_quant_is_what_matmulnbits_computes(bits, symmetric, k, n, block):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(w, "w")])
    q = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bits=bits,
                             block_size=block, is_symmetric=symmetric, accuracy_level=0, op_types_to_quantize=("MatMul",))
    q.process()
    session = ort.InferenceSession(q.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    stored = session.run(None, {"x": np.eye(k, dtype=np.float32)})[0]  # the identity reads the weights back
    simulated = sensitivity.fake_quant(w, bits, block, symmetric)
    assert np.abs(simulated - w).max() > 1e-3  # it is quantized...
    np.testing.assert_allclose(simulated, stored, atol=1e-6)  # ...exactly as onnxruntime stores it


def test_choose_takes_the_cheapest_rise_per_byte_within_the_target():
    def group(name, saving):
        return sensitivity.Group(name, name, name, 0, 0, bytes4=0, bytes8=saving, symmetric4=False)

    found = [group("a", 100), group("b", 100), group("c", 1000), group("d", 100)]
    sens = sensitivity.Sensitivity("k", reference_nll=2.0, baseline_nll=2.01, tokens=10, deltas={},
                                   baseline_kl=0.005, kl={"a": 0.01, "b": 0.0, "c": 0.015})  # d unmeasured
    choice = sensitivity.choose(found, sens, target_pct=2.5)
    # cost per byte: b 0, c 1.5e-5, a 1e-4; a would overshoot 2.5% (0.005 + 0.015 + 0.01 nats)
    assert choice.four_bit == ["b", "c"]
    assert choice.predicted_pct == pytest.approx(100 * (np.exp(0.02) - 1))
    assert sensitivity.choose(found, sens, target_pct=5.0).four_bit == ["b", "c", "a"]
    assert "1 unmeasured" in choice.why


def test_replayed_blocks_give_the_full_forward_and_groups_cover_every_matmul(tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.export.decoder import export_decoder

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    graph = export_decoder(model, tiny_llama_dir, tmp_path, "builder")
    found, unmatched = sensitivity.groups(graph.path, model, graph.vocab_size, 16)
    assert not unmatched and len(found) == 4 * 4 + 1  # per block qkv, o, gate_up, down; the tied head
    qkv = next(g for g in found if g.name == "block.2.attn.qkv_proj")
    assert [p[0].rsplit(".", 1)[1] for p in qkv.parts] == ["q_proj", "k_proj", "v_proj"]
    gate_up = next(g for g in found if g.name == "block.2.mlp.gate_up_proj")
    assert [p[0].rsplit(".", 1)[1] for p in gate_up.parts] == ["gate_proj", "up_proj"]
    ids = np.random.default_rng(0).integers(0, graph.vocab_size, (6, 32))
    sim = sensitivity._Simulator(model, found, 16)
    try:
        sim.score(ids, keep=True)
        sim.set_all(8)
        base, base_kl = sim.score(ids, keep=True)
        assert base_kl > 0  # 8 bits is not fp32
        sim.set(next(g for g in found if g.name == "block.2.mlp.down_proj"), 4)
        (nll, kl), (full_nll, full_kl) = sim.score(ids, replay_below=2), sim.score(ids)
        assert nll != base and kl > 0
        assert nll == pytest.approx(full_nll, abs=1e-6) and kl == pytest.approx(full_kl, rel=1e-4, abs=1e-9)
    finally:
        sim.restore()
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))


def _damaged_copy(tiny_llama_dir: Path, dest: Path) -> Path:
    """The tiny llama with one group that 4 bits ruin: block 1's up projection carries huge weights on
    input channels its norm zeroes, so they change nothing in fp32 but stretch every 4-bit block."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)  # logits that depend on the hidden state
        layer = model.model.layers[1]
        w = layer.mlp.up_proj.weight
        w.mul_(10)
        cut = list(range(0, w.shape[1], 32))
        layer.post_attention_layernorm.weight[cut] = 0.0
        w[:, cut] = 20 * w.abs().max()
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(dest)
    return dest


def test_searched_finds_the_damaged_group_keeps_it_at_8_bits_and_caches(tiny_llama_dir, tmp_path):
    from edgeft.artifact import cache_root, verify
    from edgeft.runtime import Generator, SamplingParams

    source = _damaged_copy(tiny_llama_dir, tmp_path / "damaged")
    cfg = {"quantize": "searched", "eval_data": REPO / "demo" / "sonnets.txt", **FAST_GATE}
    first = export(ExportConfig(source=str(source), out=tmp_path / "a", **cfg), log=None)
    m = json.loads((first / "manifest.json").read_text())
    search = m["quantization"]["search"]
    assert m["quantization"]["scheme"] == "searched" and m["gate"]["passed"], m["gate"]["candidates"]
    assert m["gate"]["chosen"].startswith("searched")
    assert max(search["kl"], key=search["kl"].get) == DAMAGED
    assert max(search["nll_rise"], key=search["nll_rise"].get) == DAMAGED
    assert search["widths"][DAMAGED] == "int8"
    assert sum(w == "int4" for w in search["widths"].values()) >= 12  # the rest (of 17) could go narrow
    assert not search["tokens_are_gate_texts"] and search["groups_from_cache"] == 0
    assert "groups at 4 bits" in m["gate"]["chosen_because"]
    widths = _node_bits(first)
    assert widths["/model/layers.1/mlp/gate_up_proj/MatMul"] == 8 and widths["/model/layers.2/mlp/gate_up_proj/MatMul"] == 4
    assert list((cache_root() / "sensitivity").glob("*.json"))

    second = export(ExportConfig(source=str(source), out=tmp_path / "b", **cfg), log=None)
    again = json.loads((second / "manifest.json").read_text())["quantization"]["search"]
    assert again["groups_from_cache"] == len(again["widths"]) and again["widths"] == search["widths"]
    assert again["seconds"] == search["seconds"]  # nothing measured the second time

    verify(first)
    gen = Generator.open(first, threads=1)
    assert len(gen.generate(gen.encode("Shall I compare thee"), SamplingParams(max_new_tokens=5)).token_ids) > 0
    shutil.rmtree(tmp_path / "b")


def _node_bits(folder: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {n.name.removesuffix("_Q4").removesuffix("_Q8"): next(a.i for a in n.attribute if a.name == "bits")
            for n in model.graph.node if n.op_type == "MatMulNBits"}


def test_time_budget_leaves_groups_unmeasured_at_8_bits(tiny_llama_dir, tmp_path):
    out = export(ExportConfig(source=str(tiny_llama_dir), out=tmp_path / "a", quantize="searched",
                              sensitivity_seconds=0, **FAST_GATE), log=None)
    search = json.loads((out / "manifest.json").read_text())["quantization"]["search"]
    assert search["kl"] == {} and len(search["unmeasured"]) == len(search["widths"])
    assert set(search["widths"].values()) == {"int8"}
