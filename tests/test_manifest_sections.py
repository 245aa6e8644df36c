"""The manifest's typed sections (``quantization``, ``gate``, ``source``, ``generation``), as ``edgeft.artifact``
declares them.

A manifest in the shape the export writes reads back to the very same bytes, so its digest holds;
an artifact written before the sections were typed still verifies and reads by attribute; the int4
grid is one spelling from ``--int4-mode`` to ``quantization.int4_grid``; the sampling defaults are
the manifest's, and ``SamplingParams`` reads them from there.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_integrity import make_classifier, one_line_refusal, run

from edgeft import artifact
from edgeft.artifact import Gate, Generation, Int4Grid, Manifest, Provenance, Quantization
from edgeft.errors import EdgeftError

# The three sections as the export wrote them while they were dicts (the gate's record in
# edgeft.export.pipeline, merge.Source.provenance, quantize.QuantReport.to_dict with a search
# record): every key, in the order written.
QUANTIZATION = {"scheme": "searched", "method": "weight-only", "block_size": 32,
                "groups": {"embeddings": "int8", "head": "int8", "blocks.0-3": "int4"},
                "tied_embeddings_shared": True, "activations": "int8", "int4_grid": "float-offset",
                "search": {"why": "cheapest first", "attempt": 1, "widths": {"blocks.1.mlp_in": "int4"}}}
DYNAMIC = {"scheme": "int8", "method": "dynamic-smoothed", "block_size": 32, "groups": {"blocks.0-3": "int8"},
           "tied_embeddings_shared": False, "activations": "int8-per-row",
           "calibration": {"tokens": 2048, "texts": "held-out texts the gate does not score", "alpha": 0.5}}
GATE = {"passed": True, "degraded": False, "chosen": "int8-dynamic", "chosen_because": "rule: most int8 matmuls",
        "metrics": {"accuracy": 0.9, "accuracy_drop_ci95": [-0.5, 1.0], "texts": 16},
        "reference": {"accuracy": 0.91}, "failures": [],
        "thresholds": {"max_accuracy_drop_points": 1.0, "accuracy_drop_rule": "McNemar"},
        "eval_data": "eval.csv", "eval_sha256": "ef" * 32,
        "candidates": {"int8-dynamic": {"passed": True, "metrics": {"accuracy": 0.9}, "failures": [], "bytes": 1234}},
        "runtime": "edgeft.runtime", "export_seconds": 12.34}
SOURCE = {"base_model": "tiny-bert", "base_sha256": "ab" * 32, "run_folder": "/runs/a",
          "data_sha256": {"train.csv": "cd" * 32}, "trainable_layers": 2}
# What the first export wrote (no gate.chosen_because, no quantization.activations).
FIRST = {"quantization": {"scheme": "int8", "method": "dynamic", "block_size": None, "groups": {"dense": "int8"},
                          "tied_embeddings_shared": False},
         "gate": {k: v for k, v in GATE.items() if k != "chosen_because"}, "source": SOURCE}


def assert_reads_back(folder: Path) -> dict:
    """``manifest.json`` as a dict, after checking that its typed ``Manifest`` writes the very same bytes."""
    raw = (folder / artifact.MANIFEST).read_bytes()
    d = json.loads(raw)
    again = artifact.sealed(Manifest.from_dict(d).to_dict())
    if "signature" in d:
        again["signature"] = d["signature"]
    assert artifact.manifest_file_bytes(again) == raw
    return d


def _rewrite(folder: Path, **sections) -> dict:
    """Put ``sections`` (plain dicts) in the folder's manifest and seal it as the export always did."""
    path = folder / artifact.MANIFEST
    d = json.loads(path.read_text())
    d.update(sections)
    d = artifact.sealed(d)
    path.write_bytes(artifact.manifest_file_bytes(d))
    return d


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("sections") / "art")


@pytest.mark.parametrize("quantization", [QUANTIZATION, DYNAMIC], ids=["searched", "dynamic"])
def test_a_manifest_in_the_shape_the_export_writes_reads_back_byte_for_byte(classifier, tmp_path, quantization):
    import shutil

    folder = tmp_path / "art"
    shutil.copytree(classifier, folder)
    d = _rewrite(folder, quantization=quantization, gate=GATE, source=SOURCE)
    assert assert_reads_back(folder) == d
    m = Manifest.from_dict(d)
    assert artifact.sealed(m.to_dict())["digest"] == d["digest"]
    assert (m.quantization.to_dict(), dataclasses.asdict(m.gate), dataclasses.asdict(m.source)) == (
        quantization, GATE, SOURCE)
    assert isinstance(m.gate, Gate) and isinstance(m.source, Provenance) and isinstance(m.quantization, Quantization)


def test_an_ungated_manifest_keeps_its_empty_sections(classifier):
    d = assert_reads_back(classifier)  # written by write_manifest with no gate and no source
    assert d["gate"] == {} and d["source"] == {} and d["quantization"]["scheme"] == "none"
    m = artifact.read_manifest(classifier)
    assert m.gate is None and m.source is None and m.quantization.int4_grid is None
    assert "int4_grid" not in d["quantization"] and "search" not in d["quantization"]


@pytest.mark.parametrize("shape", ["today", "first"])
def test_an_artifact_written_before_the_sections_were_typed_still_verifies(tmp_path, shape):
    folder = make_classifier(tmp_path / "art")
    old = dict(quantization=QUANTIZATION, gate=GATE, source=SOURCE) if shape == "today" else FIRST
    d = _rewrite(folder, **old)
    m = artifact.verify(folder)
    assert artifact.open_artifact(folder, artifact.Check.full)[1] == m
    assert artifact.verify_packed(artifact.pack(folder, tmp_path / "art.edgeft")) == m
    res = run("verify", folder)
    assert res.exit_code == 0 and f", {d['quantization']['scheme']}, gate passed; digest ok" in res.output, res.output
    assert m.gate.passed and m.gate.metrics == GATE["metrics"] and m.source.base_model == "tiny-bert"
    if shape == "first":  # keys it never wrote read as their defaults
        assert m.gate.chosen_because == "" and m.quantization.activations == "fp32"
    else:
        assert m.quantization.int4_grid is Int4Grid.float_offset and m.gate.chosen_because == GATE["chosen_because"]
        assert artifact.sealed(m.to_dict())["digest"] == d["digest"]


def test_unknown_keys_are_dropped_as_in_every_section_and_a_wrong_type_is_one_line(tmp_path):
    folder = make_classifier(tmp_path / "art")
    later = {"from_a_later_edgeft": 1}
    _rewrite(folder, quantization={**QUANTIZATION, **later}, gate={**GATE, **later}, source={**SOURCE, **later},
             classifier={**json.loads((folder / "manifest.json").read_text())["classifier"], **later})
    m = artifact.verify(folder)
    written = m.to_dict()
    assert all("from_a_later_edgeft" not in written[s] for s in ("quantization", "gate", "source", "classifier"))
    assert m.quantization.to_dict() == QUANTIZATION and dataclasses.asdict(m.gate) == GATE
    for section, bad in (("gate", [True]), ("source", "tiny-bert"), ("quantization", 8)):
        _rewrite(folder, **{section: bad})
        one_line_refusal(run("verify", folder), "is not a valid manifest")
        _rewrite(folder, quantization=QUANTIZATION, gate=GATE, source=SOURCE)


def test_the_int4_grid_is_one_spelling_from_the_flag_to_the_manifest(tmp_path, monkeypatch):
    import edgeft.export as E
    from test_cli_options import _help
    from test_quantize_stream import _graph

    from edgeft.export import quantize
    from edgeft.export.config import Quantize

    assert [g.value for g in Int4Grid] == ["zero-point", "float-offset", "symmetric"]
    assert "--int4-mode [zero-point|float-offset|symmetric]" in _help("export")
    src, _ = _graph(tmp_path)
    seen = []
    monkeypatch.setattr(E, "export", lambda config: seen.append(config) or tmp_path)
    for spelled in ("zero-point", "float-offset", "symmetric"):
        res = run("export", "src", "-o", tmp_path / "a", "-q", "int4", "--int4-mode", spelled)
        assert res.exit_code == 0, res.output
        grid = seen[-1].int4_mode
        assert grid is Int4Grid(spelled) and seen[-1].to_dict()["int4_mode"] == spelled  # export.json
        (tmp_path / spelled).mkdir()
        made = quantize.quantize_decoder(src, tmp_path / spelled / "model.onnx", Quantize.int4, 32, 1, 40,
                                         int4_grid=grid)
        assert made.int4_grid is grid and made.to_dict()["int4_grid"] == spelled
        assert Manifest.from_dict(_minimal(made.to_dict())).quantization == made  # and back from the JSON
    (tmp_path / "eight").mkdir()
    eight = quantize.quantize_decoder(src, tmp_path / "eight" / "model.onnx", Quantize.int8, 32, 1, 40,
                                      int4_grid=Int4Grid.float_offset)
    assert eight.int4_grid is None and "int4_grid" not in eight.to_dict()  # no 4-bit blocks: no grid written


def _minimal(quantization: dict) -> dict:
    """The smallest decoder manifest dict around a quantization section."""
    return {"format": artifact.FORMAT, "task": "causal-lm", "architecture": "llama", "quantization": quantization,
            "graph": {"file": "model.onnx", "opset": 17, "inputs": [], "outputs": [], "builder": "torch.onnx"},
            "tokenizer": {}, "decoder": {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "vocab_size": 40,
                                         "context_length": 64}}


def test_the_old_int4_spelling_is_refused_in_one_line_naming_the_new_one(tmp_path):
    from edgeft.export.config import ExportConfig

    res = run("export", "src", "-o", tmp_path / "a", "-q", "int4", "--int4-mode", "offset")
    assert res.exit_code == 2 and "--int4-mode offset is now spelled float-offset" in res.output, res.output
    with pytest.raises(EdgeftError, match="^--int4-mode offset is now spelled float-offset"):
        ExportConfig(source="src", out=tmp_path / "a", int4_mode="offset")
    with pytest.raises(EdgeftError, match="--int4-mode must be one of zero-point, float-offset, symmetric, not 'q4_1'"):
        ExportConfig(source="src", out=tmp_path / "a", int4_mode="q4_1")


def test_the_sampling_defaults_are_the_manifests_and_the_manifest_imports_no_runtime():
    from edgeft.runtime.params import SamplingParams

    loaded = "import sys, edgeft.artifact; print(sorted(m for m in sys.modules if m.startswith('edgeft.runtime')))"
    assert subprocess.run([sys.executable, "-c", loaded], capture_output=True, text=True, check=True).stdout == "[]\n"
    # SamplingParams takes its defaults from the manifest's section when it is defined: change one there first
    moved = ("import dataclasses, edgeft.artifact as a\n"
             "a.Generation = dataclasses.make_dataclass('G', [('top_k', int, 7)], bases=(a.Generation,), frozen=True)\n"
             "from edgeft.runtime.params import SamplingParams\nprint(SamplingParams().top_k)")
    assert subprocess.run([sys.executable, "-c", moved], capture_output=True, text=True, check=True).stdout == "7\n"
    params = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    assert {f.name: f.default for f in dataclasses.fields(Generation)}.items() <= params.items()
    assert SamplingParams.over(None) == SamplingParams()
    assert SamplingParams.over(Generation(temperature=0.7, top_p=0.9), top_p=0.5) == SamplingParams(
        temperature=0.7, top_p=0.5)
