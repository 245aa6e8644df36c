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

from edgeft.runtime.constrain import Constraint, ConstraintError, closed, escape, lark_json, token_space

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


def test_closed_objects_keep_to_their_declared_keys():
    loose = {"type": "object", "required": ["where"], "properties": {
        "where": {"type": "object", "properties": {"city": {"type": "string"}}},
        "extra": {"type": "object", "additionalProperties": {"type": "object"}},
        "tags": {"type": "array", "items": {"properties": {"k": {"type": "string"}}}},
        "any": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        "both": {"allOf": [{"type": "object", "properties": {"a": {"type": "object"}}}]}},
        "$defs": {"p": {"type": ["object", "null"]}}}
    c = closed(loose)
    assert c["additionalProperties"] is False and c["properties"]["where"]["additionalProperties"] is False
    extra = c["properties"]["extra"]
    assert extra["additionalProperties"] == {"type": "object", "additionalProperties": False}  # allowed, closed inside
    assert c["properties"]["tags"]["items"]["additionalProperties"] is False
    assert c["properties"]["any"]["anyOf"][0] == {"type": "object", "additionalProperties": False}
    branch = c["properties"]["both"]["allOf"][0]  # an allOf branch stays open; what it nests is closed
    assert "additionalProperties" not in branch and branch["properties"]["a"]["additionalProperties"] is False
    assert c["$defs"]["p"]["additionalProperties"] is False
    assert c["required"] == ["where"] and loose["properties"]["where"] == {"type": "object", "properties": {
        "city": {"type": "string"}}}  # the caller's schema is not changed
    strict = closed({"type": "object", "additionalProperties": True, "properties": {"a": {}, "b": {}}}, strict=True)
    assert strict["additionalProperties"] is False and strict["required"] == ["a", "b"]
    assert closed({"type": "object", "additionalProperties": True})["additionalProperties"] is True


def test_a_json_rule_in_lark_allows_no_free_whitespace(vocab):
    space, tok, _ = vocab
    g = space.compile(Constraint.lark(f'start: "A:" body\nbody: {lark_json({"type": "object"})}'))
    for text, ok in [('A:{"a": [1, 2]}', True), ('A:{\n"a": 1}', False), ('A:{"a":  1}', False),
                     ('A:{"a":1}', False)]:
        mask, fits = g.mask(), True
        for t in tok.encode(text, add_special_tokens=False).ids:
            fits = fits and bool(mask.allowed()[t])
            if fits:
                mask.accept(t)
        assert (fits and mask.done) is ok, text


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
    r = CliRunner().invoke(app, ["generate", art, "A pet:", "--json-schema", str(schema), "--max-new-tokens", "200", "-t", "1",
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


def test_generate_constrains_a_file_of_prompts(gen, tmp_path):
    from typer.testing import CliRunner

    from edgeft.cli import app

    pet = tmp_path / "pet.json"
    pet.write_text(json.dumps(NESTED))
    code = {"type": "object", "additionalProperties": False, "required": ["code"],
            "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}$"}}}
    rows = [{"prompt": f"Pet {i}:"} for i in range(4)] + [{"id": "c", "prompt": "Code:", "json_schema": code}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = CliRunner().invoke(app, ["generate", str(gen.folder), "--input", str(src), "-o", str(out), "--json-schema",
                                 str(pet), "--max-new-tokens", "200", "-t", "1", "--seed", "5", "--parallel", "3"])
    assert r.exit_code == 0, r.output
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["index"] for g in got] == [0, 1, 2, 3, 4] and got[4]["id"] == "c"
    for g in got[:4]:
        if g["finish_reason"] == "stop":
            jsonschema.validate(json.loads(g["text"]), NESTED)
        else:
            assert g["text"].startswith("{") and g["completion_tokens"] == 200
    assert got[4]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(got[4]["text"]), code)  # the row's own schema, not the flag's
    r = CliRunner().invoke(app, ["generate", str(gen.folder), "--input", str(src), "--regex", "[0-9]{2}", "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    assert all(re.fullmatch("[0-9]{2}", json.loads(line)["text"]) for line in r.stdout.splitlines()[:4])
    src.write_text(json.dumps({"prompt": "x", "json_schema": {"type": "wat"}}) + "\n")
    r = CliRunner().invoke(app, ["generate", str(gen.folder), "--input", str(src)])
    assert r.exit_code == 2 and "prompt 1" in r.output and "wat" in r.output and "Traceback" not in r.output
