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


def test_every_case_is_known_to_the_runner_and_the_default_set_is_a_subset():
    assert set(cases.DEFAULT_CASES) <= set(cases.CASES)
    folded = {"tune_minilm_sst2", "tune_smollm2_sonnets"}
    assert folded <= set(cases.CASES) and not folded & set(cases.DEFAULT_CASES)
    for name in folded:  # every case module has the case function the registry imports
        assert callable(__import__(f"benchmarks.{name}", fromlist=["case"]).case)


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
