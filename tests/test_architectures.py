"""Every architecture ``edgeft.export.architectures`` names, as a tiny random model (2 blocks,
64 wide, the fixtures' tokenizers), through export: a decoder's fp32 graph equals PyTorch step
by step through the runtime's KV cache (past any sliding window) and decodes batched as alone,
int8 passes the gate; classifiers' fp32 probabilities (a padded batch; a decoder's also left-
padded) equal PyTorch's, int8 passes the gate. A few go through ``edgeft tune`` first. The table
and the tiny configs here are checked to name the same architectures, so a new row needs a test."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CHATML, _bpe_tokenizer, _wordpiece_tokenizer

from edgeft.export import ExportConfig, export
from edgeft.export.architectures import ARCHITECTURES, markdown, of_task

FAST_GATE = {"gate_prompts": 4, "gate_new_tokens": 12, "gate_texts": 12, "threads": 1, "progress": False}
WINDOW = 16  # sliding windows shorter than the compared sequences, so the window matters
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256}


def _decoder_config(name: str):
    """The tiny config of each decoder the table names (the class name, keyword arguments)."""
    return {
        "llama": ("LlamaConfig", {}),
        "mistral": ("MistralConfig", {"sliding_window": WINDOW}),
        "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
        "qwen3": ("Qwen3Config", {"head_dim": 16}),
        # partial rotary embeddings: GroupQueryAttention wants rotary dims / 2 a multiple of 8
        "phi": ("PhiConfig", {"num_attention_heads": 2, "num_key_value_heads": 2}),
        "phi3": ("Phi3Config", {"sliding_window": WINDOW, "original_max_position_embeddings": 256}),
        "gemma": ("GemmaConfig", {"head_dim": 16}),
        "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": WINDOW}),
        "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": WINDOW, "sliding_window_pattern": 2}),
        "granite": ("GraniteConfig", {}),
        "olmo": ("OlmoConfig", {}),
        "nemotron": ("NemotronConfig", {"head_dim": 32, "num_attention_heads": 2, "num_key_value_heads": 2}),
        "smollm3": ("SmolLM3Config", {"no_rope_layer_interval": 2}),  # block 1 has no rotary embedding
        "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    }[name]


def _encoder_config(name: str):
    return {
        "bert": ("BertConfig", {}),
        "roberta": ("RobertaConfig", {"type_vocab_size": 1, "max_position_embeddings": 258}),
        "xlm-roberta": ("XLMRobertaConfig", {"type_vocab_size": 1, "max_position_embeddings": 258}),
        "distilbert": ("DistilBertConfig", {"dim": 64, "hidden_dim": 128, "n_layers": 2, "n_heads": 4}),
        "electra": ("ElectraConfig", {"embedding_size": 64}),
        "deberta-v2": ("DebertaV2Config", {}),
        "modernbert": ("ModernBertConfig", {"cls_token_id": 2, "sep_token_id": 3, "bos_token_id": 2,
                                            "eos_token_id": 3, "global_attn_every_n_layers": 2,
                                            "local_attention": 16}),
    }[name]


DECODERS = [a.name for a in of_task("causal-lm")]
ENCODERS = [a.name for a in of_task("classification") if a.name not in DECODERS]
DECODER_CLASSIFIERS = [a.name for a in of_task("classification") if a.name in DECODERS]


@pytest.fixture(scope="module")
def bpe():
    tok = _bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.bos_token, tok.eos_token, tok.pad_token = "<|endoftext|>", "<|im_end|>", "<|endoftext|>"
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def wordpiece():
    return _wordpiece_tokenizer()


@pytest.fixture(scope="module")
def sst2_csv(arch_root, test_data) -> Path:
    """120 labelled SST-2 rows, the classifiers' gate data."""
    rows = [ln.split("\t") for ln in (test_data / "sst2_dev_400.tsv").read_text().splitlines()[1:121]]
    path = arch_root / "sst2.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows([t, "positive" if y.strip() == "1" else "negative"] for t, y in rows)
    return path


@pytest.fixture(scope="module")
def arch_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("architectures")


def tiny_decoder(name: str, tok, root: Path, task: str = "causal-lm") -> Path:
    """A tiny random ``name`` decoder saved with ``tok`` under ``root`` (once per module); for
    ``task="classification"`` with a two-label score head."""
    import torch
    import transformers

    folder = root / f"model-{name}-{task}"
    if folder.is_dir():
        return folder
    cls_name, extra = _decoder_config(name)
    cfg_cls = getattr(transformers, cls_name)
    base = {} if name == "gpt2" else SMALL
    labels = {"num_labels": 2, "id2label": {0: "negative", 1: "positive"},
              "label2id": {"negative": 0, "positive": 1}} if task == "classification" else {}
    cfg = cfg_cls(vocab_size=len(tok), **{**base, **extra}, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **labels)
    arch = next(a for a in ARCHITECTURES if a.name == name and a.task == task)
    torch.manual_seed(0)
    model = getattr(transformers, arch.hf_class)(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_encoder(name: str, tok, root: Path) -> Path:
    """A tiny random ``name`` classifier (labels negative, positive) saved under ``root``."""
    import torch
    import transformers

    folder = root / f"model-{name}"
    if folder.is_dir():
        return folder
    cls_name, extra = _encoder_config(name)
    kw = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "max_position_embeddings": 256, **extra}
    if name == "distilbert":
        kw = {k: v for k, v in kw.items() if k not in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "num_attention_heads")}
    cfg = getattr(transformers, cls_name)(vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=2,
                                           id2label={0: "negative", 1: "positive"},
                                           label2id={"negative": 0, "positive": 1}, **kw)
    arch = next(a for a in ARCHITECTURES if a.name == name and a.task == "classification")
    torch.manual_seed(0)
    getattr(transformers, arch.hf_class)(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _runtime_steps(folder: Path, ids: list[int], prefill: int) -> np.ndarray:
    from edgeft.runtime import Generator

    state = Generator.open(folder, threads=1).engine.start(len(ids))
    rows = [state.prefill(ids[:prefill], all_logits=True)]
    rows += [state.step(t)[None] for t in ids[prefill:]]
    return np.concatenate(rows)


PROMPTS = ["shall i compare thee", "thou art more lovely and more temperate: rough winds do shake the darling buds",
           "so long as men can breathe or eyes can see, so long lives this, and this gives life to thee", "o"]


def _batched_equals_alone(folder: Path) -> None:
    """Greedy continuations decoded together (``serve --parallel``'s engine) equal each decoded alone."""
    from edgeft.runtime import Generator, SamplingParams

    gen = Generator.open(folder, threads=1)
    params = SamplingParams(max_new_tokens=10)
    together = gen.generate_batch(PROMPTS, params, parallel=3)
    assert [c.token_ids for c in together] == [gen.generate(p, params).token_ids for p in PROMPTS]


def test_the_table_and_the_tiny_models_name_the_same_architectures():
    for name in DECODERS:
        assert _decoder_config(name)
    for name in ENCODERS:
        assert _encoder_config(name)
    assert DECODER_CLASSIFIERS and set(DECODER_CLASSIFIERS) <= set(DECODERS)
    assert {a.task for a in ARCHITECTURES} == {"causal-lm", "classification"}
    table = markdown().splitlines()
    assert table[0].startswith("| model_type |") and len(table) == 2 + len(ARCHITECTURES)
    assert any(line.startswith("| roberta | RobertaForSequenceClassification |") for line in table)


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_fp32_equals_pytorch_and_int8_passes_the_gate(name, bpe, arch_root):
    import torch
    from transformers import AutoModelForCausalLM

    src = tiny_decoder(name, bpe, arch_root)
    out = export(ExportConfig(source=str(src), out=arch_root / f"{name}-fp32", quantize="none", **FAST_GATE),
                 log=None)
    assert _manifest(out)["gate"]["passed"]
    ids = [int(i) for i in np.random.RandomState(0).randint(5, len(bpe) - 1, size=3 * WINDOW)]
    got = _runtime_steps(out, ids, prefill=WINDOW // 2)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(torch.tensor([ids])).logits[0]
    np.testing.assert_allclose(got, want.numpy(), atol=2e-4, rtol=1e-4)
    _batched_equals_alone(out)

    int8 = export(ExportConfig(source=str(src), out=arch_root / f"{name}-int8", quantize="int8", **FAST_GATE),
                  log=None)
    m = _manifest(int8)
    assert m["gate"]["passed"] and m["quantization"]["scheme"] == "int8"


@pytest.mark.parametrize("name", ENCODERS)
def test_classifier_fp32_equals_pytorch_and_int8_passes_the_gate(name, wordpiece, arch_root, sst2_csv):
    import torch
    from transformers import AutoModelForSequenceClassification

    from edgeft.runtime import TextClassifier

    src = tiny_encoder(name, wordpiece, arch_root)
    gate = {**FAST_GATE, "eval_data": sst2_csv}
    out = export(ExportConfig(source=str(src), out=arch_root / f"{name}-fp32", quantize="none", **gate), log=None)
    texts = ["a gorgeous, witty film", "dull and far too long, with a plot that never arrives", "it is"]
    ref = AutoModelForSequenceClassification.from_pretrained(src).eval()
    with torch.no_grad():
        enc = wordpiece(texts, return_tensors="pt", padding=True)  # one segment: token types are all 0
        want = torch.softmax(ref(**{k: v for k, v in enc.items() if k != "token_type_ids"}).logits, -1).numpy()
    got = TextClassifier.open(out, threads=1).predict_proba(texts)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert _manifest(out)["classifier"]["labels"] == ["negative", "positive"]

    int8 = export(ExportConfig(source=str(src), out=arch_root / f"{name}-int8", quantize="int8", **gate), log=None)
    assert _manifest(int8)["gate"]["passed"]


def test_gemma2_window_longer_than_the_cache_exports_and_generates(bpe, arch_root):
    """Gemma-2's real window (4096) is longer than any cache the gate or a short request allocates."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from edgeft.runtime import Generator, SamplingParams

    src = arch_root / "model-gemma2-4096"
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(bpe), **SMALL, head_dim=16, sliding_window=4096,
                       bos_token_id=bpe.bos_token_id, eos_token_id=bpe.eos_token_id, pad_token_id=bpe.pad_token_id)
    Gemma2ForCausalLM(cfg).eval().save_pretrained(src)
    bpe.save_pretrained(src)
    out = export(ExportConfig(source=str(src), out=arch_root / "gemma2-4096", quantize="none", **FAST_GATE), log=None)
    assert _manifest(out)["gate"]["passed"]
    done = Generator.open(out, threads=1).generate("Shall I compare thee", SamplingParams(max_new_tokens=4))
    assert done.completion_tokens >= 1


def test_olmo_with_clipped_qkv_is_refused_in_one_line(bpe, tmp_path):
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    from edgeft.errors import EdgeftError

    torch.manual_seed(0)
    OlmoForCausalLM(OlmoConfig(vocab_size=len(bpe), **SMALL, clip_qkv=8.0)).save_pretrained(tmp_path / "olmo")
    bpe.save_pretrained(tmp_path / "olmo")
    with pytest.raises(EdgeftError, match=r"^cannot export an OLMo model with clip_qkv=8.0: "):
        export(ExportConfig(source=str(tmp_path / "olmo"), out=tmp_path / "a", quantize="none"), log=None)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("name", DECODER_CLASSIFIERS)
def test_decoder_classifier_scores_the_last_real_token_batched_and_passes_the_gate(name, bpe, arch_root, sst2_csv):
    """Texts of different lengths in one padded batch get the scores PyTorch gives each alone."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from edgeft.runtime import TextClassifier

    src = tiny_decoder(name, bpe, arch_root, "classification")
    gate = {**FAST_GATE, "eval_data": sst2_csv}
    out = export(ExportConfig(source=str(src), out=arch_root / f"{name}-cls-fp32", quantize="none", **gate), log=None)
    m = _manifest(out)
    assert m["task"] == "classification" and m["graph"]["inputs"] == ["input_ids", "attention_mask"]
    texts = ["a gorgeous, witty film", "dull and far too long, with a plot that never arrives", "it is"]
    ref = AutoModelForSequenceClassification.from_pretrained(src).eval()
    with torch.no_grad():  # one text at a time: no padding for transformers to find
        want = np.stack([torch.softmax(ref(**bpe(t, return_tensors="pt")).logits[0], -1).numpy() for t in texts])
    clf = TextClassifier.open(out, threads=1)
    np.testing.assert_allclose(clf.predict_proba(texts), want, atol=1e-5)
    np.testing.assert_allclose(clf.predict_proba(texts[1:2]), want[1:2], atol=1e-5)
    # left padding too: the graph finds the last real token from the mask
    enc = bpe(texts, return_tensors="np", padding=True)
    left = {"input_ids": np.zeros_like(enc["input_ids"]), "attention_mask": np.zeros_like(enc["attention_mask"])}
    for i, n in enumerate(enc["attention_mask"].sum(1)):
        left["input_ids"][i, -n:], left["attention_mask"][i, -n:] = enc["input_ids"][i, :n], 1
    logits = clf.session.run(["logits"], {k: v.astype(np.int64) for k, v in left.items()})[0]
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), want, atol=1e-5)

    int8 = export(ExportConfig(source=str(src), out=arch_root / f"{name}-cls-int8", quantize="int8", **gate), log=None)
    assert _manifest(int8)["gate"]["passed"]


# Tuned first: sliding-window models through the builder and through torch.onnx, an ungated MLP, an
# encoder without token types, and a causal-LM folder tuned as a classifier (the score head is new);
# the rest export their base.
TUNED = [("gemma2", "causal-lm"), ("phi3", "causal-lm"), ("gemma3_text", "causal-lm"), ("nemotron", "causal-lm"),
         ("roberta", "classification"), ("qwen2", "classification")]


@pytest.mark.parametrize("name,task", TUNED)
def test_tune_then_export_int8_then_runtime(name, task, bpe, wordpiece, arch_root, sst2_csv):
    from edgeft.runtime import Generator, SamplingParams, TextClassifier
    from edgeft.tune import TuneConfig, tune

    src = tiny_encoder(name, wordpiece, arch_root) if name in ENCODERS else tiny_decoder(name, bpe, arch_root)
    if task == "causal-lm":
        data = arch_root / "verse.txt"
        data.write_text("\n\n".join((Path(__file__).parents[1] / "demo" / "sonnets.txt").read_text().split("\n\n")[:60]))
    else:
        data = sst2_csv
    run = tune(TuneConfig(model=str(src), data=data, out=arch_root / f"{name}-{task}-run", task=task, max_length=48,
                          batch_size=8, max_steps=3, lr=3e-3, warmup=0, progress=False, threads=1, trainable_layers=1))
    info = json.loads((Path(run) / "run.json").read_text())
    assert info["task"] == task and info["architecture"] == name
    out = export(ExportConfig(source=str(run), out=arch_root / f"{name}-{task}-tuned", quantize="int8", **FAST_GATE),
                 log=None)
    m = _manifest(out)
    assert m["gate"]["passed"] and m["source"]["run_folder"] == str(Path(run).resolve())
    if task == "causal-lm":
        # ignore_eos: a tuned random model may well pick EOS first; what is asserted is that the runtime decodes
        done = Generator.open(out, threads=1).generate("Shall I compare thee",
                                                       SamplingParams(max_new_tokens=6, ignore_eos=True))
        assert done.completion_tokens == 6
    else:
        probs = TextClassifier.open(out, threads=1).predict_proba(["a gorgeous, witty film", "dull"])
        assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_a_classifier_edgeft_cannot_export_is_refused_before_tuning(tiny_gpt2_dir, sst2_csv, tmp_path):
    from edgeft.errors import EdgeftError
    from edgeft.tune import TuneConfig, tune

    with pytest.raises(EdgeftError, match=r"^cannot export a gpt2 classifier, so it does not tune as one; "
                                          r"supported classifiers: bert, .*qwen2"):
        tune(TuneConfig(model=str(tiny_gpt2_dir), data=sst2_csv, out=tmp_path / "run", task="classification",
                        progress=False, threads=1))
    assert not list(tmp_path.iterdir())


def test_export_help_lists_the_tested_architectures():
    from typer.testing import CliRunner

    from edgeft.cli import app

    res = CliRunner().invoke(app, ["export", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    assert "Supported architectures" in text
    for a in ARCHITECTURES:
        assert a.name in text, a.name
