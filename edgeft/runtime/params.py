"""The runtime's settings types: ``SamplingParams``, ``Speculation`` and ``Spin``.

``SamplingParams`` (how to pick tokens and when to stop) is the one table of sampling
settings: each field declares its default, its docstring (the flag's ``--help``), its
``edgeft generate`` flag (``flag``), its allowed range (``param(lo=..., hi=...)``, kept as ``flag``'s bounds) and its
name on the HTTP wire. ``check`` tests a value against a field's range; ``SamplingParams``
runs it on construction and the server's request parser (``edgeft.runtime.serve.wire``)
runs it on each field it reads, so a range is declared once. A new sampling setting is
one field here (plus where the runtime applies it).

The defaults of the fields an artifact may set (``max_new_tokens``, ``temperature``,
``top_k``, ``top_p``, ``repetition_penalty``) are the manifest's: ``edgeft.artifact.Generation``
declares them and this table reads them from there (never the reverse), and ``over`` puts an
artifact's own section under what a request gives.

Standard library only, plus the manifest (no numpy, no onnxruntime), so ``edgeft --help``
imports it on an install without the runtime extra; it knows nothing of graphs, tokenizers
or HTTP.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from edgeft.artifact import Generation
from edgeft.errors import EdgeftError
from edgeft.flags import field_problem, flag

MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1  # a seed is a non-negative int64, as in most OpenAI-compatible servers
WIRE = "edgeft.wire"

# --help panel of edgeft generate and chat.
SAMPLING = "Sampling"


class Speculation(str, enum.Enum):
    """Prompt-lookup speculative decoding: switched by its acceptance rate, always, or never."""

    auto = "auto"
    on = "on"
    off = "off"


class Spin(str, enum.Enum):
    """Whether onnxruntime's idle pool threads spin between parallel sections or sleep."""

    auto = "auto"  # decided when the model loads (edgeft.runtime.session.choose_spin)
    on = "on"
    off = "off"

    @classmethod
    def _missing_(cls, value: object) -> "Spin | None":
        """``EDGEFT_SPIN=1`` (or 0, true, false, yes, no) and any case: the spellings the variable always took."""
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return cls.on
        if text in ("0", "false", "no", "off"):
            return cls.off
        return cls.auto if text in ("", "auto") else None


def param(*names: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
          wire: str | None = "", **flag_kw: Any) -> dict[str, Any]:
    """Field metadata: the flag (``edgeft.flags.flag``, which holds the range: ``lo`` to ``hi``, ``lo``
    excluded when ``lo_open``) and the name on the wire.

    ``wire``: "" (the field's name), another name, or None (the wire format reads it its own way)."""
    return {**flag(*names, min=None if lo_open else lo, above=lo if lo_open else None, max=hi, **flag_kw),
            WIRE: wire}


def check(f: dataclasses.Field, value: Any, name: str | None = None) -> str | None:
    """Why ``value`` is out of ``f``'s declared range (a message naming ``name``), or None.

    The range and its wording are ``edgeft.flags``' (one checker for every config and the wire)."""
    problem = None if value is None else field_problem(f, value)
    return f"{name or f.name} {problem}, got {value}" if problem else None


def wire_fields() -> list[tuple[str, dataclasses.Field, type]]:
    """(name on the wire, field, scalar type: int, float or bool) for every field the wire reads by the table."""
    hints = get_type_hints(SamplingParams)
    out: list[tuple[str, dataclasses.Field, type]] = []
    for f in dataclasses.fields(SamplingParams):
        name = f.metadata.get(WIRE, None)
        if name is None:
            continue
        kind = next(t for t in (bool, int, float) if t == hints[f.name] or t | None == hints[f.name])
        out.append((name or f.name, f, kind))
    return out


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_new_tokens: int = field(default=Generation.max_new_tokens,
                                metadata=param(lo=1, wire=None, panel=SAMPLING))
    """Most tokens to generate."""
    temperature: float = field(default=Generation.temperature, metadata=param("-t", lo=0, hi=2, panel=SAMPLING))
    """0 is greedy; higher is more random."""
    top_k: int = field(default=Generation.top_k, metadata=param(lo=0, panel=SAMPLING))
    """Sample only among the k most likely tokens (0: off)."""
    top_p: float = field(default=Generation.top_p, metadata=param(lo=0, hi=1, lo_open=True, panel=SAMPLING))
    """Sample only among the most likely tokens holding this much probability (1: off)."""
    min_p: float = field(default=0.0, metadata=param(lo=0, hi=1, cli=False))
    """Drop tokens whose probability is below min_p times the most likely one's (0: off)."""
    typical_p: float = field(default=1.0, metadata=param(lo=0, hi=1, lo_open=True, panel=SAMPLING))
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, holding this much
    probability (1: off)."""
    repetition_penalty: float = field(default=Generation.repetition_penalty,
                                      metadata=param(lo=0, hi=10, lo_open=True, panel=SAMPLING))
    """Above 1 discourages repeating tokens of the context (1: off)."""
    presence_penalty: float = field(default=0.0, metadata=param(lo=-2, hi=2, cli=False))
    """Subtracted from the logit of every token generated at least once (OpenAI's, -2..2)."""
    frequency_penalty: float = field(default=0.0, metadata=param(lo=-2, hi=2, cli=False))
    """Subtracted once per earlier occurrence in the generated tokens (OpenAI's, -2..2)."""
    logit_bias: tuple[tuple[int, float], ...] = field(default=(), metadata=param(wire=None, cli=False))
    """(token id, bias) pairs added to the logits (a mapping is accepted too)."""
    seed: int | None = field(default=None, metadata=param(lo=0, hi=MAX_SEED, panel=SAMPLING))
    """Random seed: the same seed and settings give the same text."""
    stop: tuple[str, ...] = field(default=(), metadata=param(wire=None, panel=SAMPLING))
    """End generation where this text appears (repeatable); it is not part of the output."""
    ignore_eos: bool = field(default=False, metadata=param(cli=False))
    """Keep generating past end-of-sequence tokens (until max_new_tokens or a stop string)."""
    logprobs: int | None = field(default=None, metadata=param(lo=0, hi=MAX_TOP_LOGPROBS, wire=None, cli=False))
    """Report each chosen token's logprob and this many top alternatives (None: off; 0..20)."""
    speculate: Speculation = field(default=Speculation.auto, metadata=param(wire=None, panel=SAMPLING))
    """Prompt-lookup speculative decoding: drafts copied from the prompt's and output's own tokens,
    several verified per step (faster on repeating, rewriting or extracting; the same tokens, up to an int8
    graph's rounding). auto switches it off while drafts are mostly rejected."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "speculate", Speculation(self.speculate))
        except ValueError:
            raise EdgeftError(f"speculate must be auto, on or off, got {self.speculate!r}") from None
        if isinstance(self.stop, str):  # a lone string is one stop, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        self._validate()

    def _validate(self) -> None:
        if self.seed is not None and not isinstance(self.seed, int):
            raise EdgeftError(f"seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}")
        for f in dataclasses.fields(self):
            problem = check(f, getattr(self, f.name))
            if problem is not None:
                raise EdgeftError(problem)
        if any(not (t >= 0 and math.isfinite(b)) for t, b in self.logit_bias):
            raise EdgeftError("logit_bias takes non-negative token ids and finite biases")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise EdgeftError("stop strings must be non-empty strings")

    @classmethod
    def over(cls, defaults: Generation | None, **given: Any) -> "SamplingParams":
        """``given`` values (None: not given) over an artifact's ``manifest.generation`` defaults.

        ``defaults`` may be None (an artifact without them): then ``Generation``'s own apply.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in dataclasses.asdict(defaults).items() if k in names} if defaults else {}
        kw.update({k: v for k, v in given.items() if v is not None})
        return cls(**kw)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
