"""The frozen-block cache on tiny llama, gpt2 and bert over the real int8 base.

Fed from the cache, the top blocks see what the frozen blocks would have given them
(padding, rotary positions and attention masks included), so cache on and off train
alike; the cache is read instead of recomputed from the second pass on, survives
--resume, is rebuilt when anything it depends on changes, and is off with a note when
something below the boundary trains.
"""

from __future__ import annotations

import json

import pytest

from edgeft.errors import EdgeftError
from edgeft.runs import TRAINED
from edgeft.tune import TuneConfig, frozen, tune
from test_tune import _cls_data, _interrupt_at, _Kill, _text_data


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=data, out=out, max_length=32, batch_size=8, epochs=3, lr=3e-3,
                warmup=0, progress=False, threads=1, trainable_layers=2)
    return TuneConfig(**(base | kw))


@pytest.fixture
def reads(monkeypatch):
    """How many examples each run reads from / writes to the cache."""
    counts = {"read": 0, "written": 0}
    read, write = frozen.StateCache.read, frozen.StateCache.write

    def counted_read(self, index, width, device):
        counts["read"] += len(index)
        return read(self, index, width, device)

    def counted_write(self, index, states):
        counts["written"] += int((~self.filled[list(index)]).sum())
        return write(self, index, states)

    monkeypatch.setattr(frozen.StateCache, "read", counted_read)
    monkeypatch.setattr(frozen.StateCache, "write", counted_write)
    return counts


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_fed_states_give_the_full_forward(name, request):
    """With right padding, the top blocks fed cached states give the logits of the full model."""
    import torch

    from edgeft.artifact import Task
    from edgeft.tune.dataset import collate
    from edgeft.tune.model import load_for_tuning

    task = Task.classification if name == "bert" else Task.causal_lm
    loaded = load_for_tuning(request.getfixturevalue(f"tiny_{name}_dir"), task, ["a", "b"] if name == "bert" else None,
                             2, "int8", "cpu")
    model = loaded.model.eval()
    examples = [(list(range(5, 5 + n)), 0 if task is Task.classification else list(range(5, 5 + n))) for n in (12, 7, 3)]
    batch = collate(examples, loaded.tokenizer.pad_token_id, task)
    boundary = frozen.Boundary(model, loaded.layout.blocks, loaded.layout.n_blocks - 2)
    box = []
    with torch.no_grad(), boundary.capture(box):
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    states = box[0].clone()
    for r, (ids, _) in enumerate(examples):
        states[r, len(ids):] = 0  # the cache stores no padding
    calls = []
    hook = boundary.all[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), boundary.feed(states):
        fed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad(), boundary.feed(states + torch.randn_like(states)):
        moved = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hook.remove()
    assert calls == []  # the frozen blocks did not run
    assert not torch.allclose(moved, fed, atol=1e-3)  # the fed states are what the top blocks see
    assert len(getattr(boundary.parent, boundary.attr)) == loaded.layout.n_blocks  # the blocks are back
    mask = batch["attention_mask"].bool()
    if task is Task.classification:
        torch.testing.assert_close(fed, full, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(fed[mask], full[mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("name", "data"), [("llama", "text"), ("gpt2", "text"), ("bert", "cls")])
def test_cache_on_and_off_train_alike(name, data, request, tmp_path, reads):
    import torch
    from safetensors.torch import load_file

    model = request.getfixturevalue(f"tiny_{name}_dir")
    path = _cls_data(tmp_path / "d.csv", n=120) if data == "cls" else _text_data(tmp_path / "t.txt")
    off = tune(_cfg(model, path, tmp_path / "off", frozen_cache="off"))
    assert reads == {"read": 0, "written": 0}
    on = tune(_cfg(model, path, tmp_path / "on", frozen_cache="on"))
    mon, moff = (json.loads((p / "metrics.json").read_text()) for p in (on, off))
    assert mon["frozen_cache"] and not moff["frozen_cache"]
    n_train, n_eval = mon["train_examples"], mon["eval_examples"]
    assert reads["written"] == n_train + n_eval  # each example ran through the frozen blocks once
    evals = 1 + 3  # before tuning, then after each epoch
    assert reads["read"] >= 2 * n_train + (evals - 1) * n_eval
    if data == "cls":
        assert abs(mon["after"]["accuracy"] - moff["after"]["accuracy"]) <= 0.005
    assert mon["after"]["eval_loss"] == pytest.approx(moff["after"]["eval_loss"], rel=1e-3)
    a, b = load_file(str(on / TRAINED)), load_file(str(off / TRAINED))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    assert not (tmp_path / "on.frozen-cache").exists()  # deleted at the end without --keep-cache


def test_resume_keeps_the_cache(tiny_bert_dir, tmp_path, reads):
    data = _cls_data(tmp_path / "d.csv", n=120)
    kw = dict(frozen_cache="on", eval_every=10)
    cfg = _cfg(tiny_bert_dir, data, tmp_path / "run", **kw)
    with pytest.raises(_Kill):
        tune(cfg, callback=_interrupt_at(25))  # 14 steps an epoch: the cache is complete
    key = (cfg.partial / frozen.FOLDER / "key.json").read_text()
    written = reads["written"]
    assert written == 108 + 12
    resumed = tune(_cfg(tiny_bert_dir, data, tmp_path / "run", resume=True, **kw))
    assert reads["written"] == written  # nothing recomputed after the resume
    assert json.loads((resumed / "metrics.json").read_text())["frozen_cache"]
    assert json.loads(key)["parts"]["trainable_layers"] == 2


def test_kept_cache_is_reused_and_rebuilt_when_its_key_changes(tiny_llama_dir, tmp_path, reads, capfd):
    data = _text_data(tmp_path / "t.txt")
    out = tmp_path / "run"
    tune(_cfg(tiny_llama_dir, data, out, keep_cache=True))
    kept = tmp_path / "run.frozen-cache"
    assert (kept / "states.bin").is_file()
    first = reads["written"]
    err = capfd.readouterr().err
    assert "frozen cache: " in err and "on disk in" in err and f"kept in {kept}" in err

    tune(_cfg(tiny_llama_dir, data, out, keep_cache=True, overwrite=True))
    assert reads["written"] == first  # same key: every state came from the kept cache
    tune(_cfg(tiny_llama_dir, data, out, keep_cache=True, overwrite=True, trainable_layers=1))
    assert reads["written"] == 2 * first
    assert "other settings (trainable_layers)" in capfd.readouterr().err
    tune(_cfg(tiny_llama_dir, data, out, keep_cache=True, overwrite=True, trainable_layers=1, max_length=24))
    assert "other settings (max_length, token_ids" in capfd.readouterr().err
    tune(_cfg(tiny_llama_dir, data, out, keep_cache=True, overwrite=True, trainable_layers=1, max_length=24,
              int8_kernel="bitsandbytes"))
    assert "other settings (int8_kernel)" in capfd.readouterr().err  # bitsandbytes rounds otherwise
    tune(_cfg(tiny_llama_dir, data, out, overwrite=True, trainable_layers=1, max_length=24, base_precision="fp32"))
    assert "other settings (base_precision, int8_kernel)" in capfd.readouterr().err
    assert not kept.exists()  # adopted, then deleted without --keep-cache


def test_cache_is_off_with_a_note_when_something_below_trains(tiny_llama_dir, tmp_path, reads, capfd):
    out = tune(_cfg(tiny_llama_dir, _text_data(tmp_path / "t.txt"), tmp_path / "run", train_embeddings=True,
                    untie_head=True, frozen_cache="on"))
    notes = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("frozen cache")]
    assert notes == ["frozen cache: off (model.embed_tokens.weight trains and lies below the top 2 blocks, "
                     "so no frozen block's output is fixed)"]
    assert not json.loads((out / "metrics.json").read_text())["frozen_cache"]
    assert reads == {"read": 0, "written": 0}


def test_auto_is_off_for_one_pass_and_without_room(tiny_llama_dir, tmp_path, monkeypatch, capfd):
    data = _text_data(tmp_path / "t.txt")
    one = tune(_cfg(tiny_llama_dir, data, tmp_path / "one", epochs=1))
    assert not json.loads((one / "metrics.json").read_text())["frozen_cache"]
    monkeypatch.setattr(frozen, "disk_free", lambda folder: 1000)
    full = tune(_cfg(tiny_llama_dir, data, tmp_path / "full"))
    assert not json.loads((full / "metrics.json").read_text())["frozen_cache"]
    assert "frozen cache: off (it needs" in capfd.readouterr().err
    with pytest.raises(EdgeftError, match="--frozen-cache on: not enough disk"):
        tune(_cfg(tiny_llama_dir, data, tmp_path / "on", frozen_cache="on"))
