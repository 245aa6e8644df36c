"""Case ``scale``: what the 8-bit frozen base saves at the sizes it is for (0.5B-3B), on CPU.

    python -m benchmarks.run --cases scale                 # 0.5B and 1B shapes, ~15 min on 2 cores
    BENCH_SCALE_SHAPES=qwen2.5-0.5b,llama-3.2-1b,llama-3.2-3b python -m benchmarks.run --cases scale

Random-weight models built from the real configs (Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.2-3B), with the
vocabulary cut to 49,152 (SmolLM2's size; the real ones have 151,936 and 128,256) so the embeddings do not
dominate: the frozen blocks are what the 8-bit base is for. The checkpoint is written tensor by tensor
(normal(0, 0.02) matrices, unit norms, zero biases: what ``_init_weights`` gives), in 2 GB safetensors
shards, so a 3B model is made without holding it. The tokenizer is a byte-level BPE trained on the
sonnets (a few hundred tokens: the ids it gives are a subset of the model's vocabulary).

Each shape is tuned by ``edgeft tune -n 2 --max-steps 4 --max-length 256 --batch-size 4`` on the sonnets,
once over the 8-bit base (``--base-precision int8``: edgeft's int8 rows on CPU) and once over the fp32
base (``--base-precision fp32``), each in its own process; recorded is the process's peak RSS
(``ru_maxrss`` of the child) and its memory right after the model loaded (the ``loaded`` line of
``EDGEFT_MEM_TRACE``). The theoretical saving is the frozen blocks' bytes in fp32 minus int8 (one byte per
weight plus one fp32 scale per output row); goal: 8-bit peak <= fp32 peak - 0.7 x saving.
``BENCH_SCALE_SKIP_FP32=llama-3.2-3b`` leaves out the fp32 run of a shape that does not fit the machine.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "scale"
VOCAB = 49152
SHARD = 2 * 10**9
# the real configs, vocabulary cut to VOCAB (see the module docstring)
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu"),
    "llama-3.2-1b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
                         rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                           original_max_position_embeddings=8192, rope_type="llama3")),
    "llama-3.2-3b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=3072,
                         intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
                         rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                           original_max_position_embeddings=8192, rope_type="llama3")),
}
TUNE_ARGS = ["-n", "2", "--max-steps", "4", "--max-length", "256", "--batch-size", "4"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _config(shape: str) -> Any:
    from transformers import AutoConfig

    spec = dict(SHAPES[shape])
    kind = spec.pop("model_type")
    return AutoConfig.for_model(kind, vocab_size=VOCAB, bos_token_id=0, eos_token_id=2, pad_token_id=0,
                                torch_dtype="float32", **spec)


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((prepare.REPO / "demo" / "sonnets.txt").read_text().splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[2],
                                   pad_token=SPECIALS[0])
    fast.save_pretrained(folder)


def random_model(shape: str, folder: Path) -> Path:
    """A random-weight checkpoint of ``shape`` in ``folder``, written one tensor at a time (cached)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    cfg = _config(shape)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(cfg)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # a tied head is saved as the embeddings
    names = [n for n, _ in meta.named_parameters() if n not in tied]
    shapes = dict(meta.state_dict()) | dict(meta.named_parameters())
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[str] = []

    def flush() -> None:
        if shard:
            files.append(f"model-{len(files) + 1:05d}.safetensors")
            save_file(shard, tmp / files[-1], metadata={"format": "pt"})
            weight_map.update({k: files[-1] for k in shard})
            shard.clear()

    for name in names:
        size = tuple(shapes[name].shape)
        if name.endswith("norm.weight"):
            t = torch.ones(size)
        elif name.endswith(".bias"):
            t = torch.zeros(size)
        else:
            t = torch.empty(size).normal_(0.0, 0.02, generator=gen)
        if sum(v.numel() * 4 for v in shard.values()) + t.numel() * 4 > SHARD:
            flush()
        shard[name] = t
    flush()
    total = sum(shapes[n].numel() * 4 for n in names)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(tmp)
    _tokenizer(tmp)
    tmp.rename(folder)
    return folder
