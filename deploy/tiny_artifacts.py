"""Make two small real artifacts for the deploy rehearsal: a chat model and a classifier.

    .venv/bin/python deploy/tiny_artifacts.py OUT_DIR

Writes ``OUT_DIR/chat`` (a 2-block llama with a ChatML template) and ``OUT_DIR/sentiment``
(a 2-block BERT classifier, labels negative/positive), each built from a config with a
tokenizer trained on ``demo/sonnets.txt`` and exported by ``edgeft.export`` (int8). The
weights are random: the rehearsal checks the packaging and the server, not the answers.
Needs the full (torch) environment; the artifacts it writes need only the runtime.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    return [ln for ln in (REPO / "demo" / "sonnets.txt").read_text().splitlines() if ln.strip()]


def _bpe(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _wordpiece():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=320, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_llama(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.bos_token, tok.eos_token, tok.pad_token = "<|endoftext|>", "<|im_end|>", "<|endoftext|>"
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_bert(path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = _wordpiece()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                     num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main(out: Path) -> None:
    from edgeft.export import ExportConfig, export

    out.mkdir(parents=True, exist_ok=True)
    src = out / "src"
    llama, bert = tiny_llama(src / "llama"), tiny_bert(src / "bert")
    export(ExportConfig(source=str(llama), out=out / "chat", task="causal-lm", overwrite=True,
                        allow_degraded=True, gate_texts=8, gate_prompts=2, gate_new_tokens=8))
    export(ExportConfig(source=str(bert), out=out / "sentiment", task="classification", overwrite=True,
                        allow_degraded=True, labels=("negative", "positive"), gate_texts=8,
                        eval_data=REPO / "demo" / "sst2_2k.csv"))
    print(out / "chat")
    print(out / "sentiment")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
