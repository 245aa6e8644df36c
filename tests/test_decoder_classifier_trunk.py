"""One decoder base, many tuned classifiers: a llama classifier split at its freeze boundary, one trunk at load.

Tiny llama classifiers (4 blocks, the top 2 trained; a score head on the last real token) tuned
from one base on different tasks (two binary, one with three labels) with different seeds, exported
int8 (dynamic) with ``--trunk-blocks 2``: the split graph must answer what the whole graph answers,
rows of any length padded together must get what each gets alone (fp32), the three trunks must be
byte-identical and load as one onnxruntime session, and a multi-model call (``classify_many``)
must run that trunk once per batch and give each model what it gives alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_trunk import _data as trunk_data

# rows of different lengths, so a batch pads: the score head must read each row's last real token
TEXTS = ["great lovely fine", "awful dull bad day and a long grey night of nothing at all", "summer night",
         "who wrote it ?", "cold", "where is the rose of may , and when does it come back ?"]
TASKS = [{"positive": ["great", "lovely", "fine", "good"], "negative": ["awful", "dull", "boring", "bad"]},
         {"positive": ["summer", "day", "sonnet", "rose"], "negative": ["winter", "night", "cold", "grave"]},
         {"who": ["who", "wrote", "person", "name"], "where": ["where", "city", "place", "country"],
          "when": ["when", "year", "date", "time"]}]


def _data(path: Path, seed: int, words: dict[str, list[str]]) -> Path:
    return trunk_data(path, seed, words, n=96, lengths=(2, 9))  # texts of different lengths: padding matters


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> list[Path]:
    """Three classifier runs from the same llama: top 2 of 4 blocks trained, on different tasks and seeds."""
    from edgeft.tune import TuneConfig, tune

    root = tmp_path_factory.mktemp("decoder-classifier-runs")
    return [Path(tune(TuneConfig(model=str(tiny_llama_dir), task="classification",
                                 data=_data(root / f"d{i}.csv", i, words), out=root / f"run{i}", max_length=32,
                                 batch_size=8, max_steps=3, lr=3e-3, warmup=0, progress=False, threads=1,
                                 trainable_layers=2, seed=i)))
            for i, words in enumerate(TASKS)]


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """``exported(run index, quantize, trunk_blocks)``: the artifact folder, exported once."""
    from edgeft.export import ExportConfig, export

    root, done = tmp_path_factory.mktemp("decoder-classifier-arts"), {}

    def get(i: int, quantize: str, blocks: int) -> Path:
        key = (i, quantize, blocks)
        if key not in done:
            out = root / f"a{i}-{quantize}-{blocks}"
            done[key] = Path(export(ExportConfig(source=str(runs[i]), out=out, quantize=quantize, int8_mode="dynamic",
                                                 trunk_blocks=blocks, allow_degraded=True, gate_texts=8, threads=1),
                                    log=None))
        return done[key]

    return get


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _open(folder: Path):
    from edgeft.runtime import TextClassifier

    return TextClassifier.open(folder, threads=1)


@pytest.mark.parametrize("quantize,tol", [("none", 1e-5), ("int8", 1e-5)])
def test_a_split_decoder_classifier_answers_what_the_whole_graph_does(exported, quantize, tol):
    split, whole = exported(0, quantize, 2), exported(0, quantize, 0)
    m = _manifest(split)
    assert m["trunk"]["blocks"] == 2 and m["graph"]["file"] == "top.onnx" and _manifest(whole)["trunk"] is None
    assert "/layers.1/" in m["trunk"]["outputs"][0]  # the hidden state entering block 2
    assert "attention_mask" in m["trunk"]["top_inputs"]  # the top finds each row's last real token itself
    got, want = _open(split).predict_proba(TEXTS, batch_size=4), _open(whole).predict_proba(TEXTS, batch_size=4)
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)


def test_padded_rows_get_what_each_gets_alone(exported):
    """Right padding after the trunk: the score head reads each row's last real token, not a pad."""
    model = _open(exported(0, "none", 2))
    together = model.predict_proba(TEXTS, batch_size=len(TEXTS))
    alone = np.concatenate([model.predict_proba([t]) for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_decoder_classifiers_from_one_base_share_one_trunk_pass(exported, monkeypatch):
    from edgeft.runtime import trunks
    from edgeft.runtime.classify import classify_many, predict_proba_many
    from edgeft.runtime.trunks import SharedTrunk

    arts = [exported(i, "int8", 2) for i in range(len(TASKS))]
    specs = [_manifest(a)["trunk"] for a in arts]
    assert all(s == specs[0] for s in specs)
    assert len({(a / s["file"]).read_bytes() for a, s in zip(arts, specs)}) == 1
    models = [_open(a) for a in arts]
    assert len({id(m.trunk) for m in models}) == 1 and len({id(m.session) for m in models}) == len(models)
    assert trunks.loaded()[specs[0]["sha256"]] is models[0].trunk
    assert [len(m.labels) for m in models] == [2, 2, 3]
    alone = [m.predict_proba(TEXTS, batch_size=4) for m in models]
    calls = []
    real = SharedTrunk.run
    monkeypatch.setattr(SharedTrunk, "run", lambda self, feeds: calls.append(self.sha256) or real(self, feeds))
    together = predict_proba_many(models, TEXTS, batch_size=4)
    assert len(calls) == 2  # 6 texts in batches of 4: the trunk once per batch for all three models
    for got, want in zip(together, alone):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert classify_many(models, TEXTS, batch_size=4) == [m.classify(TEXTS, batch_size=4) for m in models]
