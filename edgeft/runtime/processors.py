"""Logit processors: the stages a sequence's next-token logits pass through before a token is drawn.

A ``LogitProcessor`` is any object with two methods (a ``Protocol``, no base class):

- ``__call__(logits) -> logits``: take the row of next-token logits (``[vocab]`` float32,
  owned by the caller: edit it in place or return a new array) and return the row to use.
  Push a token out with ``-inf``; never make every entry ``-inf``.
- ``accept(token)``: the token that was chosen from the row it returned (update state).

One instance serves one sequence (it may keep state, e.g. a grammar's position), and is
called once per generated token, in order. ``Sampler`` (``edgeft.runtime.sampling``) runs
its chain as: repetition penalty, presence/frequency penalties, ``logit_bias``, then any
processors it was given (masks such as a grammar), then temperature, top-k, top-p,
min-p and typical-p select the candidates. Logprobs are the log-softmax of the row after the chain and
before temperature.

This module knows numpy arrays of logits and token ids; nothing of graphs, text or HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class LogitProcessor(Protocol):
    """One stage of the sampling chain for one sequence."""

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """The processed logits ``[vocab]`` (float32); may edit ``logits`` in place."""
        ...

    def accept(self, token: int) -> None:
        """Record the token chosen after this step."""
        ...


def apply_repetition_penalty(logits: np.ndarray, ids: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: divide positive logits, multiply negative ones."""
    picked = logits[ids]
    logits[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return logits


class RepetitionPenalty:
    """transformers' ``repetition_penalty`` over every token of the context (prompt included)."""

    def __init__(self, penalty: float, vocab_size: int, context: Iterable[int] = ()) -> None:
        self.penalty = penalty
        self._mask = np.zeros(vocab_size, dtype=bool)
        self._ids: list[int] = []
        for t in context:
            self.accept(t)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self._ids:
            apply_repetition_penalty(logits, np.asarray(self._ids), self.penalty)
        return logits

    def accept(self, token: int) -> None:
        if 0 <= token < self._mask.size and not self._mask[token]:
            self._mask[token] = True
            self._ids.append(token)


class OccurrencePenalty:
    """OpenAI's ``presence_penalty`` and ``frequency_penalty`` over the generated tokens.

    ``logit[t] -= presence * (count[t] > 0) + frequency * count[t]``, counting only the
    tokens generated so far (as vLLM and the OpenAI reference do), not the prompt.
    """

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence, self.frequency = presence, frequency
        self._counts: dict[int, int] = {}

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self._counts:
            ids = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
            logits[ids] -= np.float32(self.presence) + np.float32(self.frequency) * counts
        return logits

    def accept(self, token: int) -> None:
        self._counts[token] = self._counts.get(token, 0) + 1


class LogitBias:
    """OpenAI's ``logit_bias``: a fixed number added to the logits of some token ids."""

    def __init__(self, bias: Mapping[int, float]) -> None:
        self.ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self.values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        logits[self.ids] += self.values
        return logits

    def accept(self, token: int) -> None:
        pass


class TokenMask:
    """Allow only ``allowed`` token ids (a fixed mask; a grammar would recompute it per step)."""

    def __init__(self, allowed: Iterable[int], vocab_size: int) -> None:
        self.blocked = np.ones(vocab_size, dtype=bool)
        self.blocked[np.fromiter(allowed, dtype=np.int64)] = False

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        logits[self.blocked] = -np.inf
        return logits

    def accept(self, token: int) -> None:
        pass


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log(softmax(logits))`` in float32, stable for large and ``-inf`` entries."""
    m = logits.max()
    shifted = logits - m
    return shifted - np.float32(np.log(np.exp(shifted).sum()))
