"""Real-model structured output and embeddings (``make test-slow``): SmolLM2-135M at int8 fills a
{name, age} schema on 20 prompts, every answer valid JSON that fits the schema; all-MiniLM-L6-v2 at
int8 embeds SST-2 sentences within the cosine goal of sentence-transformers' vectors (computed here
through transformers with the model's own mean pooling). Needs the pulled models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

HOME = Path(os.environ.get("EDGEFT_REAL_HOME", "/tmp/edgeft-home"))
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
NAMES = ["Ada", "Alan", "Grace", "Linus", "Marie", "Isaac", "Rosalind", "Niels", "Emmy", "Carl",
         "Hedy", "Nikola", "Barbara", "Claude", "Katherine", "Dennis", "Frances", "Ken", "Margaret", "Edsger"]


def _home(monkeypatch, name: str) -> None:
    if not (HOME / "models" / name).is_dir():
        pytest.skip(f"{name} is not pulled under {HOME} (set EDGEFT_REAL_HOME)")
    monkeypatch.setenv("EDGEFT_HOME", str(HOME))  # for the commands
    monkeypatch.setattr("edgeft.artifact._CACHE_ROOT", [HOME])  # for library calls


def test_smollm2_fills_a_schema_on_every_prompt(monkeypatch, tmp_path):
    import jsonschema

    from edgeft.export import ExportConfig, export
    from edgeft.runtime import Constraint, SamplingParams, compile_for, load

    _home(monkeypatch, "smollm2-135m-instruct")
    art = export(ExportConfig(source="smollm2-135m-instruct", out=tmp_path / "smol", quantize="int8",
                              gate_texts=8, gate_prompts=2, gate_new_tokens=16), log=None)
    gen = load(art)
    grammar = compile_for(gen, Constraint.json_schema(PERSON))
    finished = 0
    for name in NAMES:
        prompt = gen.render_chat([{"role": "user", "content": f"Write a JSON object with the name and the age "
                                   f"of a person called {name}."}])
        done = gen.generate(prompt, SamplingParams(max_new_tokens=96), processors=[grammar.mask()])
        if done.finish_reason == "stop":
            finished += 1
            jsonschema.validate(json.loads(done.text), PERSON)
    assert finished == len(NAMES)


def test_minilm_int8_embeddings_match_pytorch(monkeypatch, tmp_path, shared_data):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from edgeft.export import ExportConfig, export
    from edgeft.runtime import TextEmbedder

    _home(monkeypatch, "minilm-l6")
    rows = (shared_data / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [r.split("\t")[0] for r in rows][:300]
    art = export(ExportConfig(source="minilm-l6", out=tmp_path / "emb", task="embedding", quantize="int8"), log=None)
    got = np.asarray(TextEmbedder.open(art).embed(texts))
    folder = HOME / "models" / "minilm-l6"
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.mean() >= 0.99 and cos.min() > 0.9
