"""Real-model export (``make test-slow``): SmolLM2-135M through onnxruntime-genai's builder at int8,
gated against PyTorch on instruction prompts through edgeft's runtime. Needs the pulled model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HOME = Path(os.environ.get("EDGEFT_REAL_HOME", "/tmp/edgeft-home"))


@pytest.fixture
def real_home(monkeypatch):
    if not (HOME / "models" / "smollm2-135m-instruct").is_dir():
        pytest.skip(f"smollm2-135m-instruct is not pulled under {HOME} (set EDGEFT_REAL_HOME)")
    monkeypatch.setenv("EDGEFT_HOME", str(HOME))  # for the commands
    monkeypatch.setattr("edgeft.artifact._CACHE_ROOT", [HOME])  # for library calls


def test_smollm2_int8_is_fused_small_and_passes_the_gate(real_home, tmp_path, shared_data):
    import onnx

    from edgeft.export import ExportConfig, export
    from edgeft.runtime import Generator, SamplingParams

    out = export(ExportConfig(source="smollm2-135m-instruct", out=tmp_path / "smol", quantize="int8",
                              eval_data=shared_data / "instruct" / "alpaca_small_2k.json", gate_texts=24,
                              gate_prompts=4, gate_new_tokens=32), log=None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["gate"]["passed"] and m["gate"]["metrics"]["perplexity_increase_pct"] < 5
    assert m["quantization"]["tied_embeddings_shared"] and m["decoder"]["num_layers"] == 30
    assert sum(f["size"] for f in m["files"].values()) < 200e6  # fp32 is ~540 MB
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "MatMulNBits", "SkipSimplifiedLayerNormalization", "GatherBlockQuantized"} <= ops
    gen = Generator.open(out)
    prompt = gen.render_chat([{"role": "user", "content": "Name three colours."}])
    done = gen.generate(prompt, SamplingParams(max_new_tokens=24))
    assert done.completion_tokens > 0 and done.text.strip()
