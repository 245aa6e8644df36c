"""Constrained decoding: JSON schemas, regexes and choices as one logit processor (llguidance).

On the tiny llama's tokenizer, under adversarial (random) logits, whatever is drawn through
the mask stays inside the constraint, and a finished output validates (jsonschema); a
constraint the engine cannot compile is one clear error naming the problem.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgeft.runtime.constrain import Constraint, ConstraintError, escape, token_space

NESTED = {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address", "kind"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 4}},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "address": {"type": "object", "additionalProperties": False, "required": ["zip"],
                    "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                   "city": {"type": "string", "maxLength": 6}}},
    },
}


@pytest.fixture(scope="module")
def vocab(tiny_llama_dir):
    """(token space, tokenizer, eos id) of the tiny llama."""
    from tokenizers import Tokenizer

    cfg = json.loads((Path(tiny_llama_dir) / "config.json").read_text())
    tj = Path(tiny_llama_dir) / "tokenizer.json"
    return token_space(tj, cfg["vocab_size"], [cfg["eos_token_id"]]), Tokenizer.from_file(str(tj)), cfg["eos_token_id"]


def _draw(grammar, vocab, seed: int, steps: int) -> tuple[str | None, list[int]]:
    """Sample through the mask from random logits; (text, ids) when EOS came, (None, ids) when steps ran out."""
    from edgeft.runtime.sampling import sample

    space, tok, eos = vocab
    rng, mask, out = np.random.default_rng(seed), grammar.mask(), []
    for _ in range(steps):
        token = sample(mask(rng.normal(size=space.vocab_size).astype(np.float32) * 4), 1.0, 0, 1.0, rng)
        if token == eos:
            return tok.decode(out), out
        mask.accept(token)
        out.append(token)
    return None, out


def test_random_logits_through_the_mask_give_only_valid_json(vocab):
    grammar = vocab[0].compile(Constraint.json_schema(NESTED))
    finished = 0
    for seed in range(20):
        text, ids = _draw(grammar, vocab, seed, 400)
        if text is not None:
            finished += 1
            jsonschema.validate(json.loads(text), NESTED)
        else:  # cut short: still a prefix the grammar allowed
            assert vocab[1].decode(ids).startswith("{")
    assert finished >= 15


def test_regex_choice_and_json_object(vocab):
    rx = vocab[0].compile(Constraint.regex(r"[0-9]{3}-[a-z]{2,4}"))
    choice = vocab[0].compile(Constraint.choice(["yes", "no", "not sure (a.b)"]))
    anything = vocab[0].compile(Constraint.json_object())
    for seed in range(10):
        text, _ = _draw(rx, vocab, seed, 40)
        assert text is not None and re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
        text, _ = _draw(choice, vocab, seed, 40)
        assert text in ("yes", "no", "not sure (a.b)"), text
        text, ids = _draw(anything, vocab, seed, 300)
        assert (text is None and vocab[1].decode(ids).startswith("{")) or isinstance(json.loads(text), dict)
    assert escape("a.b (c)") == r"a\.b \(c\)"


def test_a_finished_grammar_allows_only_eos(vocab):
    space, tok, eos = vocab
    mask = space.compile(Constraint.choice(["yes"])).mask()
    for t in tok.encode("yes", add_special_tokens=False).ids:
        assert mask.allowed()[t]
        mask.accept(t)
    assert mask.done
    logits = mask(np.zeros(space.vocab_size, dtype=np.float32))
    assert np.flatnonzero(np.isfinite(logits)).tolist() == [eos]


def test_bad_constraints_name_the_problem(vocab):
    space = vocab[0]
    for c, needle in [(Constraint.regex("(["), "regex"), (Constraint.json_schema({"type": "wat"}), "wat"),
                      (Constraint.json_schema({"$ref": "#/$defs/none"}), "none")]:
        with pytest.raises(ConstraintError, match=needle):
            space.compile(c)
    with pytest.raises(ConstraintError, match="not valid JSON"):
        Constraint.json_schema("{nope")
    with pytest.raises(ConstraintError, match="non-empty"):
        Constraint.choice([])
    tj = Path(space.path)
    assert token_space(tj, space.vocab_size, space.eos_ids) is space  # built once per process
