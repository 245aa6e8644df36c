"""A classifier that learnt nothing is not a success; an accuracy drop is judged with its uncertainty.

Tune: the warnings (one label for nearly every eval text, macro F1 not improved) in
metrics.json and the summary line, and the best checkpoint chosen by macro F1 when the
labels are imbalanced (``--select-metric`` overrides). Gate: the paired-bootstrap interval
and McNemar's exact test on constructed predictions, and the fail rule (significant and
over the budget, or over 3x the budget whatever the test).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeft.cli import app
from edgeft.errors import EdgeftError
from edgeft.tune import TuneConfig, tune
from edgeft.tune import metrics as M

WORDS = ["great", "awful", "fine", "dull", "happy", "sad", "film", "plot", "actor", "scene"]


def _noise_data(path, n=200, spam_share=0.1, seed=0):
    """Imbalanced labels on texts that say nothing about them: the best a model can learn is the prior."""
    rng = random.Random(seed)
    rows = ["text,label"]
    for _ in range(n):
        label = "spam" if rng.random() < spam_share else "ham"
        rows.append(f"{' '.join(rng.choice(WORDS) for _ in range(6))},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=data, out=out, max_length=16, batch_size=16, max_steps=30,
                lr=3e-3, warmup=0, progress=False, threads=1, trainable_layers=1, eval_every=10)
    return TuneConfig(**(base | kw))


def _evals(out):
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    return [e for e in log if "eval" in e and e["step"] > 0]


# ---------------------------------------------------------------- pure functions

def _metrics(truth, pred, labels=("ham", "spam")):
    return M.classification_metrics(list(truth), list(pred), list(labels), loss=0.5)


def test_one_label_for_nearly_every_text_is_a_warning():
    truth = [0] * 87 + [1] * 13
    before = _metrics(truth, [0] * 95 + [1] * 5)  # the base: mostly ham already
    all_ham = _metrics(truth, [0] * 100)
    warnings = M.learning_warnings(before, all_ham)
    assert all_ham["accuracy"] == 0.87 and len(warnings) == 2
    assert "'ham' for 100% of the eval texts" in warnings[0] and "macro F1 did not improve" in warnings[1]
    learnt = _metrics(truth, [0] * 85 + [1] * 2 + [1] * 13)
    assert M.learning_warnings(before, learnt) == []
    assert M.learning_warnings(None, None) == [] and M.learning_warnings({}, M.lm_metrics(1.0, 10)) == []


def test_best_checkpoint_metric_follows_label_balance():
    assert M.select_metric("auto", "classification", [0] * 87 + [1] * 13) == "macro_f1"
    assert M.select_metric("auto", "classification", [0] * 52 + [1] * 48) == "accuracy"
    assert M.select_metric("accuracy", "classification", [0] * 87 + [1] * 13) == "accuracy"
    assert M.select_metric("auto", "causal-lm", []) == "loss"
    truth = [0] * 87 + [1] * 13
    majority = _metrics(truth, [0] * 100)  # accuracy 0.87, macro F1 0.47
    useful = _metrics(truth, [0] * 72 + [1] * 15 + [1] * 12 + [0] * 1)  # accuracy 0.84, macro F1 0.75
    assert majority["accuracy"] > useful["accuracy"] and useful["macro_f1"] > majority["macro_f1"]
    assert M.score(useful, "classification", "macro_f1") > M.score(majority, "classification", "macro_f1")
    assert M.score(majority, "classification", "accuracy") > M.score(useful, "classification", "accuracy")


def test_select_metric_is_validated(tmp_path):
    with pytest.raises(EdgeftError, match="select-metric"):
        TuneConfig(model="m", data=tmp_path / "d.txt", out=tmp_path / "o", select_metric="bogus")
    with pytest.raises(EdgeftError, match="classification"):
        TuneConfig(model="m", data=tmp_path / "d.txt", out=tmp_path / "o", task="causal-lm", select_metric="macro_f1")


# ---------------------------------------------------------------- tune end to end

def test_a_classifier_that_learnt_the_prior_is_warned_about(tiny_bert_dir, tmp_path):
    res = CliRunner().invoke(app, ["tune", "-m", str(tiny_bert_dir), "-d", str(_noise_data(tmp_path / "d.csv")),
                                   "-o", str(tmp_path / "run"), "--max-length", "16", "-b", "16", "--max-steps", "30",
                                   "--lr", "3e-3", "--warmup", "0", "-n", "1", "--eval-every", "10", "--threads", "1",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["select_metric"] == "macro_f1"  # 9 ham to 1 spam: imbalanced
    assert m["warnings"], m["after"]
    summary = res.stdout.strip().splitlines()[-1]
    assert "macro F1" in summary and "by macro_f1" in summary
    assert all(f"WARNING: {w}" in summary for w in m["warnings"])
    # the kept evaluation is the best by macro F1 among those made
    assert m["after"]["macro_f1"] == max(e["eval"]["macro_f1"] for e in _evals(tmp_path / "run"))


def test_select_metric_accuracy_keeps_the_most_accurate(tiny_bert_dir, tmp_path):
    out = tune(_cfg(tiny_bert_dir, _noise_data(tmp_path / "d.csv"), tmp_path / "run", select_metric="accuracy"))
    m = json.loads((out / "metrics.json").read_text())
    assert m["select_metric"] == "accuracy"
    assert m["after"]["accuracy"] == max(e["eval"]["accuracy"] for e in _evals(out))


def test_tune_help_lists_select_metric():
    res = CliRunner().invoke(app, ["tune", "--help"], env={"COLUMNS": "200"})
    assert "--select-metric" in res.stdout and "macro_f1" in res.stdout


# ---------------------------------------------------------------- the gate's interval

def _probs(correct: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Two-label probabilities whose argmax is the truth where ``correct``, the other label elsewhere."""
    pred = np.where(correct, truth, 1 - truth)
    p = np.full((len(truth), 2), 0.2)
    p[np.arange(len(truth)), pred] = 0.8
    return p


def _case(n: int, worse: int, better: int, ref_wrong: int = 0):
    """Reference right on all but ``ref_wrong`` (+ ``better``) texts; the candidate loses ``worse`` of them."""
    truth = np.array([i % 2 for i in range(n)])
    ref_ok = np.ones(n, dtype=bool)
    ref_ok[:better + ref_wrong] = False
    art_ok = ref_ok.copy()
    art_ok[:better] = True
    art_ok[n - worse:] = False
    gold = ["negative" if t == 0 else "positive" for t in truth]
    return _probs(ref_ok, truth), _probs(art_ok, truth), gold


def _gate_metrics(n, worse, better, ref_wrong=0):
    from edgeft.export.gate import accuracy_drop_interval

    ref, art, gold = _case(n, worse, better, ref_wrong)
    labels = ["negative", "positive"]
    ref_acc = float(np.mean(ref.argmax(1) == np.array([labels.index(g) for g in gold])))
    acc = float(np.mean(art.argmax(1) == np.array([labels.index(g) for g in gold])))
    return {"accuracy": acc, "reference_accuracy": ref_acc, "accuracy_drop_points": 100 * (ref_acc - acc),
            **accuracy_drop_interval(ref, art, gold, labels)}


def test_mcnemar_exact_p_values():
    from edgeft.export.gate import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(4, 0) == pytest.approx(0.125)
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(0, 10) == mcnemar_exact(10, 0)


def test_the_interval_is_paired_seeded_and_holds_the_drop():
    m = _gate_metrics(1000, worse=25, better=5, ref_wrong=100)
    lo, hi = m["accuracy_drop_ci95"]
    assert m["accuracy_drop_points"] == pytest.approx(2.0)
    assert lo < 2.0 < hi and lo > 0 and hi < 4  # paired: 30 discordant texts, not two accuracies' noise
    assert m["texts_worse"] == 25 and m["texts_better"] == 5 and m["accuracy_drop_significant"]
    assert _gate_metrics(1000, worse=25, better=5, ref_wrong=100)["accuracy_drop_ci95"] == [lo, hi]
    same = _gate_metrics(300, worse=0, better=0)
    assert same["accuracy_drop_ci95"] == [0.0, 0.0] and not same["accuracy_drop_significant"]


@pytest.mark.parametrize("n,worse,better,fails,why", [
    (200, 4, 0, False, None),  # 2.0 points, four texts: over the budget, but noise (p = 0.125)
    (1000, 25, 5, True, "significantly over the budget"),  # 2.0 points on 1,000 texts: real
    (200, 8, 0, True, "hard ceiling"),  # 4.0 points: over 3x the budget whatever the test
    (1000, 40, 5, True, "hard ceiling"),
    (1000, 8, 2, False, None),  # 0.6 points: within the budget even if real
])
def test_the_drop_fails_when_significant_over_budget_or_over_the_ceiling(n, worse, better, fails, why):
    from edgeft.export.config import ExportConfig
    from edgeft.export.gate import _drop_failures

    m = _gate_metrics(n, worse, better, ref_wrong=n // 10)
    failures = _drop_failures(m, ExportConfig(source="x", out="y", max_accuracy_drop=1.0))
    assert bool(failures) is fails, (m, failures)
    if why:
        assert why in failures[0] and "95% interval" in failures[0] and "McNemar p" in failures[0]


def test_the_manifest_records_the_rule():
    from edgeft.artifact import Task
    from edgeft.export.config import ExportConfig
    from edgeft.export.gate import thresholds

    t = thresholds(ExportConfig(source="x", out="y", max_accuracy_drop=1.5), Task.classification)
    assert t["max_accuracy_drop_points"] == 1.5 and t["accuracy_drop_ceiling_points"] == 4.5
    assert "McNemar" in t["accuracy_drop_rule"]
