"""What a decoder export holds in memory and on disk, bounded by the model's own fp32 bytes (never by time).

- onnxruntime-genai's builder reads the export's own model (``edgeft.export.genai``): the graph it writes
  is byte for byte the graph it writes from a folder holding the weights, and building it adds little to
  what the model itself holds (left to itself it loaded a second model from that folder and kept every
  fused weight, q/k/v and gate/up, until the graph was saved).
- The work folder holds no merged fp32 Hugging Face copy of the model: at its largest (the fp32 graph
  and the first candidate) it stays under 1.5x the model's fp32 bytes (with the copy it was over 2x).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_int8_memory import mid_llama  # noqa: F401 - the 100 MB llama fixture

CHILD = r'''
import gc, json, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, LlamaForCausalLM
from edgeft.artifact import Task
from edgeft.export import decoder
from edgeft.export.merge import Source, save_hf_configs

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

folder, work = Path(sys.argv[1]), Path(sys.argv[2])
model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
with torch.no_grad():
    sum(float(p.sum()) for p in model.parameters())  # every page of the model resident, as after any pass
source = Source(model=model, task=Task.causal_lm, architecture="llama", tokenizer=AutoTokenizer.from_pretrained(folder),
                tokenizer_dir=folder)
hf = save_hf_configs(source, work / "hf")
import onnxruntime_genai.models.builder  # noqa: F401 - its imports are not the build
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size starts again from here
before = status("VmRSS")
decoder._builder_export(model, hf, work, decoder._builder_options(model))
print(json.dumps({"grown": status("VmHWM") - before, "before": before, "after": status("VmRSS"),
                  "fp32": sum(p.numel() * 4 for p in model.parameters()),
                  "hf": sorted(p.name for p in hf.iterdir())}))
'''


def _build(model_dir: Path, out: Path, handed: bool) -> Path:
    """The builder's fp32 graph of the llama at ``model_dir``: read from the folder, or handed the model."""
    import torch
    from onnxruntime_genai.models import builder
    from transformers import AutoTokenizer, LlamaForCausalLM

    from edgeft.artifact import Task
    from edgeft.export import decoder
    from edgeft.export.merge import Source, save_hf_configs

    if not handed:
        opts = builder.parse_extra_options(None, str(model_dir), str(out / "builder"), "fp32", "cpu",
                                           str(out / "cache"), [decoder.FUSE_GATE_UP, *decoder.BUILDER_OPTIONS])
        builder.create_model(None, str(model_dir), str(out / "builder"), "fp32", "cpu", str(out / "cache"), **opts)
        return out / "builder"
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    source = Source(model=model, task=Task.causal_lm, architecture="llama",
                    tokenizer=AutoTokenizer.from_pretrained(model_dir), tokenizer_dir=model_dir)
    hf = save_hf_configs(source, out / "hf")
    assert not [p for p in hf.iterdir() if p.suffix in (".safetensors", ".bin")]
    return decoder._builder_export(model, hf, out, decoder._builder_options(model)).path.parent


@pytest.mark.parametrize("model", ["tiny_llama_dir", "mid_llama"])  # weights under 1 MiB, and over (paged out)
def test_builder_handed_the_model_writes_the_same_graph(model, tmp_path, request):
    model_dir = request.getfixturevalue(model)
    old = _build(model_dir, tmp_path / "folder", handed=False)
    new = _build(model_dir, tmp_path / "handed", handed=True)
    assert (new / "model.onnx.data").read_bytes() == (old / "model.onnx.data").read_bytes()
    assert (new / "model.onnx").read_bytes() == (old / "model.onnx").read_bytes()
    assert json.loads((new / "genai_config.json").read_text()) == json.loads((old / "genai_config.json").read_text())
    # the fused weights are there, as one initializer each (the builder's names)
    import onnx

    names = {t.name for t in onnx.load(str(new / "model.onnx"), load_external_data=False).graph.initializer}
    assert {"model.layers.0.attn.qkv_proj.MatMul.weight", "model.layers.0.mlp.gate_up_proj.MatMul.weight"} <= names


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak through /proc/self/clear_refs")
def test_builder_adds_little_to_the_model_it_reads(mid_llama, tmp_path):  # noqa: F811
    # a copy of its own, written through to disk: the kernel keeps a page that another process maps (this
    # test process, or any test that opened the fixture) or that is still dirty, whatever the child asks
    folder = tmp_path / "model"
    shutil.copytree(mid_llama, folder)
    for f in folder.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tmp_path)], capture_output=True,
                         text=True, env=env, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert not [n for n in got["hf"] if n.endswith((".safetensors", ".bin"))]
    # Fused q/k/v and gate/up weights are 0.7 of this llama's bytes; a second model would be 1.0 more (the
    # builder grew 0.8x with every fused weight held, 1.8x reading the folder). Handed the model and fusing
    # each weight as it is written, it adds one fused weight at a time and its graph (0.2x).
    assert got["grown"] <= 0.35 * got["fp32"], got
    # and each weight's pages, mapped from the model's file, were given back once written
    assert got["after"] <= got["before"] - 0.5 * got["fp32"], got


def test_work_folder_holds_no_fp32_copy_of_the_model(mid_llama, tmp_path, monkeypatch):  # noqa: F811
    from edgeft.export import ExportConfig, export, quantize
    from edgeft.export.assemble import folder_size

    largest: list[int] = []
    real = quantize.quantize_decoder

    def watched(src, dest, *args, **kwargs):  # the work folder at its fullest: the fp32 graph and a candidate
        got = real(src, dest, *args, **kwargs)
        largest.append(folder_size(Path(dest).parent.parent))
        return got

    monkeypatch.setattr(quantize, "quantize_decoder", watched)
    out = tmp_path / "out" / "mid"
    export(ExportConfig(source=str(mid_llama), out=out, quantize="int8", gate_prompts=2, gate_new_tokens=4,
                        gate_texts=4, threads=1, progress=False, allow_degraded=True), log=None)
    fp32 = sum(p.stat().st_size for p in mid_llama.glob("*.safetensors"))
    assert largest and max(largest) <= 1.5 * fp32, (largest, fp32)
    assert max(largest) >= 1.0 * fp32  # the fp32 graph itself is there (what the bound is made of)


@pytest.mark.parametrize("symmetric", [False, True])
def test_4bit_weights_are_read_one_at_a_time_and_match_onnxruntimes_quantizer(tmp_path, monkeypatch, symmetric):
    import onnx
    import onnx.external_data_helper as ext
    import onnxruntime as ort
    import numpy as np

    from edgeft.export import quantize
    from test_quantize_stream import _graph

    src, weights = _graph(tmp_path, k=96, n=40, vocab=44)  # K not a multiple of the block: a padded last block
    loaded: list[str] = []
    real = ext.load_external_data_for_tensor
    monkeypatch.setattr(ext, "load_external_data_for_tensor", lambda t, base: (loaded.append(t.name), real(t, base)))
    ours = onnx.load(str(src), load_external_data=False)
    nodes = [n.name for n in ours.graph.node]
    ours = quantize._block_pass(ours, tmp_path, nodes, 64, 4, 4, symmetric)
    assert not loaded  # no weight was read into the graph

    monkeypatch.setattr(ext, "load_external_data_for_tensor", real)
    ref = quantize._nbits_pass(onnx.load(str(src)), nodes, [], 4, 64, 4, symmetric)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in ours.graph.initializer}
    made = [t for t in ref.graph.initializer if t.name not in weights]
    assert made and {t.name for t in made} == set(arrays) - set(weights)
    for t in made:
        assert np.array_equal(arrays[t.name], onnx.numpy_helper.to_array(t)), t.name
    assert ([(n.op_type, n.name, list(n.input), sorted((a.name, a.i) for a in n.attribute)) for n in ours.graph.node]
            == [(n.op_type, n.name, list(n.input), sorted((a.name, a.i) for a in n.attribute)) for n in ref.graph.node])

    x = np.random.default_rng(1).normal(size=(1, 96)).astype(np.float32)
    outs = []
    for name, m in (("ours", ours), ("ref", ref)):
        (tmp_path / name).mkdir()
        quantize.materialize(m, tmp_path)
        quantize.save(m, tmp_path / name / "model.onnx")
        outs.append(ort.InferenceSession(str(tmp_path / name / "model.onnx")).run(None, {"x": x})[0])
    assert np.array_equal(*outs)
