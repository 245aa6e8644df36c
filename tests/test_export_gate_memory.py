"""A decoder export never holds the torch model beside an onnxruntime session, and the gate measures the same.

The gate's PyTorch reference is measured first (``edgeft.export.decoder_plan``), on the ids the runtime gives
(``decoder_plan.runtime_encoder``, with no session); the torch model is released once the graph is exported, so the
quantizers' calibration, the KV cache's scales and the gate's sessions run without it. What the gate records
is what measuring it the old way (a session's tokenizer, the reference on a freshly loaded model, the artifact
through the runtime) gives, to the last bit.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest

from edgeft.export import ExportConfig, export

FAST_GATE = {"gate_prompts": 4, "gate_new_tokens": 12, "gate_texts": 12, "threads": 1, "progress": False}
REPO = Path(__file__).resolve().parents[1]


def _watched_export(monkeypatch, source: Path, out: Path, **kw) -> tuple[Path, list[int], int]:
    """Export with every torch model the export loads watched (weakrefs to it and to its embedding weight):
    returns the artifact, how many watched objects were alive at each onnxruntime session's creation, and how
    many times a model was loaded."""
    import onnxruntime as ort

    from edgeft.export import merge

    watched: list[weakref.ref] = []
    real_load = merge.load_source

    def load_source(config):
        got = real_load(config)
        watched.extend([weakref.ref(got.model), weakref.ref(got.model.get_input_embeddings().weight)])
        return got

    alive_at_sessions: list[int] = []

    class Session(ort.InferenceSession):
        def __init__(self, *args, **kwargs):
            gc.collect()
            alive_at_sessions.append(sum(r() is not None for r in watched))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(merge, "load_source", load_source)
    monkeypatch.setattr(ort, "InferenceSession", Session)
    art = export(ExportConfig(source=str(source), out=out, **{**FAST_GATE, **kw}), log=None)
    return art, alive_at_sessions, len(watched) // 2


@pytest.mark.parametrize("kw", [
    {"quantize": "int8"},
    {"quantize": "int8", "int8_mode": "dynamic", "kv_cache": "int8"},  # calibration and the KV scales' sessions
    {"quantize": "searched", "eval_data": REPO / "demo" / "sonnets.txt", "sensitivity_tokens": 256},
], ids=["int8", "dynamic-kv8", "searched"])
def test_no_onnxruntime_session_runs_beside_the_torch_model(tiny_llama_dir, tmp_path, monkeypatch, kw):
    art, alive, loads = _watched_export(monkeypatch, tiny_llama_dir, tmp_path / "art", allow_degraded=True, **kw)
    assert (art / "manifest.json").is_file()
    assert alive and alive == [0] * len(alive), alive  # every session, the gate's included, with no model alive
    # loaded, mapped afresh for the graph, and (searched) once more for the sensitivity pass
    assert loads == (3 if kw["quantize"] == "searched" else 2)


def test_the_gate_records_what_measuring_it_beside_the_artifact_gives(tiny_llama_dir, tmp_path):
    """The reference measured first, on ids from ``runtime_encoder``, equals the old order's: ids from the
    artifact's own ``Generator``, the PyTorch pass on a freshly loaded model; the gate's figures equal
    ``lm_gate`` of the artifact against that reference; the graph equals one made without the pass first."""
    from edgeft.export import gate
    from edgeft.export.decoder_plan import runtime_encoder
    from edgeft.export.merge import load_source
    from edgeft.runtime import Generator

    config = ExportConfig(source=str(tiny_llama_dir), out=tmp_path / "art", quantize="int8", **FAST_GATE)
    art = export(config, log=None)
    record = json.loads((art / "manifest.json").read_text())["gate"]

    gen = Generator.open(art, threads=1)
    source = load_source(config)
    evals = gate.eval_set(config, source.task, source.run_config, source.tokenizer, None)
    ours, eos = runtime_encoder(art, gen.manifest.tokenizer)
    texts = [*evals.texts, *evals.prompts, "", "<|im_start|>user"]
    assert [ours(t) for t in texts] == [gen.encode(t) for t in texts] and eos == set(gen.eos_ids)

    ref = gate.lm_reference(source.model, gen.encode, evals, config, set(gen.eos_ids))
    assert record["reference"] == ref.metrics  # the same floats, not rounded
    got = gate.lm_gate(art, ref, config)
    assert record["metrics"] == got.metrics and record["failures"] == got.failures

    # and the graph: quantized from a graph exported off a model that never ran a PyTorch pass, byte for byte
    from edgeft.export import quantize
    from edgeft.export.decoder import check_supported, export_decoder
    from edgeft.export.merge import save_hf_configs

    fresh = load_source(config)
    hf = save_hf_configs(fresh, tmp_path / "old" / "hf")
    graph = export_decoder(fresh.model, hf, tmp_path / "old", check_supported(fresh.model.config))
    (tmp_path / "old" / "q").mkdir()
    quantize.quantize_decoder(graph.path, tmp_path / "old" / "q" / "model.onnx", config.quantize, config.block_size,
                              graph.num_layers, graph.vocab_size, config.int8_activations, None, config.int4_mode)
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "old" / "q" / name).read_bytes() == (art / name).read_bytes(), name


def test_nll_in_row_blocks_is_the_whole_arrays_to_the_bit():
    from edgeft.export import gate

    rng = np.random.default_rng(0)
    for rows in (2, gate.NLL_ROWS, gate.NLL_ROWS + 1, 3 * gate.NLL_ROWS + 5):
        logits = (rng.normal(size=(rows, 997)) * 8).astype(np.float32)
        ids = rng.integers(0, 997, size=rows).tolist()
        x = logits[:-1].astype(np.float64)  # the whole-array form the gate used
        m = x.max(axis=1, keepdims=True)
        whole = float(((m[:, 0] + np.log(np.exp(x - m).sum(axis=1))) - x[np.arange(rows - 1), ids[1:]]).sum())
        assert gate._nll(logits, ids) == whole
