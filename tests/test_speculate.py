"""Prompt-lookup speculative decoding: the drafter, its on/off switch, and output equal to plain decoding.

On the tiny llama (GQA, shared KV buffer) and GPT-2 (past/present graph): greedy and
seeded sampling give the same tokens with drafts as without, under a JSON-schema mask,
penalties, stop strings and token budgets that end inside a draft; the chain's ``accept``
sees exactly the output tokens; drafts were really verified (accepted > 0).
"""

from __future__ import annotations

import pytest
from runtime_artifacts import build

from edgeft.errors import EdgeftError
from edgeft.runtime import Constraint, Generator, SamplingParams, compile_for
from edgeft.runtime.generate import PromptCache
from edgeft.runtime.speculate import RETRY, Lookup, SpecCounts, Speculation, Speculator

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "tags": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 6}}}}
PROMPTS = ["shall i compare thee to a summer's day? shall i compare thee to a summer's day? shall i",
           "rough winds do shake the darling buds of may, and summer's lease hath all too short a date",
           "o"]


# ---------------------------------------------------------------- the drafter and the switch


def test_lookup_drafts_what_followed_the_latest_earlier_match():
    assert Lookup([2, 3, 5, 2, 3, 6, 2, 3]).draft(3) == [6, 2, 3]  # the latest earlier (2, 3), not the first
    lk = Lookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    assert lk.draft(3) == [4, 5, 9]  # the longest suffix that matches wins: (1, 2, 3) over the later (2, 3)
    lk.extend([7])
    assert lk.draft(4) == [8, 1, 2, 3]  # the index learns as tokens come
    assert Lookup([5, 6, 7]).draft(4) == []  # nothing repeats: no draft
    assert Lookup([5, 6, 5]).draft(4) == []  # single tokens are not looked up (NGRAM_MIN = 2)
    assert Lookup([1, 2, 1, 2]).draft(5) == [1, 2, 1, 2, 1]  # a loop copied past the end keeps looping


def test_auto_mode_pauses_below_break_even_and_retries_later():
    tokens = [1, 2, 3] * 10
    spec = Speculator(tokens, Speculation.auto)
    assert spec.draft(4) == [1, 2, 3, 1]
    for _ in range(3):
        spec.record(4, 0)  # below BREAK_EVEN
    paused = [spec.draft(4) for _ in range(RETRY)]
    assert paused == [[]] * RETRY  # off for RETRY steps
    assert spec.draft(4) == [1, 2]  # then tried again, with a draft shortened by the misses
    spec.record(2, 2)
    assert spec.draft(8) == [1, 2, 3, 1]  # a draft accepted whole lengthens the next one
    assert (spec.counts.drafted, spec.counts.accepted, spec.counts.steps) == (14, 2, 4)
    on = Speculator(tokens, Speculation.on)
    for _ in range(10):
        on.record(4, 0)
    assert on.draft(4) == [1, 2]  # "on" never pauses (the draft shrank to DRAFT_MIN)
    assert Speculator(tokens, "off").draft(4) == []


def test_speculate_setting_is_validated():
    assert SamplingParams(speculate="on").speculate is Speculation.on
    with pytest.raises(EdgeftError, match="auto, on or off"):
        SamplingParams(speculate="sometimes")


# ---------------------------------------------------------------- through the generator


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def gen(request, tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory):
    src = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    return Generator.open(build(request.param, str(src), str(tmp_path_factory.getbasetemp() / "runtime-artifacts")),
                          threads=1)


class Recorder:
    """A processor that records every token its ``accept`` is told about."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def __call__(self, logits):
        return logits

    def accept(self, token):
        self.accepted.append(token)


def _both(gen, prompt, params, processors=lambda: []):
    """(plain completion, speculative completion, its counts)."""
    from dataclasses import replace

    plain = gen.generate(prompt, replace(params, speculate=Speculation.off), processors=processors())
    counts = SpecCounts()
    ids = gen.encode(prompt)
    from edgeft.runtime.generate import collect

    spec = collect(gen.stream(ids, replace(params, speculate=Speculation.on), processors=processors(), counts=counts),
                   len(ids), params)
    return plain, spec, counts


@pytest.mark.parametrize("max_new", [40, 7])
def test_greedy_output_equals_plain_decoding(gen, max_new):
    total = SpecCounts()
    for prompt in PROMPTS:
        plain, spec, counts = _both(gen, prompt, SamplingParams(max_new_tokens=max_new))
        assert spec.token_ids == plain.token_ids and spec.text == plain.text
        assert spec.finish_reason == plain.finish_reason
        total.add(counts)
    assert total.steps > 0 and total.accepted > 0, total  # drafts were made and some were right


def test_seeded_sampling_and_penalties_are_unchanged(gen):
    params = SamplingParams(max_new_tokens=48, temperature=0.8, top_k=20, seed=7, repetition_penalty=1.1,
                            frequency_penalty=0.2)
    for prompt in PROMPTS[:2]:
        plain, spec, _ = _both(gen, prompt, params)
        assert spec.token_ids == plain.token_ids


def test_stop_strings_end_inside_a_draft_as_they_would_without(gen):
    plain = gen.generate(PROMPTS[0], SamplingParams(max_new_tokens=40, speculate="off"))
    if len(plain.text) < 12:
        pytest.skip("the tiny model said too little to cut")
    stop = plain.text[len(plain.text) // 2:len(plain.text) // 2 + 3]
    a, b, _ = _both(gen, PROMPTS[0], SamplingParams(max_new_tokens=40, stop=(stop,)))
    assert (b.text, b.finish_reason, b.token_ids) == (a.text, a.finish_reason, a.token_ids)


def test_the_chain_accepts_only_output_tokens_and_json_stays_valid(gen):
    recs: list[Recorder] = []

    def procs():
        recs.append(Recorder())
        return [recs[-1]]

    plain, spec, counts = _both(gen, PROMPTS[0], SamplingParams(max_new_tokens=40), procs)
    assert recs[1].accepted == spec.token_ids == recs[0].accepted == plain.token_ids
    grammar = compile_for(gen, Constraint.json_schema(SCHEMA))
    for prompt in PROMPTS:
        a, b, _ = _both(gen, prompt, SamplingParams(max_new_tokens=60), lambda: [grammar.mask()])
        assert b.token_ids == a.token_ids and b.text == a.text


def test_a_conversation_cache_stays_consistent_with_drafts(gen):
    """A second turn reusing the cache of a speculative first turn sees what it would see plain."""
    outs = {}
    for mode in ("off", "on"):
        cache, texts = PromptCache(), []
        prompt = PROMPTS[0]
        for _ in range(2):
            ids = gen.encode(prompt)
            chunks = list(gen.stream(ids, SamplingParams(max_new_tokens=24, speculate=mode), cache=cache))
            text = "".join(c.text for c in chunks)
            assert len(cache.tokens) == cache.state.length  # the cache knows exactly what it holds
            texts.append(text)
            prompt = prompt + text + " and so"
        outs[mode] = texts
    assert outs["on"] == outs["off"]


# ---------------------------------------------------------------- through the batching engine


def _engine_run(engine, jobs):
    """Submit (ids, params, processors) jobs together; their token ids once all finished."""
    import threading

    outs = [[] for _ in jobs]
    left = threading.Semaphore(0)

    def receiver(i):
        def on_chunk(chunk):
            if isinstance(chunk, BaseException):
                outs[i].append(chunk)
                left.release()
                return
            if chunk.token_id is not None:
                outs[i].append(chunk.token_id)
            if chunk.finish_reason is not None:
                left.release()
        return on_chunk

    for i, (ids, params, procs) in enumerate(jobs):
        engine.submit(ids, params, receiver(i), procs)
    for _ in jobs:
        assert left.acquire(timeout=120), "a sequence never finished"
    for out in outs:
        assert not any(isinstance(t, BaseException) for t in out), out
    return outs


@pytest.mark.parametrize("batching", [None, "none"])
@pytest.mark.parametrize("parallel", [1, 3])
def test_engine_greedy_output_equals_plain_decoding(gen, batching, parallel):
    from edgeft.runtime.engine import Engine

    grammar = compile_for(gen, Constraint.json_schema(SCHEMA))
    jobs = [(gen.encode(p), SamplingParams(max_new_tokens=40, speculate=mode), [])
            for p in PROMPTS for mode in ("on", "auto")]
    jobs.append((gen.encode(PROMPTS[0]), SamplingParams(max_new_tokens=50, speculate="on"), [grammar.mask()]))
    engine = Engine(gen, parallel=parallel, ctx_size=parallel * 128, batching=batching, queue_size=len(jobs))
    try:
        outs = _engine_run(engine, jobs)
    finally:
        engine.close()
    for (ids, params, procs), out in zip(jobs, outs):
        fresh = [grammar.mask()] if procs else []
        plain = gen.generate(ids, SamplingParams(max_new_tokens=params.max_new_tokens, speculate="off"), fresh)
        assert out == plain.token_ids
    if engine.kind == "padded":  # the left-padded batch decodes plainly
        assert engine.stats.drafted == 0
    else:
        assert engine.stats.drafted > 0 and engine.stats.accepted > 0, engine.stats


# ---------------------------------------------------------------- the commands


def test_generate_and_chat_print_the_acceptance_rate(llama_art):
    from runtime_artifacts import run

    prompt = PROMPTS[0]
    plain = run("generate", llama_art, prompt, "--max-new-tokens", 30, "--speculate", "off", "--stats")
    spec = run("generate", llama_art, prompt, "--max-new-tokens", 30, "--speculate", "on", "--stats")
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert spec.stdout == plain.stdout
    assert "drafts: none" in plain.stderr
    assert "accepted (" in spec.stderr and " steps" in spec.stderr
    res = run("chat", llama_art, "--max-new-tokens", 8, "--speculate", "on", "--stats", input=f"{prompt}\n/exit\n")
    assert res.exit_code == 0, res.output
    assert "tok/s" in res.stderr and "drafts:" in res.stderr
    bad = run("generate", llama_art, prompt, "--speculate", "sometimes")
    assert bad.exit_code == 2
