"""Choosing the next token from logits: the logit-processor chain, then greedy or a seeded draw.

The chain (``edgeft.runtime.processors``) runs repetition penalty, presence/frequency
penalties, ``logit_bias`` and any extra processors (masks); then temperature, top-k,
top-p, min-p and typical-p pick the candidates, in the order transformers' ``generate`` uses, so
that seeded sampling here means what it means there. This module knows numpy arrays of
logits and token ids only; nothing of graphs or text. ``SamplingParams`` (the settings)
is declared in ``edgeft.runtime.params``, torch- and numpy-free, with the CLI flags.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from edgeft.runtime.params import SamplingParams
from edgeft.runtime.processors import (LogitBias, LogitProcessor, OccurrencePenalty, RepetitionPenalty,
                                       apply_repetition_penalty, log_softmax)

__all__ = ["SamplingParams", "Sampler", "TokenLogprob", "LogitProcessor", "apply_repetition_penalty",
           "candidates", "draw", "sample"]


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the most likely alternatives (id, logprob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Sampler:
    """Picks tokens for one sequence: its processor chain, its random state, its logprobs.

    ``seen`` is the context (the prompt) for the repetition penalty; ``processors`` are
    extra chain stages (``LogitProcessor``: e.g. a grammar mask) run after the built-in ones.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, seen: Iterable[int] | None = None,
                 processors: Iterable[LogitProcessor] = ()) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.vocab_size = vocab_size
        self.chain: list[LogitProcessor] = []
        if params.repetition_penalty != 1.0:
            self.chain.append(RepetitionPenalty(params.repetition_penalty, vocab_size, seen or ()))
        if params.presence_penalty or params.frequency_penalty:
            self.chain.append(OccurrencePenalty(params.presence_penalty, params.frequency_penalty))
        bias = {t: b for t, b in params.logit_bias if t < vocab_size}
        if bias:
            self.chain.append(LogitBias(bias))
        self.chain.extend(processors)

    def accept(self, token: int) -> None:
        """Tell every stage of the chain which token was chosen."""
        for proc in self.chain:
            proc.accept(token)

    def process(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` [vocab] (float32, may be modified in place) through the chain."""
        for proc in self.chain:
            logits = proc(logits)
        return logits

    def select(self, logits: np.ndarray) -> int:
        """Greedy, or a seeded draw after temperature, top-k, top-p and min-p, from processed logits."""
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        return sample(logits, p.temperature, p.top_k, p.top_p, self.rng, p.min_p, p.typical_p)

    def __call__(self, logits: np.ndarray) -> int:
        """The next token for ``logits`` [vocab] (float32; may be modified in place)."""
        return self.select(self.process(logits))

    def pick(self, logits: np.ndarray) -> tuple[int, TokenLogprob | None]:
        """The next token and, when ``params.logprobs`` is set, its logprob and the top alternatives."""
        x = self.process(logits)
        token = self.select(x)
        if self.params.logprobs is None:
            return token, None
        return token, token_logprob(x, token, self.params.logprobs)


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """``token``'s log-softmax over ``logits`` and the ``top`` best (id, logprob), best first."""
    lp = log_softmax(logits)
    best: tuple[tuple[int, float], ...] = ()
    if top:
        ids = np.argpartition(-lp, top - 1)[:top] if top < lp.size else np.arange(lp.size)
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        best = tuple((int(i), float(lp[i])) for i in ids)
    return TokenLogprob(int(token), float(lp[token]), best)


def candidates(logits: np.ndarray, top_k: int, top_p: float, min_p: float = 0.0, typical_p: float = 1.0
               ) -> tuple[np.ndarray | None, np.ndarray]:
    """Token ids allowed by top-k, then top-p, then min-p, then typical-p, and their probabilities (summing to 1),
    best first.

    ids is None when every token stays a candidate (probabilities then cover the vocabulary).
    Selection never sorts the whole vocabulary: it widens a logit threshold below the best
    token until the tokens above it are enough (k of them, or top_p of the mass), then sorts those.
    """
    if typical_p < 1.0:
        ids, probs = candidates(logits, top_k, top_p, min_p)
        return typical(np.arange(logits.size) if ids is None else ids, probs, typical_p)
    v = logits.size
    m = logits.max()
    e = np.exp(logits - m)
    z = float(e.sum())
    k = top_k if 0 < top_k < v else v
    if k == v and top_p >= 1.0 and min_p <= 0.0:  # plain temperature sampling: no selection
        return None, e / z
    if k == v and top_p >= 1.0:  # min-p alone: p / p_max >= min_p is a threshold on the logit
        ids = np.flatnonzero(logits >= m + np.float32(math.log(min_p)))
        ids = ids[np.argsort(logits[ids], kind="stable")[::-1]]
        probs = e[ids].astype(np.float64)
        return ids, probs / probs.sum()
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
    if min_p > 0.0:  # probs are best first: keep those at least min_p of the first
        keep = max(1, int(np.count_nonzero(probs >= min_p * probs[0])))
        ids, probs = ids[:keep], probs[:keep]
    return ids, probs / probs.sum()


def typical(ids: np.ndarray, probs: np.ndarray, mass: float) -> tuple[np.ndarray, np.ndarray]:
    """Locally typical sampling (Meister et al., as transformers' ``TypicalLogitsWarper``): the tokens whose
    surprise ``-log p`` is closest to the entropy, the closest first, until they hold ``mass``; in ``ids``' order."""
    with np.errstate(divide="ignore"):
        logp = np.log(probs)
    entropy = -float(np.sum(probs * np.where(probs > 0, logp, 0.0)))
    order = np.argsort(np.abs(-logp - entropy), kind="stable")
    keep = min(int(np.count_nonzero(np.cumsum(probs[order]) < mass)), order.size - 1) + 1
    kept = np.sort(order[:keep])  # back to best first
    return ids[kept], probs[kept] / probs[kept].sum()


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
           rng: np.random.Generator, min_p: float = 0.0, typical_p: float = 1.0) -> int:
    """One draw from the temperature-scaled distribution restricted by top-k, top-p, min-p and typical-p."""
    scaled = logits / np.float32(temperature) if temperature != 1.0 else logits
    ids, probs = candidates(scaled, top_k, top_p, min_p, typical_p)
    i = draw(probs, rng.random())
    return int(ids[i]) if ids is not None else i
