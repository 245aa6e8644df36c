"""One base, many tuned classifiers: the split artifact (trunk + top) and the shared trunk at load.

Two tiny tune runs from the same 4-block BERT (top 2 blocks trained, different data and
seeds) are exported split at their freeze boundary: the trunks must be byte-identical, load
as one onnxruntime session, be refused when a byte changes, and the split models must give
what the unsplit graph gives.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from runtime_artifacts import run

from edgeft import artifact
from edgeft.errors import EdgeftError

TEXTS = ["great lovely fine", "awful dull bad day", "summer night", "it is what it is, and a bit more than that",
         "cold"]
WORDS = [{"positive": ["great", "lovely", "fine", "good"], "negative": ["awful", "dull", "boring", "bad"]},
         {"positive": ["summer", "day", "sonnet", "rose"], "negative": ["winter", "night", "cold", "grave"]}]


def _data(path: Path, seed: int, words: dict[str, list[str]], n: int = 120, lengths: tuple[int, int] = (5, 5)) -> Path:
    """A labelled CSV of ``n`` rows: each text ``lengths`` words (a range) drawn from its label's words."""
    rng = random.Random(seed)
    rows = ["text,label"]
    for _ in range(n):
        label = rng.choice(sorted(words))
        k = lengths[0] if lengths[0] == lengths[1] else rng.randint(*lengths)
        rows.append(f"{' '.join(rng.choice(words[label]) for _ in range(k))},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, tmp_path_factory) -> list[Path]:
    """Two runs from the same base: top 2 of 4 blocks trained, on different data with different seeds."""
    from edgeft.tune import TuneConfig, tune

    root = tmp_path_factory.mktemp("trunk-runs")
    return [tune(TuneConfig(model=str(tiny_bert_dir), data=_data(root / f"d{i}.csv", i, words), out=root / f"run{i}",
                            max_length=32, batch_size=8, max_steps=4, lr=3e-3, warmup=0, progress=False, threads=1,
                            trainable_layers=2, seed=i))
            for i, words in enumerate(WORDS)]


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """``exported(run index, quantize, trunk_blocks=None)``: the artifact folder, exported once."""
    from edgeft.export import ExportConfig, export

    root, done = tmp_path_factory.mktemp("trunk-arts"), {}

    def get(i: int, quantize: str, blocks: int | None = None) -> Path:
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


def _open(folder, check=artifact.Check.full):
    from edgeft.runtime import TextClassifier

    return TextClassifier.open(folder, threads=1, check=check)


@pytest.mark.parametrize("quantize,tol", [("none", 1e-5), ("int8", 1e-6)])
def test_a_split_artifact_answers_what_the_whole_graph_does(exported, quantize, tol):
    split, whole = exported(0, quantize), exported(0, quantize, 0)
    m = _manifest(split)
    trunk = m["trunk"]
    assert m["format_version"] == 2 and trunk["blocks"] == 2 and m["graph"]["file"] == "top.onnx"
    assert trunk["file"] == f"trunk-{trunk['sha256'][:16]}.onnx"
    assert m["files"][trunk["file"]]["sha256"] == trunk["sha256"]
    assert trunk["outputs"][0].startswith("/m/bert/encoder/layer.1/")  # the hidden state entering block 2
    assert not (split / "model.onnx").exists() and _manifest(whole)["trunk"] is None
    assert m["gate"]["metrics"]["texts"] == 8  # the gate scored the split model as a whole
    got, want = _open(split).predict_proba(TEXTS), _open(whole).predict_proba(TEXTS)
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)


def test_a_base_exported_with_a_boundary_holds_the_runs_trunk(exported, tiny_bert_dir, tmp_path):
    """A base exported alone with the runs' boundary is their trunk, byte for byte."""
    from runtime_artifacts import _seeded_classifier

    from edgeft.export import ExportConfig, export

    base = _seeded_classifier(tiny_bert_dir, tmp_path / "base")
    out = export(ExportConfig(source=str(base), out=tmp_path / "art", quantize="none", task="classification",
                              trunk_blocks=2, allow_degraded=True, gate_texts=8, threads=1,
                              eval_data=Path(__file__).parents[1] / "demo" / "sst2_2k.csv"), log=None)
    assert _manifest(out)["trunk"]["sha256"] == _manifest(exported(0, "none"))["trunk"]["sha256"]
    whole = export(ExportConfig(source=str(base), out=tmp_path / "whole", quantize="none", task="classification",
                                allow_degraded=True, gate_texts=8, threads=1,
                                eval_data=Path(__file__).parents[1] / "demo" / "sst2_2k.csv"), log=None)
    assert _manifest(whole)["trunk"] is None  # a base is split only when asked


def test_two_runs_from_one_base_carry_one_trunk_and_share_its_session(exported, tmp_path):
    from edgeft.runtime import trunks

    a, b = exported(0, "int8"), exported(1, "int8")
    ta, tb = _manifest(a)["trunk"], _manifest(b)["trunk"]
    assert ta == tb and (a / ta["file"]).read_bytes() == (b / tb["file"]).read_bytes()
    assert (a / "top.onnx.data").read_bytes() != (b / "top.onnx.data").read_bytes()  # the tops are their own
    ca, cb = _open(a), _open(b)
    assert ca.trunk is cb.trunk and ca.trunk.session is cb.trunk.session and ca.session is not cb.session
    assert trunks.loaded()[ta["sha256"]] is ca.trunk
    # packed, each unpacked to its own folder: still the one session
    pa, pb = artifact.pack(a, tmp_path / "a.edgeft"), artifact.pack(b, tmp_path / "b.edgeft")
    packed = [_open(pa), _open(pb)]
    assert packed[0].folder != packed[1].folder and {p.trunk.session for p in packed} == {ca.trunk.session}
    assert not np.array_equal(ca.predict_proba(TEXTS), cb.predict_proba(TEXTS))


def test_the_trunk_bytes_do_not_depend_on_the_exporting_process(runs, exported, tmp_path):
    """Another process with another hash seed, exporting the other run: the same trunk file, byte for byte."""
    import os
    import subprocess
    import sys

    out = tmp_path / "other"
    code = ("from edgeft.export import ExportConfig, export\n"
            f"export(ExportConfig(source={str(runs[1])!r}, out={str(out)!r}, quantize='int8', int8_mode='dynamic', "
            "allow_degraded=True, gate_texts=8, threads=1), log=None)")
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "12345",
           "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600, capture_output=True)
    mine = exported(0, "int8")
    name = _manifest(mine)["trunk"]["file"]
    assert _manifest(out)["trunk"]["file"] == name and (out / name).read_bytes() == (mine / name).read_bytes()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_a_changed_trunk_is_refused_for_every_model_that_carries_it(exported, tmp_path):
    a, b = (Path(shutil.copytree(exported(i, "int8"), tmp_path / f"m{i}")) for i in range(2))
    name = _manifest(a)["trunk"]["file"]
    for folder in (a, b):  # stamps from a full check, so a quick check has something to trust
        _open(folder)
    held = _open(exported(0, "int8"))  # its session stays loaded: no shortcut past the check
    for folder in (a, b):
        _flip(folder / name)
        for check in artifact.Check:
            with pytest.raises(EdgeftError, match=f"{name} does not match its checksum"):
                _open(folder, check)
    res = run("classify", a, b, "good")
    assert res.exit_code == 2 and "does not match its checksum" in res.output and "Traceback" not in res.output
    assert held.predict_proba(["good"]).shape == (1, 2)


def test_a_manifest_whose_trunk_digest_is_not_its_file_is_refused(exported, tmp_path):
    folder = Path(shutil.copytree(exported(0, "int8"), tmp_path / "m"))
    d = _manifest(folder)
    d["trunk"]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(artifact.sealed(d)))
    with pytest.raises(EdgeftError, match="trunk .* is not among its files"):
        _open(folder)


def test_classify_many_equals_each_model_alone_with_one_trunk_pass_per_batch(exported, monkeypatch):
    from edgeft.runtime.classify import classify_many, predict_proba_many
    from edgeft.runtime.trunks import SharedTrunk

    models = [_open(exported(0, "int8")), _open(exported(1, "int8")), _open(exported(0, "int8", 0)),
              _open(exported(1, "none"))]
    alone = [m.classify(TEXTS, batch_size=2) for m in models]
    calls = []
    real = SharedTrunk.run
    monkeypatch.setattr(SharedTrunk, "run", lambda self, feeds: calls.append(self.sha256) or real(self, feeds))
    assert classify_many(models, TEXTS, batch_size=2) == alone
    # 5 texts in batches of 2: 3 batches; the two int8 models share each one, the fp32 trunk runs its own
    digests = [_manifest(exported(i, q))["trunk"]["sha256"] for i, q in ((0, "int8"), (1, "none"))]
    assert sorted(calls) == sorted([digests[0]] * 3 + [digests[1]] * 3)
    for got, m in zip(predict_proba_many(models, TEXTS), models):
        np.testing.assert_array_equal(got, m.predict_proba(TEXTS))
    assert classify_many(models, []) == [[], [], [], []]


def test_classify_command_answers_several_models(exported, tmp_path):
    a, b = exported(0, "int8"), exported(1, "int8")
    res = run("classify", a, b, *TEXTS[:2])
    assert res.exit_code == 0, res.output
    lines = [json.loads(ln) for ln in res.stdout.splitlines()]
    want = [_open(f).classify(TEXTS[:2]) for f in (a, b)]
    assert [ln["text"] for ln in lines] == TEXTS[:2]
    for k, ln in enumerate(lines):
        assert ln["models"] == {str(a): want[0][k], str(b): want[1][k]}
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    res = run("classify", a, b, "--input", texts, "-o", tmp_path / "out.csv")
    assert res.exit_code == 0, res.output
    header = (tmp_path / "out.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["text", f"{a}:label"] and f"{b}:p_positive" in header and len(header) == 7
    single = run("classify", a, "good")  # one model: the usual lines
    assert single.exit_code == 0 and set(json.loads(single.stdout)) == {"text", "label", "scores"}
    res = run("classify", a, a, "good")
    assert res.exit_code == 2 and "named twice" in res.output


ENCODERS = {  # tiny random encoders of every supported family: (config class, keyword arguments)
    "roberta": ("RobertaConfig", {"pad_token_id": 1}),
    "distilbert": ("DistilBertConfig", {"dim": 64, "n_layers": 4, "n_heads": 4, "hidden_dim": 128}),
    "electra": ("ElectraConfig", {"embedding_size": 64}),
    "deberta-v2": ("DebertaV2Config", {"relative_attention": True, "position_buckets": 16, "type_vocab_size": 0,
                                       "pos_att_type": ["p2c", "c2p"]}),
    "modernbert": ("ModernBertConfig", {"pad_token_id": 0, "global_attn_every_n_layers": 2, "local_attention": 16}),
}


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_every_supported_encoder_family_cuts_exactly(family, tmp_path):
    """The cut on each family's graph (fused or not, fp32 and dynamic int8): trunk then top is the whole graph."""
    import onnxruntime as ort
    import torch
    import transformers

    from edgeft.export.classifier import export_classifier
    from edgeft.export.quantize import load, quantize_classifier_dynamic
    from edgeft.export.trunk import cut_graph

    klass, extra = ENCODERS[family]
    kw = {"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
          "intermediate_size": 128, "max_position_embeddings": 130, "num_labels": 2}
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(getattr(transformers, klass)(**kw | extra))
    fp32 = export_classifier(model.eval(), tmp_path, 64).path
    quantize_classifier_dynamic(fp32, tmp_path / "int8.onnx")
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(5, 290, (3, 11)), "attention_mask": np.ones((3, 11), np.int64),
             "token_type_ids": np.zeros((3, 11), np.int64)}
    feeds["attention_mask"][1, 7:] = 0

    def session(m):
        return ort.InferenceSession(m if isinstance(m, str) else m.SerializeToString(),
                                    providers=["CPUExecutionProvider"])

    for path in (str(fp32), str(tmp_path / "int8.onnx")):
        whole = session(path)
        want = whole.run(["logits"], {i.name: feeds[i.name] for i in whole.get_inputs()})[0]
        for blocks in (1, 3):
            cut = cut_graph(load(path), blocks)
            trunk, top = session(cut.trunk), session(cut.top)
            below = dict(zip(cut.outputs, trunk.run(cut.outputs, {i.name: feeds[i.name] for i in trunk.get_inputs()})))
            got = top.run(["logits"], {n: below[n] if n in below else feeds[n] for n in cut.top_inputs})[0]
            np.testing.assert_array_equal(got, want)
            assert f"layer.{blocks - 1}/" in cut.outputs[0] or f"layers.{blocks - 1}/" in cut.outputs[0]


def test_trunk_blocks_are_checked(runs, tiny_bert_dir, tmp_path):
    from edgeft.export import ExportConfig, export

    with pytest.raises(EdgeftError, match="above the run's 2 frozen blocks"):
        export(ExportConfig(source=str(runs[0]), out=tmp_path / "a", quantize="none", trunk_blocks=3), log=None)
    with pytest.raises(EdgeftError, match="an embedding model exports as one graph"):  # decoders: test_decoder_trunk
        export(ExportConfig(source=str(tiny_bert_dir), out=tmp_path / "b", task="embedding", trunk_blocks=1),
               log=None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
