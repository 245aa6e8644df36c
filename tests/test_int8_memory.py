"""The CPU 8-bit base holds no full-precision copy of the frozen blocks once loaded (edgeft.tune.int8).

A llama with matrices of 1-4 MB (too small for glibc to map them on their own once a larger block was
freed: freed whole-matrix temporaries then stay in the heap), loaded by the real ``load_for_tuning`` in a
fresh process; the anonymous memory the load added is compared with what the 8-bit base must hold.
Resident memory is the outcome the user sees; it does not depend on the machine's speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r'''
import json, sys
import torch
from edgeft.artifact import Task
from edgeft.tune.model import load_for_tuning

def anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))

from accelerate import init_empty_weights
from transformers import AutoConfig, LlamaForCausalLM
from edgeft.tune import int8
with init_empty_weights():  # the imports and lazy set-up a load does, before counting
    LlamaForCausalLM(AutoConfig.from_pretrained(sys.argv[1]))
before = anon()
loaded = load_for_tuning(sys.argv[1], Task.causal_lm, None, 1, "int8", "cpu")
grown = anon() - before
frozen = {n: p for n, p in loaded.model.named_parameters() if not p.requires_grad}
frozen |= {n: b for n, b in loaded.model.named_buffers() if n.startswith("model.layers.")}
print(json.dumps({
    "grown": grown,
    "held": sum(p.numel() * p.element_size() for p in loaded.model.parameters() if not p.is_meta)
            + sum(b.numel() * b.element_size() for n, b in loaded.model.named_buffers() if n.endswith("scale")),
    "fp32_in_frozen_blocks": sum(t.numel() * 4 for n, t in frozen.items()
                                 if n.startswith("model.layers.") and t.dtype == torch.float32
                                 and not n.endswith(("scale", "layernorm.weight", "inv_freq"))),
    "kinds": sorted({str(p.dtype) for n, p in frozen.items() if n.endswith("proj.weight")}),
}))
'''


@pytest.fixture(scope="module")
def mid_llama(tmp_path_factory) -> Path:
    """A 6-block llama with 512-wide hidden states (25M parameters, 100 MB in fp32), random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import CHATML, _bpe_tokenizer

    tok = _bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.bos_token, tok.eos_token, tok.pad_token = "<|endoftext|>", "<|im_end|>", "<|endoftext|>"
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("mid-llama")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status")
def test_int8_base_holds_no_full_precision_copy_of_the_frozen_blocks(mid_llama):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", CHILD, str(mid_llama)], capture_output=True, text=True, env=env,
                         check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["kinds"] == ["torch.int8"]
    assert got["fp32_in_frozen_blocks"] == 0
    # 5 frozen blocks: 20M weights, 80 MB in fp32, 20 MB in int8. What the load adds to the process is what
    # the model holds (int8 rows, the trained block in fp32) and little else: before, the freed fp32
    # matrices stayed in the heap and the load added about the frozen blocks' fp32 size on top.
    # The bound leaves half the fp32 size for the allocator's own slack (0.30 was passed and missed by
    # 0.25 MB on one machine across two runs of the suite); the regression it guards added 1.0x.
    fp32_frozen = 5 * (4 * 512 * 512 + 3 * 512 * 2048) * 4
    assert got["grown"] <= got["held"] + 0.5 * fp32_frozen, got
