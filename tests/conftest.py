"""Shared fixtures: tiny random llama, gpt2 and bert models, built from configs.

Each model is a real Hugging Face folder (config, safetensors, tokenizer.json) with a
small tokenizer trained on Shakespeare's sonnets and SST-2 rows, so every stage (tune,
export, runtime) runs on it end to end in seconds. No test touches the user's cache: an
autouse fixture points ``EDGEFT_HOME`` at a temporary folder.

The default suite reads only data shipped in the repository (``demo/``, ``tests/data/``):
a fresh clone passes it with no ``../shared`` beside it. Only slow tests ask for the
``shared_data`` fixture (the full datasets), which skips when the folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from runtime_artifacts import build

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
SHARED_DATA = Path(os.environ.get("EDGEFT_SHARED_DATA") or REPO.parent / "shared" / "data")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def _edgeft_home(tmp_path_factory, monkeypatch):
    """A fresh cache folder per test: for the commands (``$EDGEFT_HOME``) and for library calls."""
    from edgeft import artifact

    home = tmp_path_factory.mktemp("edgeft-home")
    monkeypatch.setenv("EDGEFT_HOME", str(home))
    monkeypatch.setattr(artifact, "_CACHE_ROOT", [home])


@pytest.fixture(scope="session")
def test_data() -> Path:
    """``tests/data``: slices of SST-2 dev, TREC test and Alpaca rows (sources in its README)."""
    return TEST_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$EDGEFT_SHARED_DATA``, else ``../shared/data``: the full datasets, for slow tests only."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the full datasets at {SHARED_DATA} (absent; set EDGEFT_SHARED_DATA)")
    return SHARED_DATA


def _corpus() -> list[str]:
    lines = (REPO / "demo" / "sonnets.txt").read_text().splitlines()
    sst = (TEST_DATA / "sst2_dev_400.tsv").read_text().splitlines()[1:400]
    return [ln for ln in lines if ln.strip()] + [s.split("\t")[0] for s in sst]


def _bpe_tokenizer(specials: list[str], vocab: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _wordpiece_tokenizer(vocab: int = 384):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 4-block llama (tied embeddings, grouped KV heads) with a ChatML chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.bos_token, tok.eos_token, tok.pad_token = "<|endoftext|>", "<|im_end|>", "<|endoftext|>"
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return _save(LlamaForCausalLM(cfg).eval(), tok, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 4-block GPT-2 with a byte-level BPE tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _bpe_tokenizer(["<|endoftext|>"])
    tok.bos_token = tok.eos_token = tok.pad_token = "<|endoftext|>"
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=4, n_head=4, n_positions=256,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _save(GPT2LMHeadModel(cfg).eval(), tok, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 4-block BERT encoder (no classification head yet) with a WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    tok = _wordpiece_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    return _save(BertModel(cfg).eval(), tok, tmp_path_factory.mktemp("tiny-bert"))


# The tiny runtime artifacts, built once per test module from the tiny models above.
@pytest.fixture(scope="module")
def llama_art(tiny_llama_dir, tmp_path_factory):
    return build("llama", str(tiny_llama_dir), str(tmp_path_factory.getbasetemp() / "runtime-artifacts"))


@pytest.fixture(scope="module")
def bert_art(tiny_bert_dir, tmp_path_factory):
    return build("bert", str(tiny_bert_dir), str(tmp_path_factory.getbasetemp() / "runtime-artifacts"))
