"""The runtime's text handling on the real SmolLM2 tokenizer and chat template (pulled model;
``make test-slow``), and greedy decoding of a real fp32 export against transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HOME = Path(os.environ.get("EDGEFT_REAL_HOME", "/tmp/edgeft-home"))
SMOL = HOME / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol() -> Path:
    if not (SMOL / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 not pulled at {SMOL} (EDGEFT_HOME=... edgeft pull smollm2-135m-instruct)")
    return SMOL


def test_real_tokenizer_incremental_detok(smol):
    from tokenizers import Tokenizer

    from edgeft.runtime.detok import REPLACEMENT, IncrementalDetokenizer

    tok = Tokenizer.from_file(str(smol / "tokenizer.json"))
    text = "Voilà: naïve café, 東京タワー 🗼🎉, Ελληνικά, \u00a0and \t  spaces"
    ids = tok.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)


def test_real_chat_template_matches_transformers(smol):
    from transformers import AutoTokenizer

    from edgeft.runtime import chat

    source = chat.load_template(smol, "chat_template.jinja", "tokenizer_config.json")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Write a haiku about the sea."}]
    ref = AutoTokenizer.from_pretrained(smol).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.render(source, msgs) == ref


def test_real_fp32_export_generates_like_transformers(smol, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.export import ExportConfig, export
    from edgeft.runtime import Generator, SamplingParams

    art = export(ExportConfig(source=str(smol), out=tmp_path / "smol", quantize="none", task="causal-lm",
                              allow_degraded=True, gate_texts=8, gate_prompts=2, gate_new_tokens=8), log=None)
    gen = Generator.open(art)
    prompt = gen.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    ids = gen.encode(prompt)
    assert ids == AutoTokenizer.from_pretrained(smol)(prompt).input_ids
    model = AutoModelForCausalLM.from_pretrained(smol).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    out = gen.generate(ids, SamplingParams(max_new_tokens=24))
    # Cut the reference at transformers' own end of sequence, not where edgeft stopped.
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ended = next((i for i, t in enumerate(ref) if t in eos), None)
    assert out.finish_reason == ("stop" if ended is not None else "length")
    assert out.token_ids == (ref[:ended] if ended is not None else ref)
    assert "Paris" in out.text
