"""The benchmark suite's plumbing: statistics, schema round trip, ratios, goals, writers, weight bytes.

Measurements themselves are not tests; these check the arithmetic and the files the suite
writes, on tiny inputs and tiny real models.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.headline import CLS, EDGEFT, HF, LLAMA, TORCH_CLS, goals, headline_ratios  # noqa: E402
from benchmarks.report import case_table, fmt, write_charts, write_markdown  # noqa: E402
from benchmarks.schema import Environment, Gate, Goal, Measurement, SuiteResult, compute_ratio  # noqa: E402
from edgeft.bench import (  # noqa: E402
    Stat,
    bench_batches,
    bench_generation,
    percentile,
    summarize,
    timeit,
)


def _env() -> Environment:
    return Environment(date="2026-11-28 14:00 UTC", host="testhost", cpu="Test CPU", cores=2, threads=2,
                       memory_gib=24.0, python="3.11", versions={"edgeft": "0.1.0", "onnxruntime": "1.32"},
                       shared_machine="shared with four other engineers", load_average=[1.0, 2.0, 3.0])


def _stat(median: float, spread: float = 0.1) -> Stat:
    return Stat(median, median * (1 - spread), median * (1 + spread), median * 0.8, median * 1.2, 5)


@pytest.fixture()
def result() -> SuiteResult:
    res = SuiteResult(_env())
    res.add(Measurement("generation", EDGEFT["int8"], "decode_tps", _stat(60.0), "tok/s", {"new_tokens": 128}))
    res.add(Measurement("generation", LLAMA["Q8_0"], "decode_tps", _stat(30.0), "tok/s", {"new_tokens": 128}))
    res.add(Measurement("generation", HF, "decode_tps", _stat(12.0), "tok/s", {"new_tokens": 128}))
    for n, (a, b) in {32: (400.0, 500.0), 512: (800.0, 1000.0)}.items():
        res.add(Measurement("generation", EDGEFT["int8"], "prefill_tps", _stat(a), "tok/s", {"prompt_tokens": n}))
        res.add(Measurement("generation", LLAMA["Q8_0"], "prefill_tps", _stat(b), "tok/s", {"prompt_tokens": n}))
    res.add(Measurement("bandwidth", EDGEFT["int8"], "bandwidth_share", _stat(0.45), "share"))
    res.add(Measurement("classification", CLS["int8"], "throughput", 900.0, "texts/s", {"batch": 32}))
    res.add(Measurement("classification", TORCH_CLS, "throughput", 200.0, "texts/s", {"batch": 32}))
    res.add(Measurement("classification", CLS["int8"], "accuracy", 89.0, "%", {"dataset": "sst2-dev"}))
    res.add(Measurement("classification", TORCH_CLS, "accuracy", 89.3, "%", {"dataset": "sst2-dev"}))
    res.add(Measurement("tuning", "full fine-tuning", "train_mib", 400.0, "MiB", higher_is_better=False))
    res.add(Measurement("tuning", "edgeft top-N over int8", "train_mib", 120.0, "MiB", higher_is_better=False))
    res.skip("generation", LLAMA["F16"], "llama-cpp-python is not installed")
    res.notes.append("a note")
    return res


# ---------------------------------------------------------------- statistics


def test_percentile_and_summarize_known_values():
    xs = [5.0, 1.0, 100.0, 2.0, 3.0, 4.0, 6.0]
    s = summarize(xs)
    assert s.median == 4.0 and s.min == 1.0 and s.max == 100.0 and s.n == 7
    assert s.q1 == pytest.approx(2.5) and s.q3 == pytest.approx(5.5)
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        summarize([])


def test_stat_inverse_swaps_quartiles_and_scaled_multiplies():
    s = Stat(median=2.0, q1=1.0, q3=4.0, min=0.5, max=8.0, n=3)
    r = s.inverse(10.0)  # seconds -> rate
    assert (r.median, r.q1, r.q3, r.min, r.max) == (5.0, 2.5, 10.0, 1.25, 20.0)
    m = s.scaled(1000)
    assert (m.median, m.q1, m.max, m.n) == (2000.0, 1000.0, 8000.0, 3)
    assert Stat.from_dict(s.to_dict()) == s


def test_timeit_runs_warmup_then_repeats():
    calls = []
    secs = timeit(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and len(secs) == 4 and all(t >= 0 for t in secs)
    with pytest.raises(ValueError):
        timeit(lambda: None, repeats=0)


def test_bench_generation_counts_tokens_and_prefill_lengths():
    seen = []

    def run(ids, n, on_token):
        seen.append((len(ids), n))
        for _ in range(n):
            on_token()

    fig = bench_generation(run, [1] * 8, {8: [1] * 8, 64: [2] * 64}, new_tokens=5, repeats=3, warmup=1)
    assert fig.new_tokens == 5 and fig.prompt_tokens == 8
    assert fig.decode_tps.n == 3 and fig.decode_tps.median > 0
    assert set(fig.prefill_tps) == {8, 64}
    # 4 decode runs (1 warm-up), then 4 single-token runs per prefill length
    assert seen.count((8, 5)) == 4 and seen.count((64, 1)) == 4 and seen.count((8, 1)) == 4
    d = fig.to_dict()
    assert set(d["prefill_tps"]) == {"8", "64"}


def test_bench_batches_latency_percentiles():
    sizes = []
    fig = bench_batches(lambda b: sizes.append(len(b)), [f"t{i}" for i in range(40)], batch=8, batches=6, warmup=2)
    assert sizes == [8] * 8
    assert fig.batch == 8 and fig.latency_ms.n == 6 and fig.p50_ms <= fig.p95_ms and fig.throughput > 0


# ---------------------------------------------------------------- schema, ratios, goals


def test_suite_result_json_round_trip(result, tmp_path):
    path = result.save(tmp_path / "r.json")
    again = SuiteResult.load(path)
    assert again.to_dict() == result.to_dict()
    m = again.find("decode_tps", EDGEFT["int8"])
    assert isinstance(m.value, Stat) and m.value.median == 60.0
    assert again.find("throughput", CLS["int8"], {"batch": 32}).value == 900.0
    assert again.skipped[0].system == LLAMA["F16"]
    assert json.loads(path.read_text())["env"]["threads"] == 2


def test_ratio_arithmetic_and_bounds(result):
    r = result.ratio("decode_tps", EDGEFT["int8"], LLAMA["Q8_0"])
    assert r.value == pytest.approx(2.0)
    assert r.low == pytest.approx(54.0 / 33.0) and r.high == pytest.approx(66.0 / 27.0)
    pre = result.ratio("prefill_tps", EDGEFT["int8"], LLAMA["Q8_0"], {"prompt_tokens": 512})
    assert pre.value == pytest.approx(0.8) and pre.params == {"prompt_tokens": 512}
    assert result.ratio("decode_tps", EDGEFT["int4"], LLAMA["Q4_1"]) is None  # not measured
    plain = compute_ratio(Measurement("c", "a", "m", 3.0, "x"), Measurement("c", "b", "m", 0.0, "x"))
    assert math.isinf(plain.value)
    with pytest.raises(ValueError):
        compute_ratio(Measurement("c", "a", "m", 1.0, "x"), Measurement("c", "b", "other", 1.0, "x"))


def test_goals_met_missed_and_not_measured(result):
    by_name = {g.name: g for g in goals(result)}
    assert by_name["int8 decode vs llama.cpp Q8_0"].verdict == "met"
    share = by_name["int8 decode share of the bandwidth limit"]
    assert share.met is False and share.verdict == "missed by 25%"  # 0.45 against 0.60
    assert by_name["prefill at 512 vs llama.cpp Q8_0"].verdict == "missed by 20%"
    assert by_name["classification int8 vs PyTorch at batch 32"].value == pytest.approx(4.5)
    assert by_name["classification int8 accuracy lost (points)"].value == pytest.approx(0.3)
    assert by_name["classification int8 accuracy lost (points)"].met is True
    assert by_name["8-bit-frozen tuning peak memory vs full fine-tuning"].value == pytest.approx(0.3)
    assert by_name["best of int4/mixed decode vs llama.cpp Q4"].verdict == "not measured"
    assert Goal("x", 0.5, 0.4, "<=").verdict == "missed by 25%"


def test_q4_goal_counts_only_artifacts_whose_gate_passed(result):
    def q4_goal(res):
        return next(g for g in goals(res) if g.name == "best of int4/mixed decode vs llama.cpp Q4")

    res = SuiteResult.from_dict(result.to_dict())
    res.add(Measurement("generation", LLAMA["Q4_1"], "decode_tps", 40.0, "tok/s"))
    res.add(Measurement("generation", EDGEFT["int4"], "decode_tps", 100.0, "tok/s"))
    res.gates.append(Gate.from_manifest("generation", EDGEFT["int4"], {
        "passed": False, "chosen": "int4", "metrics": {"perplexity_increase_pct": 49.5},
        "failures": ["perplexity +49.5% > 5%"]}))
    assert q4_goal(res).verdict == "not measured"  # the faster int4 failed its gate: it does not count
    # a note that says "gate passed" is not the gate: the verdict is read from the gate's fields only
    res.add(Measurement("generation", EDGEFT["mixed"], "decode_tps", 60.0, "tok/s", note="edgeft mixed: gate passed"))
    assert q4_goal(res).verdict == "not measured"
    res.gates.append(Gate.from_manifest("generation", EDGEFT["mixed"], {"passed": True, "chosen": "mixed"}))
    assert q4_goal(res).value == pytest.approx(1.5) and q4_goal(res).met
    again = SuiteResult.from_dict(json.loads(json.dumps(res.to_dict())))  # the gates survive the JSON file
    assert [(g.system, g.passed, g.origin) for g in again.gates] == [(EDGEFT["int4"], False, "manifest"),
                                                                      (EDGEFT["mixed"], True, "manifest")]
    assert again.gate(EDGEFT["int4"]).metrics == {"perplexity_increase_pct": 49.5}
    assert q4_goal(again).value == pytest.approx(1.5)


def test_a_result_from_before_gates_were_fields_keeps_its_verdicts_from_the_notes(result):
    old = result.to_dict()
    del old["gates"]
    old["measurements"] += [
        Measurement("generation", EDGEFT["mixed"], "decode_tps", 60.0, "tok/s", note="edgeft mixed: gate passed").to_dict(),
        Measurement("generation", EDGEFT["int4"], "decode_tps", 90.0, "tok/s",
                    note="edgeft int4: gate FAILED (exported with --allow-degraded)").to_dict()]
    res = SuiteResult.from_dict(old)
    assert [(g.system, g.passed, g.origin) for g in res.gates] == [(EDGEFT["mixed"], True, "note"),
                                                                    (EDGEFT["int4"], False, "note")]
    for name in ("2026-11-28-vm.json", "2026-12-01-vm.json", "2026-12-04-vm-peers-avx512.json",
                 "2026-12-04-vm-peers-avx512-offsets8.json"):  # the results the README quotes still load
        SuiteResult.load(REPO / "benchmarks" / "results" / name)


# ---------------------------------------------------------------- writers


def test_fmt_significant_digits():
    assert fmt(1234.4) == "1,234" and fmt(1234.6) == "1,235" and fmt(-98765.0) == "-98,765"
    assert fmt(123.4) == "123" and fmt(12.34) == "12.3" and fmt(1.234) == "1.23" and fmt(0.5) == "0.50" and fmt(0.01234) == "0.0123"
    assert fmt(float("nan")) == "n/a"


def test_markdown_report_has_headline_goals_tables_and_skips(result, tmp_path):
    charts = write_charts(result, tmp_path, "r")
    md = write_markdown(result, tmp_path / "r.md", charts).read_text()
    assert "| decode_tps: edgeft int8 / llama.cpp Q8_0 | **2.00x** |" in md
    assert "| decode_tps: edgeft int8 / transformers fp32 | **5.00x** |" in md
    assert "prefill_tps (prompt_tokens=512): edgeft int8 / llama.cpp Q8_0 | **0.80x**" in md
    assert "| int8 decode share of the bandwidth limit | 0.45 | >= 0.60 | missed by 25% |" in md
    assert "Test CPU, 2 cores" in md and "Threads per system: 2" in md and "shared with four" in md
    assert "- generation / llama.cpp F16: llama-cpp-python is not installed" in md
    assert "60.0 [54.0-66.0]" in md  # median [q1-q3]
    assert "![r-decode](r-decode.png)" in md
    table = case_table(result, "classification")
    assert "throughput (batch=32) [texts/s]" in table and "| edgeft int8 | 900 |" in table


def test_headline_ratios_skip_missing_systems(result):
    labels = [r.label for r in headline_ratios(result)]
    assert "decode_tps: edgeft int8 / llama.cpp Q8_0" in labels
    assert not any("int4" in lb for lb in labels)


def test_chart_writer_writes_pngs_for_cases_with_data(result, tmp_path):
    paths = write_charts(result, tmp_path, "stem")
    names = sorted(p.name for p in paths)
    assert names == ["stem-bandwidth.png", "stem-classification.png", "stem-decode.png", "stem-prefill.png",
                     "stem-tuning.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert write_charts(SuiteResult(_env()), tmp_path / ".", "empty") == []


# ---------------------------------------------------------------- weight bytes and extras


def test_safetensors_weight_bytes_counts_tied_embedding_once(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.weights import safetensors_weight_bytes

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    unique = {id(p): p for p in model.parameters()}
    expected = sum(p.numel() * 4 for p in unique.values())
    if not model.config.tie_word_embeddings:  # an untied table is only looked up, one row per token
        expected -= model.get_input_embeddings().weight.numel() * 4
    assert safetensors_weight_bytes(tiny_llama_dir) == expected


def test_onnx_weight_bytes_skips_lookup_tables(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeft.bench import onnx_weight_bytes

    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")  # only gathered
    w = numpy_helper.from_array(np.zeros((8, 16), np.float32), "w")  # a matmul weight
    q = numpy_helper.from_array(np.zeros((16, 4), np.int8), "q")  # a 1-byte weight
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["h"]),
         helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["h", "qf"], ["y"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[table, w, q])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert onnx_weight_bytes(path) == 8 * 16 * 4 + 16 * 4


def test_runtime_extra_closure_has_no_torch():
    from benchmarks.footprint import closure, extra_installed_mib

    runtime = closure("edgeft", {"runtime"})
    assert "onnxruntime" in runtime and "tokenizers" in runtime
    assert "torch" not in runtime and "transformers" not in runtime
    assert "torch" in closure("edgeft", {"train"})
    assert 0 < extra_installed_mib("runtime") < extra_installed_mib("train")


def test_cached_artifact_from_another_run_is_stale(tmp_path):
    from benchmarks.prepare import _stale

    run, other, art = tmp_path / "run", tmp_path / "other", tmp_path / "art"
    model = tmp_path / "model"  # a Hugging Face folder, not a run
    for d in (run, other, art, model):
        d.mkdir()
    for d in (run, other):
        (d / "run.json").write_text("{}")
    (art / "manifest.json").write_text(json.dumps({"source": {"run_folder": str(run.resolve())}}))
    assert not _stale(art, run) and _stale(art, other)
    assert not _stale(art, "smollm2-135m-instruct")  # a pulled model's name, not a folder
    assert not _stale(art, model)  # nor a model folder: the export checks its weights' hash itself
    (art / "manifest.json").write_text("{not json")
    assert _stale(art, run)


def test_appended_rerun_of_a_case_replaces_its_figures(result, monkeypatch):
    import benchmarks.run as run

    def fake_classification(ctx):
        ctx.add("classification", CLS["int8"], "throughput", 1.0, "texts/s", batch=32)

    monkeypatch.setitem(run.CASES, "classification", fake_classification)
    res = run.run_suite(["classification"], quick=True, threads=2, into=SuiteResult.from_dict(result.to_dict()))
    rows = [m for m in res.measurements if m.case == "classification"]
    assert [(m.system, m.value) for m in rows] == [(CLS["int8"], 1.0)]
    assert res.find("decode_tps", EDGEFT["int8"]) is not None  # other cases kept


def test_a_case_keeps_figures_an_earlier_case_of_the_same_run_filed_under_it(monkeypatch):
    import benchmarks.run as run

    def quality(ctx):
        ctx.add("tuning", "edgeft tune CLI (sst2-dev)", "wall_s", 30.0, "s", higher=False)

    def tuning(ctx):
        ctx.add("tuning", "full fine-tuning", "peak_mib", 900.0, "MiB", higher=False)

    monkeypatch.setitem(run.CASES, "quality", quality)
    monkeypatch.setitem(run.CASES, "tuning", tuning)
    res = run.run_suite(["quality", "tuning"], quick=True, threads=2)
    assert {m.system for m in res.measurements} == {"edgeft tune CLI (sst2-dev)", "full fine-tuning"}
