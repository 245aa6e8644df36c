"""The settings of ``edgeft generate`` and ``edgeft chat``, and ``SamplingParams``.

``SamplingParams`` (how to pick tokens and when to stop) is the runtime's
(``edgeft.runtime.sampling`` re-exports it) and the CLI's at once: each field's default
and docstring are the runtime's default and the sampling flag's help, and an artifact's
manifest defaults (``artifact.Generation``) start from the same values. ``ChatConfig``
(what chat and generate share) and ``GenerateConfig`` hold the rest of their flags.

Standard library only, so ``edgeft --help`` works on an install without the runtime
extra; it knows nothing of graphs, tokenizers or numpy.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.flags import check_fields, flag

MAX_TOP_LOGPROBS = 20


class Speculation(str, enum.Enum):
    """Prompt-lookup speculative decoding: switched by its acceptance rate, always, or never."""

    auto = "auto"
    on = "on"
    off = "off"

# --help panels of edgeft generate and chat.
SAMPLING, CONSTRAIN, FILE = "Sampling", "Constrained output", "A file of prompts"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_new_tokens: int = field(default=128, metadata=flag(panel=SAMPLING, aliases=("-n",)))
    """Most tokens to generate."""
    temperature: float = field(default=0.0, metadata=flag("-t", panel=SAMPLING))
    """0 is greedy; higher is more random."""
    top_k: int = field(default=0, metadata=flag(panel=SAMPLING))
    """Sample only among the k most likely tokens (0: off)."""
    top_p: float = field(default=1.0, metadata=flag(panel=SAMPLING))
    """Sample only among the most likely tokens holding this much probability (1: off)."""
    min_p: float = field(default=0.0, metadata=flag(cli=False))
    """Drop tokens whose probability is below min_p times the most likely one's (0: off)."""
    repetition_penalty: float = field(default=1.0, metadata=flag(panel=SAMPLING))
    """Above 1 discourages repeating tokens of the context (1: off)."""
    presence_penalty: float = field(default=0.0, metadata=flag(cli=False))
    """Subtracted from the logit of every token generated at least once (OpenAI's, -2..2)."""
    frequency_penalty: float = field(default=0.0, metadata=flag(cli=False))
    """Subtracted once per earlier occurrence in the generated tokens (OpenAI's, -2..2)."""
    logit_bias: tuple[tuple[int, float], ...] = field(default=(), metadata=flag(cli=False))
    """(token id, bias) pairs added to the logits (a mapping is accepted too)."""
    seed: int | None = field(default=None, metadata=flag(panel=SAMPLING))
    """Random seed: the same seed and settings give the same text."""
    stop: tuple[str, ...] = field(default=(), metadata=flag(panel=SAMPLING))
    """End generation where this text appears (repeatable); it is not part of the output."""
    ignore_eos: bool = field(default=False, metadata=flag(cli=False))
    """Keep generating past end-of-sequence tokens (until max_new_tokens or a stop string)."""
    logprobs: int | None = field(default=None, metadata=flag(cli=False))
    """Report each chosen token's logprob and this many top alternatives (None: off; 0..20)."""
    speculate: Speculation = field(default=Speculation.auto, metadata=flag(panel=SAMPLING))
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
        if self.max_new_tokens < 1:
            raise EdgeftError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise EdgeftError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k < 0:
            raise EdgeftError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise EdgeftError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise EdgeftError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise EdgeftError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise EdgeftError(f"seed must be an integer in 0..2**64-1, got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise EdgeftError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not (t >= 0 and math.isfinite(b)) for t, b in self.logit_bias):
            raise EdgeftError("logit_bias takes non-negative token ids and finite biases")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise EdgeftError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise EdgeftError("stop strings must be non-empty strings")

    @classmethod
    def over(cls, defaults: Any, **given: Any) -> "SamplingParams":
        """``given`` values (None: not given) over an artifact's ``manifest.generation`` defaults.

        ``defaults`` may be None (an artifact without them): then the class defaults apply.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in dataclasses.asdict(defaults).items() if k in names} if defaults else {}
        kw.update({k: v for k, v in given.items() if v is not None})
        return cls(**kw)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class ChatConfig:
    """What ``edgeft chat`` and ``edgeft generate`` share (their sampling flags are ``SamplingParams``)."""

    artifact: str = field(metadata=flag(argument=True))
    """Artifact folder or packed .edgeft file (from `edgeft export`)."""
    system: str | None = None
    """A system message that starts the conversation (generate: with --chat)."""
    threads: int | None = field(default=None, metadata=flag(min=1))
    """onnxruntime threads [default: all usable cores, or $EDGEFT_THREADS]."""
    stats: bool = False
    """Print token counts, tokens/s and the draft acceptance rate to stderr at the end (chat: of each reply)."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class GenerateConfig(ChatConfig):
    """``edgeft generate``: one prompt streamed, or a file of prompts decoded together."""

    prompt: str | None = field(default=None, metadata=flag(argument=True))
    """The prompt; omit it or pass '-' to read it from stdin."""
    chat: bool = False
    """Send the prompt as one user message through the chat template."""
    json_schema: Path | None = field(default=None, metadata=flag(panel=CONSTRAIN))
    """Constrain the output to JSON valid under the JSON schema in this file."""
    regex: str | None = field(default=None, metadata=flag(panel=CONSTRAIN))
    """Constrain the output to match this regular expression."""
    choice: str | None = field(default=None, metadata=flag(panel=CONSTRAIN))
    """Constrain the output to one of these comma-separated strings."""
    input: Path | None = field(default=None, metadata=flag("--input", "-i", panel=FILE))
    """A JSONL file of prompts (strings, or objects with 'prompt' or 'messages'), generated together; one JSON
    result per line out."""
    output: Path | None = field(default=None, metadata=flag("--output", "-o", panel=FILE))
    """With --input: write the results here, not to stdout."""
    parallel: int = field(default=8, metadata=flag(panel=FILE, min=1))
    """With --input: prompts decoded together in one batch."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if sum(x is not None for x in (self.json_schema, self.regex, self.choice)) > 1:
            raise EdgeftError("give at most one of --json-schema, --regex and --choice")
        if self.input is not None and self.prompt is not None:
            raise EdgeftError("give a prompt or --input FILE, not both")
        if self.input is not None and self.constrained:
            raise EdgeftError("--json-schema, --regex and --choice constrain one prompt: not with --input")

    @property
    def constrained(self) -> bool:
        return any(x is not None for x in (self.json_schema, self.regex, self.choice))
