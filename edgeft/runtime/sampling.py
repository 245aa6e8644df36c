"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

The processors run in the order transformers' ``generate`` uses (repetition penalty, then
temperature, top-k, top-p) so that seeded sampling here means what it means there. This
module knows numpy arrays of logits and token ids only; nothing of graphs or text.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeft.errors import EdgeftError

@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string is one stop, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 1:
            raise EdgeftError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise EdgeftError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k < 0:
            raise EdgeftError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise EdgeftError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise EdgeftError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise EdgeftError(f"seed must be an integer in 0..2**64-1, got {self.seed}")
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


class Sampler:
    """Picks tokens for one generation; holds its random state and the ids seen so far."""

    def __init__(self, params: SamplingParams, vocab_size: int, seen: list[int] | None = None) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._penalize = params.repetition_penalty != 1.0
        self._seen_mask = np.zeros(vocab_size, dtype=bool)
        self._seen: list[int] = []
        for t in seen or ():
            self.observe(t)

    def observe(self, token: int) -> None:
        """Record a token of the context (for the repetition penalty)."""
        if self._penalize and 0 <= token < self._seen_mask.size and not self._seen_mask[token]:
            self._seen_mask[token] = True
            self._seen.append(token)

    def __call__(self, logits: np.ndarray) -> int:
        """The next token for ``logits`` [vocab] (float32; may be modified in place)."""
        p = self.params
        if self._penalize and self._seen:
            logits = apply_repetition_penalty(logits, np.asarray(self._seen), p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        return sample(logits, p.temperature, p.top_k, p.top_p, self.rng)


def apply_repetition_penalty(logits: np.ndarray, ids: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: divide positive logits, multiply negative ones."""
    picked = logits[ids]
    logits[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def candidates(logits: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray | None, np.ndarray]:
    """Token ids allowed by top-k then top-p, and their probabilities (summing to 1), best first.

    ids is None when every token stays a candidate (probabilities then cover the vocabulary).
    Selection never sorts the whole vocabulary: it widens a logit threshold below the best
    token until the tokens above it are enough (k of them, or top_p of the mass), then sorts those.
    """
    v = logits.size
    m = logits.max()
    e = np.exp(logits - m)
    z = float(e.sum())
    k = top_k if 0 < top_k < v else v
    if k == v and top_p >= 1.0:  # plain temperature sampling: no selection
        return None, e / z
    d = 4.0
    while True:
        ids = np.flatnonzero(logits >= m - d)
        enough = ids.size >= k if k < v else float(e[ids].sum()) >= top_p * z
        if enough or ids.size == v or d > 1e4:
            break
        d *= 2
    ids = ids[np.argsort(logits[ids], kind="stable")[::-1]][:k]
    probs = e[ids].astype(np.float64)
    probs /= probs.sum() if k < v else z  # top-p acts on the distribution top-k left
    if top_p < 1.0:
        keep = min(int(np.searchsorted(np.cumsum(probs), top_p)) + 1, ids.size)  # smallest set reaching top_p
        ids, probs = ids[:keep], probs[:keep]
    return ids, probs / probs.sum()


def draw(probs: np.ndarray, u: float, block: int = 512) -> int:
    """The index where ``u`` (in [0, 1)) falls in the cumulative distribution of ``probs``.

    Large vocabularies go block by block (sum blocks, find the block, then scan inside it),
    which is several times cheaper than one cumulative sum over 50k float32 values.
    """
    n = probs.size
    if n <= 4 * block:
        cdf = np.cumsum(probs)
        return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), n - 1)
    nb = n // block
    sums = probs[:nb * block].reshape(nb, block).sum(axis=1, dtype=np.float64)
    cdf = np.cumsum(np.append(sums, probs[nb * block:].sum(dtype=np.float64)))
    target = u * cdf[-1]
    b = min(int(np.searchsorted(cdf, target, side="right")), cdf.size - 1)
    inside = np.cumsum(probs[b * block:(b + 1) * block], dtype=np.float64) + (cdf[b - 1] if b else 0.0)
    return b * block + min(int(np.searchsorted(inside, target, side="right")), inside.size - 1)


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
           rng: np.random.Generator) -> int:
    """One draw from the temperature-scaled distribution restricted by top-k and top-p."""
    scaled = logits / np.float32(temperature) if temperature != 1.0 else logits
    ids, probs = candidates(scaled, top_k, top_p)
    i = draw(probs, rng.random())
    return int(ids[i]) if ids is not None else i
