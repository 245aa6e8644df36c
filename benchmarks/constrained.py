"""Case ``constrained``: grammar engines compared, the mask's cost against a decode step, and JSON validity.

    python -m benchmarks.run --cases constrained          # on the suite's SmolLM2 int8 artifact
    .venv/bin/pip install outlines-core                    # optional: the second engine compared

Measured in one worker process (``measure``), one after the other, on the machine's shared cores:

1. engines (llguidance, and outlines-core where installed) on the artifact's tokenizer:
   tokenizer setup, compile time per schema, mask time per token while replaying a valid
   output, JSON-schema features each compiles, installed size and licence;
2. the mask against decoding, on the artifact itself: greedy decode with the schema mask, the
   decode step (``KVDecoder.step``) and the mask (compute + apply + accept) timed apart, token by token
   (goal: the mask at most 10% of a step, in ``benchmarks.headline``);
3. 20 prompts asking for {"name", "age"}: valid JSON (and schema-valid) with and without the constraint.

The earlier run of the script this case replaces is kept as written: ``results/constrained.{json,md}``.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks import prepare

if TYPE_CHECKING:
    from benchmarks.cases import Context

CASE = "constrained"
MASK_GOAL_PCT = 10.0

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
ORDER = {"type": "object", "additionalProperties": False, "required": ["id", "items", "status"], "properties": {
    "id": {"type": "integer", "minimum": 1, "maximum": 99999},
    "status": {"enum": ["open", "paid", "shipped"]},
    "items": {"type": "array", "maxItems": 4, "items": {
        "type": "object", "additionalProperties": False, "required": ["sku", "qty"],
        "properties": {"sku": {"type": "string", "maxLength": 12}, "qty": {"type": "integer", "minimum": 1}}}}}}
SCHEMAS = {"person": PERSON, "order": ORDER}
SAMPLES = {"person": {"name": "Ada Lovelace", "age": 36},
           "order": {"id": 42, "status": "paid", "items": [{"sku": "A-17", "qty": 2}, {"sku": "B-3", "qty": 1}]}}
FEATURES = {
    "enum": {"enum": ["a", "b"]},
    "const": {"const": "x"},
    "bounded integer": {"type": "integer", "minimum": 0, "maximum": 120},
    "bounded number": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
    "string length": {"type": "string", "minLength": 2, "maxLength": 5},
    "string pattern": {"type": "string", "pattern": "^[A-Z]{2}[0-9]+$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "array bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "nested object": ORDER,
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "integer"}}}]},
    "$ref / $defs": {"$defs": {"p": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/p"}}},
    "recursion": {"$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
                  "$ref": "#/$defs/n"},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "any JSON object": {"type": "object"},
}
NAMES = ["Ada", "Alan", "Grace", "Linus", "Marie", "Isaac", "Rosalind", "Niels", "Emmy", "Carl",
         "Hedy", "Nikola", "Barbara", "Claude", "Katherine", "Dennis", "Frances", "Ken", "Margaret", "Edsger"]


def _site_size(package: str) -> float:
    files = md.files(package) or []
    return round(sum((Path(f.locate()).stat().st_size for f in files if Path(f.locate()).is_file())) / 1e6, 1)


def _licence(package: str) -> str:
    meta = md.metadata(package)
    return meta.get("License-Expression") or meta.get("License") or "?"


def _stats(seconds: list[float]) -> dict:
    us = sorted(s * 1e6 for s in seconds)
    return {"mean_us": round(statistics.fmean(us), 1), "p50_us": round(us[len(us) // 2], 1),
            "p99_us": round(us[min(len(us) - 1, int(len(us) * 0.99))], 1), "max_us": round(us[-1], 1), "n": len(us)}


# ---------------------------------------------------------------- 1. engines

def llguidance_engine(tokenizer_json: Path, vocab: int, eos: list[int], tok) -> dict:
    from edgeft.runtime.constrain import Constraint, TokenSpace

    t0 = time.perf_counter()
    space = TokenSpace(tokenizer_json, vocab, eos)
    out = {"package": "llguidance", "version": md.version("llguidance"), "licence": _licence("llguidance"),
           "installed_mb": _site_size("llguidance"), "setup_s": round(time.perf_counter() - t0, 2),
           "compile_ms": {}, "mask": {}, "coverage": {}}
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        grammar = space.compile(Constraint.json_schema(schema))
        out["compile_ms"][name] = round(1000 * (time.perf_counter() - t0), 2)
        mask, times = grammar.mask(), []
        for t in tok.encode(json.dumps(SAMPLES[name]), add_special_tokens=False).ids:
            t0 = time.perf_counter()
            mask.allowed()
            times.append(time.perf_counter() - t0)
            mask.accept(t)
        assert mask.done, f"llguidance did not accept the {name} sample"
        out["mask"][name] = _stats(times)
    for name, schema in FEATURES.items():
        try:
            space.compile(Constraint.json_schema(schema))
            out["coverage"][name] = True
        except Exception:
            out["coverage"][name] = False
    return out


def _byte_vocab(tok, eos: list[int]) -> dict:
    """outlines-core wants each token's bytes: undo the byte-level BPE alphabet (GPT-2's)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    u2b = {chr(c): b for b, c in zip(bs, cs)}
    vocab: dict[bytes, list[int]] = {}
    for s, i in tok.get_vocab(with_added_tokens=True).items():
        if i in eos:
            continue
        key = bytes(u2b[c] for c in s) if all(c in u2b for c in s) else s.encode()
        vocab.setdefault(key, []).append(i)
    return vocab


def outlines_engine(vocab_size: int, eos: list[int], tok) -> dict | None:
    try:
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return None
    t0 = time.perf_counter()
    vocab = oc.Vocabulary(eos[0], _byte_vocab(tok, eos))
    out = {"package": "outlines-core", "version": md.version("outlines-core"), "licence": _licence("outlines-core"),
           "installed_mb": _site_size("outlines-core"), "setup_s": round(time.perf_counter() - t0, 2),
           "compile_ms": {}, "mask": {}, "coverage": {}}
    words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        index = oc.Index(build_regex_from_schema(json.dumps(schema)), vocab)
        out["compile_ms"][name] = round(1000 * (time.perf_counter() - t0), 2)
        guide, times = oc.Guide(index), []
        # outlines' regex fixes the whitespace: replay its own layout (compact separators)
        for t in tok.encode(json.dumps(SAMPLES[name], separators=(",", ":")), add_special_tokens=False).ids:
            t0 = time.perf_counter()
            guide.write_mask_into(words.ctypes.data, words.size, 4)
            times.append(time.perf_counter() - t0)
            guide.advance(t)
        out["mask"][name] = _stats(times)
    for name, schema in FEATURES.items():
        try:
            t0 = time.perf_counter()
            oc.Index(build_regex_from_schema(json.dumps(schema)), vocab)
            out["coverage"][name] = True
        except Exception:
            out["coverage"][name] = False
    return out


# ---------------------------------------------------------------- 2. the mask against decoding

def _prompt(gen, name: str) -> list[int]:
    msg = f"Write a JSON object with the name and the age of a person called {name}."
    return gen.encode(gen.render_chat([{"role": "user", "content": msg}]))


def greedy(gen, ids: list[int], n: int, mask=None, timing: dict | None = None) -> list[int]:
    """Greedy decoding with an optional mask, timing the decode step and the mask apart."""
    state = gen.engine.start(len(ids) + n)
    logits = state.prefill(ids)
    out: list[int] = []
    for _ in range(n):
        t0 = time.perf_counter()
        if mask is not None:
            logits = mask(logits)
        token = int(np.argmax(logits))
        if mask is not None:
            mask.accept(token)
        t1 = time.perf_counter()
        if token in gen.eos_ids:
            break
        out.append(token)
        logits = state.step(token)
        if timing is not None:
            timing.setdefault("mask", []).append(t1 - t0)
            timing.setdefault("step", []).append(time.perf_counter() - t1)
    return out


def mask_cost(gen, space, prompts: int = 6, tokens: int = 48) -> dict:
    from edgeft.runtime.constrain import Constraint

    grammar = space.compile(Constraint.json_schema(ORDER))
    timing: dict = {}
    for name in NAMES[:prompts]:
        greedy(gen, _prompt(gen, name), tokens, grammar.mask(), timing)
    mask, step = statistics.fmean(timing["mask"]), statistics.fmean(timing["step"])
    return {"schema": "order", "tokens": len(timing["step"]), "mask_ms": round(1000 * mask, 3),
            "decode_step_ms": round(1000 * step, 3), "mask_share_of_decode_pct": round(100 * mask / step, 2),
            "mask_p99_ms": _stats(timing["mask"])["p99_us"] / 1000, "goal_pct": MASK_GOAL_PCT,
            "threads": gen.engine.session.get_session_options().intra_op_num_threads}


# ---------------------------------------------------------------- 3. validity with and without

def validity(gen, space, tokens: int = 96) -> dict:
    import jsonschema

    from edgeft.runtime.constrain import Constraint

    grammar = space.compile(Constraint.json_schema(PERSON))
    counts = {"constrained": [0, 0], "unconstrained": [0, 0]}  # [valid JSON, schema-valid]
    examples = {}
    for name in NAMES:
        ids = _prompt(gen, name)
        for kind, mask in (("constrained", grammar.mask()), ("unconstrained", None)):
            text = gen.decode(greedy(gen, ids, tokens, mask))
            examples.setdefault(kind, text)
            try:
                obj = json.loads(text)
            except ValueError:
                continue
            counts[kind][0] += 1
            try:
                jsonschema.validate(obj, PERSON)
                counts[kind][1] += 1
            except jsonschema.ValidationError:
                pass
    return {"prompts": len(NAMES), "max_new_tokens": tokens, "decoding": "greedy",
            **{f"{k}_valid_json": v[0] for k, v in counts.items()},
            **{f"{k}_schema_valid": v[1] for k, v in counts.items()}, "first_outputs": examples}


# ---------------------------------------------------------------- the case


def measure(spec: dict) -> dict:
    """The three measurements on one artifact, in this (worker) process."""
    from tokenizers import Tokenizer

    from edgeft.runtime import Generator
    from edgeft.runtime.constrain import token_space

    gen = Generator.open(spec["path"], threads=spec["threads"])
    tj = gen.folder / gen.manifest.tokenizer.file
    tok = Tokenizer.from_file(str(tj))
    vocab, eos = gen.decoder.vocab_size, sorted(gen.eos_ids)
    res = {"engines": [llguidance_engine(tj, vocab, eos, tok)]}
    other = outlines_engine(vocab, eos, tok)
    if other:
        res["engines"].append(other)
    space = token_space(tj, vocab, eos)
    res["mask_cost"] = mask_cost(gen, space, prompts=spec["prompts"], tokens=spec["tokens"])
    res["validity"] = validity(gen, space)
    return res


def case(ctx: Context) -> None:
    from benchmarks.cases import WorkerFailed, lm_artifact

    prepare.need_module("llguidance", "constrained decoding")
    art = lm_artifact(ctx, "int8")
    try:
        r = ctx.measure("constrained", path=str(art), prompts=2 if ctx.quick else 6, tokens=24 if ctx.quick else 48)
    except (WorkerFailed, subprocess.TimeoutExpired) as exc:
        raise prepare.Unavailable(str(exc)) from None
    for e in r["engines"]:
        system = f"{e['package']} {e['version']}"
        ctx.add(CASE, system, "setup_s", e["setup_s"], "s", higher=False,
                note=f"{system}: licence {e['licence']}, {e['installed_mb']} MB installed")
        ctx.add(CASE, system, "installed_mb", e["installed_mb"], "MB", higher=False)
        for schema in SCHEMAS:
            ctx.add(CASE, system, "compile_ms", e["compile_ms"][schema], "ms", higher=False, schema=schema)
            ctx.add(CASE, system, "mask_us", e["mask"][schema]["mean_us"], "us/token", higher=False, schema=schema)
            ctx.add(CASE, system, "mask_p99_us", e["mask"][schema]["p99_us"], "us/token", higher=False, schema=schema)
        ctx.add(CASE, system, "features_compiled", sum(e["coverage"].values()), f"of {len(e['coverage'])}")
        missing = [k for k, ok in e["coverage"].items() if not ok]
        if missing:
            ctx.res.notes.append(f"{CASE}: {system} does not compile: {', '.join(missing)}")
    c, v = r["mask_cost"], r["validity"]
    system = "llguidance mask on edgeft int8"
    ctx.add(CASE, system, "mask_ms", c["mask_ms"], "ms/token", higher=False,
            note=f"{system}: greedy decoding of the order schema, {c['tokens']} tokens, {c['threads']} threads; "
                 "mask = compute + apply + accept, timed apart from the decode step")
    ctx.add(CASE, system, "decode_step_ms", c["decode_step_ms"], "ms/token", higher=False)
    ctx.add(CASE, system, "mask_share_of_decode", c["mask_share_of_decode_pct"], "%", higher=False)
    for kind in ("constrained", "unconstrained"):
        ctx.add(CASE, f"edgeft int8 {kind}", "valid_json", v[f"{kind}_valid_json"], f"of {v['prompts']}",
                note=f"{CASE}: {{name, age}} asked on {v['prompts']} prompts, greedy, {v['max_new_tokens']} tokens")
        ctx.add(CASE, f"edgeft int8 {kind}", "schema_valid", v[f"{kind}_schema_valid"], f"of {v['prompts']}")
