"""The sampling chain: penalties, logit_bias, min-p, masks (the LogitProcessor protocol),
ignore_eos and logprobs, on plain arrays and on the tiny llama artifact."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_artifacts import build

from edgeft.errors import EdgeftError
from edgeft.runtime import Generator, SamplingParams
from edgeft.runtime.processors import LogitProcessor, OccurrencePenalty, TokenMask, log_softmax
from edgeft.runtime.sampling import Sampler, candidates

PROMPT = "shall i compare thee to a summer's day"


@pytest.fixture(scope="module")
def llama(tiny_llama_dir, tmp_path_factory):
    return Generator.open(build("llama", str(tiny_llama_dir),
                                str(tmp_path_factory.getbasetemp() / "runtime-artifacts")))


def test_presence_and_frequency_penalties_count_generated_tokens():
    pen = OccurrencePenalty(presence=0.5, frequency=0.25)
    for t in (1, 1, 3):
        pen.accept(t)
    out = pen(np.zeros(4, dtype=np.float32))
    assert out.tolist() == [0.0, -1.0, 0.0, -0.75]


def test_logit_bias_and_a_mask_steer_greedy_choice():
    logits = np.array([3.0, 1.0, 0.0, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(), 4)(logits.copy()) == 0
    assert Sampler(SamplingParams(logit_bias={3: 5.0}), 4)(logits.copy()) == 3
    masked = Sampler(SamplingParams(temperature=1.0, seed=0), 4, processors=[TokenMask([1, 2], 4)])
    assert {masked(logits.copy()) for _ in range(50)} == {1, 2}


def test_min_p_keeps_tokens_within_the_ratio_of_the_best():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    ids, p = candidates(logits, 0, 1.0, min_p=0.25)  # keeps p >= 0.125
    assert ids.tolist() == [0, 1, 2] and np.allclose(p, probs[:3] / probs[:3].sum())
    ids, _ = candidates(logits, 3, 0.7, min_p=0.7)  # top-k, top-p ({0, 1}), then min-p (0.3 < 0.35)
    assert ids.tolist() == [0]


def test_params_refuse_out_of_range_values():
    for bad in ({"min_p": 1.5}, {"presence_penalty": 3}, {"frequency_penalty": -2.5}, {"logprobs": 21},
                {"logit_bias": {0: float("inf")}}, {"logit_bias": {-1: 1.0}}):
        with pytest.raises(EdgeftError):
            SamplingParams(**bad)
    assert SamplingParams(logit_bias={5: 1}).logit_bias == ((5, 1.0),)


class Recorder:
    """A processor that bans one token and remembers what it was told was chosen."""

    def __init__(self, banned: int) -> None:
        self.banned, self.accepted = banned, []

    def __call__(self, logits):
        logits[self.banned] = -np.inf
        return logits

    def accept(self, token):
        self.accepted.append(token)


def test_an_extra_processor_joins_the_chain(llama):
    assert isinstance(Recorder(0), LogitProcessor)
    plain = llama.generate(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True))
    rec = Recorder(plain.token_ids[0])
    out = llama.generate(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True), processors=[rec])
    assert out.token_ids[0] != plain.token_ids[0] and plain.token_ids[0] not in out.token_ids
    assert rec.accepted == out.token_ids


def test_ignore_eos_runs_to_the_budget(llama):
    eos = sorted(llama.eos_ids)[0]
    forced = SamplingParams(max_new_tokens=6, logit_bias={eos: 100.0})
    assert llama.generate(PROMPT, forced).completion_tokens == 0
    out = llama.generate(PROMPT, SamplingParams(max_new_tokens=6, logit_bias={eos: 100.0}, ignore_eos=True))
    assert out.completion_tokens == 6 and out.finish_reason == "length"


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_are_log_softmax_of_the_processed_logits(llama, temperature):
    params = SamplingParams(max_new_tokens=6, temperature=temperature, seed=2, logprobs=3, ignore_eos=True,
                            presence_penalty=0.5)
    ids = llama.encode(PROMPT)
    out = llama.generate(ids, params)
    assert len(out.logprobs) == out.completion_tokens == 6
    rows = llama.score(ids + out.token_ids)[len(ids) - 1:]
    seen: dict[int, int] = {}
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = rows[i].copy()
        for t in seen:
            row[t] -= 0.5
        ref = log_softmax(row)
        assert lp.token == tok and abs(lp.logprob - ref[tok]) < 1e-4
        assert [t for t, _ in lp.top] == np.argsort(-ref)[:3].tolist()
        assert np.allclose([v for _, v in lp.top], np.sort(ref)[::-1][:3], atol=1e-4)
        seen[tok] = seen.get(tok, 0) + 1


def test_typical_p_keeps_the_tokens_closest_to_the_entropy():
    # p = .5, .3, .15, .05: entropy 1.142 nats; |-log p - H| = .449, .062, .755, 1.853, so token 1 is the most
    # typical, then 0 (transformers' TypicalLogitsWarper keeps them in that order until typical_p is reached).
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    ids, p = candidates(logits, 0, 1.0, typical_p=0.2)
    assert ids.tolist() == [1] and p.tolist() == [1.0]
    ids, p = candidates(logits, 0, 1.0, typical_p=0.5)
    assert ids.tolist() == [0, 1] and p == pytest.approx([0.625, 0.375])
    assert candidates(logits, 0, 1.0, typical_p=1.0)[0] is None
    with pytest.raises(EdgeftError, match="typical_p"):
        SamplingParams(typical_p=0)


def test_typical_p_narrows_a_seeded_draw_to_the_typical_token(llama):
    """With a tiny typical_p each step keeps one token (the most typical): every seed gives the same text."""
    ids = llama.encode(PROMPT)
    texts = {llama.generate(ids, SamplingParams(max_new_tokens=8, temperature=1.0, seed=s, typical_p=1e-6,
                                                ignore_eos=True)).text for s in range(4)}
    assert len(texts) == 1
    free = {llama.generate(ids, SamplingParams(max_new_tokens=8, temperature=1.0, seed=s, ignore_eos=True)).text
            for s in range(4)}
    assert len(free) > 1
    greedy = llama.generate(ids, SamplingParams(max_new_tokens=8, ignore_eos=True, typical_p=1e-6)).text
    assert greedy == llama.generate(ids, SamplingParams(max_new_tokens=8, ignore_eos=True)).text  # greedy ignores it
