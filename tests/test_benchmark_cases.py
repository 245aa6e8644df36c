"""The suite's cases run alone: each makes what it needs, records into the one schema, and its goals read fields.

Real cases on tiny models (``tests/conftest.py``) and the shipped test data, with the suite's
work folder in a temporary directory; the heavy comparisons themselves are ``make bench``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchmarks.cases as cases  # noqa: E402
import benchmarks.prepare as prepare  # noqa: E402
import benchmarks.run as run  # noqa: E402
from benchmarks.headline import goals  # noqa: E402

SST2_SLICE = REPO / "tests" / "data" / "sst2_dev_400.tsv"


@pytest.fixture()
def work(tmp_path, monkeypatch) -> Path:
    """The suite's cache (benchmarks/work) in a temporary folder."""
    monkeypatch.setattr(prepare, "WORK", tmp_path / "work")
    monkeypatch.setattr(cases, "WORK", tmp_path / "work")
    monkeypatch.setattr(prepare, "CACHED_ONLY", False)
    return tmp_path / "work"


def _goal(res, start: str):
    return next(g for g in goals(res) if g.name.startswith(start))


FOLDED = ("tune_minilm_sst2", "tune_smollm2_sonnets", "export_quality", "server_overhead", "frozen_cache",
          "int8_memory", "embeddings", "constrained", "serving", "batch_drift", "long_row", "gpu_tuning")


def test_every_case_is_known_to_the_runner_and_the_default_set_is_a_subset():
    import importlib

    assert set(cases.DEFAULT_CASES) <= set(cases.CASES)
    assert set(FOLDED) <= set(cases.CASES) and not set(FOLDED) & set(cases.DEFAULT_CASES)
    for name in FOLDED:  # each module is a case of the suite: case(ctx), its figures filed under its name
        module = importlib.import_module(f"benchmarks.{name}")
        assert callable(module.case) and module.CASE == name
        assert not hasattr(module, "main"), f"{name} keeps an entry point of its own"
    with pytest.raises(SystemExit):
        run.main(["--cases", "no_such_case"])


def test_a_case_that_cannot_run_here_is_skipped_with_its_reason(monkeypatch):
    import benchmarks.gpu_tuning as gpu

    monkeypatch.setattr(gpu, "have_cuda", lambda: False)
    res = run.run_suite(["gpu_tuning"], quick=True, threads=1)
    assert [(s.case, s.system) for s in res.skipped] == [("gpu_tuning", "(whole case)")]
    assert "needs a CUDA device" in res.skipped[0].reason and not res.measurements


def test_folded_case_goals_read_their_own_case_and_system():
    from benchmarks.schema import Environment, Measurement, SuiteResult

    res = SuiteResult(Environment("d", "h", "cpu", 2, 2, 24.0, "3.11", {}))
    add = lambda *a, **params: res.add(Measurement(*a, params=params))  # noqa: E731
    add("tune_minilm_sst2", "full fine-tuning (fp32)", "accuracy", 91.0, "%", dataset="sst2-dev")
    add("tune_minilm_sst2", "edgeft tune top-2 over int8", "accuracy", 80.0, "%", dataset="sst2-dev")
    add("tuning", "edgeft tune top-2 over int8", "accuracy", 95.0, "%")  # another case's figure: not this goal's
    g = _goal(res, "tune_minilm_sst2")
    assert g.value == 80.0 and g.verdict == "missed by 9%"
    for c, v in ((1, 90.0), (8, 300.0)):
        add("serving", "edgeft", "aggregate_tps", v, "tok/s", clients=c)
        add("serving", "llama-server Q8_0", "aggregate_tps", 250.0, "tok/s", clients=c)
        add("serving", "edgeft", "ttft_p50_ms", 100.0, "ms", clients=c)
        add("serving", "llama-server Q8_0", "ttft_p50_ms", 200.0, "ms", clients=c)
    assert _goal(res, "serving: edgeft at 8 clients vs its own").value == pytest.approx(300 / 90)
    assert not [x for x in goals(res) if "speculate off" in x.name]  # not run: no goal
    for c, v in ((1, 80.0), (8, 320.0)):
        add("serving", "edgeft --speculate off", "aggregate_tps", v, "tok/s", clients=c)
    assert _goal(res, "serving: edgeft --speculate off at 8 clients").value == pytest.approx(4.0)
    assert _goal(res, "serving: edgeft at 8 clients vs its own").value == pytest.approx(300 / 90)  # its own rows
    assert not [x for x in goals(res) if "int8-dynamic" in x.name]  # not served: no goal
    for c, v in ((1, 100.0), (8, 250.0)):
        add("serving", "edgeft int8-dynamic", "aggregate_tps", v, "tok/s", clients=c)
    dyn = _goal(res, "serving: edgeft int8-dynamic at 8 clients")
    assert dyn.value == pytest.approx(2.5) and not dyn.met
    vs = _goal(res, "serving: edgeft at 8 clients vs llama-server Q8_0")
    assert vs.value == pytest.approx(1.2) and not vs.met
    assert _goal(res, "serving: TTFT p50").value == 0.5 and _goal(res, "serving: TTFT p50").met
    assert not [x for x in goals(res) if x.name.startswith(("embeddings", "constrained", "long_row"))]  # not run


def test_a_case_run_alone_gets_its_own_result_file_and_the_default_set_the_plain_one():
    plain = run.result_stem(list(cases.DEFAULT_CASES), quick=False, append=False)
    assert run.result_stem(["generation", "bandwidth"], quick=False, append=False) == plain
    assert run.result_stem(["tune_minilm_sst2"], quick=True, append=False) == plain + "-quick-tune_minilm_sst2"
    assert run.result_stem(["tune_minilm_sst2"], quick=False, append=True) == plain


def test_tune_minilm_case_runs_alone_and_its_goal_reads_the_top2_accuracy(work, tiny_bert_dir, monkeypatch):
    monkeypatch.setattr(prepare, "ENCODER", str(tiny_bert_dir))
    monkeypatch.setattr(prepare, "ensure_model", lambda name: Path(name))
    monkeypatch.setattr(prepare, "data_file", lambda *parts: SST2_SLICE)
    res = run.run_suite(["tune_minilm_sst2"], quick=True, threads=1, tune_steps=2)
    assert not res.skipped, res.skipped
    from benchmarks.tune_minilm_sst2 import CASE, TOP2, VARIANTS

    systems = res.systems(CASE)
    assert systems == [v[0] for v in VARIANTS.values()]
    for system in systems:
        for metric in ("accuracy", "accuracy_before", "train_s", "wall_s", "peak_mb", "trainable_m"):
            assert res.find(metric, system) is not None, (system, metric)
    full, top2 = res.find("trainable_m", "full fine-tuning (fp32)"), res.find("trainable_m", TOP2)
    assert full.median > top2.median  # the full variant trains every block and the embeddings
    goal = _goal(res, "tune_minilm_sst2")
    assert goal.value == res.find("accuracy", TOP2).median and goal.target == 88.0


def _tiny_data(*parts: str) -> Path:
    """The shared files the LM cases read, mapped to slices shipped in the repository."""
    return {"alpaca_small_2k.json": REPO / "tests" / "data" / "alpaca_200.json",
            "shakespeare_sonnets.txt": REPO / "demo" / "sonnets.txt"}.get(parts[-1], SST2_SLICE)


def test_bandwidth_case_alone_exports_and_decodes_what_it_needs_once(work, tiny_llama_dir, monkeypatch):
    from benchmarks.headline import EDGEFT

    monkeypatch.setattr(prepare, "LM", str(tiny_llama_dir))
    monkeypatch.setattr(prepare, "ensure_model", lambda name: Path(name))
    monkeypatch.setattr(prepare, "data_file", _tiny_data)
    res = run.run_suite(["bandwidth"], quick=True, threads=1)  # no generation case before it
    int8 = EDGEFT["int8"]
    assert not [s for s in res.skipped if s.system == int8], res.skipped
    share, dec = res.find("bandwidth_share", int8), res.find("decode_tps", int8)
    assert share is not None and dec is not None and dec.case == "bandwidth"
    limit = res.find("limit_tps", int8).median
    assert share.median == pytest.approx(dec.median / limit)
    assert _goal(res, "int8 decode share of the bandwidth limit").value == share.median
    manifest = work / "artifacts" / "smollm2-base-int8" / "manifest.json"
    made = manifest.stat().st_mtime_ns
    again = cases.lm_artifact(cases.Context(res, quick=True), "int8")  # a later run reuses the cached artifact
    assert again == manifest.parent and manifest.stat().st_mtime_ns == made


def test_the_profile_worker_profiles_through_the_runtime_option(llama_art):
    from benchmarks.workers import profile_edgeft

    r = profile_edgeft({"path": str(llama_art), "threads": 1, "new_tokens": 6, "decode_prompt": [5, 6, 7, 8]})
    assert r["tokens"] == 6 and r["runs"] == 6 and r["run_s"] > 0  # every decode step of the timed run
    assert r["kernel_s"] and all(t >= 0 for t in r["kernel_s"].values())


def test_multi_decoder_renders_each_row_as_one_text_edgeft_reads_back(tmp_path):
    from benchmarks.multi_decoder import render, write_paragraphs

    from edgeft.data import load_texts

    rows = [{"text": "Who wrote\n\nHamlet ?", "coarse_label": "HUM"}, {"text": "  ", "coarse_label": "LOC"},
            {"text": "Where is Rome ?", "coarse_label": "LOC"}]
    paras = render(rows, "Question: {text}\nAnswer type: {coarse_label}")
    assert paras == ["Question: Who wrote Hamlet ?\nAnswer type: HUM", "Question: \nAnswer type: LOC",
                     "Question: Where is Rome ?\nAnswer type: LOC"]
    assert load_texts(write_paragraphs(tmp_path / "trec.txt", paras)) == paras  # one tuning text per row


def test_multi_decoder_compares_served_logprobs_with_the_artifact_alone():
    import numpy as np
    from benchmarks.multi_decoder import logprob_gap, served_logprobs

    from edgeft.runtime.sampling import token_logprob
    from edgeft.runtime.serve.responses import completion_logprobs

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3, 40)).astype("float32")
    alone_lps = [token_logprob(r, int(r.argmax()), 5) for r in rows]
    alone = {"text": "abc", "token_logprobs": [lp.logprob for lp in alone_lps],
             "top": [[v for _, v in lp.top] for lp in alone_lps]}
    # what /v1/completions sends for the same tokens: texts for ids, the top alternatives as a dict
    wire = completion_logprobs([(chr(97 + i), lp.logprob, [(f"t{t}", v) for t, v in lp.top])
                                for i, lp in enumerate(alone_lps)])
    served = served_logprobs({"text": "abc", "logprobs": wire})
    assert served["text"] == "abc" and logprob_gap(served, alone) == 0.0
    # two alternatives that read alike share one key of the wire's dict: the other values still match
    alike = completion_logprobs([("x", lp.logprob, [("same" if k < 2 else f"t{t}", v) for k, (t, v) in enumerate(lp.top)])
                                 for lp in alone_lps])
    collapsed = served_logprobs({"text": "xxx", "logprobs": alike})
    assert [len(t) for t in collapsed["top"]] == [4, 4, 4] and logprob_gap(collapsed, alone) == 0.0
    moved = [token_logprob(r + rng.normal(scale=1e-3, size=r.shape).astype("float32"), int(r.argmax()), 5)
             for r in rows]
    wire = completion_logprobs([("x", lp.logprob, [(f"t{t}", v) for t, v in lp.top]) for lp in moved])
    gap = logprob_gap(served_logprobs({"text": "xxx", "logprobs": wire}), alone)
    assert 1e-5 < gap < 1e-2
    assert logprob_gap({**served, "token_logprobs": served["token_logprobs"][:2]}, alone) == float("inf")


def test_multi_decoder_is_a_case_of_the_suite():
    import benchmarks.multi_decoder as md

    assert md.CASE in cases.CASES and md.CASE not in cases.DEFAULT_CASES
    assert md.TRUNK_BLOCKS + md.TOP == md.LAYERS and len(md.DATASETS) == 8


@pytest.mark.slow  # tunes, exports and serves several models: minutes on 2 cores
def test_multi_decoder_case_runs_alone_on_tiny_split_decoders(work, tiny_llama_dir, monkeypatch):
    import benchmarks.multi_decoder as md

    monkeypatch.setattr(prepare, "LM", str(tiny_llama_dir))
    monkeypatch.setattr(prepare, "ensure_model", lambda name: Path(name))
    monkeypatch.setattr(prepare, "data_file", _tiny_data)
    monkeypatch.setattr(md, "TOP", 2)  # the tiny llama's 4 blocks: top 2 tuned, the trunk the 2 below
    monkeypatch.setattr(md, "TRUNK_BLOCKS", 2)
    monkeypatch.setattr(md, "STEPS", 2)
    monkeypatch.setenv("BENCH_MULTI_MODELS", "2")
    monkeypatch.setenv("BENCH_WORK", str(work))  # the workers' servers log there too
    res = run.run_suite([md.CASE], quick=True, threads=1)
    assert not res.skipped, res.skipped
    arts = sorted((work / "artifacts").iterdir())
    assert len(arts) == 4 and len(md._digests([a for a in arts if a.name.endswith("int8")])) == 1
    fp32 = "fp32, served together against each alone"
    assert res.find("greedy_text_equal", fp32).median == 1.0
    assert res.find("max_logprob_gap", fp32).median < md.GOAL_EXACT
    assert res.find("greedy_text_equal", "int8, served together against each alone") is not None
    for metric, system in (("rss_vs_one_warm", md.EIGHT), ("tps_vs_one", md.EIGHT), ("aggregate_tps", md.ONE),
                           ("load_rss_vs_alone", md.ADD), ("load_seconds", md.ALONE)):
        assert res.find(metric, system) is not None, (metric, system)
    assert "(trunk shared with 1 of them)" in res.find("load_seconds", md.ADD).note
    assert "another trunk, shared with 0" in res.find("load_seconds", md.ADD).note


def test_multi_decoder_classifier_tunes_four_tasks_of_their_own(work, monkeypatch):
    import csv

    import benchmarks.multi_classifier as mc
    import benchmarks.multi_decoder_classifier as mdc

    assert mdc.CASE in cases.CASES and mdc.CASE not in cases.DEFAULT_CASES
    assert mdc.TRUNK_BLOCKS + mdc.TOP == mdc.LAYERS and len(mdc.TASKS) == 4 and set(mdc.TASKS) <= set(mc.DATA)
    monkeypatch.setattr(prepare, "data_file", lambda *parts: (_ for _ in ()).throw(prepare.Unavailable("no")))
    labels = {}
    for name in mdc.TASKS:  # the repository's slices here: each task's labels read back as the tuning reads them
        path = mc.data_path(name)
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","))
        col = dict(zip(*[iter(mc.column_flags(name))] * 2)).get("--label-column", "label")
        labels[name] = {r[col] for r in rows}
    assert len(labels["sst2"]) == 2 and labels["sst2-length"] == {"short", "medium", "long"}
    assert len(labels["trec-coarse"]) == 6 and len(labels["trec-fine"]) > 20
    assert mc.length_label("a b c") == "short" and mc.length_label("w " * 25) == "long"
    assert mc.slice_tag("trec-fine") == "-slice"  # a slice's run is cached apart from the shared file's
    monkeypatch.setattr(prepare, "data_file", lambda *parts: SST2_SLICE)
    assert mc.slice_tag("trec-fine") == ""


def test_the_three_passes_alternate_and_each_is_warmed_once():
    from benchmarks.multi_classifier import alternate

    calls = []
    secs = alternate({k: (lambda k=k: calls.append(k)) for k in ("one", "many", "seq")}, rounds=4)
    assert calls == ["one", "many", "seq",  # the unmeasured pass of each
                     "one", "many", "seq", "many", "seq", "one", "seq", "one", "many", "one", "many", "seq"]
    assert {k: len(v) for k, v in secs.items()} == {"one": 4, "many": 4, "seq": 4}


@pytest.mark.slow  # tunes and exports four tiny decoder classifiers, then four worker processes: a few minutes
def test_multi_decoder_classifier_case_runs_alone_on_tiny_split_decoders(work, tiny_llama_dir, monkeypatch):
    import json

    import benchmarks.multi_classifier as mc
    import benchmarks.multi_decoder_classifier as mdc

    monkeypatch.setattr(prepare, "LM", str(tiny_llama_dir))
    monkeypatch.setattr(prepare, "ensure_model", lambda name: Path(name))
    monkeypatch.setattr(prepare, "data_file", lambda *parts: (_ for _ in ()).throw(prepare.Unavailable("no")))
    monkeypatch.setattr(mdc, "TOP", 2)  # the tiny llama's 4 blocks: top 2 tuned, the trunk the 2 below
    monkeypatch.setattr(mdc, "TRUNK_BLOCKS", 2)
    monkeypatch.setattr(mdc, "STEPS", 2)
    monkeypatch.setenv("BENCH_MULTI_TEXTS", "40")
    monkeypatch.setenv("BENCH_WORK", str(work))
    monkeypatch.setenv("BENCH_PREPARE_ONLY", "1")
    res = run.run_suite([mdc.CASE], quick=True, threads=1)
    assert not res.skipped and not res.measurements and len(res.gates) == 4  # prepared only: gates, no timing
    arts = sorted((work / "artifacts").iterdir())
    trunk = [json.loads((a / "manifest.json").read_text())["trunk"] for a in arts]
    assert len(arts) == 4 and len({t["sha256"] for t in trunk}) == 1 and trunk[0]["blocks"] == 2
    monkeypatch.delenv("BENCH_PREPARE_ONLY")
    made = {a.name: (a / "manifest.json").stat().st_mtime_ns for a in arts}
    res = run.run_suite([mdc.CASE], quick=True, threads=1)
    assert not res.skipped, res.skipped
    assert made == {a.name: (a / "manifest.json").stat().st_mtime_ns for a in arts}  # measured what was prepared
    note = res.find("seconds", mdc.ONE).note
    assert "1 distinct trunk(s) on disk, 1 trunk session(s) loaded for four models" in note
    assert "classify_many equal to each model alone: True" in note and "40 texts, batch 32" in note
    for system in (mc.MANY, mc.SEQ):
        ratio = res.find("time_vs_one", system)
        assert ratio.median == pytest.approx(res.find("seconds", system).median / res.find("seconds", mdc.ONE).median)
        assert "round by round" in ratio.note and ratio.case == mdc.CASE
    assert "goal <= 1.5x" in res.find("time_vs_one", mc.MANY).note
    for metric, system in (("rss_vs_one", mc.MANY), ("peak_rss_mib", mdc.ONE), ("load_rss_vs_alone", mc.ADD)):
        assert res.find(metric, system) is not None, (metric, system)
    assert "trunk session reused: True" in res.find("load_seconds", mc.ADD).note
