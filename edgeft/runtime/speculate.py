"""Speculative decoding without a second model: drafts looked up in the sequence's own tokens.

A sequence that repeats, rewrites or extracts from its prompt (or from what it already
wrote) often continues with tokens it has seen before, after the same few tokens. The
``Lookup`` drafter keeps, per n-gram of the sequence (prompt and generated), where it last
occurred; when the sequence's last n tokens occurred before, the tokens that followed
them then are the draft (prompt lookup, as llama.cpp's ngram speculation and
transformers' ``prompt_lookup_num_tokens``). The caller feeds the pending token and the
``k`` draft tokens to the graph in one step and samples each of the ``k + 1`` positions in
order with the sequence's own sampler: a drafted token is accepted when the token sampled
at its position equals it, and the first disagreement ends the step (that sampled token
is kept: every step yields at least one token). Each token is drawn from the same
distribution, with the same random numbers in the same order, as plain decoding would
draw it, so the output is unchanged (greedy and seeded sampling alike), only sooner: exactly
so where the graph's multi-token steps compute what its one-token steps do (fp32 artifacts);
an int8 artifact's multi-token kernels round differently (as its prompt prefill does), so its
text may part from plain decoding's where two tokens are nearly tied.

Whether a draft is worth its cost is decided per sequence by ``Speculator``: in ``auto``
mode it stops drafting when the share of drafted tokens accepted over its last few drafts
falls below a break-even rate, and tries again after a pause that doubles each time it
fails. ``on`` drafts whenever a match exists; ``off`` never drafts.

This module knows token ids only; nothing of graphs, logits or text.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from edgeft.runtime.params import Speculation

__all__ = ["Speculation", "Lookup", "SpecCounts", "Speculator"]


DRAFT_TOKENS = 4  # k: tokens drafted per step at first; +2 after a fully accepted draft, -1 after a miss
DRAFT_MIN, DRAFT_MAX = 2, 6
NGRAM_MAX = 3  # the longest suffix looked up
NGRAM_MIN = 2  # the shortest (single tokens match too often by chance)
# A step verifying up to DRAFT_MAX drafts costs about this many one-token steps (SmolLM2-135M int8
# on 2 cores; benchmarks/speculative.py measures it as verify_cost).
VERIFY_COST = 1.4
WINDOW = 6  # drafts over which auto mode judges the acceptance rate
# Alone, a draft pays when it gains more than the verification's extra cost: accepted tokens per
# step above VERIFY_COST - 1, i.e. an acceptance rate above this (with some margin for the loop).
BREAK_EVEN = 1.25 * (VERIFY_COST - 1) / DRAFT_TOKENS
RETRY = 16  # plain tokens before auto mode tries again (doubled after each failed retry)
RETRY_MAX = 256


class Lookup:
    """N-gram index of one sequence: the draft that followed the latest earlier match of its suffix."""

    def __init__(self, tokens: list[int] = (), ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN) -> None:
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.tokens: list[int] = []
        self._next: list[dict[tuple[int, ...], int]] = [{} for _ in range(ngram_max + 1)]  # n -> gram -> next pos
        self.extend(tokens)

    def extend(self, tokens) -> None:
        """Append tokens to the sequence (the index learns what followed each n-gram)."""
        for t in tokens:
            i = len(self.tokens)  # position of t: the n-grams ending just before it are followed by it
            for n in range(self.ngram_min, self.ngram_max + 1):
                if i >= n:
                    self._next[n][tuple(self.tokens[i - n:i])] = i
            self.tokens.append(int(t))

    def draft(self, k: int) -> list[int]:
        """``k`` tokens that followed the latest earlier occurrence of the longest matching suffix ([]: none)."""
        toks = self.tokens
        for n in range(min(self.ngram_max, len(toks)), self.ngram_min - 1, -1):
            pos = self._next[n].get(tuple(toks[-n:]))
            if pos is not None:
                return self._copy(pos, k)
        return []

    def _copy(self, pos: int, k: int) -> list[int]:
        """``k`` tokens copied from ``pos`` on; past the end, the copy goes on from the draft itself
        (a loop of period ``len - pos`` keeps looping)."""
        toks, out = self.tokens, []
        for j in range(pos, pos + k):
            out.append(toks[j] if j < len(toks) else out[j - len(toks)])
        return out


@dataclass
class SpecCounts:
    """Drafted and accepted tokens (one sequence's, or summed over many)."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # verification steps (graph calls that carried a draft)

    @property
    def rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def add(self, other: "SpecCounts") -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.steps += other.steps


class Speculator:
    """One sequence's drafter and its on/off switch (``mode``: a ``Speculation``)."""

    def __init__(self, tokens: list[int], mode: Speculation | str = Speculation.auto,
                 draft_tokens: int = DRAFT_TOKENS, counts: SpecCounts | None = None) -> None:
        self.mode = Speculation(mode)
        self.k = draft_tokens
        self.lookup = Lookup(tokens) if self.mode is not Speculation.off else None
        self.counts = counts if counts is not None else SpecCounts()  # the caller's, to sum over requests
        self._recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=WINDOW)
        self._pause = 0  # plain tokens left before auto mode drafts again
        self._retry = RETRY

    def extend(self, tokens) -> None:
        """Tokens the sequence now holds after the last ones (accepted or generated)."""
        if self.lookup is not None:
            self.lookup.extend(tokens)

    def draft(self, room: int) -> list[int]:
        """Draft tokens for the next step (at most ``room``; [] for a plain step)."""
        if self.lookup is None or room < 1:
            return []
        if self._pause > 0:
            self._pause -= 1
            return []
        return self.lookup.draft(min(self.k, room))

    def pays(self, rows: int) -> bool:
        """Whether to draft in a decode step of ``rows`` sequences, the others decoded in one call.

        Alone, a draft costs a verification call instead of a step (``draft``'s switch judges
        that). Beside others it costs a whole extra call (``VERIFY_COST`` steps) and saves
        nothing of theirs: it pays when this sequence's recent drafts were accepted by more
        than ``VERIFY_COST * rows`` tokens per step. ``on`` drafts regardless.
        """
        if self.lookup is None:
            return False
        if rows <= 1 or self.mode is Speculation.on:
            return True
        if not self._recent:
            return False
        return sum(a for _, a in self._recent) / len(self._recent) > VERIFY_COST * rows

    def record(self, drafted: int, accepted: int) -> None:
        """The outcome of one verification step; auto mode may switch drafting off for a while."""
        self.counts.drafted += drafted
        self.counts.accepted += accepted
        self.counts.steps += 1
        self.k = min(self.k + 2, DRAFT_MAX) if accepted == drafted else max(self.k - 1, DRAFT_MIN)
        if self.mode is not Speculation.auto:
            return
        self._recent.append((drafted, accepted))
        total = sum(d for d, _ in self._recent)
        if len(self._recent) >= min(3, WINDOW) and sum(a for _, a in self._recent) < BREAK_EVEN * total:
            self._pause, self._retry = self._retry, min(2 * self._retry, RETRY_MAX)
            self._recent.clear()
        elif len(self._recent) == WINDOW:
            self._retry = RETRY  # paying its way again: a later failure pauses briefly
