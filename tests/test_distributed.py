"""edgeft tune data-parallel under torchrun: two CPU processes over gloo on the tiny llama.

The llama has no dropout, so two processes summing their gradients must train what one
process trains (same global batch and seed) up to float rounding; only rank 0 writes; the
frozen cache is sharded by rank; a checkpoint written by two processes resumes in one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft.runs import TRAINED
from edgeft.tune import TuneConfig, frozen, tune
from test_tune import _text_data

WORKER = Path(__file__).with_name("ddp_worker.py")
SETTINGS = dict(max_length=32, batch_size=8, epochs=2, eval_every=4, lr=3e-3, warmup=0, threads=1,
                trainable_layers=2, frozen_cache="on")


def _torchrun(tmp_path: Path, name: str, spec: dict) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(path)]
    import edgeft

    here = [str(Path(edgeft.__file__).parents[1]), str(WORKER.parent)]  # the edgeft this test imported
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(here)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _spec(model, data, out, **kw) -> dict:
    return {"model": str(model), "data": str(data), "out": str(out)} | SETTINGS | kw


def _assert_same_training(a: Path, b: Path) -> None:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / TRAINED)), load_file(str(b / TRAINED))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-3, atol=1e-4)
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert ma["after"]["eval_loss"] == pytest.approx(mb["after"]["eval_loss"], rel=1e-3)
    assert (ma["steps"], ma["train_examples"], ma["tokens_per_s"] > 0) == (mb["steps"], mb["train_examples"], True)
    la, lb = ([json.loads(x) for x in (p / "log.jsonl").read_text().splitlines()] for p in (a, b))
    assert [e["step"] for e in la] == [e["step"] for e in lb]  # one writer: no line twice
    assert [e["loss"] for e in la if "loss" in e] == pytest.approx([e["loss"] for e in lb if "loss" in e], rel=1e-3)


@pytest.fixture(scope="module")
def one_process(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    data = _text_data(tmp / "t.txt")
    return data, tune(TuneConfig(**_spec(tiny_llama_dir, data, tmp / "one", progress=False)))


def test_two_processes_train_what_one_trains(tiny_llama_dir, one_process, tmp_path):
    data, one = one_process
    done = _torchrun(tmp_path, "two", _spec(tiny_llama_dir, data, tmp_path / "two", progress=True))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_training(one, tmp_path / "two")
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and len(metrics["peak_memory_mb_per_process"]) == 2
    assert done.stderr.count("(before tuning)") == 1  # rank 0 alone prints
    assert done.stderr.count("frozen cache: ") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two", "two.json"]  # OUT.partial and shards gone


def test_a_two_process_checkpoint_resumes_in_one(tiny_llama_dir, one_process, tmp_path):
    import numpy as np

    data, one = one_process
    out = tmp_path / "run"
    done = _torchrun(tmp_path, "cut", _spec(tiny_llama_dir, data, out, progress=False, interrupt=6))
    assert done.returncode != 0 and not out.exists(), done.stderr[-3000:]
    partial = out.with_name("run.partial")
    assert json.loads((partial / "checkpoint.json").read_text())["step"] == 4
    shards = [np.load(partial / frozen.shard_name(r, 2) / "filled.npy") for r in (0, 1)]
    for r, filled in enumerate(shards):  # each rank cached only the examples it owns
        assert filled.any() and not filled[[i for i in range(len(filled)) if i % 2 != r]].any()

    resumed = tune(TuneConfig(**_spec(tiny_llama_dir, data, out, progress=False, resume=True)))
    _assert_same_training(one, resumed)
    assert json.loads((resumed / "metrics.json").read_text())["processes"] == 1
    assert not partial.exists()
