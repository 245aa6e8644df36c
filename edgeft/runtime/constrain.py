"""Constrained decoding: at each step a token mask from a grammar, as one logit processor.

A ``Constraint`` says what the output must be: text matching a JSON schema, any JSON
object, a regular expression, one of a few fixed strings, or a Lark grammar. ``compile``
turns it, for one artifact's tokenizer, into a ``Grammar`` (a bad schema or regex is an
``EdgeftError`` naming the problem, before any token is generated); ``Grammar.mask()`` gives a
fresh ``GrammarMask`` per sequence, a ``LogitProcessor`` (``__call__(logits)`` pushes every
token the grammar forbids to ``-inf``; ``accept(token)`` advances it). When the grammar is
complete only end-of-sequence tokens stay allowed, so a finished output ends with
``finish_reason`` "stop"; running out of tokens first gives "length" as usual. Sampling,
stop strings and the batched engine see a masked row and nothing else. For grammars built
around JSON (tool calls): ``lark_json`` embeds a schema in a Lark grammar in the same fixed
layout as ``json_schema``, and ``closed`` shuts a schema's objects to their declared keys.

The engine is llguidance (MIT, a Rust wheel with no dependencies). Against the other
candidates that install without torch it was chosen because it compiles a schema per request
in milliseconds where outlines-core builds a whole-vocabulary index (seconds for a small
schema on SmolLM2's 49k tokens), because it covers much more of JSON Schema (``$ref``,
``anyOf``/``oneOf``, recursion, ``additionalProperties``, bounded numbers and lengths)
than a schema-to-regex translation, and because it reads a ``tokenizer.json`` directly
(byte-level BPE and special tokens included). xgrammar needs torch; lm-format-enforcer is
pure Python per token. The measured comparison lives in ``benchmarks/results/constrained.md``.

This module knows llguidance, token ids and logits; nothing of graphs, HTTP or chat templates.
"""

from __future__ import annotations

import enum
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.errors import EdgeftError

# How JSON is laid out: one space after ':' and ',' (as json.dumps writes it), no free
# whitespace, so a small model cannot wander into newlines and indentation forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
RUST_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


class ConstraintError(EdgeftError):
    """A constraint the grammar engine cannot compile (bad schema, regex or grammar)."""


class Kind(str, enum.Enum):
    """What a constraint holds the output to."""

    json_schema = "json_schema"
    json_object = "json_object"
    regex = "regex"
    choice = "choice"
    lark = "lark"


@dataclass(frozen=True)
class Constraint:
    """What the generated text must be; build one with the class methods."""

    kind: Kind
    source: str  # the schema as JSON text, the regex, the choices as a JSON list, or the Lark grammar

    @classmethod
    def json_schema(cls, schema: dict | str) -> "Constraint":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ConstraintError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ConstraintError("a JSON schema must be a JSON object")
        return cls(Kind.json_schema, json.dumps(schema))  # key order kept: properties come in the order given

    @classmethod
    def json_object(cls) -> "Constraint":
        return cls(Kind.json_object, '{"type": "object"}')

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError("a regex constraint needs a non-empty pattern")
        return cls(Kind.regex, pattern)

    @classmethod
    def choice(cls, options: list[str] | tuple[str, ...]) -> "Constraint":
        opts = list(options)
        if not opts or any(not isinstance(o, str) or not o for o in opts):
            raise ConstraintError("a choice constraint needs one or more non-empty strings")
        return cls(Kind.choice, json.dumps(opts))

    @classmethod
    def lark(cls, grammar: str) -> "Constraint":
        if not isinstance(grammar, str) or not grammar.strip():
            raise ConstraintError("a Lark grammar must be a non-empty string")
        return cls(Kind.lark, grammar)

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar (not yet checked)."""
        import llguidance

        if self.kind in (Kind.json_schema, Kind.json_object):
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
        if self.kind is Kind.regex:
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind is Kind.choice:
            return llguidance.LLMatcher.grammar_from_regex("|".join(escape(o) for o in json.loads(self.source)))
        return llguidance.LLMatcher.grammar_from_lark(self.source)


def lark_json(schema: dict) -> str:
    """``schema`` as a Lark ``%json`` rule body, laid out as ``JSON_OPTIONS`` says (a bare ``%json``
    would allow any run of whitespace between its tokens)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


# Keywords whose value is one schema, a list of schemas, or a name -> schema map.
_ONE = ("items", "additionalItems", "contains", "additionalProperties", "if", "then", "else", "unevaluatedItems")
_MANY = ("prefixItems", "anyOf", "oneOf")
_NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed(schema: Any, strict: bool = False, _self: bool = True) -> Any:
    """``schema`` with every object closed to its declared keys, unless it allows others explicitly.

    An object schema (``"type": "object"``, or ``properties`` without a type) that says nothing of
    ``additionalProperties`` (nor ``unevaluatedProperties``) gets ``additionalProperties: false``,
    at every depth: what llama.cpp's tool grammars assume, so a small model cannot wander into
    keys nobody declared. ``strict`` (OpenAI's ``strict: true``) closes every object, whatever it
    says, and requires every declared property. ``allOf`` branches and ``not`` stay as they are
    (closing them would change what the whole accepts); what the branches nest is still closed."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _ONE and isinstance(value, dict):
            out[key] = closed(value, strict)
        elif key in _MANY + ("allOf", "items") and isinstance(value, list):
            out[key] = [closed(v, strict, key != "allOf") for v in value]
        elif key in _NAMED and isinstance(value, dict):
            out[key] = {name: closed(v, strict) for name, v in value.items()}
        else:
            out[key] = value
    if not _self or not _is_object(schema) or "allOf" in schema:
        return out
    if strict:
        out.pop("unevaluatedProperties", None)
        out["additionalProperties"] = False
        if isinstance(schema.get("properties"), dict):
            out["required"] = list(schema["properties"])
    elif "additionalProperties" not in schema and "unevaluatedProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _is_object(schema: dict) -> bool:
    kind = schema.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or (kind is None and "properties" in schema)


def escape(text: str) -> str:
    """``text`` as a literal in llguidance's (Rust) regex syntax."""
    return "".join("\\" + c if c in RUST_REGEX_META else c for c in text)


# ---------------------------------------------------------------- the tokenizer side

class TokenSpace:
    """One artifact's vocabulary as llguidance sees it (building it takes a second or two: keep one)."""

    def __init__(self, tokenizer_json: Path | str, vocab_size: int, eos_ids: list[int]) -> None:
        import llguidance

        self.path = Path(tokenizer_json)
        text = self.path.read_text(encoding="utf-8")
        if not eos_ids:
            raise EdgeftError("constrained decoding needs the model's end-of-sequence token")
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.tokenizer = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=self.eos_ids)
        self.words = (vocab_size + 31) // 32

    def compile(self, constraint: Constraint) -> "Grammar":
        """Check and compile ``constraint``; ``ConstraintError`` names what is wrong with it."""
        import llguidance

        try:
            text = constraint.grammar_text()
        except (ValueError, TypeError) as exc:
            raise ConstraintError(f"cannot compile the {constraint.kind.value} constraint: {exc}") from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, self.tokenizer)
        if failed:
            raise ConstraintError(f"cannot compile the {constraint.kind.value} constraint: {_first_line(messages)}")
        grammar = Grammar(self, constraint, text)
        grammar.mask()  # a grammar that validates may still fail to start (e.g. an empty language)
        return grammar


def _first_line(messages: list[str]) -> str:
    text = (messages[0] if messages else "unknown error").strip()
    return text.splitlines()[0][:300] if text else "unknown error"


_spaces: dict[tuple[str, int, tuple[int, ...]], TokenSpace] = {}
_spaces_lock = threading.Lock()


def token_space(tokenizer_json: Path | str, vocab_size: int, eos_ids: list[int] | frozenset[int]) -> TokenSpace:
    """The ``TokenSpace`` of a tokenizer file, built once per process and shared."""
    key = (str(Path(tokenizer_json).resolve()), int(vocab_size), tuple(sorted(eos_ids)))
    with _spaces_lock:
        if key not in _spaces:
            _spaces[key] = TokenSpace(tokenizer_json, vocab_size, sorted(eos_ids))
        return _spaces[key]


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint for one vocabulary; ``mask()`` starts a processor for one sequence."""

    space: TokenSpace
    constraint: Constraint
    text: str

    def mask(self) -> "GrammarMask":
        import llguidance

        matcher = llguidance.LLMatcher(self.space.tokenizer, self.text, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"cannot compile the {self.constraint.kind.value} constraint: "
                                  f"{_first_line([matcher.get_error()])}")
        return GrammarMask(matcher, self.space)


class GrammarMask:
    """A ``LogitProcessor``: forbids every token the grammar does not allow next."""

    def __init__(self, matcher: Any, space: TokenSpace) -> None:
        self.matcher, self.space = matcher, space
        self.bits = np.zeros((1, space.words), dtype=np.int32)
        self.eos = np.asarray(space.eos_ids)

    def allowed(self) -> np.ndarray:
        """The tokens allowed next, as a bool array [vocab]."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        return np.unpackbits(self.bits.view(np.uint8), bitorder="little")[:self.space.vocab_size].view(bool)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        ok = self.allowed()
        n = min(logits.size, ok.size)
        if self.matcher.is_error() or not ok.any():
            ok = np.zeros(n, dtype=bool)  # nothing can follow: end the sequence
            ok[self.eos[self.eos < n]] = True
        logits[:n][~ok[:n]] = -np.inf
        logits[n:] = -np.inf
        return logits

    def accept(self, token: int) -> None:
        if int(token) in self.space.eos_ids:
            return
        self.matcher.consume_token(int(token))

    @property
    def done(self) -> bool:
        """Whether the text so far is complete (the grammar accepts it)."""
        return self.matcher.is_accepting()


def compile_for(generator: Any, constraint: Constraint) -> Grammar:
    """``constraint`` compiled for a ``Generator``'s vocabulary (its logits width and EOS tokens).

    ``compile_for(gen, c).mask()`` is the processor to hand ``gen.generate(..., processors=[...])``.
    """
    tok = generator.folder / generator.manifest.tokenizer.file
    return token_space(tok, generator.decoder.vocab_size, generator.eos_ids).compile(constraint)
