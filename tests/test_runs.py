"""The one run loader (``edgeft.tune.hf.load_run``): merges what a run trained, refuses what does not fit.

Tune's checks, export and the benchmarks' PyTorch reference all rebuild a run through it,
so its checks (base weights hash, trained names and shapes) hold for every caller.
"""

from __future__ import annotations

import shutil

import pytest

from edgeft.errors import EdgeftError
from edgeft.runs import RunInfo, write_run_info
from edgeft.tune.hf import load_run


def _run(tmp_path, base, trained, untied=False, sha=None):
    from safetensors.torch import save_file

    from edgeft.models import model_identity

    run = tmp_path / "run"
    run.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trained.items()}, str(run / "trained.safetensors"))
    write_run_info(run, RunInfo(task="causal-lm", base_model=str(base), base_path=str(base),
                                base_sha256=sha or model_identity(base), architecture="llama", trainable_layers=1,
                                trained_parameters=sorted(trained), untied_head=untied))
    return run


def _base_state(base):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()


def test_load_run_merges_trained_weights_and_unties_the_head(tiny_llama_dir, tmp_path):
    import torch

    state = _base_state(tiny_llama_dir)
    trained = {"model.norm.weight": state["model.norm.weight"] + 1.0,
               "lm_head.weight": state["lm_head.weight"] * 0.5}
    loaded = load_run(_run(tmp_path, tiny_llama_dir, trained, untied=True))
    got = loaded.model.state_dict()
    assert torch.equal(got["model.norm.weight"], trained["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], trained["lm_head.weight"])
    # untied: the embeddings kept the base's weights, and the config says so
    assert torch.equal(got["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert loaded.model.config.tie_word_embeddings is False
    assert loaded.tokenizer_dir == tiny_llama_dir and loaded.tokenizer.pad_token is not None


def test_load_run_refuses_a_wrong_shape_an_unknown_name_and_another_base(tiny_llama_dir, tmp_path):
    import torch

    with pytest.raises(EdgeftError, match="has shape"):
        load_run(_run(tmp_path / "a", tiny_llama_dir, {"model.norm.weight": torch.zeros(3)}))
    with pytest.raises(EdgeftError, match="lacks"):
        load_run(_run(tmp_path / "b", tiny_llama_dir, {"model.nothing.weight": torch.zeros(3)}))
    with pytest.raises(EdgeftError, match="not the one this run was trained on"):
        load_run(_run(tmp_path / "c", tiny_llama_dir, {}, sha="0" * 64))
    moved = tmp_path / "gone"
    shutil.copytree(tiny_llama_dir, moved)
    run = _run(tmp_path / "d", moved, {})
    shutil.rmtree(moved)
    with pytest.raises(EdgeftError, match="is not on this machine"):
        load_run(run)


def test_an_old_run_config_loads_under_the_new_names(tmp_path):
    """config.json written before text_col/label_col became text_column/label_column still reads (and resumes)."""
    import json

    from edgeft.runs import read_run_config
    from edgeft.tune.config import TuneConfig

    cfg = TuneConfig(model="m", data=tmp_path / "d.csv", out=tmp_path / "o", text_column="body", label_column="tag")
    old = {({"text_column": "text_col", "label_column": "label_col"}).get(k, k): v for k, v in cfg.to_dict().items()}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(old))
    saved = read_run_config(tmp_path / "run")
    assert saved["text_column"] == "body" and saved["label_column"] == "tag" and "text_col" not in saved
    assert cfg.same_run(saved) == []
    assert read_run_config(tmp_path / "nothing") == {}
