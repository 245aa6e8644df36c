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


# ---------------------------------------------------------------- through the generator, the CLI and the server

@pytest.fixture(scope="module")
def gen(tiny_llama_dir, tmp_path_factory):
    from runtime_artifacts import build

    from edgeft.runtime import Generator

    return Generator.open(build("llama", str(tiny_llama_dir), str(tmp_path_factory.getbasetemp() / "runtime-artifacts")),
                          threads=1)


def test_fifty_seeded_sampled_runs_stop_only_on_valid_json(gen):
    from edgeft.runtime import SamplingParams, compile_for

    grammar = compile_for(gen, Constraint.json_schema(NESTED))
    reasons = []
    for seed in range(50):
        params = SamplingParams(max_new_tokens=160, temperature=1.0, seed=seed)
        c = gen.generate("Describe a pet as JSON:", params, processors=[grammar.mask()])
        reasons.append(c.finish_reason)
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), NESTED)
        else:
            assert c.finish_reason == "length" and c.completion_tokens == 160
    assert reasons.count("stop") >= 40, reasons
    short = gen.generate("Describe a pet as JSON:", SamplingParams(max_new_tokens=3, temperature=1.0, seed=0),
                         processors=[grammar.mask()])
    assert short.finish_reason == "length" and short.completion_tokens == 3 and short.text.startswith("{")


def test_generate_command_takes_a_schema_a_regex_or_a_choice(gen, tmp_path):
    from typer.testing import CliRunner

    from edgeft.cli import app

    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(NESTED))
    art = str(gen.folder)
    r = CliRunner().invoke(app, ["generate", art, "A pet:", "--json-schema", str(schema), "-n", "200", "-t", "1",
                                 "--seed", "3", "--threads", "1"])
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.stdout.strip()), NESTED)
    r = CliRunner().invoke(app, ["generate", art, "Pick:", "--choice", "red,green,blue", "-t", "1", "--seed", "1"])
    assert r.exit_code == 0 and r.stdout.strip() in ("red", "green", "blue"), r.output
    r = CliRunner().invoke(app, ["generate", art, "Code:", "--regex", "[A-Z]{2}[0-9]{2}", "-t", "1"])
    assert r.exit_code == 0 and re.fullmatch(r"[A-Z]{2}[0-9]{2}", r.stdout.strip()), r.output
    for args, needle in [(["--regex", "(["], "regex"), (["--choice", "a", "--regex", "b"], "at most one"),
                         (["--json-schema", str(tmp_path / "none.json")], "does not exist")]:
        r = CliRunner().invoke(app, ["generate", art, "x", *args])
        assert r.exit_code == 2 and needle in r.output, r.output
